"""Bounded memory under `sage run` (issue 6), the fast version of `make bench`'s soak area:
the 5-stage pipeline of tests/bench/bench_soak.py (source | map | filter | dedupe --max-keys |
sink --to) over 30k and then 8x as many records. Every record the filter keeps comes out once,
in order; no stage (nor the supervisor) goes over 150 MB, and none grows with the input: the
peak RSS at 240k records is within 25% + 5 MB of that at 30k (a stage that held its input, or
a trace, would add tens of MB here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sage_cli.run.directory import read_events
from sage_cli.run.procs import descendants
from tests.bench.bench_soak import (
    RSS_LIMIT_MB,
    SCRIPT,
    STAGES,
    SUPERVISOR,
    check_output,
    expected_out,
    run_soak,
    write_records,
)
from tests.conftest import clean_env
from tests.readiness import wait_gone
from tests.streaming.keepers import is_worker

SMALL = 30_000
LARGE = 240_000
TEXT_BYTES = 200


def env() -> dict[str, str]:
    e = clean_env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


@pytest.fixture(scope="module")
def soak_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, object]:
    work = tmp_path_factory.mktemp("soak")
    runs = {}
    for n in (SMALL, LARGE):
        data = work / f"in-{n}.ndjson"
        out = work / f"out-{n}.ndjson"
        write_records(data, n, TEXT_BYTES)
        soak = run_soak(
            work,
            data,
            out,
            env=env(),
            sage=[sys.executable, "-m", "sage_cli"],
            keys=2_000,
            sample=False,
            timeout=300,
        )
        assert soak.status == 0, soak.stderr
        runs[n] = (soak, check_output(out, n))
    return runs


def test_every_kept_record_comes_out_once_in_order(soak_runs) -> None:
    for n, (soak, count) in soak_runs.items():
        assert count == expected_out(n)  # check_output also checked ids, order and fields
        by_stage = {s["name"]: s for s in soak.summary["stages"]}
        assert by_stage["1-source"]["records_out"] == n
        assert by_stage["3-filter"]["records_out"] == count
        assert by_stage["4-dedupe"]["records_out"] == count  # no id repeats: nothing dropped
        assert by_stage["5-sink"]["records_in"] == count


@pytest.mark.parametrize("name", [*STAGES, SUPERVISOR])
def test_peak_rss_is_bounded_and_flat(soak_runs, name: str) -> None:
    small, _ = soak_runs[SMALL]
    large, _ = soak_runs[LARGE]
    little, big = small.peak_mb[name], large.peak_mb[name]
    assert 0 < little < RSS_LIMIT_MB
    assert 0 < big < RSS_LIMIT_MB
    assert big <= little * 1.25 + 5, f"{name}: {little:.1f} MB at {SMALL:,}, {big:.1f} at {LARGE:,}"


# -- `sage run --retries`: keepers hold their input on disk past a memory bound --------------


def test_kill_9_of_a_sink_after_its_input_spilled_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    """`sink --to` is stateful (its file is written whole at the end): its keeper keeps all its
    input, past 0.1 MB in a spill file, and a killed sink's successor is fed all of it again."""
    n = 80_000
    data, out = tmp_path / "in.ndjson", tmp_path / "out.ndjson"
    write_records(data, n, TEXT_BYTES)
    (tmp_path / "soak.sh").write_text(SCRIPT.replace("{KEYS}", "2000"))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_cli", "run", "-q", "--retries", "1", "--backoff", "0"]
        + ["--run-dir", str(run_dir), "soak.sh", str(data), str(out)],
        cwd=tmp_path,
        env=env() | {"SAGE_RUN_FLIGHT_MB": "0.1"},
        stderr=subprocess.PIPE,
    )
    trace = run_dir / "stages" / "1.5-sink.trace.ndjson"
    # progress: the filter names the records it keeps (the sink, fed by a sage stage, names
    # none); 100 KB of its ids is ~12k records, ~15% of the input, well past the spill bound
    kept = run_dir / "stages" / "1.3-filter.trace.ndjson"
    deadline = time.monotonic() + 60
    while not (trace.exists() and kept.exists() and kept.stat().st_size > 100_000):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    pid = next(e["pid"] for e in read_events(trace) if e["ev"] == "start")
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert check_output(out, n) == expected_out(n)  # each kept record once, in order
    assert b"worker died (signal 9); restart 1/1" in err
    starts = [e for e in read_events(trace) if e["ev"] == "start"]
    assert len(starts) == 2 and starts[1]["keeper"]["from_line"] == 0  # replayed from line 1


def _tree_peaks(root: int, peaks: dict[int, tuple[str, float]], stop: threading.Event) -> None:
    """VmHWM of every process under `root` (keepers included), polled until `stop`."""
    while not stop.is_set():
        for pid in descendants(root):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
            if hwm is None:
                continue
            role = "worker" if is_worker(pid) else "other"
            peaks[pid] = (role, max(float(hwm.split()[1]) / 1024, peaks.get(pid, ("", 0.0))[1]))
        time.sleep(0.05)


def test_retries_keep_every_process_flat(tmp_path: Path) -> None:
    """With --retries every sage stage is a keeper holding its worker's uncommitted input (all
    of it for dedupe and `sink --to`, which replay from line 1): past SAGE_RUN_FLIGHT_MB a
    stateless stage's keeper stops reading and a stateful one's spills to a file, so no
    process of the run (keepers, workers, sage run) grows with the input."""
    peaks: dict[int, float] = {}
    for n in (SMALL, LARGE):
        data, out = tmp_path / f"in-{n}.ndjson", tmp_path / f"out-{n}.ndjson"
        write_records(data, n, TEXT_BYTES)
        (tmp_path / "soak.sh").write_text(SCRIPT.replace("{KEYS}", "2000"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage_cli", "run", "-q", "--retries", "1"]
            + ["--run-dir", str(tmp_path / f"run-{n}"), "soak.sh", str(data), str(out)],
            cwd=tmp_path,
            env=env() | {"SAGE_RUN_FLIGHT_MB": "1"},
            stderr=subprocess.PIPE,
        )
        seen: dict[int, tuple[str, float]] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_tree_peaks, args=(proc.pid, seen, stop), daemon=True)
        sampler.start()
        _, err = proc.communicate(timeout=300)
        stop.set()
        sampler.join(timeout=5)
        assert proc.returncode == 0, err
        assert check_output(out, n) == expected_out(n)
        keepers = [mb for role, mb in seen.values() if role == "other"]
        assert len(keepers) >= 5, seen  # the five keepers (and bash) were sampled
        peaks[n] = max(keepers)
    assert peaks[LARGE] < RSS_LIMIT_MB
    assert peaks[LARGE] <= peaks[SMALL] * 1.25 + 5, peaks


def test_resume_from_another_directory_after_kill_9_of_the_supervisor(tmp_path: Path) -> None:
    """--resume reads the run's output a line at a time (it was read whole, with two more
    copies of every id: 811 MB to resume a 1.5M-record run, now 262 MB), and a run directory
    given as a relative path from elsewhere is still found after the chdir to the run's cwd."""
    n = 80_000
    work = tmp_path / "work"
    work.mkdir()
    write_records(work / "in.ndjson", n, TEXT_BYTES)
    (work / "soak.sh").write_text(
        SCRIPT.replace("{KEYS}", "2000").replace('sage sink --to "$2"', 'sage sink > "$2"')
    )
    out = work / "out.ndjson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_cli", "run", "-q", "--run-dir", "run"]
        + ["soak.sh", "in.ndjson", "out.ndjson"],
        cwd=work,
        env=env(),
    )
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 5_000_000):  # about a sixth of it
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    events = read_events(work / "run" / "events.ndjson")
    stages = [e["pid"] for e in events if e["ev"] == "stage_start" and e.get("pid")]
    assert len(stages) == 5, stages
    # the stages die with the supervisor (parent-death signal): resume only once they are gone
    wait_gone(stages, "the stages to die with the supervisor", timeout=10)
    before = sum(1 for _ in out.open("rb"))
    assert 0 < before < expected_out(n)
    result = subprocess.run(  # from the parent directory: work/run, not run
        [sys.executable, "-m", "sage_cli", "run", "-q", "--resume", "work/run"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert check_output(out, n) == expected_out(n)  # each kept record once, in order
