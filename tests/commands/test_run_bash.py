"""`sage run` on any script bash runs: the same output and exit status as `bash -o pipefail`,
every sage stage in the trace by pipeline and position, the whole script under --timeout and
signals, and no process left behind (sage_cli/run/session.py, sage_cli/run/registry.py)."""

from __future__ import annotations

import array
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import orjson
import pytest

from sage_cli.run.directory import find_run
from sage_cli.run.registry import read_registry
from tests.conftest import clean_env, sage_argv
from tests.readiness import StreamLines

BIN = str(Path(sys.executable).parent)

RECORDS = "".join(f'{{"id": "r{i}", "n": {i}, "tag": "{"ab"[i % 2]}"}}\n' for i in range(40))

#: scripts bash runs whole under sage run: each compared with bash itself
SCRIPTS = {
    "set_e_if_for": """
set -euo pipefail
for f in part*.ndjson; do
  if [ -s "$f" ]; then
    sage filter 'r["n"] % 3 == 0' < "$f" | sage map '{"id": r["id"], "file": "'"$f"'"}'
  fi
done
""",
    "while_read": """
while read -r tag; do
  sage filter "r['tag'] == '$tag'" < in.ndjson | sage head 2
done < tags.txt
""",
    "and_or": """
sage head 3 < in.ndjson && echo '{"after": "and"}'
sage map 'r["missing"]' < in.ndjson 2>/dev/null || echo '{"after": "or"}'
""",
    "function_and_heredoc": """
double() { sage map '{"id": r["id"], "n": r["n"] * 2}'; }
double <<'EOF' | sage filter 'r["n"] > 2'
{"id": "h1", "n": 1}
{"id": "h2", "n": 2}
EOF
""",
    "command_substitution_subshell": """
count=$(sage filter 'r["tag"] == "a"' < in.ndjson | wc -l)
echo "{\\"a\\": $count}"
( cd sub && sage head 1 < ../in.ndjson )
""",
    "background_and_wait": """
sage map '{"id": r["id"]}' < in.ndjson > bg.ndjson &
sage head 2 < in.ndjson
wait
sage head 1 < bg.ndjson
""",
    "non_sage_between": """
sage map 'r' < in.ndjson | jq -c 'select(.n > 30)' | grep -v r35 | sage map '{"id": r["id"]}' \\
  | sort
""",
    "fails_under_set_e": """
set -e
sage head 1 < in.ndjson
sage map 'r["missing"]' < in.ndjson
echo '{"never": true}'
""",
    "pipefail_status": """
sage head 2 < in.ndjson | false
""",
    # simple commands and pipelines, but acting on the script's own shell: the parsed path
    # (commands in one bash, the pipeline forked by sage run) gave something else for each
    "trap_exit": """
trap 'echo "{\\"trap\\": \\"exit\\"}"' EXIT
sage head 1 < in.ndjson
""",
    "trap_err": """
trap 'echo "{\\"trap\\": \\"err\\"}"' ERR
sage map 'r["missing"]' < in.ndjson 2>/dev/null | sage head 1
echo '{"after": 1}'
""",
    "ulimit_reaches_the_stages": """
ulimit -n 77
sage map '{"nofile": __import__("resource").getrlimit(7)[0]}' < in.ndjson | sage head 1
""",
    "exec_a_stage": """
exec sage head 2 < in.ndjson
""",
    "status_after_the_pipeline": """
sage map 'r["missing"]' < in.ndjson 2>/dev/null | sage head 1
echo "{\\"status\\": $?, \\"statuses\\": \\"${PIPESTATUS[*]}\\"}"
sage head 1 < in.ndjson
exit 3
""",
    "kill_own_shell": """
sage head 1 < in.ndjson
kill -TERM $$
""",
    "alias_in_the_pipeline": """
shopt -s expand_aliases
alias h='sage head'
h 2 < in.ndjson | sage map r
""",
    "second_stage_reads_a_file": """
sage head 1 < in.ndjson | sage map '{"id": r["id"]}' < in.ndjson
""",
    "unset_variable_in_the_pipeline": """
set -u
sage head "$NOPE" < in.ndjson | sage map r
""",
    "bad_substitution_in_the_pipeline": """
sage head ${} < in.ndjson | sage map r
""",
}


def _workdir(tmp_path: Path) -> Path:
    (tmp_path / "in.ndjson").write_text(RECORDS)
    lines = RECORDS.splitlines(keepends=True)
    (tmp_path / "part1.ndjson").write_text("".join(lines[:20]))
    (tmp_path / "part2.ndjson").write_text("".join(lines[20:]))
    (tmp_path / "part3.ndjson").write_text("")
    (tmp_path / "tags.txt").write_text("a\nb\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(**extra)
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    return env


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sage_run_gives_what_bash_gives(tmp_path: Path, name: str) -> None:
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(SCRIPTS[name])
    bash = subprocess.run(
        ["bash", "-o", "pipefail", "s.sh"], cwd=work, env=_env(), capture_output=True, timeout=120
    )
    for leftover in ("bg.ndjson",):
        (work / leftover).unlink(missing_ok=True)
    run = subprocess.run(
        sage_argv("run", "-q", "s.sh"), cwd=work, env=_env(), capture_output=True, timeout=120
    )
    # bash killed by a signal (`kill $$`) is what a shell reports as 128 + its number
    expected = 128 - bash.returncode if bash.returncode < 0 else bash.returncode
    assert (run.returncode, run.stdout) == (expected, bash.stdout), run.stderr.decode()
    assert run.stdout or bash.returncode  # the comparison compared something


def test_every_sage_stage_is_in_the_trace_by_pipeline_and_position(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    # the filter takes 10 ms a record, so jq (which ends with it) is still there when the map
    # starts and looks for its neighbours: a chain that has already ended is counted as one
    # command (sage_cli.run.registry), and under load a fast one had ended (3.2-map once)
    (work / "s.sh").write_text(
        "for t in a b; do\n"
        "  sage filter \"__import__('time').sleep(0.01) or r['tag'] == '$t'\" < in.ndjson"
        " | jq -c . | sage map 'r' | sage head 3\n"
        "done\n"
    )
    result = subprocess.run(
        sage_argv("run", "s.sh"), cwd=work, env=_env(), capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.splitlines()) == 6
    run = find_run(None, str(work / ".sage" / "runs"))
    names = sorted(e["name"] for e in read_registry(run.stages_dir))
    # two pipelines (one per iteration), the stages at positions 1, 3 and 4 (jq is 2)
    assert names == ["1.1-filter", "1.3-map", "1.4-head", "2.1-filter", "2.3-map", "2.4-head"]
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    by_name = {s["name"]: s for s in summary["stages"]}
    assert set(by_name) == set(names)
    assert by_name["1.1-filter"]["records_in"] == 40 and by_name["1.1-filter"]["status"] == 0
    assert all(run.trace_path(n).stat().st_size > 0 for n in names)
    assert b"6 stage(s)" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "sleep 30\nfor i in 1 2 3; do sleep 30; done\n",
        # the case: a script of one pipeline after a long first command (it ran the
        # command out and exited 0 when the pipeline was taken apart)
        "sleep 30\nsage head 1 < in.ndjson | sage map r\n",
        # a program in the pipeline's own words ran in the bash that expands them, unwatched
        'sage head 1 < in.ndjson | sage map "r | {\\"x\\": \\"$(sleep 30)\\"}"\n',
    ],
    ids=["loop", "one-pipeline", "substitution-in-pipeline"],
)
def test_timeout_ends_the_whole_script_wherever_it_is(tmp_path: Path, text: str) -> None:
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(text)
    started = time.monotonic()
    result = subprocess.run(
        sage_argv("run", "--timeout", "1", "s.sh"),
        cwd=work,
        env=_env(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 124, result.stderr.decode()
    assert time.monotonic() - started < 20
    assert b"timed out after 1s" in result.stderr


def _alive(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return out.stdout.split()


def test_sigint_leaves_no_process_behind_background_jobs_included(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    marker = f"sage-run-marker-{os.getpid()}-{time.monotonic_ns()}"
    (work / "s.sh").write_text(
        f"( exec -a {marker}-bg sleep 300 ) &\n"
        f"sage map r < in.ndjson > /dev/null\n"
        f"echo ready\n"
        f"( exec -a {marker}-fg sleep 300 )\n"
    )
    proc = subprocess.Popen(
        sage_argv("run", "-q", "s.sh"),
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = StreamLines(proc.stdout)
    lines.wait_for(b"ready", timeout=60)
    deadline = time.monotonic() + 30
    while len(_alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_alive(marker)) == 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while _alive(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(marker) == []


def test_a_background_job_nobody_waited_for_is_stopped_and_said(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    marker = f"sage-run-left-{os.getpid()}-{time.monotonic_ns()}"
    (work / "s.sh").write_text(f"( exec -a {marker} sleep 300 ) &\nsage head 1 < in.ndjson\n")
    result = subprocess.run(
        sage_argv("run", "s.sh"), cwd=work, env=_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"stopping 1 process(es) the script left running" in result.stderr
    assert _alive(marker) == []


LOOP_N = 3000
#: two pipelines in a loop, one to its own file, one to stdout; the map is slow now and then so
#: that the kill lands mid-run; dedupe is stateful (a restart from the middle would re-emit)
LOOP = """set -euo pipefail
for part in a b; do
  sage source in-$part.ndjson | sage map "(__import__('time').sleep(0.03) if r['n'] % 100 == 0 else 0) or r | {'part': '$part'}" > out-$part.ndjson
  sage dedupe --key n < out-$part.ndjson | sage map 'r | {"k": r["n"] * 2}'
done
"""


def test_resume_of_a_killed_loop_gives_every_record_once(tmp_path: Path) -> None:
    for part in "ab":
        (tmp_path / f"in-{part}.ndjson").write_bytes(
            b"".join(b'{"n": %d}\n' % i for i in range(LOOP_N))
        )
    (tmp_path / "s.sh").write_text(LOOP)
    out = tmp_path / "stdout.ndjson"
    with out.open("wb") as fh:
        first = subprocess.Popen(
            sage_argv("run", "-q", "s.sh"), cwd=tmp_path, env=_env(), stdout=fh
        )
        deadline = time.monotonic() + 60
        while out.stat().st_size < 1000:  # part a is out; part b is under way
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        first.kill()
        first.wait()
    delivered = out.read_bytes().count(b"\n")
    assert 0 < delivered < 2 * LOOP_N
    with out.open("ab") as fh:
        again = subprocess.run(
            sage_argv("run", "-q", "--resume", "latest"),
            cwd=tmp_path,
            env=_env(),
            stdout=fh,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    assert again.returncode == 0, again.stderr
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [(r["part"], r["n"]) for r in records] == [
        (p, i) for p in "ab" for i in range(LOOP_N)
    ]  # each once, in order, though the run was killed half-way through
    for part in "ab":  # the script's own files are whole again
        assert (tmp_path / f"out-{part}.ndjson").read_bytes().count(b"\n") == LOOP_N


def test_resume_refuses_a_script_that_appends_before_running_it(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    (work / "s.sh").write_text("sage head 1 < in.ndjson\nsage head 2 < in.ndjson >> log.ndjson\n")
    first = subprocess.run(sage_argv("run", "-q", "s.sh"), cwd=work, env=_env())
    assert first.returncode == 0
    (work / "log.ndjson").unlink()
    result = subprocess.run(
        sage_argv("run", "--resume", "latest"), cwd=work, env=_env(), capture_output=True
    )
    assert result.returncode == 2
    assert b"s.sh:2: --resume cannot be exact for a script that appends to a file" in (
        result.stderr
    )
    assert not (work / "log.ndjson").exists()  # nothing ran


def test_resume_says_when_the_replay_differs(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(
        'if true; then sage map \'r | {"x": __import__("random").random()}\' < in.ndjson; fi\n'
    )
    first = subprocess.run(
        sage_argv("run", "-q", "s.sh"), cwd=work, env=_env(), capture_output=True
    )
    assert first.returncode == 0
    result = subprocess.run(
        sage_argv("run", "--resume", "latest"), cwd=work, env=_env(), capture_output=True
    )
    assert result.returncode == 1
    assert result.stdout == b""  # nothing past what was delivered, which differs
    assert b"differ from what run" in result.stderr


def test_check_reads_what_it_can_and_says_what_it_skipped(tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(
        "set -euo pipefail\n"
        "for f in part*.ndjson; do\n"
        '  sage map r < "$f" | sage head 1\n'
        "done\n"
        "if true; then sage map r < in.ndjson | sage head 2; fi\n"
        "sage head 1 < in.ndjson && echo done\n"
    )
    ok = subprocess.run(
        sage_argv("run", "--check", "s.sh"), cwd=work, env=_env(), capture_output=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr.decode()
    err = ok.stderr.decode()
    assert "1 pipeline(s), 2 stage(s) OK, 2 line(s) with sage stages not checked" in err
    assert 'not checked: line 3: `"$f"` is expanded by bash at run time' in err
    assert "not checked: line 6: `&&` between commands" in err
    # a problem in a line it can read is found, as in any script
    (work / "s.sh").write_text("if true; then sage map r < in.ndjson | sage head --bogus 2; fi\n")
    bad = subprocess.run(
        sage_argv("run", "--check", "s.sh"), cwd=work, env=_env(), capture_output=True, timeout=60
    )
    assert bad.returncode == 2 and b"No such option '--bogus'" in bad.stderr


def test_check_runs_none_of_the_scripts_programs(tmp_path: Path) -> None:
    """--check of a one-pipeline script with a program before the pipeline checks it as bash
    runs it, reading its words: it ran the program (`touch MADE` made the file) to expand them;
    and a redirection only bash wires (`>&2`) is no error."""
    work = _workdir(tmp_path)
    for text in (
        "touch MADE\nsage head 1 < in.ndjson | sage map r\n",
        "sage head 1 < in.ndjson >&2\n",
    ):
        (work / "s.sh").write_text(text)
        done = subprocess.run(
            sage_argv("run", "--check", "s.sh"),
            cwd=work,
            env=_env(),
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert b"bash runs it whole" in done.stderr and b"stage(s) OK" in done.stderr
        assert not (work / "MADE").exists()


def test_model_stages_started_by_bash_share_the_cores(tmp_path: Path) -> None:
    """Under `sage run`, bash starts the stages: a model stage counts the model stages of its
    own pipeline (its siblings joined to it by pipes) and takes its share of the cores, as the
    parsed path gives it; with SAGE_THREADS set it takes that."""
    sleeper = f"{sys.executable} -c 'import time; time.sleep(3)'"
    probe = f"{sys.executable} -c 'from sage_cli.resources import default_threads as t; print(t())'"
    script = (
        f"{sleeper} sage embed | {sleeper} sage generate | {probe} sage map r\n"
        f"{sleeper} sage embed | {probe} sage map r\n"
        f"{sleeper} sage embed | SAGE_THREADS=7 {probe} sage map r\n"
    )
    got = subprocess.run(
        ["bash", "-c", script],
        env=_env(SAGE_RUN_PID="1"),
        capture_output=True,
        timeout=60,
    )
    cores = os.cpu_count() or 1
    assert got.stdout.split() == [str(max(1, cores // 2)).encode(), str(cores).encode(), b"7"]


def test_resume_through_a_pipe_with_outputs_sharing_their_inputs_id(tmp_path: Path) -> None:
    """The issue's case: `--resume` kept only the first output per id (125,604 of 250,000).
    stdout a pipe: the run keeps its copy, the resume skips what the copy holds."""
    n = 3000
    (tmp_path / "in.ndjson").write_bytes(
        b"".join(b'{"id": "r%d", "n": %d}\n' % (i, i) for i in range(n))
    )
    (tmp_path / "s.sh").write_text(
        "sage source in.ndjson | sage flatmap "
        "\"(__import__('time').sleep(0.03) if r['n'] % 100 == 0 else 0) or "
        "[{'id': r['id'], 'k': k} for k in range(3)]\"\n"
    )
    first = subprocess.Popen(
        sage_argv("run", "-q", "s.sh"), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE
    )
    assert first.stdout is not None
    got = b""
    while got.count(b"\n") < 3000:  # a third of it came through the pipe
        chunk = os.read(first.stdout.fileno(), 65536)
        assert chunk, "the run ended early"
        got += chunk
    records = _kill_then_resume(first, got, tmp_path)
    assert [(r["id"], r["k"]) for r in records] == [
        (f"r{i}", k) for i in range(n) for k in range(3)
    ]


def test_a_reader_of_a_run_killed_mid_write_holds_no_torn_line(tmp_path: Path) -> None:
    """stdout a pipe to a slow reader: the run's tap writes whole lines in writes the kernel
    makes atomic, so a kill -9 while it waits on the full pipe leaves the reader whole lines
    (a 1 MB write cut at the pipe's 64 KB left half a record there); the resume then gives the
    rest, each record once."""
    n = 60_000
    (tmp_path / "in.ndjson").write_bytes(
        b"".join(b'{"id": "r%d", "text": "%s"}\n' % (i, b"x" * (i % 97)) for i in range(n))
    )
    (tmp_path / "s.sh").write_text("sage map 'r' in.ndjson\n")
    first = subprocess.Popen(
        sage_argv("run", "-q", "s.sh"), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE
    )
    assert first.stdout is not None
    fd = first.stdout.fileno()
    got = os.read(fd, 1000)  # the run is going; now the reader stops reading
    deadline = time.monotonic() + 60
    waiting = array.array("i", [0])
    while waiting[0] < 60_000:  # the pipe is full: the tap waits in a write
        assert first.poll() is None and time.monotonic() < deadline, "the run ended early"
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
        time.sleep(0.01)
    records = _kill_then_resume(first, got, tmp_path)
    assert [r["id"] for r in records] == [f"r{i}" for i in range(n)]


def _kill_then_resume(first: subprocess.Popen, got: bytes, cwd: Path) -> list[dict]:
    """SIGKILL the run whose stdout the test reads (it has read `got`), read what is left in
    the pipe (whole lines: no torn last one), resume it; the records of both, in order."""
    assert first.stdout is not None
    first.kill()
    first.wait()
    got += first.stdout.read()
    first.stdout.close()
    assert got.endswith(b"\n") or not got
    again = subprocess.run(
        sage_argv("run", "-q", "--resume", "latest"),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    return [json.loads(line) for line in _joined(got, again.stdout).splitlines()]


def _joined(got: bytes, again: bytes) -> bytes:
    """What the reader got, then what the resume gave. A kill -9 between the write of a part to
    the reader and its copy repeats that one part on resume (whole lines, at most PIPE_BUF
    bytes: docs/run.md, Resume; the reader waking on the write makes that moment a likely one
    for a test's kill): such a repeat is dropped here, anything longer stays and fails."""
    cuts = [i + 1 for i, byte in enumerate(again[: select.PIPE_BUF]) if byte == ord("\n")]
    repeat = max((cut for cut in cuts if got.endswith(again[:cut])), default=0)
    return got + again[repeat:]


def test_a_replay_found_different_after_the_script_ended_still_fails(tmp_path: Path) -> None:
    """The tap may compare the replay's first bytes only after bash has exited (a busy
    machine: `make check` saw exit 0 once): the resume fails all the same, and says why. The
    resume runs in a process of its own whose tap starts a second late (in this one, `sage
    run`'s subreaper setting would outlive the test)."""
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(
        'if true; then sage map \'r | {"x": __import__("random").random()}\' < in.ndjson; fi\n'
    )
    first = subprocess.run(
        sage_argv("run", "-q", "s.sh"), cwd=work, env=_env(), capture_output=True
    )
    assert first.returncode == 0 and first.stdout
    late_tap = (
        "import sys, time\n"
        "from sage_cli.run import output\n"
        "behind = output.Tap.run\n"
        "def late(self):\n"
        "    time.sleep(1.0)  # the one-line script has ended by now\n"
        "    behind(self)\n"
        "output.Tap.run = late\n"
        "from sage_cli.app import main\n"
        "sys.exit(main(['run', '-q', '--resume', 'latest']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", late_tap], cwd=work, env=_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert b"differ from what run" in result.stderr


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ('set -euo pipefail\nN=1\nsage head "$N" < in.ndjson | sage map r\n', None),
        ("sage head 1 < in.ndjson\nsage head 2 < in.ndjson\n", "bash"),  # two pipelines
        ("sage head 1 < in.ndjson\necho done\n", "bash"),  # a command after it
        ("umask 077\nsage head 1 < in.ndjson > out.ndjson\n", "bash"),
        ("p=$$\nsage head 1 < in.ndjson\n", "bash"),
        ("sage head 1 < in.ndjson >&2\n", "bash"),
        ("echo starting >&2\nexport X=1\nsage head 1 < in.ndjson | sage map r\n", None),
        ("mkdir -p d\nsage head 1 < in.ndjson | sage map r\n", "bash"),  # a program first
        ('X="$(ls)"\nsage head 1 < in.ndjson | sage map r\n', "bash"),
        ("set -eux\nsage head 1 < in.ndjson | sage map r\n", "bash"),  # xtrace: bash's own
        ("set -o pipefail\nsage head 1 < in.ndjson | sage map r\n", None),
        ('sage head "$(echo 1)" < in.ndjson | sage map r\n', "bash"),  # run by the expander
    ],
    ids=[
        "one-pipeline",
        "two-pipelines",
        "tail",
        "umask",
        "own-pid",
        "fd-dup",
        "builtins-first",
        "program-first",
        "substitution-first",
        "xtrace",
        "pipefail",
        "substitution-in-pipeline",
    ],
)
def test_only_a_script_the_split_runs_exactly_is_taken_apart(
    tmp_path: Path, text: str, mode: str | None
) -> None:
    """sage run forks the stages of a script only when that gives what bash gives: one
    pipeline, last, after commands that do not act on the script's own shell."""
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(text)
    run = subprocess.run(
        sage_argv("run", "-q", "--run-dir", "r", "s.sh"),
        cwd=work,
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    assert json.loads((work / "r" / "run.json").read_text()).get("mode") == mode


@pytest.mark.parametrize(
    "text",
    [
        "sage head 2 < in.ndjson | sage map r\n",  # taken apart, stages forked
        "if true; then sage head 2 < in.ndjson | sage map r; fi\n",  # bash runs it
    ],
    ids=["parsed", "bash"],
)
def test_closed_standard_descriptors_as_under_bash(tmp_path: Path, text: str) -> None:
    """`sage run` started with stdout closed (`>&-`, as some cron setups do) fails as bash does,
    the last stage saying why in one line; with stdin closed, a script that does not read it
    runs as usual."""
    work = _workdir(tmp_path)
    (work / "s.sh").write_text(text)
    sage = " ".join(f"'{w}'" for w in sage_argv("run", "-q", "s.sh"))

    def status(redirect: str, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f"{command} {redirect}; echo $? >&2"],
            cwd=work,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    closed_out = status(">&-", sage)
    by_bash = status(">&-", "bash -o pipefail s.sh")
    assert closed_out.stderr.splitlines()[-1] == by_bash.stderr.splitlines()[-1] == "1"
    said = closed_out.stderr.splitlines()[:-1]
    assert said == [
        "sage map: error: stdout is closed (`>&-`): give the stage somewhere to write its "
        "records (`> /dev/null` to discard them)"
    ]
    closed_in = status("<&-", sage)
    assert closed_in.stderr.splitlines() == ["0"], closed_in.stderr
    assert [json.loads(x)["id"] for x in closed_in.stdout.splitlines()] == ["r0", "r1"]
