"""Run the atheris harnesses (tests/fuzz/harness/fuzz_<name>.py), each in its own process.

    python -m tests.fuzz.run_atheris --seconds 10            # every harness, 10 s each
    python -m tests.fuzz.run_atheris --seconds 60 ndjson     # one harness
    python -m tests.fuzz.run_atheris --reproduce ndjson .sage/fuzz/ndjson/crashes/crash-...

Each harness runs under libFuzzer for `--seconds` (`-max_total_time`), coverage-guided over the
sage packages (operators, sage_cli, commands). Its corpus grows in .sage/fuzz/<name>/corpus/
(kept between runs, gitignored); its SEEDS are written to .sage/fuzz/<name>/seeds/. An input that
raises an unexpected exception, or runs longer than --timeout seconds, is kept in
.sage/fuzz/<name>/crashes/ and the runner exits 1 (one that was slow once but runs again, in a
fresh process, in under a tenth of the limit is the machine's stall: said, not kept). `--reproduce NAME FILE` runs one input
through the harness in this process, with the full traceback.

A harness catches the clean errors its target is allowed to raise (SageError, RecordError,
OptionError, ...); anything else that escapes is a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = Path(__file__).resolve().parent / "harness"
WORK_DIR = ROOT / ".sage" / "fuzz"
#: packages whose code is instrumented for coverage
INSTRUMENTED = ["sage_cli"]
#: seconds a single input may run before it counts as a hang
DEFAULT_TIMEOUT = 10
#: a kept slow input that runs again in under this share of --timeout was the machine's stall
STALL_FACTOR = 0.1
RSS_LIMIT_MB = 1024


def harness_names() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HARNESS_DIR.glob("fuzz_*.py"))


def load_harness(name: str):
    return importlib.import_module(f"tests.fuzz.harness.fuzz_{name}")


# -- the child: one harness under libFuzzer ----------------------------------------------------


def child(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        module = load_harness(name)
        # a harness may import lazily; bring in the packages it uses so they are instrumented
        for package in INSTRUMENTED:
            importlib.import_module(package)
    argv = [sys.argv[0], *libfuzzer_args]
    max_len = getattr(module, "MAX_LEN", None)
    if max_len:
        argv.append(f"-max_len={max_len}")
    atheris.Setup(argv, module.TestOneInput)
    atheris.Fuzz()


# -- the parent: run each harness, summarise ----------------------------------------------------


def write_seeds(name: str, seeds_dir: Path) -> int:
    seeds = getattr(load_harness(name), "SEEDS", None) or []
    seeds_dir.mkdir(parents=True, exist_ok=True)
    for old in seeds_dir.iterdir():
        old.unlink()
    for seed in seeds:
        (seeds_dir / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return len(seeds)


def stat(log: str, key: str) -> int | None:
    match = re.search(rf"stat::{key}:\s+(\d+)", log)
    return int(match.group(1)) if match else None


def progress(log: str, event: str, key: str) -> int | None:
    """`cov` (edges) or `ft` (features) on libFuzzer's last INITED or DONE line."""
    matches = re.findall(rf"#\d+\s+{event}\s.*?\b{key}: (\d+)", log)
    return int(matches[-1]) if matches else None


def run_one(name: str, seconds: int, timeout: int) -> bool:
    """Fuzz one harness; print its summary line; True when no crash was found."""
    work = WORK_DIR / name
    corpus, seeds_dir, crashes = work / "corpus", work / "seeds", work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    n_seeds = write_seeds(name, seeds_dir)
    before = set(crashes.iterdir())
    corpus_before = len(list(corpus.iterdir()))
    cmd = [
        sys.executable,
        "-m",
        "tests.fuzz.run_atheris",
        "--child",
        name,
        "--",
        f"-max_total_time={seconds}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
        str(corpus),
        str(seeds_dir),
    ]
    started = time.monotonic()
    log_path = work / "last.log"
    with open(log_path, "wb") as log_file:
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=seconds + timeout + 120,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
    elapsed = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    new_crashes = sorted(set(crashes.iterdir()) - before)
    execs = stat(log, "number_of_executed_units")
    new_units = stat(log, "new_units_added")
    ft_start, ft_end = progress(log, "INITED", "ft"), progress(log, "DONE", "ft")
    cov_end = progress(log, "DONE", "cov")
    cov = f"{cov_end if cov_end is not None else '?'} edges, features "
    cov += (
        f"{ft_start} -> {ft_end}"
        if ft_start is not None and ft_end is not None
        else f"{ft_end if ft_end is not None else '?'}"
    )
    corpus_after = len(list(corpus.iterdir()))
    for artifact in list(new_crashes):
        seconds_again = stalled(name, artifact, timeout)
        if seconds_again is not None:
            print(
                f"  {name}: {artifact.name} ran over the limit once and in {seconds_again:.3f} s "
                "again: the machine stalled, not kept",
                flush=True,
            )
            artifact.unlink()
            new_crashes.remove(artifact)
            if artifact.name.startswith("timeout-") and not new_crashes:
                rc = 0  # libFuzzer stopped at it; nothing else was found
    ok = rc == 0 and not new_crashes
    print(
        f"{name:<12} {execs if execs is not None else '?':>8} execs in {elapsed:5.1f} s, "
        f"{cov}, {new_units if new_units is not None else '?'} new inputs "
        f"(corpus {corpus_before} -> {corpus_after}, {n_seeds} seeds), "
        f"crashes: {len(new_crashes)}" + ("" if ok else f"  FAILED (exit {rc})"),
        flush=True,
    )
    if not ok:
        for crash in new_crashes:
            print(f"  kept {crash.relative_to(ROOT)}; reproduce with:", flush=True)
            print(
                f"  {Path(sys.executable).name} -m tests.fuzz.run_atheris --reproduce {name} "
                f"{crash.relative_to(ROOT)}",
                flush=True,
            )
        tail = log.strip().splitlines()[-40:]
        print("  " + "\n  ".join(tail), flush=True)
        print(f"  full log: {log_path.relative_to(ROOT)}", flush=True)
    return ok


def reproduce(name: str, path: str) -> int:
    data = Path(path).read_bytes()
    print(f"{name}: running {path} ({len(data)} bytes): {data[:200]!r}", file=sys.stderr)
    harness = load_harness(name)
    started = time.perf_counter()
    harness.TestOneInput(data)  # an unexpected exception propagates: traceback
    print(f"{name}: no crash in {time.perf_counter() - started:.3f} s", file=sys.stderr)
    return 0


def stalled(name: str, artifact: Path, timeout: int) -> float | None:
    """For a kept slow or timed-out input: the seconds it takes when run again in a fresh
    process, when that is under STALL_FACTOR of `timeout` and it raises nothing: then the
    machine stalled (a shared VM paused for half a minute once), not the input. None: a
    finding."""
    if not artifact.name.startswith(("slow-unit-", "timeout-")):
        return None
    try:
        again = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.run_atheris", "--reproduce", name, str(artifact)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
    except subprocess.TimeoutExpired:
        return None
    found = re.search(r"no crash in ([0-9.]+) s", again.stderr)
    if again.returncode != 0 or found is None or float(found.group(1)) >= timeout * STALL_FACTOR:
        return None
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        rest = argv[2:]
        child(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz.run_atheris", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("names", nargs="*", help=f"harnesses (default: all: {harness_names()})")
    parser.add_argument("--seconds", type=int, default=10, help="fuzzing time per harness")
    parser.add_argument(
        "--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds one input may take"
    )
    parser.add_argument("--reproduce", nargs=2, metavar=("NAME", "FILE"))
    args = parser.parse_args(argv)
    if args.reproduce:
        return reproduce(*args.reproduce)
    names = args.names or harness_names()
    unknown = sorted(set(names) - set(harness_names()))
    if unknown:
        parser.error(f"no harness {', '.join(unknown)}; have {', '.join(harness_names())}")
    print(f"atheris: {len(names)} harnesses, {args.seconds} s each", flush=True)
    failed = [name for name in names if not run_one(name, args.seconds, args.timeout)]
    if failed:
        print(f"atheris: crashes in {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
