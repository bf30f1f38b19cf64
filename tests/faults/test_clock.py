"""Clock changes during a time window (issue 6, faults).

Arrival-time windows (`sage window --seconds S`, no --time-field) run on a steady clock (the
wall clock read once, plus monotonic time), so a wall-clock step neither flushes open windows
early nor stalls them. Tested for real: the stage runs under libfaketime (Debian `faketime`,
`make system-deps`) with its wall clock stepped an hour forward or back mid-run, CLOCK_MONOTONIC
left alone as a real NTP step leaves it. Event-time windows use the records' own timestamps:
out-of-order, backwards, far-future and absurd timestamps lose no record (each is counted in
its windows or is an error record under --on-error) and the open state stays bounded by
(lateness + size) / slide windows per key.
"""

from __future__ import annotations

import glob
import math
import random
import select
import subprocess
import time

import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.window import Window
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


def _faketime_env(stamp_file) -> dict[str, str]:
    assert LIBFAKETIME, "libfaketime is needed: run `make system-deps` (apt-get install faketime)"
    return clean_env(
        LD_PRELOAD=LIBFAKETIME[0],
        FAKETIME_TIMESTAMP_FILE=str(stamp_file),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",  # an NTP step moves CLOCK_REALTIME only
    )


def test_libfaketime_really_steps_the_wall_clock(tmp_path):
    """The control: under this environment the child's time.time() jumps, monotonic does not."""
    stamp = tmp_path / "stamp"
    stamp.write_text("+3600\n")
    code = "import time; print(time.time(), time.monotonic())"
    out = subprocess.run(
        [sage_argv()[0], "-c", code], capture_output=True, env=_faketime_env(stamp), check=True
    ).stdout.split()
    assert float(out[0]) - time.time() == pytest.approx(3600, abs=5)
    assert float(out[1]) == pytest.approx(time.monotonic(), abs=5)


@pytest.mark.parametrize("step", ["+3600", "-3600"], ids=["forward-1h", "back-1h"])
def test_wall_clock_step_neither_flushes_nor_stalls_arrival_windows(tmp_path, step):
    stamp = tmp_path / "stamp"
    stamp.write_text("+0\n")
    proc = subprocess.Popen(
        sage_argv("window", "--seconds", "1", "--agg", "count"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_faketime_env(stamp),
    )
    # Driven by what comes out, not by a stopwatch: feed records until a first window closes
    # (the stage runs and flushes), step the wall clock, then feed until two more windows have
    # closed. A stage on the wall clock flushes early on a step forward (an hour-long gap
    # between starts) or never closes a window again on a step back (the deadline).
    sent, seen = 0, []
    stepped_at = None
    deadline = time.monotonic() + 60
    while stepped_at is None or len(seen) < stepped_at + 2:
        assert time.monotonic() < deadline, f"windows stalled after the step: {seen}"
        assert proc.poll() is None, proc.stderr.read()
        proc.stdin.write(b'{"id": "r%d"}\n' % sent)
        proc.stdin.flush()
        sent += 1
        while select.select([proc.stdout], [], [], 0.05)[0]:
            seen.append(parse_ndjson(proc.stdout.readline())[0])
        if stepped_at is None and seen:
            stamp.write_text(step + "\n")  # the wall clock jumps, mid-window
            stepped_at = len(seen)
    before_eof = len(seen)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    windows = seen + parse_ndjson(out)

    assert sum(w["count"] for w in windows) == sent  # nothing lost
    starts = [w["start"] for w in windows]
    assert len(set(w["id"] for w in windows)) == len(windows)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # one-second windows, one after the other: no hour-long jump forward or back (a window
    # with no record is not emitted, so a loaded machine may leave a gap of a few seconds)
    assert all(1 <= g <= 60 for g in gaps), f"window starts {starts}"
    assert abs(starts[0] - time.time()) < 60
    # every window but the open one came out while the stage ran (none stalled to the end)
    assert len(windows) - 1 <= before_eof, (before_eof, windows)


def test_steady_clock_ignores_a_wall_clock_step(monkeypatch):
    real = time.time
    op = Window(seconds=5)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert op.process([{"a": 1}]) == []
    assert op.tick(time.time()) == []  # an hour "later" on the wall: the window is still open
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert op.process([{"a": 2}]) == []
    (window,) = op.close()
    assert window["count"] == 2
    assert abs(window["start"] - real()) < 10


def test_an_injected_clock_going_backwards_never_reopens_an_emitted_window():
    now = [100.0]
    op = Window(seconds=5, clock=lambda: now[0])
    op.process([{"a": 1}])
    now[0] = 106.0
    first = op.tick(0.0)
    assert [w["id"] for w in first] == ["window:100"]
    now[0] = 101.0  # the clock steps back into the emitted window
    op.process([{"a": 2}])
    rest = op.close()
    ids = [w["id"] for w in first + rest]
    assert len(ids) == len(set(ids)) == 2, ids  # no second "window:100"
    assert sum(w["count"] for w in first + rest) == 2


# -- event time ----------------------------------------------------------------------------


def _feed_one_by_one(op: Window, records: list[dict]) -> tuple[list[dict], int, int]:
    """Like the driver under --on-error emit: (windows, errors, most open windows seen)."""
    out, errors, most = [], 0, 0
    for record in records:
        try:
            out.extend(op.process([record]))
        except RecordError:
            errors += 1
        most = max(most, len(op.open))
    out.extend(op.close())
    return out, errors, most


@pytest.mark.parametrize("slide", [None, 5], ids=["tumbling", "sliding"])
@pytest.mark.parametrize("lateness", [0, 60])
def test_out_of_order_and_backwards_timestamps_lose_nothing_and_state_is_bounded(lateness, slide):
    rng = random.Random(7)
    base = 1_700_000_000
    records = []
    for i in range(20_000):
        t = base + i // 10 + rng.uniform(-90, 5)  # mostly forward, often out of order
        if i % 500 == 0:
            t -= 86_400 * rng.randint(1, 365)  # a clock that jumped back (a day to a year)
        records.append({"t": t, "k": i % 3})
    op = Window(seconds=10, slide=slide, time_field="t", key="k", lateness=lateness)
    out, errors, most = _feed_one_by_one(op, records)
    accepted = len(records) - errors
    counted = sum(w["count"] for w in out)
    if slide is None:
        assert counted == accepted  # each record in its one window, or an error
    else:  # in 2 windows, or only the one still open when it came late
        assert accepted <= counted <= 2 * accepted
    # open windows: at most (lateness + size) / slide + 1 per key, whatever the timestamps
    assert most <= 3 * ((lateness + 10) / (slide or 10) + 2), most
    assert errors >= 40  # the year-old records are late, not silently folded in
    ids = [w["id"] for w in out]
    assert len(ids) == len(set(ids))


def test_every_record_is_in_a_window_or_an_error(tmp_path):
    """Through the command, --on-error emit: far-future, backwards and absurd timestamps."""
    ts = [100, 105, 101, 3e9, 110, 4e9 + 1, 1e300, -5e8, 3e9 + 2]
    records = [{"id": f"r{i}", "t": t} for i, t in enumerate(ts)]
    done = run_sage(
        "window",
        "--seconds",
        "10",
        "--time-field",
        "t",
        "--on-error",
        "emit",
        input=ndjson(records),
    )
    assert done.returncode == 0, done.stderr
    out = parse_ndjson(done.stdout)
    errors = [r for r in out if "_error" in r]
    windows = [r for r in out if "_error" not in r]
    assert sum(w["count"] for w in windows) + len(errors) == len(records)
    assert {e["id"] for e in errors} >= {"r4", "r6", "r7", "r8"}  # late after the far future
    assert any("out of range" in e["_error"]["error"] for e in errors if e["id"] == "r6")


def test_absurd_timestamp_is_an_error_not_a_silent_drop():
    op = Window(seconds=10, time_field="t")
    with pytest.raises(RecordError, match="out of range"):
        op.process([{"t": 1e300}])
    assert op.open == {} and op.watermark == -math.inf


def test_a_slide_so_small_that_state_explodes_is_refused():
    with pytest.raises(OptionError, match="raise --slide"):
        Window(seconds=86_400, slide=0.001)
    with pytest.raises(OptionError, match="raise --slide"):
        Window(size=1_000_000, slide=1)
    Window(seconds=60, slide=1)  # 60 windows a record: fine
