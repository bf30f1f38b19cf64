"""`--workers N` (sage_cli/execution/pool.py): order, --unordered, error policy, crashes, streaming."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from typing import Annotated

import orjson
import pytest
import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.execution.pool import worker_kwargs
from sage_cli.operators.base import Operator, ResourceUnavailable
from sage_cli.verbs import OperatorFactory, operator_verb
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv

USER_CODE = """
import os, random, time

def slow(r):
    time.sleep(random.random() * 0.0004)
    return {**r, "pid": os.getpid()}

def crash(r):
    if r["id"] == 500:
        os._exit(3)
    return r

def bad(r):
    if r["id"] % 1000 == 7:
        raise ValueError("boom %d" % r["id"])
    return r
"""


@pytest.fixture
def userdir(tmp_path):
    (tmp_path / "usermod.py").write_text(USER_CODE)
    return tmp_path


def records(n: int) -> bytes:
    return ndjson([{"id": i, "text": f"t{i}"} for i in range(n)])


def test_workers_keep_input_order_over_10k_records(userdir):
    result = run_sage(
        "map",
        "--fn",
        "usermod:slow",
        "--workers",
        "2",
        "--batch-size",
        "50",
        input=records(10_000),
        cwd=userdir,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == list(range(10_000))
    assert len({r["pid"] for r in out}) == 2  # both workers took batches


def test_unordered_gives_the_same_multiset(userdir):
    result = run_sage(
        "map",
        "--fn",
        "usermod:slow",
        "--workers",
        "2",
        "--unordered",
        "--batch-size",
        "50",
        input=records(10_000),
        cwd=userdir,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert Counter(r["id"] for r in out) == Counter(range(10_000))


def test_a_worker_that_dies_is_a_clean_error_not_a_hang(userdir):
    t0 = time.monotonic()
    result = run_sage(
        "map",
        "--fn",
        "usermod:crash",
        "--workers",
        "2",
        input=records(10_000),
        cwd=userdir,
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "worker process" in err and "status 3" in err
    assert "Traceback" not in err
    # what was written before the crash is a prefix of the input, in order
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == list(range(len(out)))


@pytest.mark.parametrize("mode", ["fail", "skip", "emit"])
def test_error_policy_is_the_same_as_one_process(userdir, mode):
    dead = {}
    results = {}
    for workers in ("1", "2"):
        path = userdir / f"dead{workers}.ndjson"
        results[workers] = run_sage(
            "map",
            "--fn",
            "usermod:bad",
            "--on-error",
            mode,
            "--errors",
            str(path),
            "--workers",
            workers,
            "--batch-size",
            "100",
            input=records(3000),
            cwd=userdir,
        )
        dead[workers] = parse_ndjson(path.read_bytes()) if path.exists() else []
    one, two = results["1"], results["2"]
    assert two.returncode == one.returncode == (65 if mode == "fail" else 0)
    assert two.stdout == one.stdout
    assert two.stderr == one.stderr
    assert dead["2"] == dead["1"] and len(dead["1"]) == (1 if mode == "fail" else 3)


def test_a_bad_line_stops_after_the_batches_before_it(userdir):
    data = records(1000) + b"not json\n" + records(10)
    one = run_sage("map", "r", "--batch-size", "64", input=data)
    two = run_sage("map", "r", "--workers", "2", "--batch-size", "64", input=data)
    assert one.returncode == two.returncode == 65
    assert two.stdout == one.stdout and len(parse_ndjson(two.stdout)) == 1000
    assert b"stdin:1001" in two.stderr


def test_error_records_pass_through_in_place():
    data = ndjson([{"id": 0}, {"id": 1, "_error": {"stage": "x"}}, {"id": 2}])
    result = run_sage(
        "map", 'r | {"seen": True}', "--workers", "2", "--batch-size", "1", input=data
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == [0, 1, 2]
    assert "seen" not in out[1] and out[0]["seen"] and out[2]["seen"]


def test_output_streams_before_stdin_closes():
    proc = subprocess.Popen(
        sage_argv("map", 'r | {"ok": 1}', "--workers", "2"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"id": 1}\n')
        proc.stdin.flush()
        line = proc.stdout.readline()  # would hang if output waited for EOF
        assert orjson.loads(line) == {"id": 1, "ok": 1}
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


# -- a stateful and a broken operator, registered the way commands/ registers theirs ----------

app = single_command_app()


class Counting(Operator):
    name = "counting"
    stateless = False

    def __init__(self) -> None:
        self.n = 0

    def process(self, batch):
        self.n += len(batch)
        return batch


class NeedsModel(Operator):
    name = "needs-model"

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self) -> None:
        if not os.path.exists(self.path):
            raise ResourceUnavailable(f"{self.path}: no such model; run `sage models install`")

    def process(self, batch):
        return batch


@operator_command(
    app,
    "counting",
    verb=operator_verb("counting", "Count.", "counting", stateful=True, module=__name__),
)
def counting():
    """Count.

    \b
    Examples:
      counting
    """
    return Counting()


def test_workers_on_a_stateful_operator_is_a_usage_error():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["--workers", "2"], input=ndjson([{"a": 1}]))
    assert result.exit_code == 2
    assert "--workers needs a stateless operator" in result.stderr


def build_needs_model(path: Annotated[str, typer.Option("--path")] = "/nonexistent"):
    return NeedsModel(path)


def test_a_worker_that_cannot_load_its_model_exits_69_with_the_reason():
    from sage_cli.cli.command import IOOptions, run_operator

    factory = OperatorFactory("needs-model", build_needs_model, {"path": "/nonexistent/m.gguf"})
    code = run_operator(
        "needs-model", factory(), IOOptions(workers=2), records=iter([{"a": 1}]), factory=factory
    )
    assert code == 69


def test_threads_are_divided_among_workers():
    assert worker_kwargs({"threads": 4, "x": 1}, 2) == {"threads": 2, "x": 1}
    assert worker_kwargs({"threads": 3}, 2) == {"threads": 1}
    assert worker_kwargs({"threads": 1}, 4) == {"threads": 1}
    assert worker_kwargs({"x": 1}, 2) == {"x": 1}
    none = worker_kwargs({"threads": None}, 2)["threads"]
    assert isinstance(none, int) and none >= 1
