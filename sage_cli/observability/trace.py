"""The stage side of `sage run` traces: one NDJSON event stream per stage.

`sage run` sets SAGE_TRACE_DIR and SAGE_TRACE_STAGE for each stage it starts; run_operator then
builds a Tracer and the driver calls it once per batch. Without those variables nothing here is
imported and the driver pays one `is None` test per batch.

Events (one JSON object per line, `t` in Unix seconds):
  {"ev": "start", "t", "pid", "argv", "keeper"?}   `keeper` in a worker of `--retries` (its
      attempt, the status the one before died with, the input and output lines committed before)
  {"ev": "b", "t", "d", "n", "o", "l", "w", "tok", "ids", "oids"}   one batch: when its records
      entered the stage, the seconds until its result left it (the records' latency), records
      in / out, its first input line, the records the stage had written before its output, model
      tokens of its output (`usage`), and ids where they cannot be worked out (below)
  {"ev": "stats", "t", "in", "out", "errors", "skipped", "busy", "tok"}   about once a second
  {"ev": "stop", "t", "status", ...stats, "lat", "first", "last"}   `lat`: the p50, p95 and
      p99 of the batches' `d`, weighted by records; `first`/`last`: when the first batch
      entered and the last left (sage_cli.observability.latency: a reader need not parse every
      batch event for them)
  {"ev": "r", "t", "in": [...], "out": [...]}   the content of the first SAGE_TRACE_SAMPLE (20)
      records of the stage and what it made of them (long strings and vectors cut), so the
      studio can show a record before and after each stage; none with SAGE_TRACE_IDS=0
Ids only where they change. A stage whose input comes straight from another sage stage (the
registry saw that stage's stdout as its stdin) names no input ids: its input line N is that
stage's output record N, so a reader (sage_cli.observability.views) takes them from there, by
`l` and `w`. Every other stage (the first of a pipeline, one after a non-sage command, one
reading files) writes its input ids (`ids`). Under `--retries` a stage's feeder is a keeper,
which passes on committed output only: its worker numbers input lines as the input does, each
worker's outputs start where the output forwarded before it ended (`keeper.forwarded`), and it
flushes its trace before each write of its output, so a commit marker never reaches the keeper
before the events of what it commits are on disk (a kill -9 cannot take them). A
batch whose output is not one record per input record, or whose first or last output id is not
its input's, also writes its output ids (`oids`). So a chain of one-to-one stages collects ids
once, in its first stage (collecting and writing them is ~50-60 ns a record, a tenth of a light
stage). Writes are buffered and appended to the file at most about once a second;
`SAGE_TRACE_IDS=0` drops the ids (counts and latencies only). A stage
about to wait for input writes what it has buffered first (the Driver's `idle`, which the reader
calls before it blocks on a pipe), so a live view (the studio) sees records as they pass. (A
thread that flushed every second did the same and cost a light stage ~2% more CPU, measured in
a 4-stage pipeline of 1M records.)
"""

from __future__ import annotations

import os
import resource
import sys
import time
from itertools import repeat
from typing import Any

import orjson

from sage_cli.observability.latency import BatchFigures
from sage_cli.observability.redact import redact_argv
from sage_cli.run.env import StageEnv, keeper_attempt

STATS_SECONDS = 1.0
#: records per stage whose content is kept in the trace (SAGE_TRACE_SAMPLE)
SAMPLE_RECORDS = 20
#: longest string and list kept in a sampled record
SAMPLE_CHARS = 1000
SAMPLE_ITEMS = 16
FLUSH_SECONDS = 1.0
FLUSH_BYTES = 64 * 1024
#: batch events held as numbers before they are formatted together (~40 KB of events)
PLAIN_BATCHES = 512
_BATCH = b'{"ev":"b","t":%.6f,"d":%.6f,"n":%d,"o":%d,"l":%d,"w":%d'
_PLAIN = _BATCH + b"}\n"
_get = dict.get


class Tracer:
    """Appends one stage's trace events to `path`."""

    def __init__(
        self, path: str, stage: str, with_ids: bool = True, sample: int = SAMPLE_RECORDS
    ) -> None:
        self.path = path
        self.stage = stage
        self.with_ids = with_ids
        #: the sage stage (its name, or its pid under bash) whose output is this stage's
        #: input: its trace names the records, this one does not (see the module's docstring)
        self.fed_by: str | int | None = None
        #: records whose content is still to be sampled (never without ids)
        self.sample_left = sample if with_ids else 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._parts: list[bytes] = []
        #: batch events not formatted yet: (t, d, n, o, l, w)
        self._plain: list[tuple[float, float, int, int, int, int]] = []
        self._size = 0
        # perf_counter, the clock the batches come timed with: no clock read of its own
        self._last_flush = time.perf_counter()
        self._last_stats = 0.0
        # perf_counter -> Unix time, fixed once: batches are timed with perf_counter
        self._offset = time.time() - time.perf_counter()
        self.stats: Any = None
        self.figures = BatchFigures()

    def _emit(self, event: dict[str, Any]) -> None:
        data = orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE, default=str)
        self._format_plain()
        self._parts.append(data)

    def _format_plain(self) -> None:
        """The batch events kept as numbers, formatted in one go: one at a time, each batch's
        formatting was most of what tracing cost a light stage."""
        plain = self._plain
        if plain:
            self._plain = []
            self.figures.add_rows(plain)
            data = b"".join([_PLAIN % numbers for numbers in plain])
            self._parts.append(data)
            self._size += len(data)

    def start(self, stats: Any) -> None:
        self.stats = stats
        event = {
            "ev": "start",
            "t": time.time(),
            "pid": os.getpid(),
            "argv": redact_argv(sys.argv[1:]),
        }
        if self.fed_by is not None:
            event["fed_by"] = self.fed_by
        kept = keeper_attempt()  # a keeper's worker (sage_cli.run.keeper)
        if kept is not None:
            number, after, first, forwarded = kept
            event["keeper"] = {
                "attempt": number,
                "after": after,
                "from_line": first,
                "forwarded": forwarded,
            }
        self._emit(event)
        self.flush()

    def batch(
        self,
        batch: list[dict[str, Any]],
        out: list[dict[str, Any]],
        t0: float,
        t1: float,
        tokens: int = 0,
        first_line: int = 0,
        written: int = 0,
    ) -> None:
        """One batch: its records entered the stage at `t0` and its result left at `t1`
        (perf_counter); `tokens`: the model tokens its output reports (the Driver counts);
        `first_line`: its first record's input line; `written`: records the stage wrote before
        this batch's output."""
        # formatted by hand: this runs once per batch of every traced stage (DESIGN: tracing
        # costs the stage as little as it can), and the ids are the only per-record work
        t = t0 + self._offset
        d = t1 - t0
        n, o = len(batch), len(out)
        with_ids = self.with_ids
        oids = with_ids and (
            n != o
            or (
                o > 0
                and (
                    _get(out[0], "id") != _get(batch[0], "id")
                    or _get(out[-1], "id") != _get(batch[-1], "id")
                )
            )
        )
        if not (tokens or oids or (with_ids and self.fed_by is None) or self.sample_left > 0):
            # nothing but numbers (a stage fed by another sage stage, one record out per
            # record in): formatted later, many at once (_format_plain)
            self._plain.append((t, d, n, o, first_line, written))
            if len(self._plain) >= PLAIN_BATCHES:
                self._format_plain()
        else:
            data = _BATCH % (t, d, n, o, first_line, written)
            if tokens:
                data += b',"tok":%d' % tokens
            if oids:  # ids last, so a reader that needs none can cut the line short
                data += b',"oids":' + orjson.dumps(list(map(_get, out, repeat("id"))), default=str)
            if with_ids and self.fed_by is None:
                data += b',"ids":' + orjson.dumps(list(map(_get, batch, repeat("id"))), default=str)
            data += b"}\n"
            if self.sample_left > 0:
                data += self._sample(batch, out, round(t, 6))
            self._format_plain()  # the batches before this one first, in the figures too
            self.figures.add_rows([(t, d, n, o, first_line, written)])
            self._parts.append(data)
            self._size += len(data)
        if self._size >= FLUSH_BYTES:  # small writes: no large buffers to allocate and fault in
            self.flush()
        if t1 - self._last_stats >= STATS_SECONDS:
            self._last_stats = t1
            self._emit_stats("stats")
        if t1 - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def _sample(self, batch: list[dict[str, Any]], out: list[dict[str, Any]], t: float) -> bytes:
        """An "r" event: the first records of `batch` and the outputs made from them (paired by
        position when the batch was one-to-one, else by id, parent_id or query_id)."""
        taken = batch[: self.sample_left]
        self.sample_left -= len(taken)
        if len(out) == len(batch):
            made = out[: len(taken)]
        else:
            ids = {r.get("id") for r in taken if isinstance(r.get("id"), str | int)}
            made = [
                r for r in out if any(r.get(k) in ids for k in ("id", "parent_id", "query_id"))
            ][: 4 * len(taken)]
        event = {"ev": "r", "t": t, "in": [clip(r) for r in taken], "out": [clip(r) for r in made]}
        try:
            return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE, default=str)
        except (TypeError, orjson.JSONEncodeError):
            return b""

    def _emit_stats(self, kind: str, **extra: Any) -> None:
        s = self.stats
        if s is None:
            return
        self._emit(
            {
                "ev": kind,
                "t": time.time(),
                "in": s.records_in,
                "out": s.records_out,
                "errors": s.errors,
                "skipped": s.skipped,
                "busy": round(s.busy_seconds, 6),
                "tok": s.tokens,
                **extra,
            }
        )

    def stop(self, status: int) -> None:
        # the stage's own peak RSS: the supervisor's wait4 figure is at least the RSS of the
        # process image the stage's exec replaced (the supervisor's, ~22 MB)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = round(usage.ru_utime + usage.ru_stime, 3)  # a run bash runs has no wait4 of its own
        self._format_plain()  # every batch in the figures
        self._emit_stats(
            "stop", status=status, hwm_mb=peak_rss_mb(), cpu=cpu, **self.figures.event_fields()
        )
        self.flush()
        fd, self.fd = self.fd, -1  # nothing writes to a closed (or reused) fd
        try:
            os.close(fd)
        except OSError:
            pass

    def flush(self) -> None:
        """Everything buffered onto disk, in order (one thread uses a tracer: its stage's)."""
        self._format_plain()
        self._last_flush = time.perf_counter()
        if not self._parts or self.fd < 0:
            return
        data = b"".join(self._parts)
        self._parts = []
        self._size = 0
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # a trace must never stop the data


def peak_rss_mb() -> float | None:
    """This process's peak RSS in MB (VmHWM: its own image only, unlike ru_maxrss, which on
    Linux also counts reaped children and the image an exec replaced); None off Linux."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def clip(value: Any, depth: int = 0) -> Any:
    """A record cut down for the trace: long strings and lists shortened, deep nesting cut."""
    if isinstance(value, str):
        if len(value) > SAMPLE_CHARS:
            return value[:SAMPLE_CHARS] + f"... ({len(value)} chars)"
        return value
    if depth >= 8:
        return "..."
    if isinstance(value, dict):
        return {str(k): clip(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        head = [clip(v, depth + 1) for v in value[:SAMPLE_ITEMS]]
        if len(value) > SAMPLE_ITEMS:
            head.append(f"... ({len(value)} items)")
        return head
    return value


def tracer_from_env(
    command: str, env: StageEnv | None = None, reads_stdin: bool = False
) -> Tracer | None:
    """The tracer `sage run` asked for through the stage's environment, or None.
    `reads_stdin`: the stage's records come from its stdin only."""
    env = env or StageEnv.read()
    if not env.trace_dir:
        return None
    stage = env.trace_stage or command
    fed_by: str | int | None = env.trace_fed_by if reads_stdin else None
    if env.trace_stage is None and env.run_dir:  # started by bash inside `sage run`
        from sage_cli.run.registry import register, sage_feeder

        try:
            stage = register(env.trace_dir, command, redact_argv(sys.argv[1:]))
        except OSError:
            return None
        fed_by = sage_feeder() if reads_stdin else None
    try:
        tracer = Tracer(
            os.path.join(env.trace_dir, f"{stage}.trace.ndjson"),
            stage,
            with_ids=env.trace_ids,
            sample=_int_env("SAGE_TRACE_SAMPLE", SAMPLE_RECORDS),
        )
    except OSError:
        return None
    tracer.fed_by = fed_by
    return tracer


def _int_env(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default
