"""Run directories of `sage run` and the summary `sage trace` shows.

A run directory (`.sage/runs/<run id>/` by default) holds:
  run.json            the script, its arguments, where it ran, where its output went
  events.ndjson       the supervisor's events: run start/stop, stage start/exit/restart
  stages/<stage>.trace.ndjson   each sage stage's own events (sage_cli.observability.trace)
  stages/<stage>.stderr         each stage's stderr
  output.ndjson       the run's output when it went to stdout (kept for --resume)
  dead.ndjson         records taken out of a stage that crashed on them twice
  summary.json        per-stage figures, written when the run ends
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from sage_cli.errors import UsageError
from sage_cli.observability.latency import weighted_percentiles
from sage_cli.observability.trace import peak_rss_mb

DEFAULT_BASE = os.path.join(".sage", "runs")


def new_run_id() -> str:
    # os.urandom, not secrets: the id needs no more, and `secrets` (hashlib, hmac) would add
    # ~4 ms to every `sage run`'s start
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


class RunDirectory:
    """The files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.id = self.path.name

    @classmethod
    def create(cls, run_dir: str | None = None, base: str = DEFAULT_BASE) -> RunDirectory:
        path = Path(run_dir) if run_dir else Path(base) / new_run_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        # private whatever the umask: a run keeps copies of records and command lines
        path.mkdir(mode=0o700, exist_ok=True)
        (path / "stages").mkdir(mode=0o700, exist_ok=True)
        if not run_dir:  # runs under the default place are capped; a --run-dir is the user's
            keep = os.environ.get("SAGE_RUN_KEEP", "")
            if keep != "0":
                prune_runs(base, int(keep) if keep.isdigit() else DEFAULT_KEEP, spare=path)
        return cls(path)

    @property
    def stages_dir(self) -> Path:
        return self.path / "stages"

    @property
    def events_path(self) -> Path:
        return self.path / "events.ndjson"

    @property
    def output_path(self) -> Path:
        return self.path / "output.ndjson"

    @property
    def dead_path(self) -> Path:
        return self.path / "dead.ndjson"

    def trace_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.trace.ndjson"

    def stderr_path(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.stderr"

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return orjson.loads((self.path / name).read_bytes())
        except FileNotFoundError:
            return {}

    def write_json(self, name: str, value: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
        os.replace(tmp, self.path / name)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.events_path)


_ID_LIST = b'ids":['  # the end of `,"ids":[` and of `,"oids":[`
_BATCH = b'{"ev":"b",'  # how a batch event starts (Tracer.batch writes it so)
_O = ord("o")


def read_events(path: Path, ids: bool = True) -> list[dict[str, Any]]:
    """Every complete event of an NDJSON trace file (a torn last line is ignored).
    With ids=False the batches' id lists (the bulk of the file) are not parsed."""
    return list(iter_events(path, ids))


def iter_events(path: Path, ids: bool = True, batches: bool = True) -> Iterator[dict[str, Any]]:
    """The events of a trace file one at a time, read line by line: a trace grows with the
    run (about 10 MB per million records with ids) and is never held in memory whole.
    With batches=False the batch events (nearly all of a trace) are skipped unparsed."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except FileNotFoundError:
        return
    loads = orjson.loads
    with fh:
        for line in fh:
            if not batches and line.startswith(_BATCH):
                continue
            if not ids:  # the id lists come last (`,"oids":[` before `,"ids":[`): one scan
                cut = line.find(_ID_LIST)
                if cut > 0:
                    cut -= 3 if line[cut - 1] == _O else 2
                    line = line[:cut] + b"}"
            try:
                yield loads(line)
            except orjson.JSONDecodeError:
                continue


def list_runs(base: str = DEFAULT_BASE) -> list[RunDirectory]:
    """Every run under `base`, oldest first (by when its run.json was written)."""
    root = Path(base)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        try:
            found.append(((p / "run.json").stat().st_mtime, p.name, p))
        except OSError:
            continue  # not a run (or one being removed)
    return [RunDirectory(p) for _, _, p in sorted(found)]


def find_run(run: str | None, base: str = DEFAULT_BASE) -> RunDirectory:
    """A run by id, unique id prefix or path; the latest run under `base` when `run` is None or
    "latest"."""
    if run and run != "latest":
        for candidate in (Path(run), Path(base) / run):
            if (candidate / "run.json").exists():
                return RunDirectory(candidate)
        matches = [r for r in list_runs(base) if r.id.startswith(run)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(r.id for r in matches[:5]) + (" ..." if len(matches) > 5 else "")
            raise UsageError(f"{run}: ambiguous run id prefix, matches {shown}")
        raise UsageError(f"{run}: no such run (see `sage trace list`)")
    runs = list_runs(base)
    if not runs:
        raise UsageError(f"no runs in {base}; start one with `sage run SCRIPT`")
    return runs[-1]


def is_running(run: RunDirectory) -> bool:
    """Whether the supervisor of `run` is still alive (it wrote no summary and its pid lives)."""
    if (run.path / "summary.json").exists():
        return False
    pid = run.read_json("run.json").get("pid")
    if not isinstance(pid, int):
        starts = [e for e in iter_events(run.events_path, ids=False) if e.get("ev") == "run_start"]
        pid = starts[-1].get("pid") if starts else None
    return pid_alive(pid)


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: finished runs kept under the default run directory when a new run starts (SAGE_RUN_KEEP)
DEFAULT_KEEP = 100


def prune_runs(
    base: str = DEFAULT_BASE, keep: int = DEFAULT_KEEP, spare: Path | None = None
) -> list[str]:
    """Remove the oldest runs under `base` so at most `keep` remain; runs still going and
    `spare` are never removed. Returns the ids removed."""
    import shutil

    runs = list_runs(base)
    removed: list[str] = []
    excess = len(runs) - keep
    for run in runs:
        if excess <= 0:
            break
        if (spare is not None and run.path.resolve() == spare.resolve()) or is_running(run):
            continue
        shutil.rmtree(run.path, ignore_errors=True)
        removed.append(run.id)
        excess -= 1
    return removed


# -- the summary ------------------------------------------------------------------------------------


def stage_figures(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts, latency and tokens of one stage from its own trace events (all attempts)."""
    records_in = records_out = errors = skipped = tokens = 0
    busy = 0.0
    latencies: list[tuple[float, int]] = []
    first = last = None
    attempt: dict[str, Any] = {}
    attempts: list[dict[str, Any]] = []

    # the batch events are nearly all of a trace: their sums are kept in locals, not the dict
    b_in = b_out = b_tok = 0

    def close_attempt() -> None:
        nonlocal b_in, b_out, b_tok
        if b_in or b_out or b_tok:
            attempt["b_in"], attempt["b_out"], attempt["b_tok"] = b_in, b_out, b_tok
            b_in = b_out = b_tok = 0
        if attempt:
            attempts.append(dict(attempt))
            attempt.clear()

    add = latencies.append
    for ev in events:
        get = ev.get
        kind = get("ev")
        if kind == "b":
            n = get("n", 0)
            d = float(get("d", 0.0))
            add((d, n))
            b_tok += int(get("tok") or 0)
            t = float(get("t", 0.0))
            if first is None or t < first:
                first = t
            if last is None or t + d > last:
                last = t + d
            b_in += n
            b_out += get("o", 0)
        elif kind == "start":
            close_attempt()
            attempt["start"] = ev.get("t")
            if ev.get("keeper"):
                attempt["keeper"] = ev["keeper"]
        elif kind in ("stats", "stop"):
            keys = ("in", "out", "errors", "skipped", "busy", "tok")
            attempt.update({k: ev[k] for k in keys if k in ev})
            if kind == "stop":
                attempt["status"] = ev.get("status")
                attempt["hwm"] = ev.get("hwm_mb")
                attempt["cpu"] = ev.get("cpu")
                attempt["stop"] = ev.get("t")
                if "lat" in ev:  # the stage's own latency figures (observability.latency)
                    attempt["lat"] = (ev["lat"], ev.get("first"), ev.get("last"))
    close_attempt()
    for a, after in zip(attempts, [*attempts[1:], None]):  # noqa: B905 - one longer
        kept, next_kept = a.get("keeper"), after and after.get("keeper")
        if kept and next_kept:
            # a keeper's worker that died: what counts is what the keeper committed of it
            # (the one after it starts there), not what it read or wrote past its last commit
            records_in += max(0, next_kept["from_line"] - kept["from_line"])
            records_out += max(0, next_kept["forwarded"] - kept["forwarded"])
        else:
            records_in += a.get("in", a.get("b_in", 0))
            records_out += a.get("out", a.get("b_out", 0))
        errors += a.get("errors", 0)
        skipped += a.get("skipped", 0)
        busy += float(a.get("busy", 0.0))
        tokens += int(a.get("tok", a.get("b_tok", 0)))  # the Driver's counter, as the table shows
    p50, p95, p99 = weighted_percentiles(latencies)
    if not latencies and len(attempts) == 1 and "lat" in attempts[0]:
        # read without its batch events (trace_figures): the stage's stop event has them
        (p50, p95, p99), first, last = attempts[0]["lat"]
    # the stage's own peak RSS, when every attempt reported it (a crashed one did not)
    hwm = [float(a["hwm"]) for a in attempts if a.get("hwm") is not None]
    own_rss = max(hwm) if attempts and len(hwm) == len(attempts) else None
    return {
        "records_in": records_in,
        "records_out": records_out,
        "errors": errors,
        "skipped": skipped,
        "busy_seconds": round(busy, 6),
        "tokens": tokens,
        "tokens_per_second": round(tokens / busy, 2) if tokens and busy > 0 else None,
        "latency_ms": {
            k: (round(v * 1000, 3) if v is not None else None)
            for k, v in (("p50", p50), ("p95", p95), ("p99", p99))
        },
        "first_batch": first,
        "last_batch": last,
        "own_peak_rss_mb": own_rss,
        # what a stage says of itself (a run bash runs has no supervisor's wait4): None where
        # an attempt ended without its stop event (killed)
        "own_status": attempts[-1].get("status") if attempts else None,
        "own_cpu_seconds": (
            round(sum(float(a["cpu"]) for a in attempts), 3)
            if attempts and all(a.get("cpu") is not None for a in attempts)
            else None
        ),
        "own_attempts": len(attempts),
        "own_started": attempts[0].get("start") if attempts else None,
        "own_ended": attempts[-1].get("stop") if attempts else None,
    }


def trace_figures(path: Path) -> tuple[dict[str, Any], int]:
    """`stage_figures` of one stage's trace file, and how many events it holds (0: the stage
    was not traced). One attempt that stopped normally says its latency figures in its stop
    event, so its batch events are skipped unparsed; otherwise (killed, restarted) they are
    all read, streamed: the summary of a long run must not hold its traces in memory."""
    events = list(iter_events(path, ids=False, batches=False))
    starts = sum(1 for ev in events if ev.get("ev") == "start")
    if starts == 1 and events[-1].get("ev") == "stop" and "lat" in events[-1]:
        return stage_figures(events), len(events)
    seen = [0]
    return stage_figures(_counted(iter_events(path, ids=False), seen)), seen[0]


def _counted(events: Iterable[dict[str, Any]], seen: list[int]) -> Iterator[dict[str, Any]]:
    for ev in events:
        seen[0] += 1
        yield ev


def stderr_tail(path: Path, lines: int = 3) -> list[str]:
    """The last lines a stage wrote on stderr (its error, usually)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 4096))
            data = fh.read()
    except FileNotFoundError:
        return []
    return [ln.decode("utf-8", "replace") for ln in data.splitlines() if ln.strip()][-lines:]


def summarise(run: RunDirectory) -> dict[str, Any]:
    """summary.json: the run and, per stage, records in/out, errors, throughput, latency
    percentiles, tokens, CPU seconds, peak RSS, restarts and exit status."""
    info = run.read_json("run.json")
    events = run.events()
    stages: dict[str, dict[str, Any]] = {}
    for s in info.get("stages", []):
        stages[s["name"]] = {
            "name": s["name"],
            "index": s["index"],
            "group": s.get("group", 0),
            "command": s["label"],
            "argv": s["argv"],
            "model": s.get("model", False),
            "attempts": 0,
            "restarts": 0,
            "cpu_seconds": 0.0,
            "peak_rss_mb": 0.0,
            "status": None,
            "started": None,
            "ended": None,
            "relay": {},
        }
    run_start = run_end = None
    status = None
    for ev in events:
        kind = ev.get("ev")
        st = stages.get(ev.get("stage", ""))
        if kind == "run_start" and run_start is None:
            run_start = ev["t"]
        elif kind == "run_stop":
            run_end = ev["t"]
            status = ev.get("status")
        elif st is None:
            continue
        elif kind == "stage_start":
            st["attempts"] += 1
            if st["started"] is None:
                st["started"] = ev["t"]
        elif kind == "stage_exit":
            st["ended"] = ev["t"]
            st["status"] = ev.get("status")
            st["cpu_seconds"] = round(st["cpu_seconds"] + ev.get("cpu", 0.0), 3)
            st["peak_rss_mb"] = max(st["peak_rss_mb"], ev.get("rss_mb", 0.0))
        elif kind == "restart":
            st["restarts"] += 1
        elif kind == "relay":
            st["relay"].update({k: ev[k] for k in ("records_in", "records_out") if k in ev})
    for name, st in stages.items():
        figures, seen = trace_figures(run.trace_path(name))
        st["traced"] = bool(seen)
        if seen:
            if st["attempts"] == 0:  # started by bash (no supervisor events): its own account
                st.update(
                    attempts=max(1, figures["own_attempts"]),
                    restarts=max(0, figures["own_attempts"] - 1),
                    status=figures["own_status"],
                    started=figures["own_started"],
                    ended=figures["own_ended"],
                    cpu_seconds=figures["own_cpu_seconds"] or 0.0,
                )
            st.update(figures)
            if figures["own_peak_rss_mb"] is not None:  # wait4's figure is kept beside it
                st["wait4_rss_mb"] = st["peak_rss_mb"]
                st["peak_rss_mb"] = figures["own_peak_rss_mb"]
        else:  # an opaque stage: what the supervisor's relay counted, if it relayed
            st.update(
                {
                    "records_in": st["relay"].get("records_in"),
                    "records_out": st["relay"].get("records_out"),
                    "errors": None,
                    "tokens": None,
                    "tokens_per_second": None,
                    "latency_ms": {"p50": None, "p95": None, "p99": None},
                }
            )
        wall = (st["ended"] - st["started"]) if st["started"] and st["ended"] else None
        st["wall_seconds"] = round(wall, 3) if wall else None
        st["stderr_tail"] = stderr_tail(run.stderr_path(name))
        count = st.get("records_in") or st.get("records_out")
        st["throughput"] = round(count / wall, 1) if count and wall else None
    return {
        "run_id": run.id,
        "script": info.get("script"),
        "args": info.get("args", []),
        "started": run_start,
        "ended": run_end,
        "seconds": round(run_end - run_start, 3) if run_start and run_end else None,
        "status": status,
        "stages": sorted(stages.values(), key=lambda s: (s["group"], s["index"])),
        # the process that wrote the summary (the supervisor, when `sage run` does), up to now
        "supervisor_peak_rss_mb": peak_rss_mb(),
    }
