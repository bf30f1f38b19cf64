"""sage doctor: a row per check, a fix per failure, exit 0 / 69 (models) / 1 (anything else)."""

from __future__ import annotations

import shutil

import pytest

from sage_cli.cli import doctor as doc
from tests.conftest import parse_ndjson

MINILM = "all-MiniLM-L6-v2.f16.gguf"
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def healthy(tmp_path, tiny_llama, tiny_bert, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_bert, d / MINILM)
    shutil.copy(tiny_llama, d / SMOLLM)
    monkeypatch.setenv("SAGE_MODEL_DIR", str(d))
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache"))
    return d


def checks(result):
    return {r["check"]: r for r in parse_ndjson(result.stdout)}


def test_all_well(cli, healthy):
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    rows = checks(result)
    assert rows["python"]["status"] == "ok" and rows["python"]["detail"].startswith("3.")
    for dep in ("numpy", "orjson", "llama-cpp-python", "gguf", "annoy", "typer"):
        assert rows[dep]["status"] == "ok", rows[dep]
    assert "AVX" in rows["llama.cpp build"]["detail"] or rows["llama.cpp build"]["status"] == "ok"
    assert rows["model minilm-l6"]["detail"].startswith(str(healthy / MINILM))
    assert rows["cache dir"]["status"] == "ok"
    assert all(r["fix"] == "" for r in rows.values() if r["status"] == "ok")


def test_plain_table_when_piped(cli, healthy):
    result = cli("doctor")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert any(line.startswith("model smollm2-135m") and " ok " in line for line in lines)


def test_corrupt_model_is_69_with_the_fix(cli, healthy):
    (healthy / MINILM).write_bytes(b"GGUF\x03\x00\x00\x00")
    result = cli("doctor")
    assert result.exit_code == 69
    assert "fix model minilm-l6: run `sage models install`" in result.stdout
    assert "1 check(s) failed: model minilm-l6" in result.stderr
    rows = checks(cli("doctor", "--json"))
    assert rows["model minilm-l6"]["status"] == "FAIL"
    assert "truncated" in rows["model minilm-l6"]["detail"]


def test_unwritable_cache_dir_is_1(cli, healthy, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SAGE_CACHE_DIR", str(blocker / "cache"))
    result = cli("doctor", "--json")
    assert result.exit_code == 1
    row = checks(result)["cache dir"]
    assert row["status"] == "FAIL" and "SAGE_CACHE_DIR" in row["fix"]


def test_missing_dependency_is_reported(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def version(dist):
        if dist == "annoy":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    check = doc.check_dependency("annoy==1.17.3")
    assert check.failed and "pip install sage-pipes" in check.fix
    assert doc.exit_code([check]) == 1


def test_pinned_version_mismatch():
    check = doc.check_dependency("numpy==0.0.1")
    assert check.failed and "0.0.1 required" in check.detail
    assert not doc.check_dependency("numpy>=1").failed


def test_model_failures_outrank_others():
    model = doc.Check("model x", "FAIL", "gone", kind="model")
    other = doc.Check("cache dir", "FAIL", "nope")
    warn = doc.Check("cpu features", "warn", "slow")
    assert doc.exit_code([other, model]) == 69
    assert doc.exit_code([other]) == 1
    assert doc.exit_code([warn]) == 0
