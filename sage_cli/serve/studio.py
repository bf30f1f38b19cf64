"""The studio: a web page over the run directories of `sage run` (`sage studio`, or
`sage serve --studio`), live while runs go on.

The page (`studio.html`, one file, no external assets) polls three JSON routes once a second:

  GET /studio/api/runs               the runs, newest first: running, finished (exit status) or
                                     killed (no run_stop and the supervisor is gone)
  GET /studio/api/runs/ID            one run: per stage records in/out, errors, records/s (over
                                     the last seconds while it runs, else over its life),
                                     tokens/s, CPU seconds (read from /proc while the stage
                                     runs), status; the timeline (each stage's span and its
                                     throughput over time); the record ids whose content the
                                     trace sampled
  GET /studio/api/runs/ID/record?id=X   one record's path: at each stage, the record as it went
                                     in and what came out (from the trace's "r" samples; chunks
                                     `X#n` and hits for X count as X's)

Everything shown is data: the page builds its DOM with textContent, never HTML from a run.
The functions here read run directories (sage_cli.run.directory) and know nothing of HTTP but
`studio_routes`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from sage_cli.run.directory import RunDirectory, iter_events, pid_alive, summarise

#: seconds of batches the live records/s of a running stage is measured over
RECENT = 5.0
#: points in a stage's throughput series on the timeline
BINS = 60
RUNS_SHOWN = 100
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: Any) -> float | None:
    """utime + stime of a live process, from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError, TypeError):
        return None


def run_state(run: RunDirectory) -> dict[str, Any]:
    """id, script, args, started, ended, status (running / ok / failed / killed), exit."""
    info = run.read_json("run.json")
    start: dict[str, Any] = {}
    stop: dict[str, Any] = {}
    for ev in run.events():
        if ev.get("ev") == "run_start" and not start:
            start = ev
        elif ev.get("ev") == "run_stop":
            stop = ev
    if stop:
        code = stop.get("status")
        status = "ok" if code == 0 else "failed"
    elif pid_alive(start.get("pid")):
        status, code = "running", None
    else:
        status, code = "killed", None
    started = start.get("t") or info.get("started")
    ended = stop.get("t")
    return {
        "id": run.id,
        "script": info.get("script"),
        "args": info.get("args", []),
        "started": started,
        "ended": ended,
        "seconds": round((ended or time.time()) - started, 3) if started else None,
        "status": status,
        "exit": code,
        "stages": len(info.get("stages", [])),
    }


def list_runs(base: Path) -> list[dict[str, Any]]:
    """The runs under `base`, newest first."""
    try:
        dirs = [d for d in Path(base).iterdir() if (d / "run.json").is_file()]
    except OSError:
        return []
    dirs.sort(key=lambda d: d.name, reverse=True)
    return [run_state(RunDirectory(d)) for d in dirs[:RUNS_SHOWN]]


def find(base: Path, run_id: str) -> RunDirectory | None:
    """The run named `run_id` under `base` (a plain name: never a path elsewhere)."""
    if not run_id or "/" in run_id or run_id.startswith(".") or "\x00" in run_id:
        return None
    path = Path(base) / run_id
    return RunDirectory(path) if (path / "run.json").is_file() else None


def _stage_events(run: RunDirectory, name: str) -> tuple[list[float], list[int], int]:
    """A stage's batches: their end times, their sizes, and the records they put out. (While
    a stage runs, its batches are the live count: its "stats" events come about once a second
    and before the batch's output is counted.)"""
    ends: list[float] = []
    sizes: list[int] = []
    out = 0
    for ev in iter_events(run.trace_path(name), ids=False):
        if ev.get("ev") == "b":
            ends.append(float(ev.get("t", 0.0)) + float(ev.get("d", 0.0)))
            sizes.append(int(ev.get("n", 0)))
            out += int(ev.get("o", 0))
    return ends, sizes, out


def run_detail(run: RunDirectory) -> dict[str, Any]:
    state = run_state(run)
    summary = summarise(run)
    now = time.time()
    live_pids: dict[str, Any] = {}
    for ev in run.events():
        if ev.get("ev") == "stage_start":
            live_pids[ev.get("stage", "")] = ev.get("pid")
        elif ev.get("ev") == "stage_exit":
            live_pids.pop(ev.get("stage", ""), None)
    t0 = state["started"] or now
    t1 = state["ended"] or now
    stages = []
    timeline = []
    for st in summary["stages"]:
        name = st["name"]
        ends, sizes, made = _stage_events(run, name)
        running = state["status"] == "running" and name in live_pids and st.get("status") is None
        records_in, records_out = st.get("records_in"), st.get("records_out")
        if running:
            records_in, records_out = max(records_in or 0, sum(sizes)), max(records_out or 0, made)
        if running:
            recent = sum(n for e, n in zip(ends, sizes, strict=True) if e >= now - RECENT)
            rate = recent / RECENT
        else:
            rate = st.get("throughput")
        cpu = st.get("cpu_seconds") or 0.0
        if running:
            live = _cpu_seconds(live_pids.get(name))
            cpu = live if live is not None else cpu
        stages.append(
            {
                "name": name,
                "command": st.get("command"),
                "group": st.get("group", 0),
                "status": "running" if running else st.get("status"),
                "records_in": records_in,
                "records_out": records_out,
                "errors": st.get("errors"),
                "records_per_s": round(rate, 1) if rate is not None else None,
                "tokens": st.get("tokens"),
                "tokens_per_s": st.get("tokens_per_second"),
                "cpu_seconds": round(cpu, 2),
                "latency_ms": st.get("latency_ms"),
                "stderr_tail": st.get("stderr_tail", []),
            }
        )
        width = max((t1 - t0) / BINS, 1e-3)
        series = [0.0] * BINS
        for e, n in zip(ends, sizes, strict=True):
            series[min(BINS - 1, max(0, int((e - t0) / width)))] += n / width
        timeline.append(
            {
                "name": name,
                "start": st.get("started"),
                "end": st.get("ended") or (None if running else st.get("last_batch")),
                "series": [round(v, 2) for v in series],
            }
        )
    return {
        **state,
        "stages": stages,
        "timeline": {"t0": t0, "t1": t1, "stages": timeline},
        "samples": sampled_ids(run, summary),
    }


def _samples(run: RunDirectory, stage: str) -> list[dict[str, Any]]:
    return [ev for ev in iter_events(run.trace_path(stage)) if ev.get("ev") == "r"]


def sampled_ids(run: RunDirectory, summary: dict[str, Any] | None = None) -> list[Any]:
    """The ids of the records the first traced stage sampled (what the page offers)."""
    summary = summary or summarise(run)
    for st in summary["stages"]:
        ids = [r.get("id") for ev in _samples(run, st["name"]) for r in ev.get("in", [])]
        ids = [i for i in ids if isinstance(i, str | int)]
        if ids:
            return ids
    return []


def _related(record: Any, rid: str) -> bool:
    if not isinstance(record, dict):
        return False
    for key in ("id", "parent_id", "query_id"):
        value = record.get(key)
        if value is not None and (str(value) == rid or str(value).startswith(rid + "#")):
            return True
    return False


def record_path(run: RunDirectory, rid: str) -> list[dict[str, Any]]:
    """At each stage: the record `rid` (and records derived from it) before and after."""
    hops = []
    for st in summarise(run)["stages"]:
        before: list[Any] = []
        after: list[Any] = []
        for ev in _samples(run, st["name"]):
            ins, outs = ev.get("in", []), ev.get("out", [])
            paired = len(ins) == len(outs)
            for i, rec in enumerate(ins):
                if _related(rec, rid):
                    before.append(rec)
                    if paired:
                        after.append(outs[i])
            if not paired:
                after += [r for r in outs if _related(r, rid)]
        hops.append(
            {
                "stage": st["name"],
                "command": st.get("command"),
                "seen": bool(before),
                "before": before,
                "after": after,
            }
        )
    return hops


# -- HTTP -------------------------------------------------------------------------------------


def studio_routes(runs_dir: Path) -> list[Any]:
    """Starlette routes for the page and its JSON."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from sage_cli.serve.errors import APIError

    page = (Path(__file__).parent / "studio.html").read_bytes()
    base = Path(runs_dir)

    def _json(value: Any) -> Response:
        return Response(orjson.dumps(value, default=str), media_type="application/json")

    def _run(request: Request) -> RunDirectory:
        run = find(base, request.path_params["run"])
        if run is None:
            raise APIError(
                404, f"no run {request.path_params['run']!r} in {base}", code="not_found"
            )
        return run

    async def index(request: Request) -> Response:
        return Response(
            page,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def runs(request: Request) -> Response:
        return _json({"runs_dir": str(base), "runs": list_runs(base)})

    async def detail(request: Request) -> Response:
        return _json(run_detail(_run(request)))

    async def record(request: Request) -> Response:
        rid = request.query_params.get("id", "")
        if not rid:
            raise APIError(400, "give the record's id: ?id=ID", param="id")
        return _json({"id": rid, "path": record_path(_run(request), rid)})

    return [
        Route("/studio", index, methods=["GET"]),
        Route("/studio/", index, methods=["GET"]),
        Route("/studio/api/runs", runs, methods=["GET"]),
        Route("/studio/api/runs/{run}", detail, methods=["GET"]),
        Route("/studio/api/runs/{run}/record", record, methods=["GET"]),
    ]
