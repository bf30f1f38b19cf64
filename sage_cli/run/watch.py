"""`sage run --watch`: run the pipeline, then again whenever the script or its inputs change."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sage_cli.exitcodes import ExitCode
from sage_cli.run.options import RunOptions
from sage_cli.run.runner import run_pipeline
from sage_cli.run.script import Pipeline, parse_script


def watched_paths(script: str, pipeline: Pipeline) -> list[str]:
    """The script, files read with `<`, and every stage argument that names an existing path
    (outputs written with `>` are left out, or each run would trigger the next)."""
    cwd = Path(pipeline.cwd)
    outputs = {
        (cwd / r.target).resolve()
        for s in pipeline.stages
        for r in s.redirects
        if r.op != "<" and r.target
    }
    paths = {Path(script).resolve()}
    for stage in pipeline.stages:
        for r in stage.redirects:
            if r.op == "<":
                paths.add((cwd / r.target).resolve())
        for word in stage.argv[1:]:
            if word.startswith("-") or len(word) > 4096:
                continue
            p = cwd / word
            try:
                if p.exists():
                    paths.add(p.resolve())
            except OSError:
                continue
    sage_dir = (Path.cwd() / ".sage").resolve()
    return sorted(str(p) for p in paths - outputs if not str(p).startswith(str(sage_dir)))


def watch_pipeline(
    script: str | None, args: list[str], opts: RunOptions, run_dir: str | None, lock: bool
) -> int:
    import watchfiles

    if script is None:
        from sage_cli.errors import UsageError

        raise UsageError("--watch needs the pipeline script")
    status = run_pipeline(script, args, opts, run_dir=run_dir, lock=lock)
    if status in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
        return status
    paths = watched_paths(script, parse_script(script, args))
    # The watcher is armed when the generator first runs; its first step ends after at most
    # `rust_timeout` ms (an empty set when nothing changed). Only then is the notice true: a
    # change made after it is seen (tests and scripts wait for this line).
    armed = False
    try:
        for changes in watchfiles.watch(
            *paths, debounce=500, rust_timeout=200, yield_on_timeout=True, raise_interrupt=True
        ):
            if not armed:
                armed = True
                sys.stderr.write(
                    f"sage run: watching {len(paths)} path(s) for changes (Ctrl-C to stop)\n"
                )
                sys.stderr.flush()
            if not changes:
                continue
            names = sorted({os.path.relpath(p) for _, p in changes})
            sys.stderr.write(f"sage run: changed: {', '.join(names[:5])}; running again\n")
            status = run_pipeline(script, args, RunOptions(**vars(opts)), lock=lock)
            if status in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
                return status  # Ctrl-C while a run was going stops the watch too
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    return status
