"""sage run with real processes: a stage killed mid-run is restarted without losing or repeating
a record, SIGINT leaves no process behind, a killed run resumes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from sage_cli.observability.views import NamedBatches
from sage_cli.run.directory import find_run, read_events
from tests.conftest import clean_env, sage_argv
from tests.readiness import wait_gone

N = 100_000
BIN = str(Path(sys.executable).parent)
# the middle stage sleeps now and then so that a kill lands in the middle of the run
SLOW = "(__import__('time').sleep(0.003) if r['n'] % 200 == 0 else 0) or r | {'b': r['n'] * 2}"
PIPELINE = (
    f'sage map \'r | {{"a": 1}}\' in.ndjson \\\n  | sage map "{SLOW}" --batch-size 64 '
    "\\\n  | sage map 'r | {\"c\": 3}' > out.ndjson\n"
)


def env() -> dict[str, str]:
    e = clean_env()
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return b"".join(
        orjson.dumps({"id": f"r{i}", "n": i, "text": "some words here"}) + b"\n" for i in range(N)
    )


@pytest.fixture
def work(tmp_path: Path, big_input: bytes) -> Path:
    (tmp_path / "in.ndjson").write_bytes(big_input)
    (tmp_path / "p.sh").write_text(PIPELINE)
    return tmp_path


def write_records(path: Path, n: int) -> None:
    """`{"id": "r<i>", "n": i}` for i in 0..n-1."""
    path.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n)))


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        sage_argv("run", *args), env=env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def stage_pids(cwd: Path, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = cwd / ".sage" / "runs"
        for run in runs.iterdir() if runs.is_dir() else []:
            pids = {
                e["stage"]: e["pid"]
                for e in read_events(run / "events.ndjson")
                if e["ev"] == "stage_start" and e.get("pid")
            }
            if len(pids) == 3:
                return pids
        time.sleep(0.02)
    raise AssertionError("the stages did not start")


def wait_for_output(path: Path, size: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    raise AssertionError("no output")


def output_ids(path: Path) -> list[str]:
    return [orjson.loads(line)["id"] for line in path.read_bytes().splitlines() if line]


def worker_pids(cwd: Path, name: str, count: int = 1, timeout: float = 30) -> list[int]:
    """The pids of the first `count` workers of stage `name` of a `--retries` run, from the
    start events of its trace (each attempt's worker writes one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (cwd / ".sage" / "runs").glob(f"*/stages/{name}.trace.ndjson"):
            pids = [e["pid"] for e in read_events(path) if e["ev"] == "start"]
            if len(pids) >= count:
                return pids
        time.sleep(0.02)
    raise AssertionError(f"no worker {count} of {name}")


def test_kill_9_of_a_middle_stage_loses_and_repeats_nothing(work: Path) -> None:
    proc = start(work, "--retries", "2", "--backoff", "0.05", "p.sh")
    worker = worker_pids(work, "1.2-map")[0]
    wait_for_output(work / "out.ndjson", 1_000_000, proc)  # about 10% of the output
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ids = output_ids(work / "out.ndjson")
    assert len(ids) == N and set(ids) == {f"r{i}" for i in range(N)}
    assert ids == [f"r{i}" for i in range(N)]  # and still in input order
    records = [orjson.loads(x) for x in (work / "out.ndjson").read_bytes().splitlines()[:1000]]
    assert all(r["a"] == 1 and r["b"] == r["n"] * 2 and r["c"] == 3 for r in records)
    assert b"worker died (signal 9); restart 1/2" in err
    run = find_run(None, str(work / ".sage" / "runs"))
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["1.2-map"]["attempts"] == 2 and stages["1.2-map"]["restarts"] == 1
    assert stages["1.1-map"]["restarts"] == stages["1.3-map"]["restarts"] == 0
    # what the keeper committed of each attempt, once, despite the crash
    assert stages["1.2-map"]["records_in"] == stages["1.2-map"]["records_out"] == N
    assert stages["1.1-map"]["records_out"] == N and stages["1.3-map"]["records_in"] == N
    second = [e for e in read_events(run.trace_path("1.2-map")) if e["ev"] == "start"][1]
    assert second["keeper"]["attempt"] == 2 and second["keeper"]["after"] == 128 + signal.SIGKILL
    # 1.3-map names no ids (fed by 1.2-map's keeper): a reader finds them by position through
    # 1.2-map's two attempts (the first killed), each record once, in order
    third = read_events(run.trace_path("1.3-map"))
    assert third[0].get("fed_by") or all("ids" in e for e in third if e["ev"] == "b")
    named = NamedBatches(run)
    ids = [i for e in named.events("1.3-map") if e["ev"] == "b" for i in e["ids"]]
    assert ids == [f"r{i}" for i in range(N)]


def test_sigint_gives_130_and_leaves_no_process(work: Path) -> None:
    proc = start(work, "p.sh")
    pids = stage_pids(work)
    wait_for_output(work / "out.ndjson", 100_000, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    wait_gone(pids.values(), "every stage to end after SIGINT", timeout=10)
    run = find_run(None, str(work / ".sage" / "runs"))
    stop = [e for e in run.events() if e["ev"] == "run_stop"]
    assert stop and stop[0]["status"] == 130


def test_kill_9_of_the_supervisor_then_resume_processes_each_record_once(work: Path) -> None:
    proc = start(work, "p.sh")
    pids = stage_pids(work)
    wait_for_output(work / "out.ndjson", 2_000_000, proc)
    proc.kill()
    proc.wait()
    # PR_SET_PDEATHSIG takes the stages down with it
    wait_gone(pids.values(), "the stages to die with the supervisor", timeout=10)
    before = output_ids(work / "out.ndjson")
    assert 0 < len(before) < N
    run = find_run(None, str(work / ".sage" / "runs"))
    result = subprocess.run(
        sage_argv("run", "--resume", run.id), env=env(), cwd=work, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    ids = output_ids(work / "out.ndjson")
    counts = Counter(ids)
    assert len(ids) == N and set(counts) == {f"r{i}" for i in range(N)}
    assert max(counts.values()) == 1
    # the resume replayed the script and passed on only what the run had not delivered
    starts = [e for e in run.events() if e["ev"] == "run_start"]
    assert starts[-1]["resume"] is True and starts[-1]["skipped_lines"] == 0  # `> out` in it
    assert (run.path / "stages.1").is_dir()  # the killed attempt's traces, set aside


def test_a_record_that_crashes_a_stage_twice_goes_to_the_dead_letter(tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "n": i} for i in range(50)]
    (tmp_path / "in.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    crash = "__import__('os').abort() if r['n'] == 17 else r"
    (tmp_path / "p.sh").write_text(f'sage map r in.ndjson | sage map "{crash}" | sage map r\n')
    result = subprocess.run(
        sage_argv("run", "--retries", "3", "--backoff", "0", "p.sh"),
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ids = [orjson.loads(x)["id"] for x in result.stdout.splitlines()]
    assert ids == [f"r{i}" for i in range(50) if i != 17]
    run = find_run(None, str(tmp_path / ".sage" / "runs"))
    dead = [orjson.loads(x) for x in run.dead_path.read_bytes().splitlines()]
    assert [d["raw"]["id"] for d in dead] == ["r17"]
    # crash, crash again on the same batch, isolate it (batches of one), find the record
    starts = [e for e in read_events(run.trace_path("1.2-map")) if e["ev"] == "start"]
    assert len(starts) >= 4 and {e["keeper"]["after"] for e in starts[1:]} == {128 + signal.SIGABRT}


def test_retries_exhausted_fails_with_the_stage_status(tmp_path: Path) -> None:
    # each worker dies at its third record: a crash no record causes alone (no dead letter)
    (tmp_path / "in.ndjson").write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(10)))
    (tmp_path / "third.py").write_text(
        "import os\nseen = []\n\n\ndef f(r):\n    seen.append(r)\n"
        "    if len(seen) == 3:\n        os._exit(9)\n    return r\n"
    )
    (tmp_path / "p.sh").write_text("sage map r in.ndjson | sage map --fn third:f | sage map r\n")
    result = subprocess.run(
        sage_argv("run", "--retries", "2", "--backoff", "0", "p.sh"),
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 9
    assert b"worker died (exit 9) 3 times; gave up" in result.stderr
    run = find_run(None, str(tmp_path / ".sage" / "runs"))
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    assert {s["name"]: s["restarts"] for s in summary["stages"]}["1.2-map"] == 2


def test_trace_counts_match_the_records_seen(tmp_path: Path) -> None:
    records = [{"id": f"d{i}", "text": "x " * (i % 7), "n": i} for i in range(3000)]
    (tmp_path / "in.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    (tmp_path / "p.sh").write_text(
        "sage map r in.ndjson | sage filter 'r[\"n\"] % 3 != 0' "
        '| sage flatmap \'[r | {"id": r["id"] + "#" + str(k), "parent_id": r["id"]} '
        "for k in range(2)]' | cat\n"
    )
    result = subprocess.run(
        sage_argv("run", "p.sh"), env=env(), cwd=tmp_path, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    kept = [r for r in records if r["n"] % 3 != 0]
    assert len(out) == 2 * len(kept)
    run = find_run(None, str(tmp_path / ".sage" / "runs"))
    summary = orjson.loads((run.path / "summary.json").read_bytes())
    got = {s["name"]: (s["records_in"], s["records_out"]) for s in summary["stages"]}
    assert got["1-map"] == (3000, 3000)
    assert got["2-filter"] == (3000, len(kept))
    assert got["3-flatmap"] == (len(kept), 2 * len(kept))
    assert summary["stages"][3]["traced"] is False and summary["stages"][3]["status"] == 0
    # one span per record per stage: every record's id appears in each stage's batches, as a
    # reader sees them; the filter, fed by 1-map, writes its output ids only (it drops some)
    raw = [e for e in read_events(run.trace_path("2-filter")) if e["ev"] == "b"]
    assert all("ids" not in e for e in raw)
    assert [i for e in raw for i in e["oids"]] == [r["id"] for r in kept]
    named = NamedBatches(run)
    ids = [i for e in named.events("2-filter") if e["ev"] == "b" for i in e["ids"]]
    assert ids == [r["id"] for r in records]
    flat = [i for e in named.events("3-flatmap") if e["ev"] == "b" for i in e["ids"]]
    assert flat == [r["id"] for r in kept]


def test_an_opaque_stage_that_crashes_is_not_restarted(tmp_path: Path) -> None:
    """Not a sage stage: a Python filter that kills itself half-way. Nothing says which of its
    outputs came from which input, so a restart could not be exact: the run fails with its
    status, as bash's pipefail would, and nothing is written twice."""
    n = 5000
    write_records(tmp_path / "in.ndjson", n)
    (tmp_path / "crash_once.py").write_text(
        "import os, signal, sys\n"
        "for i, line in enumerate(sys.stdin):\n"
        "    sys.stdout.write(line)\n"
        "    if i == 2500:\n"
        "        sys.stdout.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    (tmp_path / "p.sh").write_text(
        f"sage map r in.ndjson | {sys.executable} crash_once.py | sage map 'r | {{\"ok\": 1}}'\n"
    )
    result = subprocess.run(
        sage_argv("run", "--retries", "1", "--backoff", "0", "p.sh"),
        env=env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    ids = [orjson.loads(x)["id"] for x in result.stdout.splitlines()]
    assert ids == [f"r{i}" for i in range(len(ids))] and len(ids) <= 2501


def test_resume_with_retries_after_the_supervisor_is_killed(work: Path) -> None:
    proc = start(work, "--retries", "1", "p.sh")
    pids = [worker_pids(work, f"1.{k}-map")[0] for k in (1, 2, 3)]
    wait_for_output(work / "out.ndjson", 1_500_000, proc)
    proc.kill()
    proc.wait()
    # bash dies with it, and every stage with it (sage_cli.run.lifeline)
    wait_gone(pids, "the stages to die with the supervisor", timeout=10)
    assert len(output_ids(work / "out.ndjson")) < N
    run = find_run(None, str(work / ".sage" / "runs"))
    result = subprocess.run(
        sage_argv("run", "--retries", "1", "--resume", run.id),
        env=env(),
        cwd=work,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ids = output_ids(work / "out.ndjson")
    assert ids == [f"r{i}" for i in range(N)]


def test_first_stage_reading_the_runs_own_stdin_under_kills(tmp_path: Path) -> None:
    """The issue's case: a restarted first stage read on from where the dead one stopped (16-19k
    of 100k lost), or from mid-line when stdin was a file. Its keeper reads `sage run`'s stdin
    itself and feeds the new worker from the line after the last commit."""
    n = 30_000
    write_records(tmp_path / "in.ndjson", n)
    (tmp_path / "p.sh").write_text(
        "sage map \"(__import__('time').sleep(0.02) if r['n'] % 150 == 0 else 0) or r\" "
        '| sage map \'r | {"m": r["n"]}\' > out.ndjson\n'
    )
    with (tmp_path / "in.ndjson").open("rb") as stdin:
        proc = subprocess.Popen(
            sage_argv("run", "-q", "--retries", "3", "--backoff", "0", "p.sh"),
            cwd=tmp_path,
            env=env(),
            stdin=stdin,
            stderr=subprocess.PIPE,
        )
    first = worker_pids(tmp_path, "1.1-map")[0]
    wait_for_output(tmp_path / "out.ndjson", 300_000, proc)
    os.kill(first, signal.SIGKILL)
    second = worker_pids(tmp_path, "1.1-map", count=2)[1]
    wait_for_output(tmp_path / "out.ndjson", 700_000, proc)
    os.kill(second, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = [orjson.loads(x)["m"] for x in (tmp_path / "out.ndjson").read_bytes().splitlines()]
    assert got == list(range(n)), err
    assert err.count(b"worker died (signal 9)") == 2


def _proc_facts(pid: int) -> tuple[str, int, int]:
    """(command name, parent pid, process group) of a running process."""
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return comm, int(fields[1]), int(fields[2])


@pytest.mark.parametrize("fork", ["1", "0"])
def test_sage_stages_start_as_forks_of_sage_run_and_give_the_same_output(
    work: Path, fork: str
) -> None:
    """The sage stages of a parsed pipeline are forks of `sage run` (no interpreter start-up:
    ps shows them as `sage map`), each in its own process group; SAGE_RUN_FORK=0 starts them
    as new interpreters. Both give every record once, in order."""
    proc = subprocess.Popen(
        sage_argv("run", "-q", "p.sh"),
        env=env() | {"SAGE_RUN_FORK": fork},
        cwd=work,
        stderr=subprocess.PIPE,
    )
    pids = stage_pids(work)
    facts = {}
    for name, pid in pids.items():
        try:
            facts[name] = _proc_facts(pid)
        except (OSError, ValueError):  # already done
            continue
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert facts, "no stage was still running to look at"
    for name, (comm, parent, group) in facts.items():
        assert parent == proc.pid and group == pids[name]
        assert (comm == "sage map") == (fork == "1"), (name, comm)
    assert output_ids(work / "out.ndjson") == [f"r{i}" for i in range(N)]


def test_a_stage_whose_environment_a_new_interpreter_reads_is_not_forked(tmp_path: Path) -> None:
    """`PYTHONPATH=lib sage map ...`: only a new interpreter puts lib/ on its path, so that stage
    starts as one (a fork of `sage run` would not find the module)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sage_test_mod.py").write_text("V = 42\n")
    write_records(tmp_path / "in.ndjson", 3)
    (tmp_path / "p.sh").write_text(
        "sage map r in.ndjson | PYTHONPATH=lib sage map "
        '\'r | {"v": __import__("sage_test_mod").V}\' > out.ndjson\n'
    )
    result = subprocess.run(
        sage_argv("run", "-q", "p.sh"), env=env(), cwd=tmp_path, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = [orjson.loads(line) for line in (tmp_path / "out.ndjson").read_bytes().splitlines()]
    assert [r["v"] for r in out] == [42, 42, 42]
