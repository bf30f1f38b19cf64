import pytest

from tests.conftest import ndjson, parse_ndjson
from tests.index_fixture import tiny_index


def test_rerank_mmr_with_given_embeddings(cli):
    rec = {
        "query": "q",
        "embedding": [1.0, 0.0, 0.0],
        "docs": [
            {"id": "a", "text": "A", "score": 0.9, "embedding": [0.9, 0.1, 0.0]},
            {"id": "b", "text": "B", "score": 0.8, "embedding": [0.9, 0.11, 0.0]},
            {"id": "c", "text": "C", "score": 0.5, "embedding": [0.7, 0.0, 0.7]},
        ],
    }
    result = cli("rerank", "--method", "mmr", "--lambda", "0.5", "-k", "2", input=ndjson([rec]))
    assert result.exit_code == 0, result.stderr
    [out] = parse_ndjson(result.stdout)
    assert [d["id"] for d in out["docs"]] == ["a", "c"]
    assert [d["retrieval_score"] for d in out["docs"]] == [0.9, 0.5]


def test_rerank_phrase_needs_no_model(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("SAGE_MODEL_DIR", str(tmp_path))  # no model anywhere to load
    rec = {
        "query": "Which statement is used for repeated execution?",
        "docs": [
            {"id": "compound", "text": "Compound statements hold other statements.", "score": 0.9},
            {
                "id": "while",
                "text": "The while statement is used for repeated execution.",
                "score": 0.85,
            },
            {
                "id": "if",
                "text": "The if statement is used for conditional execution.",
                "score": 0.1,
            },
        ],
    }
    result = cli("rerank", "--method", "phrase", "-k", "2", input=ndjson([rec]))
    assert result.exit_code == 0, result.stderr
    [out] = parse_ndjson(result.stdout)
    assert [d["id"] for d in out["docs"]] == ["while", "compound"]
    assert [d["retrieval_score"] for d in out["docs"]] == [0.85, 0.9]
    # 0.85 scaled over 0.1..0.9 is 0.9375; five query word pairs found add 0.5
    assert [d["score"] for d in out["docs"]] == [1.4375, 1.0]


def test_rerank_without_docs_is_data_error(cli):
    result = cli("rerank", input=ndjson([{"query": "q"}]))
    assert result.exit_code == 65 and "'docs'" in result.stderr


@pytest.mark.model
def test_rerank_mmr_with_index_vectors(cli, tmp_path):
    idx = tiny_index(tmp_path / "idx")
    got = cli(
        "retrieve",
        "--index",
        str(idx),
        "-k",
        "4",
        input=ndjson([{"query": "Python programming: files and lists"}]),
    )
    assert got.exit_code == 0, got.stderr
    result = cli(
        "rerank", "--method", "mmr", "--index", str(idx), "--lambda", "0.7", input=got.stdout
    )
    assert result.exit_code == 0, result.stderr
    [out] = parse_ndjson(result.stdout)
    assert {d["id"] for d in out["docs"][:2]} == {"file", "list"}
    assert [d["rank"] for d in out["docs"]] == [1, 2, 3, 4]


@pytest.mark.model
def test_rerank_llm_with_the_real_model_is_deterministic(cli):
    rec = {
        "query": "How do I open a file in Python?",
        "docs": [
            {"id": "stock", "text": "The stock market fell sharply today.", "score": 0.9},
            {
                "id": "file",
                "text": "To open a file in Python, use the open() built-in.",
                "score": 0.1,
            },
        ],
    }
    first = cli("rerank", "--method", "llm", input=ndjson([rec]))
    assert first.exit_code == 0, first.stderr
    [out] = parse_ndjson(first.stdout)
    assert [d["id"] for d in out["docs"]] == ["file", "stock"]
    assert 0 <= out["docs"][1]["score"] < out["docs"][0]["score"] <= 10
    again = cli("rerank", "--method", "llm", input=ndjson([rec]))
    assert again.stdout == first.stdout


@pytest.mark.model
def test_default_rerank_sentence_with_the_real_model_finds_the_answering_sentence(cli):
    """The gold doc is retrieved second and shares no word pair with the question; the real
    MiniLM matches the question to its one answering sentence and puts it first, where the
    phrase method keeps the retrieved order."""
    rec = {
        "query": "How do I make my program wait a couple of seconds?",
        "docs": [
            {
                "id": "time.time",
                "text": "Return the current time in seconds since the Epoch. "
                "Fractions of a second may be present if the system clock provides them.",
                "score": 0.9,
            },
            {
                "id": "time.sleep",
                "text": "This function is found in the time module. "
                "Delay execution for a given time, in seconds.",
                "score": 0.88,
            },
            {
                "id": "math.pi",
                "text": "The ratio of a circle's circumference to its diameter.",
                "score": 0.1,
            },
        ],
    }
    phrase = cli("rerank", "--method", "phrase", input=ndjson([rec]))
    assert phrase.exit_code == 0, phrase.stderr
    assert [d["id"] for d in parse_ndjson(phrase.stdout)[0]["docs"]][0] == "time.time"
    result = cli("rerank", "-k", "2", input=ndjson([rec]))  # the default method
    assert result.exit_code == 0, result.stderr
    [out] = parse_ndjson(result.stdout)
    assert [d["id"] for d in out["docs"]] == ["time.sleep", "time.time"]
    assert [d["retrieval_score"] for d in out["docs"]] == [0.88, 0.9]
    assert out["docs"][0]["score"] > out["docs"][1]["score"] > 1.0  # 0..1 + 2 * a cosine


def test_default_rerank_refuses_an_unknown_or_missing_model_at_start(cli, tmp_path):
    rec = {"query": "q", "docs": [{"id": "a", "text": "A b."}]}
    unknown = cli("rerank", "--model", "nope", input=ndjson([rec]))
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.stderr
    assert unknown.stdout == "" and "stdin:1" not in unknown.stderr  # not a record's error
    missing = cli("rerank", "--model", str(tmp_path / "gone.gguf"), input=ndjson([rec]))
    assert missing.exit_code == 69 and "model file not found" in missing.stderr
