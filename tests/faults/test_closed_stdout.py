"""A stage's stdout closed early (issue 6, faults): `sage ... | head -1`, `sage ... | true`.

For every command the CLI offers (the contract table, tests/contract/test_contract.py, says how
to build each): with a stdout pipe whose reader is already gone, the command ends quietly, with
the exit status it has with an open stdout (0 for a record stream) and nothing on stderr that
looks like Python (no traceback, no "BrokenPipeError", no "Exception ignored"). Record streams
are also cut mid-stream: the reader takes one line of a long output and closes. Under `sage
run`, a stage whose consumer went away ends 0 like any sage stage, a non-sage writer killed by
SIGPIPE counts 141 (as under `bash -o pipefail`), and a failing consumer's status is the run's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv
from tests.contract.test_contract import (
    REGISTERED,
    SPECS,
    TOOL,
    argv,
    records,
)

PYTHON_NOISE = ("Traceback", "BrokenPipe", "Exception ignored", "Errno 32", "Broken pipe")

#: tools (no record stream): how to make each one print something. None: not run here (why).
TOOLS: dict[str, list[str] | None] = {
    "index info": ["index", "info", "{index}", "--json"],
    "models list": ["models", "list"],
    "models path": ["models", "path", "minilm-l6"],
    # slow (each loads and runs both models, or converts one: 3-8 s a run) and they print
    # through the same guarded NDJSON/one-object writers as `models list` and `models path`
    "models verify": None,
    "models convert": None,
    "models install": None,
    "doctor": ["doctor"],
    # servers and REPLs write no NDJSON stream to a pipe: serve logs to stderr and answers
    # over HTTP (tests/serve/test_serve.py), studio likewise, chat answers a terminal or a
    # piped question (tests/serve/test_chat.py), mcp speaks JSON-RPC to its client on stdio
    # (tests/serve/test_mcp.py)
    "serve": None,
    "studio": None,
    "chat": None,
    "mcp": None,
    "run": ["run", "--quiet", "{tmp}/pipeline.sh"],
    "trace": ["trace", "{tmp}/run"],
}

#: extra arguments so a model command stays quick
QUICK = {"generate": ["--max-tokens", "2"]}


def test_every_command_is_covered():
    for path in REGISTERED:
        assert path in SPECS, path
        if SPECS[path].kind == TOOL:
            assert path in TOOLS, f"{path}: add it to TOOLS in {__file__}"


def _tool_argv(path: str, tmp_path: Path) -> list[str]:
    from tests.index_fixture import tiny_index

    subs = {"{tmp}": str(tmp_path), "{index}": str(tmp_path / "index")}
    args = TOOLS[path]
    assert args is not None
    if "{index}" in " ".join(args):
        tiny_index(tmp_path / "index")
    if path in ("run", "trace"):
        data = tmp_path / "in.ndjson"
        data.write_bytes(ndjson([{"id": f"r{i}", "text": "t" * 50} for i in range(3000)]))
        (tmp_path / "pipeline.sh").write_text(f"sage source {data} | sage map r\n")
        if path == "trace":
            made = run_sage(
                "run", "--quiet", "--run-dir", str(tmp_path / "run"), str(tmp_path / "pipeline.sh")
            )
            assert made.returncode == 0, made.stderr
    out = []
    for arg in args:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def _stdin_for(path: str, tmp_path: Path, n: int) -> Path:
    data = tmp_path / "stdin.ndjson"
    data.write_bytes(ndjson(records(path, n)))
    return data


def _run_with_dead_reader(args: list[str], stdin: Path | None, cwd: Path) -> tuple[int, str]:
    """Run sage with stdout a pipe whose read end is closed before it starts."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with open(stdin if stdin else os.devnull, "rb") as fh:
            done = subprocess.run(
                sage_argv(*args),
                stdin=fh,
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=clean_env(),
                cwd=cwd,
                timeout=120,
            )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr.decode()


def _params(paths: list[str]) -> list:
    return [
        pytest.param(p, id=p.replace(" ", "-"), marks=[pytest.mark.model] if SPECS[p].model else [])
        for p in paths
    ]


RUNNABLE = [p for p in REGISTERED if p in SPECS and (SPECS[p].kind != TOOL or TOOLS.get(p))]


@pytest.mark.parametrize("path", _params(RUNNABLE))
def test_stdout_closed_before_start_is_quiet(path, tmp_path):
    if SPECS[path].kind == TOOL:
        args, stdin = _tool_argv(path, tmp_path), None
    else:
        n = 5 if SPECS[path].model or path == "rerank" else 200
        args = argv(path, tmp_path) + QUICK.get(path, [])
        stdin = _stdin_for(path, tmp_path, n)
    # the control: with an open stdout it writes something, with this exit status
    with open(stdin if stdin else os.devnull, "rb") as fh:
        control = subprocess.run(
            sage_argv(*args),
            stdin=fh,
            capture_output=True,
            env=clean_env(),
            cwd=tmp_path,
            timeout=120,
        )
    assert control.stdout, f"{path} printed nothing: the test would prove nothing"
    code, stderr = _run_with_dead_reader(args, stdin, tmp_path)
    for noise in PYTHON_NOISE:
        assert noise not in stderr, f"{path}: {stderr}"
    assert code == control.returncode, f"{path}: exit {code} (open stdout: {control.returncode})"
    if SPECS[path].kind != TOOL:
        assert code == 0, stderr
    # sources and streams: nothing at all on stderr; tools may report (doctor's table is data)
    if SPECS[path].kind != TOOL:
        assert stderr == "", f"{path}: {stderr!r}"


STREAMS = [p for p in RUNNABLE if SPECS[p].kind != TOOL and not SPECS[p].model]


@pytest.mark.parametrize("path", _params(STREAMS))
def test_reader_that_leaves_mid_stream(path, tmp_path):
    """`sage OP | head -1` on an output far bigger than a pipe's buffer (64 KiB)."""
    stdin = _stdin_for(path, tmp_path, 2000)
    with stdin.open("rb") as fh:
        proc = subprocess.Popen(
            sage_argv(*argv(path, tmp_path)),
            stdin=fh,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            cwd=tmp_path,
        )
        first = proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert first.endswith(b"\n") and parse_ndjson(first), first
    assert code == 0, stderr
    assert stderr == "", f"{path}: {stderr!r}"


# -- under sage run ----------------------------------------------------------------------------


def _script(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "in.ndjson"
    data.write_bytes(ndjson([{"id": f"r{i}", "text": "t" * 80} for i in range(20_000)]))
    script = tmp_path / "pipeline.sh"
    script.write_text(text.replace("DATA", str(data)))
    return script


def _stage_exits(run_dir: Path) -> dict[str, int]:
    events = parse_ndjson((run_dir / "events.ndjson").read_bytes())
    return {e["stage"]: e["status"] for e in events if e.get("ev") == "stage_exit"}


@pytest.mark.parametrize("retries", [[], ["--retries", "1"]], ids=["plain", "relayed"])
def test_sage_run_when_the_last_stage_stops_reading(tmp_path, retries):
    script = _script(tmp_path, "sage source DATA | sage map r | head -1\n")
    done = run_sage("run", "--quiet", *retries, "--run-dir", str(tmp_path / "run"), str(script))
    assert done.returncode == 0, done.stderr
    assert parse_ndjson(done.stdout) == [{"id": "r0", "text": "t" * 80}]
    for noise in PYTHON_NOISE:
        assert noise not in done.stderr.decode()
    if not retries:
        assert _stage_exits(tmp_path / "run") == {"1-source": 0, "2-map": 0, "3-head": 0}
    else:  # bash runs it, every sage stage a keeper: the stages' own account
        summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
        assert summary["status"] == 0
        assert [s["name"] for s in summary["stages"]] == ["1.1-source", "1.2-map"]


def test_sage_run_a_non_sage_writer_killed_by_sigpipe_is_141_like_bash(tmp_path):
    script = _script(tmp_path, "yes '{}' | head -1\n")
    done = run_sage("run", "--quiet", str(script), cwd=tmp_path)  # its run dir there
    bash = subprocess.run(["bash", "-o", "pipefail", str(script)], capture_output=True)
    assert done.returncode == bash.returncode == 141
    assert done.stdout == bash.stdout == b"{}\n"


def test_sage_run_a_consumer_that_fails_gives_its_status_and_the_writer_ends_quietly(tmp_path):
    script = _script(tmp_path, "sage source DATA | sage map 'r[\"missing\"]' | sage head 5\n")
    done = run_sage("run", "--quiet", "--run-dir", str(tmp_path / "run"), str(script))
    assert done.returncode == 65, done.stderr
    exits = _stage_exits(tmp_path / "run")
    assert exits == {"1-source": 0, "2-map": 65, "3-head": 0}, exits
    source_err = next((tmp_path / "run" / "stages").glob("1-*.stderr")).read_text()
    assert source_err == "", source_err  # the writer whose reader died: quiet
