"""sage embed: through the CLI (tiny model for plumbing, the real MiniLM for meaning)."""

from __future__ import annotations

import base64
import shutil

import numpy as np
import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage

DOCS = [
    {"id": "1", "text": "the cat sits on the mat"},
    {"id": "2", "content": "a kitten"},
    {"id": "3", "text": "the stock market fell", "metadata": {"src": "news"}},
]


@pytest.fixture(autouse=True)
def env(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny BERT answers to `minilm-l6`; a fresh cache per test."""
    monkeypatch.setenv("SAGE_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAGE_THREADS", "1")
    return tmp_path / "cache"


def test_embeds_every_record(cli):
    result = cli("embed", input=ndjson(DOCS))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == ["1", "2", "3"]
    assert out[2]["metadata"] == {"src": "news"}
    for r in out:
        assert len(r["embedding"]) == 32
        assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5
        assert r["embedding_model"]["name"] == "minilm-l6"
        assert len(r["embedding_model"]["sha256"]) == 64


def test_b64_and_field(cli):
    result = cli(
        "embed", "--format", "b64", "--field", "title", input=ndjson([{"title": "python"}])
    )
    assert result.exit_code == 0, result.stderr
    rec = parse_ndjson(result.stdout)[0]
    assert "embedding" not in rec
    assert len(base64.b64decode(rec["embedding_b64"])) == 32 * 4


def test_second_run_comes_from_the_cache(cli, env):
    first = cli("embed", "--progress", input=ndjson(DOCS))
    assert "3 text(s): 3 embedded, 0 from the cache" in first.stderr
    more = [*DOCS, {"id": "4", "text": "something new"}]
    second = cli("embed", "--progress", input=ndjson(more))
    assert second.exit_code == 0, second.stderr
    assert "4 text(s): 1 embedded, 3 from the cache" in second.stderr
    assert parse_ndjson(second.stdout)[:3] == parse_ndjson(first.stdout)
    assert (env / "embed.sqlite").exists()
    fresh = cli("embed", "--progress", "--no-cache", input=ndjson(DOCS))
    assert "3 text(s): 3 embedded, 0 from the cache" in fresh.stderr


def test_quiet_run_prints_no_summary(cli):
    result = cli("embed", "--progress", "--quiet", input=ndjson(DOCS))
    assert result.exit_code == 0 and "from the cache" not in result.stderr


def test_record_without_the_field(cli):
    bad = [DOCS[0], {"id": "x", "body": "no text"}, DOCS[2]]
    result = cli("embed", input=ndjson(bad))
    assert result.exit_code == 65
    assert "stdin:2" in result.stderr and "no 'text' field" in result.stderr
    assert [r["id"] for r in parse_ndjson(result.stdout)] == ["1"]
    skipped = cli("embed", "--on-error", "emit", input=ndjson(bad))
    assert skipped.exit_code == 0
    out = parse_ndjson(skipped.stdout)
    assert "_error" in out[1] and "embedding" in out[0] and "embedding" in out[2]


def test_missing_model_is_69(cli, tmp_path):
    result = cli("embed", "--model", str(tmp_path / "nope.gguf"), input=ndjson(DOCS))
    assert result.exit_code == 69 and "nope.gguf" in result.stderr


def test_corrupt_default_model_is_69_without_abort(tmp_path, tiny_bert):
    """A real process with a truncated model first in SAGE_MODEL_DIR: one line, exit 69."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "all-MiniLM-L6-v2.f16.gguf").write_bytes(tiny_bert.read_bytes()[:4000])
    proc = run_sage(
        "embed",
        input=ndjson(DOCS),
        env=clean_env(SAGE_MODEL_DIR=str(models), SAGE_CACHE_DIR=str(tmp_path)),
    )
    assert proc.returncode == 69, proc.stderr
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "not a valid GGUF" in err and "sage models install" in err


def test_model_by_path_and_threads(cli, tiny_bert, tmp_path):
    copy = tmp_path / "mine.gguf"
    shutil.copy(tiny_bert, copy)
    result = cli("embed", "--model", str(copy), "--threads", "1", input=ndjson(DOCS[:1]))
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout)[0]["embedding_model"]["name"] == "mine.gguf"


@pytest.mark.model
def test_real_model_similarity(monkeypatch):
    monkeypatch.delenv("SAGE_MODEL_DIR")
    pairs = [
        {"id": "cat", "text": "The cat sits on the mat"},
        {"id": "kitten", "text": "A kitten is on the rug"},
        {"id": "market", "text": "The stock market fell sharply today"},
    ]
    proc = run_sage("embed", input=ndjson(pairs), env=clean_env(SAGE_THREADS="2"))
    assert proc.returncode == 0, proc.stderr
    v = {r["id"]: np.array(r["embedding"]) for r in parse_ndjson(proc.stdout)}
    assert len(v["cat"]) == 384
    assert float(v["cat"] @ v["kitten"]) == pytest.approx(0.60, abs=0.03)
    assert float(v["cat"] @ v["market"]) < 0.2
