"""The seed's quick start, written with sage's names, on the real models (MiniLM, SmolLM2) and
a real annoy index: it answers from the index, and the same pipeline as Python, as a bash
script and as a YAML file gives the same records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_cli.api import LocalEnvironment
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage
from tests.index_fixture import tiny_index

QUESTIONS = [
    {"id": "q1", "query": "What is the capital of France?"},
    {"id": "q2", "query": "How do I open a file in Python?"},
]


def quick_start() -> LocalEnvironment:
    """The seed README's program: Retriever -> QAPromptor -> Generator -> a sink."""
    env = LocalEnvironment("rag_pipeline")
    (
        env.from_source("questions.ndjson")
        .map("retrieve", index="idx", top_k=2)
        .map("prompt", template="qa")
        .map("generate", max_tokens=32, temperature=0)
        .sink("answers.ndjson")
    )
    return env


def workdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    (path / "questions.ndjson").write_bytes(ndjson(QUESTIONS))
    tiny_index(path / "idx")
    return path


def comparable(path: Path) -> list[dict]:
    """The records, without the one field that is a timing (usage.seconds)."""
    records = parse_ndjson(path.read_bytes())
    for r in records:
        r["usage"].pop("seconds", None)
    return records


@pytest.mark.model
@pytest.mark.slow
def test_the_seeds_quick_start_answers_from_the_index_in_three_spellings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = quick_start()
    py = workdir(tmp_path, "python")
    monkeypatch.chdir(py)
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache-python"))
    counts = env.submit()
    assert [(c.stage, c.records_in) for c in counts] == [
        ("source", 2),
        ("retrieve", 2),
        ("prompt", 2),
        ("generate", 2),
        ("sink", 2),
    ]
    answers = {r["id"]: r for r in parse_ndjson((py / "answers.ndjson").read_bytes())}
    paris, file = answers["q1"], answers["q2"]
    assert paris["docs"][0]["id"] == "paris" and file["docs"][0]["id"] == "file"
    assert "Paris" in paris["answer"], paris["answer"]
    assert "open" in file["answer"].lower(), file["answer"]
    assert all(r["usage"]["completion_tokens"] > 0 for r in answers.values())

    bin_dir = str(Path(sys.executable).parent)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    sh = workdir(tmp_path, "bash")
    (sh / "rag.sh").write_text(env.to_script())
    result = subprocess.run(
        ["bash", "rag.sh"],
        cwd=sh,
        env=clean_env(PATH=path, SAGE_CACHE_DIR=str(tmp_path / "cache-bash")),
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]

    ya = workdir(tmp_path, "yaml")
    (ya / "rag.yaml").write_text(env.to_yaml())
    result = run_sage(
        "run",
        "--quiet",
        "rag.yaml",
        cwd=ya,
        env=clean_env(PATH=path, SAGE_CACHE_DIR=str(tmp_path / "cache-yaml")),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]

    expected = comparable(py / "answers.ndjson")
    assert comparable(sh / "answers.ndjson") == expected
    assert comparable(ya / "answers.ndjson") == expected


@pytest.mark.model
def test_an_index_built_in_python_answers_retrieval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.index_fixture import DOCS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache"))
    env = LocalEnvironment("ingest")
    built: list[dict] = []
    (
        env.from_batch(dict(d) for d in DOCS)
        .flatmap("chunk", size=200)
        .map("embed")
        .map("index build", "idx/")  # a whole-input verb: one summary record at the end
        .sink(built.append)
    )
    env.submit()
    assert built[0]["count"] == len(DOCS) and built[0]["dimension"] == 384
    hits: list[dict] = []
    env = LocalEnvironment("ask")
    env.from_batch(["Which city is the capital of France?"]).map(
        "retrieve", index="idx/", top_k=1
    ).sink(hits.append)
    env.submit()
    assert hits[0]["docs"][0]["parent_id"] == "paris"
