"""The model thread's micro-batching (sage_cli/serve/batching.py), with plain Python handlers:
jobs waiting together go into one call, kinds stay apart, each job gets its own result or
exception, a cancelled job never runs, and a stopped worker refuses new jobs."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from sage_cli.serve.batching import ModelWorker, WorkerStopped


class Recorder:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, list]] = []
        self.gate = gate
        self.started = threading.Event()

    def handler(self, kind: str):
        def run(payloads: list) -> list:
            self.started.set()
            if self.gate is not None:
                self.gate.wait(10)
            self.calls.append((kind, list(payloads)))
            return [ValueError(p) if p == "bad" else f"{kind}:{p}" for p in payloads]

        return run


def test_jobs_waiting_while_the_model_is_busy_go_into_one_call():
    gate = threading.Event()
    rec = Recorder(gate)
    worker = ModelWorker({"chat": rec.handler("chat"), "embed": rec.handler("embed")}, window=0)
    worker.start()
    try:
        first = worker.submit("chat", "a")
        assert rec.started.wait(10)  # "a" is being answered: the model is busy
        waiting = [worker.submit("chat", p) for p in ("b", "bad", "c")]
        other = worker.submit("embed", "x")
        gate.set()
        assert first.result(10) == "chat:a"
        assert waiting[0].result(10) == "chat:b" and waiting[2].result(10) == "chat:c"
        with pytest.raises(ValueError):
            waiting[1].result(10)
        assert other.result(10) == "embed:x"
    finally:
        worker.stop(10)
    assert rec.calls == [("chat", ["a"]), ("chat", ["b", "bad", "c"]), ("embed", ["x"])]
    assert worker.batches == {"chat": 2, "embed": 1} and worker.jobs_done == 5


def test_batch_limit_and_cancelled_jobs():
    gate = threading.Event()
    rec = Recorder(gate)
    worker = ModelWorker({"chat": rec.handler("chat")}, window=0, max_batch={"chat": 2})
    worker.start()
    try:
        first = worker.submit("chat", 0)
        assert rec.started.wait(10)
        jobs = [worker.submit("chat", i) for i in range(1, 6)]
        assert jobs[1].cancel()  # its client went away before its turn
        gate.set()
        assert [j.result(10) for j in jobs if j is not jobs[1]] == [
            "chat:1",
            "chat:3",
            "chat:4",
            "chat:5",
        ]
        assert first.result(10) == "chat:0"
        with pytest.raises(CancelledError):
            jobs[1].result(0)
    finally:
        worker.stop(10)
    assert all(len(p) <= 2 for _, p in rec.calls)
    assert [p for _, p in rec.calls for p in p] == [0, 1, 3, 4, 5]


def test_a_handler_that_raises_fails_each_job_of_its_batch_and_the_worker_goes_on():
    calls = []

    def boom(payloads):
        calls.append(payloads)
        if payloads == ["x"]:
            raise RuntimeError("model gone")
        return payloads

    worker = ModelWorker({"k": boom}, window=0)
    worker.start()
    try:
        with pytest.raises(RuntimeError, match="model gone"):
            worker.call("k", "x", timeout=10)
        assert worker.call("k", "y", timeout=10) == "y"
    finally:
        worker.stop(10)


def test_a_stopped_worker_finishes_what_it_has_and_refuses_the_rest():
    worker = ModelWorker({"k": lambda p: p}, window=0)
    worker.start()
    done = worker.submit("k", 1)
    worker.stop(10)
    assert done.result(10) == 1 and not worker.alive
    with pytest.raises(WorkerStopped):
        worker.submit("k", 2).result(1)
    with pytest.raises(KeyError):
        worker.submit("nope", 1)
