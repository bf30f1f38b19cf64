"""`make bench`: benchmarks that report ratios against baselines measured in the same run.

Run: `.venv/bin/python -m tests.bench` (all areas), `python -m tests.bench --only map` (one area;
repeatable), `--records N` to change the data size. Results are printed as a table (figure,
value, target, pass/fail, the command that reproduces it) and written to bench/out/results.json.

Plugins: every module `tests/bench/bench_<area>.py` exposes `run(report)`; the runner imports
each and calls it. `report` is a `Report`: call it once per figure,

    report(name, value, unit="", *, target=None, command=None, note=None)

with `target` a string such as ">= 0.8" or "<= 50" (pass/fail is judged from it) and `command`
the shell command that reproduces the figure. A plugin that needs sizes or a scratch directory
reads `report.records`, `report.repeat` and `report.workdir`. Files are named bench_*.py so
pytest never collects them.
"""

from __future__ import annotations

import operator
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out"
VENV_BIN = Path(sys.executable).parent

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass
class Figure:
    name: str
    value: float
    unit: str = ""
    target: str | None = None
    passed: bool | None = None
    command: str | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def judge(value: float, target: str | None) -> bool | None:
    """Whether `value` meets `target` (">= 0.8"); None when there is no target."""
    if not target:
        return None
    op, _, threshold = target.strip().partition(" ")
    return _COMPARE[op](value, float(threshold))


class Report:
    """Collects the figures of one run; callable as `report(name, value, unit, ...)`."""

    def __init__(
        self,
        records: int = 1_000_000,
        pipeline_records: int = 1_000_000,
        repeat: int = 3,
        workdir: Path | None = None,
    ) -> None:
        self.records = records
        self.pipeline_records = pipeline_records
        self.repeat = repeat
        self.workdir = workdir or OUT / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.figures: list[Figure] = []
        #: what could not be measured (a missing model, jq, a failed helper): the run fails
        self.unmeasured: list[str] = []
        self.started = time.time()

    def __call__(
        self,
        name: str,
        value: float,
        unit: str = "",
        *,
        target: str | None = None,
        command: str | None = None,
        note: str | None = None,
        **extra: Any,
    ) -> Figure:
        figure = Figure(name, value, unit, target, judge(value, target), command, note, extra)
        self.figures.append(figure)
        status = {True: "pass", False: "FAIL", None: ""}[figure.passed]
        print(
            f"  {name}: {format_value(value)} {unit} {target or ''} {status}".rstrip(),
            file=sys.stderr,
            flush=True,
        )
        return figure

    def note(self, message: str) -> None:
        print(f"  note: {message}", file=sys.stderr, flush=True)

    def not_measured(self, message: str) -> None:
        """A figure this run should have produced and cannot: `make bench` exits 1."""
        self.unmeasured.append(message)
        print(f"  NOT MEASURED: {message}", file=sys.stderr, flush=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "records": self.records,
            "pipeline_records": self.pipeline_records,
            "repeat": self.repeat,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "figures": [asdict(f) for f in self.figures],
            "unmeasured": self.unmeasured,
        }


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(report: Report) -> None:
    rows = [("figure", "value", "target", "result", "command")]
    for f in report.figures:
        result = {True: "pass", False: "FAIL", None: "-"}[f.passed]
        rows.append(
            (
                f.name,
                f"{format_value(f.value)} {f.unit}".strip(),
                f.target or "-",
                result,
                f.command or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
        print("  ".join(cells) + "  " + row[4])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    notes = [f for f in report.figures if f.note]
    for f in notes:
        print(f"note: {f.name}: {f.note}")


# -- helpers for plugins -------------------------------------------------------------------


def sage_command() -> list[str]:
    """The `sage` of this venv (the console script, as a user runs it)."""
    script = VENV_BIN / "sage"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sage_cli"]


#: unset for timed commands: PYTHONDONTWRITEBYTECODE makes every `sage` start recompile all of
#: its own modules (about 60 ms of CPU per process here), which no installed tool pays
_UNSET = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "SAGE_DEBUG")


def shell_env() -> dict[str, str]:
    """Environment for timed commands: this venv first on PATH; see _UNSET."""
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Timing:
    """The fastest of several runs of one command: wall seconds and CPU seconds (user + system,
    of every process the command started)."""

    wall: float = float("inf")
    cpu: float = float("inf")


def time_shell(command: str, *, timeout: float = 600) -> Timing:
    """Wall and CPU seconds of one run of a bash command line (pipefail on); raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        env=shell_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{command}` exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu)


def best_of(
    commands: dict[str, str],
    repeat: int,
    *,
    warmup: bool = True,
    at_most: dict[str, int] | None = None,
) -> dict[str, Timing]:
    """Run each command `repeat` times, interleaved (so load from elsewhere hits all of them
    alike), and keep the fastest wall time and the lowest CPU time of each; `warmup` runs each
    once first, untimed (page cache, byte-code caches); `at_most` caps the runs of slow ones."""
    limits = at_most or {}
    for command in commands.values() if warmup else ():
        time_shell(command)
    best = {name: Timing() for name in commands}
    for i in range(repeat):
        for name, command in commands.items():
            if i >= limits.get(name, repeat):
                continue
            t = time_shell(command)
            best[name] = Timing(min(best[name].wall, t.wall), min(best[name].cpu, t.cpu))
    return best


def small_records_file(n: int) -> Path:
    """NDJSON of n small records (about 58 bytes each), made once and reused."""
    path = OUT / "data" / f"small-{n}.ndjson"
    if path.exists():
        return path
    import orjson

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        step = 100_000
        for start in range(0, n, step):
            fh.write(
                b"".join(
                    orjson.dumps({"id": i, "text": f"record {i}", "n": i, "ok": i % 3 == 0}) + b"\n"
                    for i in range(start, min(n, start + step))
                )
            )
    tmp.rename(path)
    return path


def rel(path: Path) -> str:
    """A path as the reproduce commands show it: relative to the repo when inside it."""
    try:
        return shlex.quote(str(path.relative_to(ROOT)))
    except ValueError:
        return shlex.quote(str(path))
