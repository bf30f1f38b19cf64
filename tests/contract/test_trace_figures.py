"""Trace figures agree everywhere (issue 11): the Driver counts records and tokens once; the trace
file, `sage trace`'s summary (stage_figures), the live table (StageWatch) and the progress line
all show those counts, and tokens/s is tokens over busy seconds in each. A record's latency runs
from entering the stage to its result leaving it, waiting behind earlier batches included."""

from __future__ import annotations

import time
from pathlib import Path

from sage_cli.cli.io import RecordWriter
from sage_cli.execution.driver import Driver, ErrorPolicy, Stats
from sage_cli.observability.dashboard import StageWatch
from sage_cli.observability.progress import Progress
from sage_cli.observability.trace import Tracer
from sage_cli.operators.base import Operator
from sage_cli.run.directory import read_events, stage_figures

PAUSE = 0.05


class SlowAnswers(Operator):
    name = "answers"
    produces = {"usage": {"type": "object"}}

    def process(self, batch):
        time.sleep(PAUSE)
        return [r | {"usage": {"prompt_tokens": 3, "completion_tokens": r["id"]}} for r in batch]


def run_traced(tmp_path: Path, records: list[dict]) -> tuple[Stats, Path]:
    trace = tmp_path / "1-answers.trace.ndjson"
    out = (tmp_path / "out.ndjson").open("wb")
    stats = Stats()
    driver = Driver(
        SlowAnswers(), RecordWriter(out.fileno()), ErrorPolicy("sage answers", stats=stats), 1
    )
    driver.observe(Tracer(str(trace), "1-answers"))
    driver.start()
    driver.feed_block("stdin", 1, records, None, True)  # one block: three batches of one
    driver.finish()
    driver.tracer.stop(0)
    out.close()
    return stats, trace


def test_latency_counts_the_wait_behind_earlier_batches(tmp_path):
    _, trace = run_traced(tmp_path, [{"id": i} for i in range(1, 4)])
    batches = [e for e in read_events(trace) if e["ev"] == "b"]
    assert [e["n"] for e in batches] == [1, 1, 1]
    starts = {e["t"] for e in batches}
    assert len(starts) == 1  # the three records entered together
    latencies = [e["d"] for e in batches]
    assert latencies == sorted(latencies)
    assert latencies[2] >= 3 * PAUSE  # its own batch and the two before it


def test_tokens_and_counts_agree_in_trace_summary_table_and_progress(tmp_path, capsys):
    stats, trace = run_traced(tmp_path, [{"id": i} for i in range(1, 4)])
    assert stats.tokens == 3 * 3 + (1 + 2 + 3)
    figures = stage_figures(read_events(trace))
    assert (figures["records_in"], figures["records_out"], figures["tokens"]) == (3, 3, 15)
    rate = stats.tokens / stats.busy_seconds
    assert abs(figures["tokens_per_second"] - rate) < 0.01  # rounded to 2 places in the summary
    watch = StageWatch(str(trace))
    watch.poll()
    assert (watch.figure("in"), watch.figure("out"), watch.figure("tok")) == (3, 3, 15)
    assert abs((watch.tokens_per_second() or 0) - rate) < 0.01
    Progress("sage answers").update(stats, force=True)
    line = capsys.readouterr().err
    assert "3 in, 3 out" in line
    assert f"{rate:,.1f} tok/s" in line


def test_summary_reads_a_stopped_stage_from_its_stop_event_and_a_killed_one_from_its_batches(
    tmp_path,
):
    """A stage that stopped normally puts its latency figures in its stop event, so `sage
    run`'s summary skips its batch events; one killed before its stop event (the last line
    gone) is summed from its batches. Both give what the batch events give."""
    from sage_cli.run.directory import iter_events, trace_figures

    _, trace = run_traced(tmp_path, [{"id": i} for i in range(1, 4)])
    stop = read_events(trace)[-1]
    assert stop["ev"] == "stop" and len(stop["lat"]) == 3 and stop["first"] <= stop["last"]
    full = stage_figures(iter_events(trace, ids=False))
    fast, seen = trace_figures(trace)
    others = [e for e in read_events(trace) if e["ev"] != "b"]
    assert fast == full and seen == len(others)  # the batch events were not parsed
    assert fast["latency_ms"]["p99"] >= 3 * PAUSE * 1000
    killed = tmp_path / "killed.trace.ndjson"
    killed.write_bytes(b"".join(trace.read_bytes().splitlines(keepends=True)[:-1]))
    figures, seen = trace_figures(killed)
    assert seen == len(others) + 3 - 1 and figures["latency_ms"] == full["latency_ms"]
    assert (figures["first_batch"], figures["last_batch"]) == (
        full["first_batch"],
        full["last_batch"],
    )


def test_a_stage_waiting_for_input_has_written_its_trace(tmp_path):
    """While a traced stage blocks on its input pipe, the batches it has finished are in its
    trace file (the studio shows them live): it writes its buffer before it waits."""
    import subprocess
    import time as clock

    from tests.conftest import clean_env, sage_argv

    env = clean_env(SAGE_TRACE_DIR=str(tmp_path), SAGE_TRACE_STAGE="1-map")
    proc = subprocess.Popen(
        sage_argv("map", "r"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"".join(b'{"id": %d}\n' % i for i in range(3)))
        proc.stdin.flush()
        assert [proc.stdout.readline() for _ in range(3)][-1] == b'{"id":2}\n'
        trace = tmp_path / "1-map.trace.ndjson"
        deadline = clock.monotonic() + 10
        batches: list[dict] = []
        while not batches and clock.monotonic() < deadline:
            batches = [e for e in read_events(trace) if e["ev"] == "b"]
            clock.sleep(0.02)
        assert proc.poll() is None  # still waiting for input
        assert [(e["n"], e["ids"]) for e in batches] == [(3, [0, 1, 2])]
    finally:
        proc.kill()
        proc.wait()


def test_the_stop_events_figures_are_the_batch_events_figures_when_batches_wait_unformatted(
    tmp_path,
):
    """A stage fed by another sage stage keeps its plain batch events as numbers and adds them
    to its figures many at once: its stop event still says what its batch events say, with
    batches that must be written at once (ids changed) in between."""
    from sage_cli.run.directory import iter_events, trace_figures

    trace = tmp_path / "2-map.trace.ndjson"
    tracer = Tracer(str(trace), "2-map", sample=0)  # no "r" events: plain but where ids change
    tracer.fed_by = "1-map"
    tracer.start(Stats())
    t = time.perf_counter()
    for k in range(1200):  # more than PLAIN_BATCHES: formatted in several goes
        batch = [{"id": f"r{k}-{i}"} for i in range(1 + k % 5)]
        out = batch if k % 97 != 50 else [{"id": "changed"}]  # now and then, ids change
        d = ((k * 7919) % 1000) / 1e5
        tracer.batch(batch, out, t + k / 1e4, t + k / 1e4 + d, 0, k, k)
    tracer.stop(0)
    events = list(iter_events(trace))
    assert sum(1 for e in events if e["ev"] == "b") == 1200
    assert sum(1 for e in events if e["ev"] == "b" and "oids" in e) == 12  # k = 50, 147, ...
    stop = events[-1]
    assert stop["ev"] == "stop" and "lat" in stop
    full = stage_figures(iter_events(trace, ids=False))
    fast, _ = trace_figures(trace)  # from the stop event
    assert fast["latency_ms"] == full["latency_ms"]
    assert (fast["first_batch"], fast["last_batch"]) == (full["first_batch"], full["last_batch"])
