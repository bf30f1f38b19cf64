"""Interop with simonw's `llm` (the real package, its real CLI): what `sage chunk` writes,
projected with `sage sink --format llm`, goes into `llm embed-multi --format nl`, and what
`llm similar` writes (records with `content`) goes back into sage as text or as a query.

llm needs an embedding model: a tiny deterministic one (bag of hashed words) is registered as
an llm plugin from a temporary directory (a module plus its dist-info entry point), loaded
with LLM_LOAD_PLUGINS so no other plugin and no network is involved."""

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv

PLUGIN = """
import zlib

import llm


@llm.hookimpl
def register_embedding_models(register):
    register(HashedWords())


class HashedWords(llm.EmbeddingModel):
    model_id = "sage-test-words"

    def embed_batch(self, texts):
        for text in texts:
            vec = [0.0] * 64
            for word in text.lower().replace(".", " ").split():
                vec[zlib.crc32(word.encode()) % 64] += 1.0
            yield vec
"""

DOCS = [
    {"id": "volcano", "text": "Volcanoes erupt molten rock called lava.", "metadata": {"n": 1}},
    {"id": "penguin", "text": "Penguins are birds that cannot fly.", "metadata": {"n": 2}},
    {"id": "train", "text": "The night train to Vienna leaves at ten.", "metadata": {"n": 3}},
]


@pytest.fixture
def llm_env(tmp_path) -> dict[str, str]:
    plugins = tmp_path / "plugins"
    info = plugins / "sage_test_words-0.1.dist-info"
    info.mkdir(parents=True)
    (plugins / "sage_test_words.py").write_text(PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sage-test-words\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[llm]\nsage_test_words = sage_test_words\n")
    return clean_env(
        PYTHONPATH=str(plugins),
        LLM_LOAD_PLUGINS="sage-test-words",
        LLM_USER_PATH=str(tmp_path / "llm-home"),
    )


def _llm(*args: str, env: dict[str, str], input: bytes | None = None):
    llm = Path(sys.executable).parent / "llm"
    return subprocess.run([str(llm), *args], input=input, capture_output=True, env=env, timeout=120)


def test_chunks_go_into_llm_embed_multi_and_llm_results_come_back(tmp_path, llm_env):
    chunked = run_sage("chunk", input=ndjson(DOCS))
    assert chunked.returncode == 0, chunked.stderr
    db = str(tmp_path / "embeddings.db")
    # as `sage chunk` writes them, llm cannot take the records: the metadata object breaks it
    raw = _llm("embed-multi", "docs", "-", "--format", "nl", "-m", "sage-test-words",
               "-d", db, env=llm_env, input=chunked.stdout)  # fmt: skip
    assert raw.returncode != 0 and b"dict" in raw.stderr, raw.stderr
    # one flag makes them what llm reads
    projected = run_sage("sink", "--format", "llm", input=chunked.stdout)
    assert projected.returncode == 0, projected.stderr
    lines = parse_ndjson(projected.stdout)
    assert lines[0] == {"id": "volcano#0", "content": DOCS[0]["text"]}
    embedded = _llm("embed-multi", "docs", "-", "--format", "nl", "-m", "sage-test-words",
                    "--store", "-d", db, env=llm_env, input=projected.stdout)  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    similar = _llm("similar", "docs", "-c", "when does the train to Vienna leave", "-n", "1",
                   "-d", db, env=llm_env)  # fmt: skip
    assert similar.returncode == 0, similar.stderr
    (hit,) = parse_ndjson(similar.stdout)
    assert hit["id"] == "train#0" and hit["content"] == DOCS[2]["text"]

    # llm's shape (`content`) back into sage: as a document to chunk and as a query
    rechunked = run_sage("chunk", input=similar.stdout)
    assert rechunked.returncode == 0, rechunked.stderr
    assert parse_ndjson(rechunked.stdout)[0]["text"] == DOCS[2]["text"]
    index = tmp_path / "idx"
    vectors = [dict(d, embedding=[1.0, float(i)]) for i, d in enumerate(DOCS)]
    built = run_sage("index", "build", str(index), input=ndjson(vectors))
    assert built.returncode == 0, built.stderr
    query = ndjson([{"id": "q", "content": "penguins that cannot fly"}])
    retrieved = subprocess.run(
        sage_argv("retrieve", "--index", str(index), "--mode", "bm25", "-k", "1"),
        input=query,
        capture_output=True,
        env=clean_env(),
    )
    assert retrieved.returncode == 0, retrieved.stderr
    assert orjson.loads(retrieved.stdout)["docs"][0]["id"] == "penguin"
    sourced = run_sage("source", "-", input=query)
    assert parse_ndjson(sourced.stdout) == [{"id": "q", "text": "penguins that cannot fly"}]


def test_sink_format_llm_needs_an_id(tmp_path):
    result = run_sage("sink", "--format", "llm", input=ndjson([{"text": "no id"}]))
    assert result.returncode == 65
    assert b"id" in result.stderr and len(result.stderr.splitlines()) == 1
