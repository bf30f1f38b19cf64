"""What `sage trace` shows: the summary table, one record's path through the stages, a
self-contained HTML report (inline SVG, no external assets) and OpenTelemetry JSON spans."""

from __future__ import annotations

import hashlib
import html
import time
from pathlib import Path
from typing import Any

import orjson

from sage_cli.errors import UsageError
from sage_cli.run.directory import RunDirectory, read_events, summarise
from sage_cli.run.registry import read_registry

COLUMNS = [
    ("stage", "name"),
    ("command", "command"),
    ("status", "status"),
    ("tries", "attempts"),
    ("in", "records_in"),
    ("out", "records_out"),
    ("errors", "errors"),
    ("rec/s", "throughput"),
    ("p50 ms", "p50"),
    ("p95 ms", "p95"),
    ("p99 ms", "p99"),
    ("tokens", "tokens"),
    ("tok/s", "tokens_per_second"),
    ("cpu s", "cpu_seconds"),
    ("rss MB", "peak_rss_mb"),
]


def load_summary(run: RunDirectory) -> dict[str, Any]:
    """summary.json, or a fresh summary of a run still going (or killed before writing it)."""
    summary = run.read_json("summary.json")
    return summary if summary else summarise(run)


def run_row(run: RunDirectory) -> dict[str, Any]:
    """One line of `sage trace list`: id, start, seconds, exit status (None while running)."""
    from sage_cli.run.directory import is_running

    info = run.read_json("run.json")
    summary = run.read_json("summary.json")
    running = not summary and is_running(run)
    return {
        "id": run.id,
        "started": info.get("started"),
        "seconds": summary.get("seconds"),
        "status": summary.get("status"),
        "state": "running" if running else ("finished" if summary else "stopped"),
        "script": info.get("script"),
        "path": str(run.path),
    }


def runs_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs\n"
    lines = [f"{'run':<22} {'started':<19} {'seconds':>8} {'status':>6}  script"]
    for r in rows:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
            if r["started"]
            else "-"
        )
        seconds = f"{r['seconds']:.1f}" if isinstance(r["seconds"], int | float) else "-"
        status = str(r["status"]) if r["status"] is not None else r["state"]
        lines.append(f"{r['id']:<22} {started:<19} {seconds:>8} {status:>6}  {r['script']}")
    return "\n".join(lines) + "\n"


def _cell(stage: dict[str, Any], key: str) -> str:
    value = stage.get("latency_ms", {}).get(key) if key in ("p50", "p95", "p99") else stage.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> str:
    rows = [[title for title, _ in COLUMNS]]
    for stage in summary["stages"]:
        rows.append([_cell(stage, key) for _, key in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    started = summary.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    status = summary.get("status")
    head = (
        f"run {summary['run_id']}  {summary.get('script')} {' '.join(summary.get('args', []))}"
        f"\nstarted {when}  {summary.get('seconds') or '?'}s  "
        f"exit {status if status is not None else '(still running or killed)'}"
    )
    notes = [
        f"{st['name']} exited {st['status']}: {st['stderr_tail'][-1]}"
        for st in summary["stages"]
        if st.get("status") and st.get("stderr_tail")
    ]
    tail = ("\n" + "\n".join(notes) + "\n") if notes else ""
    return head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + tail


class NamedBatches:
    """A run's batch events with every batch's input ids, also where the stage did not write
    them: a stage fed straight by another sage stage names none (its trace's start event says
    `fed_by`: that stage's name, or its pid under bash (its keeper's under `--retries`), which
    the registry maps to its name;
    sage_cli.observability.trace), and its input line N is that stage's output record N. A
    batch's output ids are its `oids`, or its input ids when it made one record of each
    (`n == o`); they sit at output positions `w`.. (plus, in a keeper's worker, the output
    lines forwarded before it started)."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        entries = read_registry(run.stages_dir)
        self.by_pid = {e.get("pid"): e.get("name") for e in entries}
        self.by_pid.update((e["keeper"], e.get("name")) for e in entries if "keeper" in e)
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._outputs: dict[str, list[Any]] = {}

    def events(self, stage: str) -> list[dict[str, Any]]:
        """The stage's trace events, each batch with its input `ids` where they can be known."""
        if stage not in self._events:
            self._events[stage] = []  # a loop of feeders must not recurse for ever
            events = read_events(self.run.trace_path(stage))
            fed_by = next((e.get("fed_by") for e in events if e.get("ev") == "start"), None)
            feeder = self.by_pid.get(fed_by) if isinstance(fed_by, int) else fed_by
            upstream = self.outputs(feeder) if isinstance(feeder, str) else None
            for ev in events:
                if ev.get("ev") == "b" and "ids" not in ev and upstream is not None and "l" in ev:
                    first = ev["l"] - 1
                    ev["ids"] = [
                        upstream[i] if 0 <= i < len(upstream) else None
                        for i in range(first, first + ev["n"])
                    ]
            self._events[stage] = events
        return self._events[stage]

    def outputs(self, stage: str) -> list[Any]:
        """The ids of the stage's output records by position (None where unknown)."""
        if stage not in self._outputs:
            self._outputs[stage] = []
            out: list[Any] = []
            offset = 0
            for ev in self.events(stage):
                if ev.get("ev") == "start":
                    offset = (ev.get("keeper") or {}).get("forwarded", 0)
                if ev.get("ev") != "b" or "w" not in ev:
                    continue
                ids = ev.get("oids")
                if ids is None and ev["n"] == ev["o"]:
                    ids = ev.get("ids")
                if ids is None:
                    continue
                at = offset + ev["w"]
                if len(out) < at + len(ids):
                    out.extend([None] * (at + len(ids) - len(out)))
                out[at : at + len(ids)] = ids
            self._outputs[stage] = out
        return self._outputs[stage]


def _matches(rid: Any, record: str) -> bool:
    return rid == record or (isinstance(rid, str) and rid.startswith(record + "#"))


def follow_record(run: RunDirectory, record: str) -> str:
    """Every stage a record (and its chunks `ID#n`, and hits for it) went through."""
    summary = load_summary(run)
    out = [f"record {record} in run {run.id}"]
    found = False
    named = NamedBatches(run)
    for stage in summary["stages"]:
        spans = []
        for ev in named.events(stage["name"]):
            if ev.get("ev") != "b":
                continue
            ids = [i for i in ev.get("ids") or [] if _matches(i, record)]
            if ids:
                spans.append((ev["t"], ev["d"], ev["n"], ids))
        if not spans:
            state = "no trace (not a sage stage)" if not stage.get("traced") else "not seen"
            out.append(f"  {stage['name']:<14} {state}")
            continue
        found = True
        for t, d, n, ids in spans:
            clock = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
            shown = ", ".join(str(i) for i in ids[:5]) + (
                f" (+{len(ids) - 5})" if len(ids) > 5 else ""
            )
            out.append(
                f"  {stage['name']:<14} {clock}  {d * 1000:9.2f} ms  batch of {n:<5} {shown}"
            )
    info = run.read_json("run.json")
    stdout = info.get("stdout") or {}
    kept = stdout.get("path") if stdout.get("kind") in ("file", "copy") else None
    output = Path(info.get("output") or kept or run.output_path)
    results = []
    hits = []  # the record (or its chunks) retrieved for a query
    if output.exists():
        # the id as typed, and as JSON spells it (control characters and quotes are escaped)
        needles = {record.encode(errors="surrogateescape"), orjson.dumps(record)[1:-1]}
        for line in output.read_bytes().split(b"\n"):
            if any(n in line for n in needles):
                try:  # a script may end in a non-sage stage (`| cut ...`): not every line is JSON
                    r = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(r, dict):
                    continue
                if any(_matches(r.get(k), record) for k in ("id", "parent_id", "query_id")):
                    results.append(r)
                docs = r.get("docs")
                if isinstance(docs, list):
                    for d in docs:
                        if isinstance(d, dict) and (
                            _matches(d.get("id"), record) or _matches(d.get("parent_id"), record)
                        ):
                            hits.append((r.get("id"), d))
    out.append(f"  output: {len(results)} record(s) in {output}")
    for r in results[:5]:
        text = orjson.dumps({k: v for k, v in r.items() if k != "embedding"}).decode()
        out.append("    " + (text if len(text) <= 160 else text[:157] + "..."))
    for query, d in hits[:10]:
        out.append(
            f"  hit: {d.get('id')} for query {query} (rank {d.get('rank')}, score {d.get('score')})"
        )
    if run.dead_path.exists():
        for line in run.dead_path.read_bytes().splitlines():
            entry = orjson.loads(line)
            raw = entry.get("raw")
            if isinstance(raw, dict) and _matches(raw.get("id"), record):
                out.append(f"  dead letter: {entry.get('stage')}: {entry.get('error')}")
                found = True
    if not found and not results and not hits:
        raise UsageError(
            f"record {record!r} is in no stage of run {run.id} (see `sage trace {run.id}`)"
        )
    return "\n".join(out) + "\n"


# -- HTML -------------------------------------------------------------------------------------------

_PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]


def _stage_windows(run: RunDirectory) -> dict[str, list[dict[str, Any]]]:
    """Each stage's attempts as {start, end, status} from the supervisor's events."""
    windows: dict[str, list[dict[str, Any]]] = {}
    for ev in run.events():
        if ev.get("ev") == "stage_start":
            windows.setdefault(ev["stage"], []).append(
                {"start": ev["t"], "end": None, "status": None}
            )
        elif ev.get("ev") == "stage_exit" and windows.get(ev["stage"]):
            windows[ev["stage"]][-1].update(end=ev["t"], status=ev.get("status"))
    return windows


def throughput_series(
    run: RunDirectory, stage: str, t0: float, t1: float, bins: int = 60
) -> list[float]:
    """Records per second a stage took in, over `bins` equal slices of the run."""
    width = max((t1 - t0) / bins, 1e-6)
    counts = [0.0] * bins
    for ev in read_events(run.trace_path(stage), ids=False):
        if ev.get("ev") == "b":
            i = min(bins - 1, max(0, int((ev["t"] + ev["d"] - t0) / width)))
            counts[i] += ev["n"]
    return [c / width for c in counts]


def html_report(run: RunDirectory) -> str:
    summary = load_summary(run)
    stages = summary["stages"]
    windows = _stage_windows(run)
    starts = [w["start"] for ws in windows.values() for w in ws]
    ends = [w["end"] for ws in windows.values() for w in ws if w["end"]]
    t0 = summary.get("started") or (min(starts) if starts else time.time())
    t1 = summary.get("ended") or (max(ends) if ends else t0 + 1)
    span = max(t1 - t0, 1e-3)
    width, left, row = 900, 150, 34
    x = lambda t: left + (t - t0) / span * (width - left - 20)  # noqa: E731
    # the timeline: one row per stage, one bar per attempt, a cross where it crashed
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{row * len(stages) + 50}" role="img" aria-label="timeline">'
    ]
    for i, st in enumerate(stages):
        y = 20 + i * row
        color = _PALETTE[i % len(_PALETTE)]
        parts.append(f'<text x="8" y="{y + 18}" class="lbl">{html.escape(st["name"])}</text>')
        for w in windows.get(st["name"], []):
            a, b = x(w["start"]), x(w["end"] or t1)
            ok = w["status"] in (0, None)
            parts.append(
                f'<rect x="{a:.1f}" y="{y + 4}" width="{max(b - a, 2):.1f}" height="20" '
                f'rx="3" fill="{color if ok else "#d62728"}" opacity="{1 if ok else 0.6}">'
                f"<title>{html.escape(st['name'])}: exit {w['status']}</title></rect>"
            )
            if not ok:
                parts.append(f'<text x="{b - 4:.1f}" y="{y + 19}" class="x">✕</text>')
    axis_y = 20 + row * len(stages) + 10
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" stroke="#888"/>')
    for k in range(6):
        tx = left + k * (width - left - 20) / 5
        parts.append(f'<text x="{tx:.1f}" y="{axis_y + 16}" class="ax">{span * k / 5:.1f}s</text>')
    parts.append("</svg>")
    timeline = "".join(parts)
    # throughput over time: one line per traced stage
    height, bins = 220, 60
    series = {
        st["name"]: throughput_series(run, st["name"], t0, t1, bins)
        for st in stages
        if st.get("traced")
    }
    peak = max([max(s) for s in series.values() if s] + [1.0])
    chart = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        'role="img" aria-label="throughput">'
    ]
    for k in range(5):
        gy = 10 + height * k / 4
        chart.append(
            f'<line x1="{left}" y1="{gy:.1f}" x2="{width - 20}" y2="{gy:.1f}" stroke="#eee"/>'
        )
        chart.append(
            f'<text x="{left - 8}" y="{gy + 4:.1f}" class="ax" text-anchor="end">'
            f"{peak * (4 - k) / 4:,.0f}</text>"
        )
    for i, st in enumerate(stages):
        values = series.get(st["name"])
        if not values:
            continue
        pts = " ".join(
            f"{left + (j + 0.5) / bins * (width - left - 20):.1f},"
            f"{10 + height - v / peak * height:.1f}"
            for j, v in enumerate(values)
        )
        chart.append(
            f'<polyline points="{pts}" fill="none" stroke="{_PALETTE[i % len(_PALETTE)]}"'
            f' stroke-width="2"><title>{html.escape(st["name"])}</title></polyline>'
        )
    legend_x = left
    for i, st in enumerate(stages):
        if st["name"] in series:
            chart.append(
                f'<rect x="{legend_x}" y="{height + 24}" width="12" height="12" '
                f'fill="{_PALETTE[i % len(_PALETTE)]}"/><text x="{legend_x + 16}" '
                f'y="{height + 34}" class="ax">{html.escape(st["name"])}</text>'
            )
            legend_x += 24 + 8 * len(st["name"])
    chart.append(f'<text x="8" y="{height / 2:.0f}" class="ax">records/s</text></svg>')
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(st, key))}</td>" for _, key in COLUMNS) + "</tr>"
        for st in stages
    )
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS)
    tails = [(st["name"], st.get("stderr_tail") or []) for st in stages]
    errors = "".join(
        f"<h3>{html.escape(name)}</h3><pre>{html.escape(chr(10).join(tail))}</pre>"
        for name, tail in tails
        if tail
    )
    if errors:
        errors = "<h2>What the stages said on stderr (last lines)</h2>" + errors
    status = summary.get("status")
    title = f"sage run {summary['run_id']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 10px; border-bottom: 1px solid #ddd;
text-align: right; white-space: nowrap; }} td:nth-child(-n+2), th:nth-child(-n+2) {{ text-align: left; }}
.lbl {{ font: 13px monospace; }} .ax {{ font: 11px sans-serif; fill: #555; }}
.x {{ fill: #fff; font: bold 14px sans-serif; }} .ok {{ color: #2a7; }} .bad {{ color: #c22; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(summary.get("script")))} {html.escape(" ".join(summary.get("args", [])))} &middot;
{summary.get("seconds") or "?"} s &middot; exit status
<b class="{"ok" if status == 0 else "bad"}">{status}</b></p>
<h2>Timeline of the stages</h2>
{timeline}
<h2>Throughput over time</h2>
{"".join(chart)}
<h2>Stages</h2>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{errors}
</body></html>
"""


# -- OpenTelemetry ----------------------------------------------------------------------------------


def _hex_id(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        v: dict[str, Any] = {"boolValue": value}
    elif isinstance(value, int):
        v = {"intValue": str(value)}
    elif isinstance(value, float):
        v = {"doubleValue": value}
    else:
        v = {"stringValue": str(value)}
    return {"key": key, "value": v}


def _ns(t: float) -> str:
    return str(int(t * 1e9))


def otlp_spans(run: RunDirectory, per_record: bool = True) -> dict[str, Any]:
    """The run as OTLP/JSON (ExportTraceServiceRequest): a root span for the run, one per
    stage attempt, and one per record per stage (or per batch with per_record=False)."""
    summary = load_summary(run)
    trace_id = _hex_id(run.id, 32)
    root = _hex_id(run.id + "/run", 16)
    t0 = summary.get("started") or time.time()
    t1 = summary.get("ended") or t0
    spans: list[dict[str, Any]] = [
        {
            "traceId": trace_id,
            "spanId": root,
            "name": f"sage run {summary.get('script')}",
            "kind": 1,
            "startTimeUnixNano": _ns(t0),
            "endTimeUnixNano": _ns(t1),
            "attributes": [
                _attr("sage.run_id", run.id),
                _attr("sage.exit_status", summary.get("status") or 0),
            ],
            "status": {"code": 1 if summary.get("status") == 0 else 2},
        }
    ]
    windows = _stage_windows(run)
    named = NamedBatches(run)
    for st in summary["stages"]:
        for n, w in enumerate(windows.get(st["name"], []), start=1):
            sid = _hex_id(f"{run.id}/{st['name']}/{n}", 16)
            spans.append(
                {
                    "traceId": trace_id,
                    "spanId": sid,
                    "parentSpanId": root,
                    "name": f"{st['name']} ({st['command']})",
                    "kind": 1,
                    "startTimeUnixNano": _ns(w["start"]),
                    "endTimeUnixNano": _ns(w["end"] or t1),
                    "attributes": [
                        _attr("sage.stage", st["name"]),
                        _attr("sage.attempt", n),
                        _attr("process.exit_code", w["status"] if w["status"] is not None else -1),
                    ],
                    "status": {"code": 1 if w["status"] == 0 else 2},
                }
            )
        parent = _hex_id(f"{run.id}/{st['name']}/1", 16)
        k = attempt = 0
        for ev in (
            named.events(st["name"])
            if per_record
            else read_events(run.trace_path(st["name"]), ids=False)
        ):
            if ev.get("ev") == "start":  # the spans of each attempt hang under its span
                attempt += 1
                parent = _hex_id(f"{run.id}/{st['name']}/{attempt}", 16)
            if ev.get("ev") != "b":
                continue
            start, end = _ns(ev["t"]), _ns(ev["t"] + ev["d"])
            ids = ev.get("ids") or [None] * ev["n"]
            items = ids if per_record else [None]
            for rid in items:
                k += 1
                attrs = [_attr("sage.batch_size", ev["n"])]
                if rid is not None:
                    attrs.append(_attr("sage.record_id", rid))
                if not per_record:
                    attrs.append(_attr("sage.records_out", ev.get("o", 0)))
                if ev.get("tok"):
                    attrs.append(_attr("sage.tokens", ev["tok"]))
                spans.append(
                    {
                        "traceId": trace_id,
                        "spanId": _hex_id(f"{run.id}/{st['name']}/{k}/r", 16),
                        "parentSpanId": parent,
                        "name": "record" if per_record else "batch",
                        "kind": 1,
                        "startTimeUnixNano": start,
                        "endTimeUnixNano": end,
                        "attributes": attrs,
                    }
                )
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [_attr("service.name", "sage"), _attr("sage.run_id", run.id)]
                },
                "scopeSpans": [{"scope": {"name": "sage", "version": "0.1.0"}, "spans": spans}],
            }
        ]
    }
