import os

import numpy as np
import orjson
import pytest

from sage_cli.operators.index import ModelRef, write_index
from tests.conftest import ndjson, parse_ndjson
from tests.index_fixture import DOCS


def unit_rows(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedded(n, model="m1", dim=8, seed=0):
    return [
        {"id": f"r{i}", "text": f"text {i}", "embedding": row.tolist(), "embedding_model": model}
        for i, row in enumerate(unit_rows(n, dim, seed))
    ]


def test_build_from_given_embeddings_then_info(cli, tmp_path):
    target = tmp_path / "idx"
    result = cli("index", "build", str(target), input=ndjson(embedded(4)))
    assert result.exit_code == 0, result.stderr
    [summary] = parse_ndjson(result.stdout)
    assert summary["count"] == 4 and summary["dimension"] == 8 and summary["model"] == "m1"
    info = cli("index", "info", str(target))
    assert info.exit_code == 0, info.stderr
    manifest = orjson.loads(info.stdout)
    assert manifest["count"] == 4 and manifest["metric"] == "angular"
    assert manifest["model"]["name"] == "m1" and manifest["build"]["trees"] == 32
    assert set(manifest["files"].values()) <= set(os.listdir(target))


def test_build_refuses_mixed_models_naming_the_record(cli, tmp_path):
    records = embedded(3) + [dict(embedded(1, seed=1)[0], id="odd", embedding_model="m2")]
    result = cli("index", "build", str(tmp_path / "idx"), input=ndjson(records))
    assert result.exit_code == 65
    assert "stdin:4" in result.stderr and "'odd'" in result.stderr and "m2" in result.stderr
    assert not (tmp_path / "idx").exists()


def test_build_refuses_mixed_dimensions(cli, tmp_path):
    records = embedded(2) + embedded(1, dim=4, seed=3)[:1]
    records[2]["id"] = "short"
    result = cli("index", "build", str(tmp_path / "idx"), input=ndjson(records))
    assert (
        result.exit_code == 65 and "'short'" in result.stderr and "4-dimensional" in result.stderr
    )


def test_build_never_replaces_a_foreign_directory(cli, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    result = cli("index", "build", str(tmp_path / "home"), input=ndjson(embedded(2)))
    assert result.exit_code == 2 and "not a sage index" in result.stderr
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


def test_build_with_no_records_writes_nothing(cli, tmp_path):
    result = cli("index", "build", str(tmp_path / "idx"), input=b"")
    assert result.exit_code == 0 and result.stdout == ""
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("damage", ["missing", "foreign", "corrupt", "traversal"])
def test_info_on_bad_index_is_69_with_the_fix(cli, tmp_path, damage):
    path = tmp_path / "idx"
    if damage != "missing":
        write_index(
            path,
            unit_rows(3, 4),
            [{"id": str(i), "text": "t"} for i in range(3)],
            ModelRef("m"),
            trees=2,
        )
    if damage == "foreign":
        (path / "manifest.json").write_text('{"name": "something else"}')
    elif damage == "corrupt":
        (path / "manifest.json").write_text('{"format": "sage-ind')
    elif damage == "traversal":
        manifest = orjson.loads((path / "manifest.json").read_bytes())
        manifest["files"]["records"] = "../../etc/passwd"
        (path / "manifest.json").write_bytes(orjson.dumps(manifest))
    result = cli("index", "info", str(path))
    assert result.exit_code == 69
    assert result.stderr.startswith("sage index info: error:") and result.stderr.count("\n") == 1
    assert "sage index build" in result.stderr or "plain file names" in result.stderr


@pytest.mark.model
def test_build_embeds_text_with_the_real_model(cli, tmp_path):
    result = cli("index", "build", str(tmp_path / "idx"), "--trees", "5", input=ndjson(DOCS))
    assert result.exit_code == 0, result.stderr
    [summary] = parse_ndjson(result.stdout)
    assert summary["model"] == "minilm-l6" and summary["dimension"] == 384
    assert len(summary["model_sha256"]) == 64
    vectors = np.load(tmp_path / "idx" / "vectors.npy", allow_pickle=False)
    assert vectors.shape == (len(DOCS), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


@pytest.mark.model
def test_build_with_progress_tells_the_sentence_vectors_work(sage, tmp_path):
    """The sentence vectors are embedded after the last input record: with --progress that
    work has lines of its own (it was silent: 27 s for the demo corpus)."""
    from tests.conftest import clean_env

    docs = [
        {"id": f"d{i}", "text": f"Topic {i} starts here. It has a second sentence. And a third."}
        for i in range(40)
    ]
    result = sage(
        "index", "build", "--progress", str(tmp_path / "idx"), input=ndjson(docs),
        env=clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache")),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert "sage index build: sentence vectors 0 of 120" in err, err
    assert "sage index build: sentence vectors 120 of 120" in err, err
    [summary] = parse_ndjson(result.stdout)
    assert summary["sentence_vectors"] == 120
