"""`sage run` overhead (issues 4 and 12): a 4-stage pipeline script under `sage run` against the
same script under plain bash (targets: the supervisor alone <= 5%, with full tracing <= 10%),
the same pipeline inside an `if` (bash runs the script: no stage forked from sage run; traced,
untraced, over one record, CPU), the same with `--retries 1` (bash runs it, every sage stage a keeper relaying its worker's
committed output; target <= 30%), and the cost of full per-record tracing of one `sage map`
stage (SAGE_TRACE_DIR set vs not).

Every command reads the same file and writes to /dev/null; each runs `report.repeat` times
interleaved and the fastest run counts.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench import ROOT, Timing, best_of, rel, sage_command, small_records_file

#: more runs of the script bash runs and its baseline (below)
EXTRA_RUNS = 4

#: a map that changes every id (the case that made the id relay quadratic)
KEEPER_EXPR = "\"{'id': 'x-' + r['id'], 'n': r['n']}\""


def work_dir(report) -> Path:
    work = Path(report.workdir) / "run"
    work.mkdir(parents=True, exist_ok=True)
    return work


def spaced_records_file(work: Path, n: int) -> Path:
    """n records as a non-sage producer writes them: `{"id": "r0", "n": 0}` (json.dumps)."""
    path = work / f"spaced_{n}.ndjson"
    if not path.exists():
        with path.open("w") as f:
            for start in range(0, n, 10_000):
                stop = min(n, start + 10_000)
                f.write("".join(f'{{"id": "r{i}", "n": {i}}}\n' for i in range(start, stop)))
    return path


def run(report) -> None:
    # sage run's fixed cost (~0.3 s to start the supervisor, reported on its own below) weighs
    # on short runs: use at least 1M records
    n = max(report.pipeline_records, 1_000_000)
    data = small_records_file(n)
    one = small_records_file(1)
    spaced = spaced_records_file(work_dir(report), n)
    work = work_dir(report)
    script = work / "four_stages.sh"
    script.write_text(
        "set -euo pipefail\n"
        f"sage map 'r' {data} \\\n"
        "  | sage filter 'True' \\\n"
        "  | sage map 'r' \\\n"
        "  | sage map 'r' > /dev/null\n"
    )
    # the same pipeline in an `if`: a script sage run does not take apart, so bash runs it
    # and its stages start as new interpreters (no fork of sage run)
    wrapped = work / "four_stages_in_if.sh"
    body = script.read_text().replace("set -euo pipefail\n", "")
    wrapped.write_text("set -euo pipefail\nif true; then\n" + body + "fi\n")
    tiny = work / "four_stages_one_record.sh"
    tiny.write_text(script.read_text().replace(str(data), str(one)))
    tiny_wrapped = work / "four_stages_in_if_one_record.sh"
    tiny_wrapped.write_text(wrapped.read_text().replace(str(data), str(one)))
    sage = " ".join(sage_command()).replace(str(ROOT) + "/", "")
    runs = rel(work / "runs")
    trace_dir = work / "trace"
    trace_dir.mkdir(exist_ok=True)
    commands = {
        "bash": f"bash {rel(script)}",
        "run": f"rm -rf {runs}/a; {sage} run -q --run-dir {runs}/a {rel(script)}",
        "run_retries": f"rm -rf {runs}/b; {sage} run -q --retries 1 --run-dir {runs}/b "
        f"{rel(script)}",
        "run_untraced": f"rm -rf {runs}/d; {sage} run -q --trace off --run-dir {runs}/d "
        f"{rel(script)}",
        "run_in_if": f"rm -rf {runs}/e; {sage} run -q --run-dir {runs}/e {rel(wrapped)}",
        "bash_in_if": f"bash {rel(wrapped)}",
        "run_in_if_untraced": f"rm -rf {runs}/f; {sage} run -q --trace off --run-dir {runs}/f "
        f"{rel(wrapped)}",
        "bash_in_if_one": f"bash {rel(tiny_wrapped)}",
        "run_in_if_one": f"rm -rf {runs}/g; {sage} run -q --run-dir {runs}/g {rel(tiny_wrapped)}",
        "bash_one": f"bash {rel(tiny)}",
        "run_one": f"rm -rf {runs}/c; {sage} run -q --run-dir {runs}/c {rel(tiny)}",
        "map": f"{sage} map r < {rel(data)} > /dev/null",
        # the keeper (SAGE_RUN_RETRIES): ids that change, json.dumps spacing; no id is read
        "map_keeper": f"SAGE_RUN_RETRIES=1 {sage} map {KEEPER_EXPR} < {rel(spaced)} > /dev/null",
        "map_plain": f"{sage} map {KEEPER_EXPR} < {rel(spaced)} > /dev/null",
        "map_traced": f"rm -f {rel(trace_dir)}/*; SAGE_TRACE_DIR={rel(trace_dir)} "
        f"SAGE_TRACE_STAGE=bench {sage} map r < {rel(data)} > /dev/null",
    }
    best = best_of(commands, report.repeat)
    # the script bash runs is judged against its 10% target within a few points of it, and
    # best of 3 moved it by 4-5 points from run to run (9.0% and 13.5% minutes apart): its
    # three commands run 4 more times each, interleaved, and keep their fastest
    closer = ("bash_in_if", "run_in_if", "run_in_if_untraced")
    more = best_of({k: commands[k] for k in closer}, EXTRA_RUNS, warmup=False)
    for k in closer:
        best[k] = Timing(min(best[k].wall, more[k].wall), min(best[k].cpu, more[k].cpu))
    wall = {k: t.wall for k, t in best.items()}
    cpu = {k: t.cpu for k, t in best.items()}
    report(
        "run.bash.records_per_s",
        n / wall["bash"],
        "rec/s",
        command=commands["bash"],
        note=f"4 stages, {n:,} records, best of {report.repeat}",
    )
    report("run.sage_run.records_per_s", n / wall["run"], "rec/s", command=commands["run"])
    report(
        "run.traced_overhead",
        wall["run"] / wall["bash"] - 1,
        "x",
        command="python -m tests.bench --only run",
        # issue 12's target (<= 10%): the parsed pipeline, whose sage stages sage run forks
        target="<= 0.10",
        note="wall: (sage run / bash) - 1; a pipeline sage run parses: its sage stages forked "
        "from sage run, direct pipes, full per-record traces, start-up included",
    )
    report(
        "run.bash_script_overhead",
        wall["run_in_if"] / wall["bash_in_if"] - 1,
        "x",
        command=commands["run_in_if"],
        # issue 12's target holds for any script: "default `sage run` within 10% of bash"
        target="<= 0.10",
        note="the same 4 stages inside `if true; then ... fi`: bash runs the script, each sage "
        f"stage a new interpreter that names itself to the run (full tracing); best of "
        f"{report.repeat + EXTRA_RUNS}, as its baseline and the --trace off row",
    )
    report(
        "run.bash_script_untraced_overhead",
        wall["run_in_if_untraced"] / wall["bash_in_if"] - 1,
        "x",
        command=commands["run_in_if_untraced"],
        note="the same, --trace off: what is left is sage run's own start and end",
    )
    report(
        "run.bash_script_startup_seconds",
        wall["run_in_if_one"] - wall["bash_in_if_one"],
        "s",
        command=commands["run_in_if_one"],
        note="the script in the `if` over one record, sage run minus bash: sage run's own start "
        "and end (its stages start as under bash)",
    )
    report(
        "run.bash_script_cpu_overhead",
        cpu["run_in_if"] / cpu["bash_in_if"] - 1,
        "x",
        command=commands["run_in_if"],
        note="CPU seconds of every process, the script in the `if`: (sage run / bash) - 1",
    )
    report(
        "run.per_record_overhead",
        (wall["run"] - wall["run_one"]) / (wall["bash"] - wall["bash_one"]) - 1,
        "x",
        command=commands["run"],
        note="wall, each side less its own 1-record run: sage run's fixed start-up cost "
        "(run.startup_seconds) left out, what a longer run's overhead tends to",
    )
    report(
        "run.cpu_overhead",
        cpu["run"] / cpu["bash"] - 1,
        "x",
        command=commands["run"],
        note="CPU seconds of every process: (sage run / bash) - 1 (steadier under load)",
    )
    report(
        "run.retries_overhead",
        wall["run_retries"] / wall["bash"] - 1,
        "x",
        target="<= 0.30",
        command=commands["run_retries"],
        note="--retries 1: bash runs the script, every sage stage a keeper (commit markers)",
    )
    report(
        "run.retries_cpu_overhead",
        cpu["run_retries"] / cpu["bash"] - 1,
        "x",
        command=commands["run_retries"],
    )
    report(
        "run.untraced_overhead",
        wall["run_untraced"] / wall["bash"] - 1,
        "x",
        target="<= 0.05",
        command=commands["run_untraced"],
        note="the supervisor alone (--trace off): process groups, reaping, rusage, tee",
    )
    report(
        "run.startup_seconds",
        wall["run_one"] - wall["bash_one"],
        "s",
        command=commands["run_one"],
        note="fixed cost: the same 4 stages over one record, sage run minus bash",
    )
    report(
        "run.trace_cost",
        wall["map_traced"] / wall["map"] - 1,
        "x",
        command=commands["map_traced"],
        note="one sage map stage with full per-record tracing vs without (wall)",
    )
    report(
        "run.trace_cpu_cost",
        cpu["map_traced"] / cpu["map"] - 1,
        "x",
        command=commands["map_traced"],
    )
    report(
        "run.keeper_overhead",
        wall["map_keeper"] / wall["map_plain"] - 1,
        "x",
        target="<= 0.30",
        command=commands["map_keeper"],
        note=f"one sage map changing every id over {n:,} json.dumps-spaced records: "
        "SAGE_RUN_RETRIES=1 (keeper + worker, commit markers) vs the same stage alone (wall)",
    )
