"""The Python API (`sage_cli.api`, issue 13), two figures:

- api.sage_vs_isage: a from_batch -> map -> filter -> sink pipeline of plain Python functions
  on the same in-memory records, with sage's LocalEnvironment and with SAGE's own
  (`isage` in .venv-bench, made by bench_pipeline.ensure_bench_venv), target >= 50x. Each
  script times its own pipeline, from creating the environment to submit() returning (SAGE's
  `submit(autostop=True)` polls for the end once a second: that wait is what its users get);
  the records reaching the sink are written afterwards and compared. Whole-process wall time
  (imports included) is reported beside it.
- api.verbs_vs_shell: `sage source F | sage map E | sage filter P | sage sink --to OUT` as
  four processes against the same four verbs in one Python pipeline (no JSON between the
  stages), both as whole processes; outputs compared byte for byte. Target > 1.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

from tests.bench import ROOT, best_of, rel, sage_command, shell_env, small_records_file
from tests.bench.api_pipeline import FILTER, MAP
from tests.bench.bench_pipeline import ensure_bench_venv

REPRODUCE = "python -m tests.bench --only api"
SCRIPT = "tests/bench/api_pipeline.py"
#: records for the comparison with SAGE (about 15k records/s: 200k take ~15 s)
ISAGE_RECORDS = 200_000


def _timed(python: str, engine: str, n: int, out: Path) -> tuple[float, float]:
    """(pipeline seconds as the script measured them, whole-process wall seconds)."""
    import time

    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, SCRIPT, engine, str(n), str(out)],
        cwd=ROOT,
        env=shell_env(),
        capture_output=True,
        timeout=900,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} pipeline failed: {proc.stderr.decode()[-800:]}")
    return float(json.loads(proc.stdout.splitlines()[-1])["seconds"]), wall


def run(report) -> None:
    work = report.workdir
    n = min(report.pipeline_records, ISAGE_RECORDS)
    isage_python = ensure_bench_venv()
    outs = {"sage": work / "api-sage.ndjson", "isage": work / "api-isage.ndjson"}
    pythons = {"sage": sys.executable, "isage": isage_python}
    best: dict[str, tuple[float, float]] = {}
    for i in range(report.repeat):
        for engine in ("sage", "isage"):
            if engine == "isage" and i:  # SAGE: one run (its noise is small next to the gap)
                continue
            seconds, wall = _timed(pythons[engine], engine, n, outs[engine])
            old = best.get(engine, (float("inf"), float("inf")))
            best[engine] = (min(old[0], seconds), min(old[1], wall))
    if not filecmp.cmp(outs["sage"], outs["isage"], shallow=False):
        raise RuntimeError(f"the two pipelines wrote different records: {outs}")
    for engine in ("sage", "isage"):
        report(
            f"api.{engine}.records_per_s",
            n / best[engine][0],
            "rec/s",
            command=f"{rel(Path(pythons[engine]))} {SCRIPT} {engine} {n} OUT",
            pipeline_s=best[engine][0],
            process_wall_s=best[engine][1],
        )
    report(
        "api.sage_vs_isage",
        best["isage"][0] / best["sage"][0],
        "x",
        target=">= 50",
        command=REPRODUCE,
        note=f"{n:,} records in memory, {n // 2:,} reach the sink; map, filter and sink are "
        f"the same Python functions; sage fastest of {report.repeat} runs, SAGE one run; "
        "outputs identical",
    )
    report(
        "api.sage_vs_isage.process",
        best["isage"][1] / best["sage"][1],
        "x",
        command=REPRODUCE,
        note="the same ratio from whole-process wall time (imports and record building included)",
    )

    m = report.records
    data = small_records_file(m)
    shell_out, api_out = work / "api-shell.ndjson", work / "api-verbs.ndjson"
    sage = " ".join(sage_command()).replace(str(ROOT) + "/", "")
    commands = {
        "shell": f"{sage} source {rel(data)} | {sage} map '{MAP}' | {sage} filter '{FILTER}' "
        f"| {sage} sink --to {rel(shell_out)}",
        "python": f"{rel(Path(sys.executable))} {SCRIPT} verbs {rel(data)} {rel(api_out)}",
    }
    timing = best_of(commands, report.repeat)
    if not filecmp.cmp(shell_out, api_out, shallow=False):
        raise RuntimeError(f"the shell and Python pipelines wrote different output: {api_out}")
    for name, command in commands.items():
        report(
            f"api.verbs.{name}.records_per_s",
            m / timing[name].wall,
            "rec/s",
            command=command,
            wall_s=timing[name].wall,
            cpu_s=timing[name].cpu,
        )
    report(
        "api.verbs_vs_shell",
        timing["shell"].wall / timing["python"].wall,
        "x",
        target="> 1",
        command=REPRODUCE,
        note=f"{m:,} records from a file, {m // 2:,} written; the same 4 verbs as 4 processes "
        f"joined by pipes vs one Python pipeline; fastest of {report.repeat} runs each",
    )
    report(
        "api.verbs_vs_shell.cpu",
        timing["shell"].cpu / timing["python"].cpu,
        "x",
        command=REPRODUCE,
        note="the same ratio from CPU seconds of all processes",
    )
