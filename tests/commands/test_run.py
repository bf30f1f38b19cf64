"""sage run: script parsing, pipefail status, stage environment, traces, --lock, --timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from sage_cli.run.directory import RunDirectory, find_run
from sage_cli.run.script import CommandsFailed, ScriptError, parse_script
from tests.conftest import clean_env, ndjson, parse_ndjson, sage_argv
from tests.readiness import StreamLines

BIN = str(Path(sys.executable).parent)


def env() -> dict[str, str]:
    """A clean environment where `sage` is on PATH (so `bash SCRIPT` works too)."""
    e = clean_env()
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sage_run(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        sage_argv("run", *args), capture_output=True, env=env(), cwd=cwd, timeout=timeout
    )


def bash(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, env=env(), cwd=cwd, timeout=60)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": f"r{i}", "n": i} for i in range(20)]))
    return tmp_path


# -- parsing ------------------------------------------------------------------------------------


def test_parse_expands_like_bash(tmp_path: Path) -> None:
    script = write(
        tmp_path / "p.sh",
        """#!/usr/bin/env bash
set -euo pipefail
# comments are skipped
FACTOR=${2:-7}
export MODE=fast
sage map 'r | {"x": r["n"] * 2}' "$1" \\
  | LIMIT=3 sage filter 'r["n"] % 2 == 0 or "|" in r.get("t", "")' \\
  | sage map "r | {\\"f\\": $FACTOR}" 2> err.log > out.ndjson   # trailing comment
""",
    )
    p = parse_script(script, ["in file.ndjson"], env=env())
    assert [s.argv for s in p.stages] == [
        ["sage", "map", 'r | {"x": r["n"] * 2}', "in file.ndjson"],
        ["sage", "filter", 'r["n"] % 2 == 0 or "|" in r.get("t", "")'],
        ["sage", "map", 'r | {"f": 7}'],
    ]
    assert p.stages[1].env == {"LIMIT": "3"}
    assert p.env["MODE"] == "fast" and "FACTOR" not in p.env  # only exported names
    last = p.stages[2]
    assert [(r.op, r.target) for r in last.redirects] == [("2>", "err.log"), (">", "out.ndjson")]
    assert [s.name for s in p.stages] == ["1-map", "2-filter", "3-map"]


def test_parse_pipe_at_line_end_continues(tmp_path: Path) -> None:
    script = write(tmp_path / "p.sh", "sage map r in.ndjson |\n  sage filter 'True' |\n  cat\n")
    p = parse_script(script, [], env=env())
    assert [s.command for s in p.stages] == ["map", "filter", "cat"]
    assert not p.stages[2].is_sage


def test_parse_quotes_across_lines_and_descriptor_copies(data: Path) -> None:
    write(
        data / "p.sh",
        """set -euo pipefail
echo "starting" >&2
echo header
sage map r in.ndjson 2>&1 |
  sage map '{"id": r["id"],
             "m": 1}'
""",
    )
    p = parse_script(data / "p.sh", [], env=env(), cwd=str(data))
    assert p.stages[1].argv[2] == '{"id": r["id"],\n             "m": 1}'
    assert [r.op for r in p.stages[0].redirects] == ["2>&1"]
    result = sage_run(data, "-q", "p.sh")
    plain = bash(data, "p.sh")
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout and result.stdout.startswith(b"header\n")
    assert b"starting" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sage map r a | cat\nsage map r b | cat\n", "one pipeline per script"),
        ("sage map r a && sage map r b\n", "`&&` between commands"),
        ("for f in a b; do sage map r $f; done\n", "a `for` block or function"),
        ("sage map r a | cat &\n", "a background job"),
        ("sage map r a | cat\necho done\n", "must be the last command"),
        ("sage map 'r\n", "unterminated single quote"),
        ('set -u\nsage map r "$1" | cat\n', "1: unbound variable"),
        ("sage map r a > x.ndjson | cat\n", "only the last stage may"),
        ("sage map r a | cat >&2\n", "`>&2` is not supported in the pipeline"),
    ],
)
def test_parse_refuses_what_it_does_not_run(tmp_path: Path, text: str, message: str) -> None:
    script = write(tmp_path / "p.sh", text)
    # an expansion that ends the shell is the script's own end (CommandsFailed, bash's status)
    with pytest.raises((ScriptError, CommandsFailed)) as err:
        parse_script(script, [], env=env())
    assert message in str(err.value)


def test_model_stages_share_the_cores(tmp_path: Path) -> None:
    from sage_cli.run.options import RunOptions
    from sage_cli.run.supervisor import Supervisor

    script = write(
        tmp_path / "p.sh",
        "sage source d | sage embed | sage retrieve --index i | sage prompt | sage generate\n",
    )
    p = parse_script(script, [], env=env())
    sup = Supervisor(p, RunDirectory.create(str(tmp_path / "run")), RunOptions())
    threads = {sr.stage.command: sr.env.get("SAGE_THREADS") for sr in sup.stages}
    share = str(max(1, (os.cpu_count() or 1) // 3))
    assert threads == {
        "source": None,
        "embed": share,
        "retrieve": share,
        "prompt": None,
        "generate": share,
    }
    assert sup.stages[0].argv[:4] == [sys.executable, "-P", "-m", "sage_cli"]
    assert sup.stages[0].env["SAGE_TRACE_STAGE"] == "1-source"


# -- running ------------------------------------------------------------------------------------


def test_run_gives_the_same_output_as_bash(data: Path) -> None:
    write(
        data / "p.sh",
        'sage map \'r | {"x": 1}\' "$1" | sage filter \'r["n"] % 2 == 0\' '
        '| sage map \'r | {"y": r["n"] * 3}\'\n',
    )
    plain = bash(data, "p.sh", "in.ndjson")
    result = sage_run(data, "p.sh", "in.ndjson")
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout
    assert [r["id"] for r in parse_ndjson(result.stdout)] == [f"r{i}" for i in range(0, 20, 2)]
    run = find_run(None, str(data / ".sage" / "runs"))
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    counts = [
        (s["name"], s["records_in"], s["records_out"], s["status"]) for s in summary["stages"]
    ]
    assert counts == [("1-map", 20, 20, 0), ("2-filter", 20, 10, 0), ("3-map", 10, 10, 0)]
    assert summary["status"] == 0
    for stage in summary["stages"]:
        assert stage["cpu_seconds"] > 0 and stage["peak_rss_mb"] > 1
        assert stage["latency_ms"]["p50"] is not None
    # the run's stdout is kept for --resume
    assert (run.path / "output.ndjson").read_bytes() == result.stdout


def test_failing_stage_gives_its_status_and_its_stderr_is_kept(data: Path) -> None:
    write(data / "p.sh", "sage map r in.ndjson | sage map 'r[\"nope\"]' | sage map r\n")
    result = sage_run(data, "p.sh")
    assert result.returncode == 65
    assert b"sage map: error: stdin:1" in result.stderr
    run = find_run(None, str(data / ".sage" / "runs"))
    assert b"KeyError" in run.stderr_path("2-map").read_bytes()
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    assert [s["status"] for s in summary["stages"]] == [0, 65, 0]
    assert "KeyError" in summary["stages"][1]["stderr_tail"][-1]
    table = subprocess.run(sage_argv("trace"), cwd=data, env=env(), capture_output=True)
    assert b"2-map exited 65: sage map: error: stdin:1" in table.stdout


@pytest.mark.parametrize(
    "pipeline",
    [
        "sh -c 'exit 3' | sh -c 'cat > /dev/null; exit 5' | cat",
        "sh -c 'exit 3' | cat | cat",
        "cat in.ndjson | false | cat",
        "cat in.ndjson | sh -c 'kill -9 $$' | cat",
        "true | true | true",
    ],
)
def test_status_is_what_pipefail_gives(data: Path, pipeline: str) -> None:
    write(data / "p.sh", pipeline + "\n")
    expected = bash(data, "-o", "pipefail", "p.sh").returncode
    result = sage_run(data, "-q", "p.sh")
    assert result.returncode == expected, result.stderr


def test_opaque_command_not_found_is_127(data: Path) -> None:
    write(data / "p.sh", "cat in.ndjson | no-such-command-here | cat\n")
    result = sage_run(data, "p.sh")
    assert result.returncode == 127
    assert b"no-such-command-here: command not found" in result.stderr


def test_lock_refuses_a_second_run(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from sage_cli.run.runner import lock_path

    write(data / "p.sh", "cat in.ndjson | cat\n")
    monkeypatch.chdir(data)
    path = data / lock_path(Path("p.sh"), [])
    path.parent.mkdir(parents=True)
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        result = sage_run(data, "--lock", "p.sh")
    assert result.returncode == 75
    assert b"already running (pid 4242)" in result.stderr
    assert sage_run(data, "--lock", "p.sh").returncode == 0


def test_timeout_stops_every_stage(data: Path) -> None:
    write(data / "p.sh", "sleep 30 | cat\n")
    started = time.monotonic()
    result = sage_run(data, "--timeout", "0.5", "p.sh")
    assert result.returncode == 124
    assert time.monotonic() - started < 10
    assert b"timed out" in result.stderr


def test_sigterm_is_forwarded_and_gives_143(data: Path) -> None:
    write(data / "p.sh", "sleep 30 | sage map r\n")
    proc = subprocess.Popen(
        sage_argv("run", "p.sh"),
        env=env(),
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    events = _wait_for_stages(data, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    for pid in events:
        assert not _alive(pid)


def _wait_for_stages(cwd: Path, n: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = cwd / ".sage" / "runs"
        for run in runs.iterdir() if runs.is_dir() else []:
            events = (
                [orjson.loads(x) for x in (run / "events.ndjson").read_bytes().splitlines() if x]
                if (run / "events.ndjson").exists()
                else []
            )
            pids = [e["pid"] for e in events if e["ev"] == "stage_start" and e.get("pid")]
            if len(pids) >= n:
                return pids
        time.sleep(0.05)
    raise AssertionError("the stages did not start")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- --check and --watch ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline", "code", "message"),
    [
        (
            "sage source docs/ | sage chunk | sage prompt",
            2,
            "stage 3 (sage prompt): needs field 'docs', which no stage before it produces",
        ),
        (
            "sage source docs/ | sage chunk --bogus 3",
            2,
            "stage 2 (sage chunk): No such option '--bogus'",
        ),
        (
            "sage source docs/ | sage retrieve --index no-such-index/",
            69,
            "stage 2 (sage retrieve): --index no-such-index/ does not exist",
        ),
        (
            "sage source docs/ | no-such-program",
            2,
            "stage 2 (no-such-program): no-such-program: command not found",
        ),
        ("sage map r < missing.ndjson | cat", 2, "input file missing.ndjson does not exist"),
    ],
)
def test_check_names_the_stage_and_the_problem(
    tmp_path: Path, pipeline: str, code: int, message: str
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world")
    write(tmp_path / "p.sh", pipeline + "\n")
    result = sage_run(tmp_path, "--check", "p.sh")
    assert result.returncode == code, result.stderr
    assert message in result.stderr.decode()
    assert not (tmp_path / ".sage" / "runs").exists()  # nothing ran


def test_check_passes_a_good_pipeline_without_running_it(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world")
    write(tmp_path / "p.sh", "sage source docs/ | sage chunk | sage filter True > out.ndjson\n")
    result = sage_run(tmp_path, "--check", "p.sh")
    assert result.returncode == 0, result.stderr
    assert b"3 stage(s) OK" in result.stderr and b"2-chunk: needs text" in result.stderr
    assert not (tmp_path / "out.ndjson").exists()


def test_check_knows_what_earlier_pipelines_of_the_script_build(tmp_path: Path) -> None:
    # scripts/rag.sh builds its index in one pipeline and searches it in the next
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world")
    write(
        tmp_path / "p.sh",
        "set -euo pipefail\n"
        "sage source docs/ | sage chunk | sage embed | sage index build idx/\n"
        "sage source q.txt -R | sage retrieve --index idx/ > hits.ndjson\n"
        "sage map r < hits.ndjson | sage sink\n",
    )
    (tmp_path / "q.txt").write_text("hello?\n")
    result = sage_run(tmp_path, "--check", "p.sh")
    assert result.returncode == 0, result.stderr
    assert b"3 pipeline(s)" in result.stderr
    assert not (tmp_path / "idx").exists()  # checked, not built
    # a path nothing builds is still missing
    write(tmp_path / "p.sh", "sage source q.txt -R | sage retrieve --index other/\n")
    assert sage_run(tmp_path, "--check", "p.sh").returncode == 69


def test_watch_runs_again_when_an_input_changes(data: Path) -> None:
    write(data / "p.sh", "sage map 'r | {\"w\": 1}' in.ndjson > out.ndjson\n")
    proc = subprocess.Popen(
        sage_argv("run", "--watch", "p.sh"),
        env=env(),
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stderr = StreamLines(proc.stderr)
    try:
        deadline = time.monotonic() + 60
        # the notice comes once the first run is over and the watcher is armed
        stderr.wait_for(b"sage run: watching 2 path(s) for changes", timeout=60)
        assert len(parse_ndjson((data / "out.ndjson").read_bytes())) == 20
        (data / "in.ndjson").write_bytes(ndjson([{"id": "new", "n": 1}]))
        while parse_ndjson((data / "out.ndjson").read_bytes()) != [{"id": "new", "n": 1, "w": 1}]:
            assert time.monotonic() < deadline, "no second run"
            time.sleep(0.1)
        while len(list((data / ".sage" / "runs").glob("*/summary.json"))) < 2:
            assert time.monotonic() < deadline, "the second run did not end"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"--watch did not stop on SIGINT: {err!r}") from None
    err = stderr.data + err
    assert proc.returncode == 130, err
    assert b"running again" in err
    assert len(list((data / ".sage" / "runs").iterdir())) == 2


def test_live_dashboard_on_a_terminal(data: Path) -> None:
    """With stderr on a terminal, a rich table of the stages is drawn there (stdout untouched)."""
    write(data / "p.sh", "sage map r in.ndjson | sage map 'r | {\"z\": 1}'\n")
    master, slave = os.openpty()
    proc = subprocess.Popen(
        sage_argv("run", "p.sh"),
        env=env() | {"COLUMNS": "120"},
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    out, _ = proc.communicate(timeout=30)
    os.close(master)
    assert proc.returncode == 0
    assert len(parse_ndjson(out)) == 20
    text = screen.decode("utf-8", "replace")
    assert "stage" in text and "rec/s" in text
    assert "1-map" in text and "2-map" in text and "ok" in text


@pytest.mark.parametrize(
    ("mode", "ids", "traced"), [("batches", False, True), ("off", False, False)]
)
def test_trace_levels(data: Path, mode: str, ids: bool, traced: bool) -> None:
    write(data / "p.sh", "sage map r in.ndjson | sage map r\n")
    result = sage_run(data, "--trace", mode, "--run-dir", "r", "p.sh")
    assert result.returncode == 0, result.stderr
    assert len(parse_ndjson(result.stdout)) == 20
    run = RunDirectory(data / "r")
    events = (
        [orjson.loads(x) for x in run.trace_path("1-map").read_bytes().splitlines()]
        if (run.trace_path("1-map").exists())
        else []
    )
    assert bool(events) is traced
    assert not any("ids" in e for e in events)
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    assert summary["stages"][0]["records_in"] == (20 if traced else None)
    assert summary["stages"][0]["status"] == 0 and summary["stages"][0]["cpu_seconds"] > 0


def test_progress_lines_without_a_terminal(data: Path) -> None:
    write(data / "p.sh", "sage map r in.ndjson | sh -c 'sleep 2.5; cat'\n")
    result = sage_run(data, "--progress", "p.sh")
    assert result.returncode == 0, result.stderr
    lines = [x for x in result.stderr.decode().splitlines() if x.startswith("sage run: 2s:")]
    assert lines and "1-map 20 in/20 out/0 err ok" in lines[0] and "2-sh running" in lines[0]


def test_a_script_with_several_pipelines_runs_them_in_turn(data: Path) -> None:
    """Commands between pipelines run as under bash, with variables, `cd` and `set -e`
    carried from one part to the next; one run directory holds every stage."""
    write(
        data / "p.sh",
        """#!/usr/bin/env bash
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-out}"
mkdir -p "$out"
sage map 'r | {"a": 1}' "$here/in.ndjson" | sage filter 'r["n"] < 5' > "$out/a.ndjson"
count=$(wc -l < "$out/a.ndjson")
echo "first: $count" >&2
cd "$out"
sage map 'r | {"b": 2}' a.ndjson | sage map r > b.ndjson
echo "done"
""",
    )
    plain = bash(data, "p.sh", "plain")
    result = sage_run(data, "-q", "p.sh", "sup")
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout == b"done\n"
    assert b"first: 5" in result.stderr
    assert (data / "sup" / "b.ndjson").read_bytes() == (data / "plain" / "b.ndjson").read_bytes()
    run = find_run(None, str(data / ".sage" / "runs"))
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    assert [s["name"] for s in summary["stages"]] == ["1.1-map", "1.2-filter", "2.1-map", "2.2-map"]
    assert [s["records_in"] for s in summary["stages"]] == [20, 20, 5, 5]
    assert not [p for p in data.iterdir() if ".sage-" in p.name]  # no temporary file left


def test_set_e_stops_a_script_at_the_failing_pipeline(data: Path) -> None:
    write(
        data / "p.sh",
        "set -eo pipefail\nsage map 'r[\"x\"]' in.ndjson | cat > a\n"
        "echo never\nsage map r in.ndjson | cat > b\n",
    )
    result = sage_run(data, "-q", "p.sh")
    assert result.returncode == bash(data, "p.sh").returncode == 65
    assert b"never" not in result.stdout and not (data / "b").exists()
    write(data / "p.sh", "sage map 'r[\"x\"]' in.ndjson | cat > a\necho goes on\n")
    result = sage_run(data, "-q", "p.sh")
    assert result.returncode == 0 and result.stdout == b"goes on\n"
