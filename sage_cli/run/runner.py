"""`sage run` from start to end: parse the script, make (or reopen) the run directory, hold the
lock, run the supervisor, write summary.json and say in one line how it went."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from sage_cli.errors import SageError, UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.observability.redact import redact_argv, redact_words
from sage_cli.run.directory import DEFAULT_BASE, RunDirectory, find_run
from sage_cli.run.options import RunOptions
from sage_cli.run.output import describe_stdout
from sage_cli.run.record import Run
from sage_cli.run.script import (
    Pipeline,
    Unsupported,
    needs_bash,
    parse_script,
    read_segments,
)

if TYPE_CHECKING:  # the supervisor is loaded for a parsed pipeline only
    from sage_cli.run.supervisor import Supervisor


def describe(pipeline: Pipeline) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "index": s.index,
            "label": s.label,
            "argv": redact_argv(s.argv),
            "model": s.is_model,
            "group": s.group,
            "text": redact_words(s.text),
        }
        for s in pipeline.stages
    ]


def stored_args(args: list[str]) -> dict[str, Any]:
    """The script's arguments as run.json keeps them: with secrets masked (sage_cli.observability.redact),
    and a flag saying so, since --resume then needs them given again."""
    shown = redact_argv(args)
    return {"args": shown, "args_redacted": True} if shown != args else {"args": args}


def output_path(pipeline: Pipeline, run: RunDirectory) -> Path | None:
    """Where the run's output is kept for --resume: the last stage's `> FILE`, or the run
    directory's copy of what went to stdout."""
    redirect = pipeline.stages[-1].redirect(">", ">>", "&>", "&>>")
    if redirect is None:
        return None
    target = Path(redirect.target)
    return target if target.is_absolute() else Path(pipeline.cwd) / target


def lock_path(script: Path, args: list[str]) -> Path:
    import hashlib  # only with --lock: ~2 ms of every run's start-up otherwise

    digest = hashlib.sha1(orjson.dumps([str(script.resolve()), args])).hexdigest()[:16]
    return Path(".sage") / "locks" / f"{script.stem}-{digest}.lock"


def acquire_lock(script: Path, args: list[str]) -> Any:
    """Hold an exclusive lock for this script and arguments, or fail (exit 75) if another
    `sage run --lock` holds it."""
    import fcntl

    path = lock_path(script, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise SageError(
            f"{script} is already running (pid {holder}); wait for it or drop --lock",
            ExitCode.TEMPFAIL,
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def supervise(sup: Supervisor, run: RunDirectory, opts: RunOptions, ledger: int | None) -> int:
    """Run one parsed pipeline, with the live table (unless --quiet) from the moment its
    stages have started: they start as forks of this process, which must have no other
    thread then (sage_cli.run.fork)."""
    dashboard: list[Any] = []

    def show() -> None:
        if not opts.quiet:
            from sage_cli.observability.dashboard import start_dashboard

            dashboard.append(start_dashboard(run, sup, progress=opts.progress))

    try:
        return sup.run(ledger_fd=ledger, on_started=show)
    finally:
        for shown in dashboard:
            shown.stop()


def run_pipeline(
    script: str | None,
    args: list[str],
    opts: RunOptions,
    run_dir: str | None = None,
    resume: str | None = None,
    lock: bool = False,
    base: str = DEFAULT_BASE,
) -> int:
    """Run a pipeline script (or resume a run) and return the exit status."""
    if resume:
        run = find_run(resume, base)
        info = run.read_json("run.json")
        script = script or info.get("script")
        if not args and info.get("args_redacted"):
            raise UsageError(
                f"{resume}: run.json keeps the script's arguments with secrets masked; "
                "give them again: sage run --resume RUN SCRIPT ARGS..."
            )
        args = args or info.get("args", [])
        if not script:
            raise UsageError(f"{resume}: the run does not name its script; give it")
        if info.get("cwd") and Path(info["cwd"]) != Path.cwd():
            # absolute: `--resume work/run` must still name it after the cd
            run = RunDirectory(run.path.resolve())
            os.chdir(info["cwd"])
        opts.resume = True
    elif script is None:
        raise UsageError("missing the pipeline script: sage run SCRIPT [ARGS]...")
    script_path = Path(script)
    held = acquire_lock(script_path, args) if lock else None
    try:
        if resume:
            return _resume_under_bash(script_path, args, opts, run)
        if opts.retries:
            # restarts are exact only where each stage keeps its own input (the keeper,
            # sage_cli.run.keeper): bash runs the script, every sage stage restarts itself
            return _run_under_bash(script_path, args, opts, run_dir, base, None, None)
        try:
            segments = read_segments(script_path)
        except Unsupported as why:
            return _run_under_bash(script_path, args, opts, run_dir, base, None, why)
        bash_only = needs_bash(segments, str(script_path))
        if bash_only is None and sys.stdout is None:
            # descriptor 1 closed (`sage run ... >&-`): the supervisor's relay has nowhere to
            # write; under bash the last stage says so itself and fails, as it would alone
            bash_only = Unsupported.after_syntax_check(f"{script_path}: stdout is closed")
        if bash_only is not None:
            return _run_under_bash(script_path, args, opts, run_dir, base, None, bash_only)
        pipeline = parse_script(script_path, args, segments=segments)
        run = RunDirectory.create(run_dir, base)
        target = output_path(pipeline, run)
        # what --resume needs to know of the run's stdout: a copy only of a pipe or terminal
        stdout = describe_stdout(1, run.output_path.resolve()) if target is None else None
        ledger = None
        if stdout is not None and stdout["kind"] == "copy":
            ledger = os.open(run.output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        record = Run(
            run,
            script=str(script_path),
            **stored_args(args),
            cwd=os.getcwd(),
            output=str(target) if target else None,
            stdout=stdout or {"kind": "none"},
            started=time.time(),
            retries=opts.retries,
            stages=describe(pipeline),
            resumed=False,
        )
        from sage_cli.run.supervisor import Supervisor

        sup = Supervisor(pipeline, run, opts, args, events=record.events)
        try:
            status = supervise(sup, run, opts, ledger)
        finally:
            if ledger is not None:
                os.close(ledger)
        record.finish(status, quiet=opts.quiet)
        return status
    finally:
        if held is not None:
            held.close()


def _resume_under_bash(script: Path, args: list[str], opts: RunOptions, run: RunDirectory) -> int:
    """`--resume`: bash runs the whole script again in the run's directory; what the run had
    delivered on stdout is checked and skipped (sage_cli.run.output), what the script writes to
    its own files (`> FILE`, `sage sink --to`) is written again whole. Refused, before anything
    runs, for a script that appends to a file (the replay would append twice)."""
    from sage_cli.run.output import appends_in
    from sage_cli.run.script import check_syntax
    from sage_cli.run.session import run_bash_script

    check_syntax(script, str(script))
    appends = appends_in(script.read_text(errors="replace"))
    if appends:
        number, text = appends[0]
        raise UsageError(
            f"{script}:{number}: --resume cannot be exact for a script that appends to a file "
            f"({text!r}): the replay would append its output again; write it with `>` (or "
            "`sage sink --to`) or run the script again from the start"
        )
    info = run.read_json("run.json")
    if "stdout" not in info:  # a run of the parsed-pipeline supervisor
        kept = info.get("output") and Path(info["output"]) == run.output_path.resolve()
        stdout = {"kind": "copy", "path": str(run.output_path)} if kept else {"kind": "none"}
        run.write_json("run.json", info | {"stdout": stdout})
    return run_bash_script(script, args, opts, None, DEFAULT_BASE, resume=run)


def _run_under_bash(
    script: Path,
    args: list[str],
    opts: RunOptions,
    run_dir: str | None,
    base: str,
    resume: str | None,
    why: Unsupported | None,
    *,
    ray: bool = False,
    address: str | None = None,
    replicas: list[str] | None = None,
) -> int:
    """A script the pipeline parser does not take apart: bash runs it whole
    (sage_cli.run.session), after bash itself found no syntax error in it."""
    from sage_cli.run.script import check_syntax
    from sage_cli.run.session import run_bash_script

    if why is None or not why.syntax_checked:
        check_syntax(script, str(script))
    if resume:
        raise UsageError(f"--resume works for scripts of simple commands and pipelines ({why})")
    return run_bash_script(
        script, args, opts, run_dir, base, ray=ray, address=address, replicas=replicas
    )


def run_on_ray(
    script: str | None,
    args: list[str],
    *,
    address: str | None,
    replicas: list[str],
    opts: RunOptions | None = None,
    run_dir: str | None = None,
    lock: bool = False,
    base: str = DEFAULT_BASE,
) -> int:
    """Run a one-pipeline script on Ray (`sage run --engine ray`): every stage a pool of actors
    built from the same operator class; traces in the same run directory format as local runs.
    `opts` and `lock` mean what they mean for a local run (--trace, --timeout, --progress,
    --quiet, --lock)."""
    opts = opts or RunOptions()
    if script is None:
        raise UsageError("missing the pipeline script: sage run --engine ray SCRIPT [ARGS]...")
    script_path = Path(script)
    held = acquire_lock(script_path, args) if lock else None
    try:
        return _run_on_ray(script_path, args, address, replicas, opts, run_dir, base)
    finally:
        if held is not None:
            held.close()


def _run_on_ray(
    script_path: Path,
    args: list[str],
    address: str | None,
    replicas: list[str],
    opts: RunOptions,
    run_dir: str | None,
    base: str,
) -> int:
    try:
        segments = read_segments(script_path)
    except Unsupported as why:
        return _run_under_bash(
            script_path,
            args,
            opts,
            run_dir,
            base,
            None,
            why,
            ray=True,
            address=address,
            replicas=replicas,
        )
    if len(segments) > 1 or segments[0].pipeline is None:
        # several pipelines: bash runs the script, each stage runs its batches on Ray
        return _run_under_bash(
            script_path,
            args,
            opts,
            run_dir,
            base,
            None,
            None,
            ray=True,
            address=address,
            replicas=replicas,
        )
    pipeline = parse_script(script_path, args, segments=segments)
    source = pipeline.stages[0].redirect("<")
    target = pipeline.stages[-1].redirect(">", ">>")
    run = RunDirectory.create(run_dir, base)
    record = Run(
        run,
        script=str(script_path),
        **stored_args(args),
        cwd=os.getcwd(),
        engine="ray",
        address=address,
        replicas=replicas,
        started=time.time(),
        stages=describe(pipeline),
    )
    from sage_cli.execution.ray import run_ray_pipeline  # imports ray: only here

    names = [stage.name for stage in pipeline.stages]
    record.emit("run_start", engine="ray", address=address)
    for name in names:
        record.emit("stage_start", stage=name, attempt=1)
    stdin = open(source.target, "rb") if source else None  # noqa: SIM115 - closed below
    stdout = None
    # the same live table / progress lines as a local run, read from the same stage traces
    view = _RayStages(pipeline)
    dashboard = None
    if not opts.quiet:
        from sage_cli.observability.dashboard import start_dashboard

        dashboard = start_dashboard(run, view, progress=opts.progress)
    status = int(ExitCode.FAILURE)
    try:
        if target is not None:
            stdout = open(target.target, "ab" if target.op == ">>" else "wb")  # noqa: SIM115
        status = run_ray_pipeline(
            [stage.argv for stage in pipeline.stages],
            address=address,
            replicas=replicas or None,
            stdin=stdin,
            stdout=stdout,
            trace_dir=str(run.stages_dir),
            trace=opts.trace,
            timeout=opts.timeout,
        )
    finally:
        view.finish(status)
        if dashboard is not None:
            dashboard.stop()
        for fh in (stdin, stdout):
            if fh is not None:
                fh.close()
    for name in names:  # the engine reports the run's status; per-stage status only when ok
        record.emit("stage_exit", stage=name, status=0 if status == 0 else None)
    record.emit("run_stop", status=status)
    record.finish(status, quiet=opts.quiet)
    return status


class _RayStages:
    """What the dashboard shows of a Ray run: its stages, running in this process."""

    @dataclass
    class _Stage:
        name: str
        stage: Any
        pid: int | None = None
        attempts: int = 1
        final: bool = False
        status: int | None = None

    def __init__(self, pipeline: Pipeline) -> None:
        self.stages = [self._Stage(s.name, s, os.getpid()) for s in pipeline.stages]

    def finish(self, status: int) -> None:
        for stage in self.stages:
            stage.final, stage.status = True, status
