"""The bench runner: `python -m tests.bench [--only AREA]...` (see tests/bench/__init__.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback

import tests.bench as bench


def areas() -> list[str]:
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        metavar="AREA",
        help=f"run only this area (repeatable): {', '.join(areas())}",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=1_000_000,
        help="records for the throughput benchmarks (default 1,000,000)",
    )
    parser.add_argument(
        "--pipeline-records",
        type=int,
        default=None,
        help="records for the 4-stage pipeline against SAGE (default: --records)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each timed command; the fastest counts (default 3)",
    )
    parser.add_argument(
        "--out", default=str(bench.OUT / "results.json"), help="where to write the results as JSON"
    )
    args = parser.parse_args(argv)

    chosen = args.only or areas()
    unknown = sorted(set(chosen) - set(areas()))
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(areas())}")
    report = bench.Report(
        records=args.records,
        pipeline_records=args.pipeline_records or args.records,
        repeat=args.repeat,
    )
    crashed: list[str] = []
    for area in chosen:
        print(f"== {area}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"tests.bench.bench_{area}")
            module.run(report)
        except Exception:  # noqa: BLE001 - one broken plugin must not hide the others' figures
            crashed.append(area)
            traceback.print_exc()
        print(f"   ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

    print()
    bench.print_table(report)
    results = report.as_json() | {"areas": chosen, "crashed": crashed}
    out = bench.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    missed = [f.name for f in report.figures if f.passed is False]
    print(f"\nresults: {out}")
    print(
        f"targets met: {sum(f.passed is True for f in report.figures)} of "
        f"{sum(f.passed is not None for f in report.figures)}"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    if crashed:
        print(f"crashed: {', '.join(crashed)}")
    for message in report.unmeasured:
        print(f"not measured: {message}")
    return 1 if missed or crashed or report.unmeasured else 0


if __name__ == "__main__":
    sys.exit(main())
