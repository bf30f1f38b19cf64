"""sage generate batches records for its batched decoder (--parallel) and in-flight requests
(--concurrency), yet a record written in still comes out before stdin closes: the driver hands
generate what the pipe holds, never waits to fill a batch."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import ndjson
from tests.openai_stub import StubServer
from tests.streaming.test_pipes import LineReader, finish, popen


def one_by_one(*args: str) -> None:
    proc = popen("generate", "--no-cache", *args)
    try:
        out = LineReader(proc.stdout)
        for i in range(3):
            proc.stdin.write(ndjson([{"id": f"r{i}", "prompt": f"say {i}"}]))
            proc.stdin.flush()
            line = out.line(timeout=30)
            assert line is not None, "no answer within 30 s while stdin is open"
            record = orjson.loads(line)
            assert record["id"] == f"r{i}" and "answer" in record
        assert proc.poll() is None, "still running: stdin is open"
        proc.stdin.close()
        rc, stderr = finish(proc)
        assert rc == 0, stderr
    finally:
        proc.kill()
        proc.wait()


def test_batched_local_model_answers_each_record_as_it_comes(tiny_llama):
    one_by_one("--model", str(tiny_llama), "--parallel", "4", "--max-tokens", "4")


@pytest.mark.parametrize("concurrency", ["1", "4"])
def test_concurrent_requests_answer_each_record_as_it_comes(concurrency):
    with StubServer() as stub:
        one_by_one(
            "--backend", "openai", "--base-url", f"{stub.url}/ok/v1", "--concurrency", concurrency
        )
