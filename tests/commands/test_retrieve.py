import numpy as np
import orjson
import pytest

from sage_cli.operators.index import ModelRef, write_index
from tests.conftest import ndjson, parse_ndjson, run_sage
from tests.index_fixture import tiny_index


def bm25_index(path):
    texts = ["the cat sits on the mat", "open a file with open()", "stock markets fell"]
    rows = np.eye(3, 4, dtype=np.float32)
    write_index(
        path,
        rows,
        [{"id": f"t{i}", "text": t, "metadata": {"i": i}} for i, t in enumerate(texts)],
        ModelRef("m"),
        trees=2,
    )
    return path


def test_bm25_mode_needs_no_model(cli, tmp_path):
    idx = bm25_index(tmp_path / "idx")
    result = cli(
        "retrieve",
        "--index",
        str(idx),
        "--mode",
        "bm25",
        "-k",
        "2",
        input=ndjson([{"id": "q1", "query": "how to open a file", "keep": True}]),
    )
    assert result.exit_code == 0, result.stderr
    [out] = parse_ndjson(result.stdout)
    assert out["keep"] is True
    hit = out["docs"][0]
    assert hit["id"] == "t1" and hit["rank"] == 1 and hit["query_id"] == "q1"
    assert hit["text"] == "open a file with open()" and hit["metadata"] == {"i": 1}
    assert hit["score"] > 0


def test_empty_query_is_a_record_error(cli, tmp_path):
    idx = bm25_index(tmp_path / "idx")
    result = cli(
        "retrieve",
        "--index",
        str(idx),
        "--mode",
        "bm25",
        "--on-error",
        "emit",
        input=ndjson([{"query": ""}, {"query": "cat"}]),
    )
    assert result.exit_code == 0
    out = parse_ndjson(result.stdout)
    assert "empty query" in out[0]["_error"]["error"]
    assert out[1]["docs"][0]["id"] == "t0"


@pytest.mark.parametrize("damage", ["missing", "foreign", "corrupt"])
def test_missing_or_foreign_index_is_69(cli, tmp_path, damage):
    path = tmp_path / "idx"
    if damage != "missing":
        path.mkdir()
        (path / "manifest.json").write_text("{oops" if damage == "corrupt" else "[1, 2]")
    result = cli("retrieve", "--index", str(path), input=ndjson([{"query": "x"}]))
    assert result.exit_code == 69
    assert result.stderr.startswith("sage retrieve: error:") and result.stderr.count("\n") == 1
    assert "sage index build" in result.stderr


@pytest.mark.model
def test_index_built_with_another_model_is_69(cli, tmp_path):
    rows = np.eye(2, 384, dtype=np.float32)
    write_index(
        tmp_path / "idx",
        rows,
        [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}],
        ModelRef("minilm-l6", "0" * 64),
        trees=2,
    )
    result = cli("retrieve", "--index", str(tmp_path / "idx"), input=ndjson([{"query": "x"}]))
    assert result.exit_code == 69
    assert "different model" in result.stderr


@pytest.mark.model
@pytest.mark.parametrize("mode", ["dense", "hybrid"])
@pytest.mark.parametrize("exact", [False, True])
def test_real_model_finds_the_obvious_document(cli, tmp_path, mode, exact):
    idx = tiny_index(tmp_path / "idx")
    queries = [
        {"id": "q1", "query": "How can I read a file in Python?"},
        {"id": "q2", "query": "What is the capital of France?"},
        {"id": "q3", "text": "Is rain expected at the weekend?"},
    ]
    args = ["retrieve", "--index", str(idx), "-k", "3", "--mode", mode]
    result = cli(*args, *(["--exact"] if exact else []), input=ndjson(queries))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["docs"][0]["id"] for r in out] == ["file", "paris", "rain"]
    assert all(len(r["docs"]) == 3 for r in out)


@pytest.mark.model
def test_min_score_and_pipeline_through_real_pipes(tmp_path):
    docs = tmp_path / "docs.ndjson"
    docs.write_bytes(
        ndjson(
            [
                {
                    "id": "guide",
                    "text": "# Cooking\nBoil the pasta for ten minutes.\n\n"
                    "# Gardening\nWater tomatoes every morning in summer.",
                }
            ]
        )
    )
    chunked = run_sage("chunk", "--by", "paragraphs", "--size", "1", str(docs))
    assert chunked.returncode == 0, chunked.stderr
    built = run_sage("index", "build", str(tmp_path / "idx"), input=chunked.stdout)
    assert built.returncode == 0, built.stderr
    found = run_sage(
        "retrieve",
        "--index",
        str(tmp_path / "idx"),
        "-k",
        "2",
        "--mode",
        "dense",
        "--min-score",
        "0.3",
        input=b'{"query": "how long should pasta cook?"}\n',
    )
    assert found.returncode == 0, found.stderr
    [out] = parse_ndjson(found.stdout)
    assert [d["id"] for d in out["docs"]] == ["guide#0"]  # the gardening chunk scores < 0.3
    assert out["docs"][0]["parent_id"] == "guide"
    assert out["docs"][0]["metadata"]["heading"] == "Cooking"
    info = run_sage("index", "info", str(tmp_path / "idx"))
    assert orjson.loads(info.stdout)["count"] == 2


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["floats", "b64"])
def test_embed_then_build_then_retrieve(tmp_path, fmt):
    from tests.index_fixture import DOCS

    embedded = run_sage("embed", "--format", fmt, input=ndjson(DOCS))
    assert embedded.returncode == 0, embedded.stderr
    built = run_sage("index", "build", str(tmp_path / "idx"), input=embedded.stdout)
    assert built.returncode == 0, built.stderr
    manifest = orjson.loads(run_sage("index", "info", str(tmp_path / "idx")).stdout)
    first = parse_ndjson(embedded.stdout)[0]["embedding_model"]
    assert manifest["model"]["name"] == first["name"] == "minilm-l6"
    assert manifest["model"]["sha256"] == first["sha256"]
    found = run_sage(
        "retrieve",
        "--index",
        str(tmp_path / "idx"),
        "-k",
        "1",
        input=b'{"query": "Which city is the capital of France?"}\n',
    )
    assert found.returncode == 0, found.stderr
    assert parse_ndjson(found.stdout)[0]["docs"][0]["id"] == "paris"


def test_raw_text_lines_become_the_query_for_prompt(tmp_path):
    # the pipeline: `source -R | retrieve | prompt` — prompt's {query} must be there
    idx = bm25_index(tmp_path / "idx")
    questions = tmp_path / "questions.txt"
    questions.write_text("how to open a file\n")
    src = run_sage("source", str(questions), "-R")
    ret = run_sage("retrieve", "--index", str(idx), "--mode", "bm25", "-k", "1", input=src.stdout)
    assert ret.returncode == 0, ret.stderr
    [record] = parse_ndjson(ret.stdout)
    assert record["query"] == "how to open a file" and record["docs"][0]["id"] == "t1"
    prompt = run_sage("prompt", "--template", "qa", input=ret.stdout)
    assert prompt.returncode == 0, prompt.stderr
    assert "how to open a file" in parse_ndjson(prompt.stdout)[0]["prompt"]
