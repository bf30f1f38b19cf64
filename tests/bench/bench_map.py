"""`sage map 'r'` pass-through throughput on small records (issue 2), against a bare Python
orjson loop (tests/bench/bare_loop.py: target sage/bare >= 0.8) and `jq -c .` (target
sage/jq >= 1.3). All read the same file on stdin and write to /dev/null; each command runs
`report.repeat` times, interleaved, and its fastest run counts, process start-up included.

The targets are judged on wall-clock records/s. The same ratios from CPU time (user + system)
are reported beside them: each command is one process on one core, so on a busy machine the
CPU ratio is the steadier estimate of what the wall ratio is on a quiet one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.bench import ROOT, best_of, rel, sage_command, small_records_file

REPRODUCE = "python -m tests.bench --only map"


def run(report) -> None:
    n = report.records
    data = small_records_file(n)
    sage = " ".join(sage_command()).replace(str(ROOT) + "/", "")
    commands = {
        "sage": f"{sage} map r < {rel(data)} > /dev/null",
        "bare": f"{rel(Path(sys.executable))} tests/bench/bare_loop.py {rel(data)} > /dev/null",
        # ~60 KB batches: glibc gave the heap's top back and faulted it in again per batch
        "sage_batch1024": f"{sage} map --batch-size 1024 r < {rel(data)} > /dev/null",
    }
    jq = shutil.which("jq")
    if jq:
        commands["jq"] = f"{jq} -c . < {rel(data)} > /dev/null"
    else:
        report.not_measured("jq not found on PATH (make system-deps installs it): sage vs jq")
    best = best_of(commands, max(report.repeat, 5))
    wall = {name: n / t.wall for name, t in best.items()}
    cpu = {name: n / t.cpu for name, t in best.items()}
    for name, command in commands.items():
        report(
            f"map.{name}.records_per_s",
            wall[name],
            "rec/s",
            command=command,
            cpu_records_per_s=cpu[name],
            wall_s=best[name].wall,
            cpu_s=best[name].cpu,
        )
    report(
        "map.sage_vs_bare",
        wall["sage"] / wall["bare"],
        "x",
        target=">= 0.8",
        command=REPRODUCE,
        note=f"{n:,} records; fastest of {max(report.repeat, 5)} runs",
    )
    report(
        "map.sage_vs_bare.cpu",
        cpu["sage"] / cpu["bare"],
        "x",
        command=REPRODUCE,
        note="the same ratio from CPU seconds (steadier when the machine is busy)",
    )
    report(
        "map.batch1024_vs_256",
        wall["sage_batch1024"] / wall["sage"],
        "x",
        target=">= 0.9",
        command=commands["sage_batch1024"],
        note="records/s with --batch-size 1024 against the default 256 (0.4x before the stage "
        "kept freed heap)",
    )
    if "jq" in wall:
        report("map.sage_vs_jq", wall["sage"] / wall["jq"], "x", target=">= 1.3", command=REPRODUCE)
        report("map.sage_vs_jq.cpu", cpu["sage"] / cpu["jq"], "x", command=REPRODUCE)
        report("map.bare_vs_jq", wall["bare"] / wall["jq"], "x", command=REPRODUCE)
