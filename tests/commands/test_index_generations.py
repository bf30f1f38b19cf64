"""A reader never mixes two generations of an index (issue 17): `sage retrieve --mode bm25`
already running while `sage index build` replaces the index keeps the index it opened, BM25
statistics included (they used to be loaded lazily, by path, from the new index)."""

import subprocess
import time
from pathlib import Path

import orjson

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv


def _docs(fruit: str, n: int) -> list[dict]:
    # bare vectors (no model): a bm25 reader never loads an embedding model
    return [
        {"id": f"{fruit}{i}", "text": f"{fruit} number{i} is a ripe {fruit}", "embedding": [1.0, i]}
        for i in range(n)
    ]


def _build(index: Path, docs: list[dict]) -> None:
    result = run_sage("index", "build", str(index), input=ndjson(docs))
    assert result.returncode == 0, result.stderr


def _wait_mapped(proc: subprocess.Popen, path: Path, timeout: float = 30) -> None:
    """Until process `proc` has `path` memory-mapped (the reader has opened the index)."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{proc.pid}/maps")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if str(path) in maps.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} not opened by the reader within {timeout}s")


def test_running_bm25_reader_keeps_its_generation_while_the_index_is_rebuilt(tmp_path):
    index = tmp_path / "idx"
    _build(index, _docs("apple", 3))
    reader = subprocess.Popen(
        sage_argv(
            "retrieve", "--index", str(index), "--mode", "bm25", "-k", "3", "--line-buffered"
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        _wait_mapped(reader, index / "index.ann")
        _build(index, _docs("banana", 8))  # replaced while the reader holds the old one
        assert run_sage("index", "info", str(index)).returncode == 0
        reader.stdin.write(ndjson([{"id": "q1", "query": "banana number5"}]))
        reader.stdin.write(ndjson([{"id": "q2", "query": "apple number2"}]))
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, err
    banana, apple = parse_ndjson(out)
    # the old generation, whole: no banana in it, and never an apple for a banana query
    assert banana["docs"] == []
    assert apple["docs"][0]["id"] == "apple2" and apple["docs"][0]["text"].startswith("apple")
    assert all(d["id"].startswith("apple") for d in apple["docs"])
    # a reader started now gets the new generation, whole
    fresh = run_sage(
        "retrieve",
        "--index",
        str(index),
        "--mode",
        "bm25",
        "-k",
        "1",
        input=b'{"query":"banana number5"}\n',
    )
    assert fresh.returncode == 0, fresh.stderr
    (hit,) = orjson.loads(fresh.stdout)["docs"]
    assert hit["id"] == "banana5" and "number5" in hit["text"]
