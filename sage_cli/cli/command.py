"""What every operator command shares: the I/O flags, `--schema`, running the driver, and
turning every way a stage can end (error, SIGINT, SIGTERM, closed stdout) into one line on stderr
and a documented exit code.

A command module writes a function that parses its own flags and returns an Operator;
`operator_command` adds the common flags and does the rest.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from sage_cli.cli.guard import fail, guarded
from sage_cli.cli.io import RecordReader, RecordWriter
from sage_cli.errors import UsageError
from sage_cli.execution.driver import (
    Driver,
    ErrorMode,
    ErrorPolicy,
    Stats,
)
from sage_cli.exitcodes import ExitCode
from sage_cli.operators.base import Operator, Record
from sage_cli.verbs import VERBS, OperatorFactory, Verb


@dataclass
class IOOptions:
    """The flags every operator command takes."""

    on_error: ErrorMode = ErrorMode.fail
    errors: str | None = None
    batch_size: int | None = None
    line_buffered: bool = False
    schema: bool = False
    quiet: bool = False
    progress: bool = False
    workers: int = 1
    unordered: bool = False
    files: list[str] | None = None


_COMMON: list[tuple[str, Any, Any]] = [
    (
        "on_error",
        Annotated[
            ErrorMode,
            typer.Option(
                "--on-error",
                help="What to do with a bad line or a record that fails: stop (exit 65), "
                "skip it, or emit an `_error` record in its place.",
                case_sensitive=False,
            ),
        ],
        ErrorMode.fail,
    ),
    (
        "errors",
        Annotated[
            str | None,
            typer.Option(
                "--errors",
                metavar="FILE",
                help="Append every bad line or failed record to this NDJSON dead-letter file.",
            ),
        ],
        None,
    ),
    (
        "batch_size",
        Annotated[
            int | None,
            typer.Option("--batch-size", min=1, help="Records per batch handed to the operator."),
        ],
        None,
    ),
    (
        "line_buffered",
        Annotated[bool, typer.Option("--line-buffered", help="Flush stdout after every record.")],
        False,
    ),
    (
        "schema",
        Annotated[
            bool,
            typer.Option(
                "--schema",
                help="Print the fields this operator needs and produces as JSON Schema, and exit.",
            ),
        ],
        False,
    ),
    (
        "workers",
        Annotated[
            int,
            typer.Option(
                "--workers",
                min=1,
                metavar="N",
                help="Run a stateless operator in N worker processes "
                "(each loads its model once; --threads is divided among them).",
            ),
        ],
        1,
    ),
    (
        "unordered",
        Annotated[
            bool,
            typer.Option(
                "--unordered",
                help="With --workers: write results as they finish, not in input order.",
            ),
        ],
        False,
    ),
    (
        "quiet",
        Annotated[
            bool,
            typer.Option("--quiet", "-q", help="No warnings or progress on stderr; errors only."),
        ],
        False,
    ),
    (
        "progress",
        Annotated[
            bool,
            typer.Option(
                "--progress", help="Show progress on stderr even when it is not a terminal."
            ),
        ],
        False,
    ),
]
_FILES = (
    "files",
    Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[FILE]...", help="NDJSON inputs; none or `-` reads stdin.", show_default=False
        ),
    ],
    None,
)


def stage_name(command: str) -> str:
    return f"sage {command}"


def schema_of(op: Operator, command: str) -> dict[str, Any]:
    """The JSON Schema of what `op` reads and writes (DESIGN §2)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": stage_name(command),
        "description": (type(op).__doc__ or "").strip().split("\n")[0],
        "x-sage-memory": op.memory,
        "x-sage-stateless": op.stateless,
        "$defs": {
            "input": {
                "type": "object",
                "required": sorted(op.requires),
                "properties": dict(op.requires),
                "additionalProperties": True,
            },
            "output": {
                "type": "object",
                "properties": dict(op.produces),
                "additionalProperties": True,
            },
        },
    }


def print_schema(op: Operator, command: str) -> None:
    import orjson

    sys.stdout.buffer.write(
        orjson.dumps(schema_of(op, command), option=orjson.OPT_INDENT_2) + b"\n"
    )
    sys.stdout.flush()


def run_operator(
    command: str,
    op: Operator,
    opts: IOOptions,
    records: Iterable[Record] | None = None,
    factory: OperatorFactory | None = None,
) -> int:
    """Run `op` over NDJSON inputs (or over `records`, for sources) and return the exit code.

    With `opts.workers` > 1, `factory` rebuilds the operator in each worker process.
    """
    prog = stage_name(command)
    if opts.schema:
        print_schema(op, command)
        return 0
    # `sage run --retries` asks for every batch's output to leave at once (so a crash loses
    # no finished record) and, to isolate a record that crashes the stage, batches of one
    from sage_cli.run.env import StageEnv

    env = StageEnv.read()
    if sys.stdout is None:  # descriptor 1 was closed before the stage started (`>&-`)
        return fail(
            prog,
            "stdout is closed (`>&-`): give the stage somewhere to write its records "
            "(`> /dev/null` to discard them)",
            int(ExitCode.FAILURE),
        )
    writer = RecordWriter(line_buffered=opts.line_buffered or env.flush_every_batch)
    stats = Stats()
    policy = ErrorPolicy(prog, opts.on_error, opts.errors, stats)
    progress = make_progress(prog, opts, op)
    batch_size = opts.batch_size or op.default_batch_size
    if env.flush_every_batch and env.batch_size:
        batch_size = env.batch_size
    on_batch = progress.update if progress else None
    if progress and hasattr(op, "on_progress"):  # a model stage: progress within a batch too
        op.on_progress = lambda: progress.update(stats)
    if progress and hasattr(op, "on_closing"):  # work after the last record (index build)
        op.on_closing = progress.step
    executor = None
    if env.ray_address and factory is not None and records is None:  # --engine ray, any script
        from sage_cli.execution.ray import stage_executor

        executor = stage_executor(
            factory, env, workers=opts.workers, stop_at_error=policy.mode is ErrorMode.fail
        )
    elif opts.workers > 1 and factory is not None:
        from sage_cli.execution.pool import ProcessPoolExecutor, worker_kwargs

        executor = ProcessPoolExecutor(
            factory.with_kwargs(worker_kwargs(factory.kwargs, opts.workers)),
            opts.workers,
            stop_at_error=policy.mode is ErrorMode.fail,
        )
    keeper_worker = is_keeper_worker()
    reads_stdin = (opts.files or ["-"]) == ["-"]
    commits = keeper_worker and records is None and reads_stdin
    if keeper_worker:
        from sage_cli.run.keeper import worker_refusal

        refusal = worker_refusal(prog, op)
        if refusal is not None:
            return fail(prog, refusal, int(ExitCode.USAGE))
    driver = Driver(
        op,
        writer,
        policy,
        batch_size,
        on_batch=on_batch,
        executor=executor,
        # a keeper's worker commits in input order: a restart replays from one line on
        ordered=not opts.unordered or keeper_worker,
    )
    kept = None
    if keeper_worker:
        from sage_cli.run.env import keeper_attempt

        kept = keeper_attempt()
    if commits:
        from sage_cli.run.env import RUN_ERRORS_FROM
        from sage_cli.run.keeper import (
            REPLAY_MARKER,
            close_direct,
            commit_marker,
            errors_marker,
            replay_lines,
        )

        close_direct()

        driver.committer = lambda line: writer.write_raw(commit_marker(line))
        # what a dead worker put in `--errors FILE` is not written again (sage_cli.run.keeper)
        errors_from = os.environ.get(RUN_ERRORS_FROM, "")
        if errors_from.isdigit():
            policy.written_from = int(errors_from)
        else:

            def tell_keeper(size: int) -> None:
                writer.write_raw(errors_marker(size))
                writer.flush()  # the keeper knows it even if this worker dies next

            policy.on_open = tell_keeper
        if not op.stateless:  # its state is rebuilt by replaying its input from the start
            writer.write_raw(REPLAY_MARKER)
            driver.silent_through = replay_lines()
    elif keeper_worker:
        from sage_cli.run.keeper import PASS_MARKER, write_direct

        writer.write_raw(PASS_MARKER)
        writer.flush()
        write_direct()  # never restarted: from here on its output skips the keeper
    tracer = None
    if env.trace_dir:  # set by `sage run` for the stages it starts
        from sage_cli.observability.trace import tracer_from_env

        tracer = tracer_from_env(command, env, reads_stdin=records is None and reads_stdin)
        if tracer is not None and commits:
            # the trace of what a commit marker commits is on disk before the keeper sees the
            # marker: a stage fed by this one finds its records there even after a kill -9
            writer.before_flush = tracer.flush
    envelope = None
    if env.envelope:
        from sage_cli.observability.envelope import envelope_from_env

        envelope = envelope_from_env(command, env)
    driver.observe(tracer, envelope)

    def body() -> None:
        try:
            if records is not None:
                driver.run_records(records, origin=command)
            else:
                reader = RecordReader(
                    opts.files,
                    on_idle=driver.idle,
                    idle_interval=op.tick_interval,
                    stdin_after=kept[2] if commits and kept is not None else 0,
                )
                driver.run_reader(reader)
        finally:
            driver.shutdown()  # --workers: stop the worker processes
            policy.close()
            if progress:
                progress.close()
        if stats.skipped and not opts.quiet:
            sys.stderr.write(f"{prog}: warning: skipped {stats.skipped} bad record(s)\n")
        notes = getattr(op, "notes", None)  # e.g. source: the files it walked past
        if notes is not None and not opts.quiet:
            for line in notes():
                sys.stderr.write(f"{prog}: {line}\n")
        summary = getattr(op, "summary", None)  # e.g. embed: how many came from the cache
        if summary is not None and not opts.quiet and (opts.progress or sys.stderr.isatty()):
            line = summary()
            if line:
                sys.stderr.write(f"{prog}: {line}\n")

    def stop() -> None:
        try:
            writer.flush()  # what is complete is written
        finally:
            driver.abandon()  # what is not (a sink's temporary file) is dropped

    code = guarded(prog, body, on_stop=stop)
    if tracer is not None:
        tracer.stop(code)
    return code


def is_keeper_worker() -> bool:
    from sage_cli.run.env import RUN_WORKER

    return os.environ.get(RUN_WORKER) == "1"


def make_progress(prog: str, opts: IOOptions, op: Operator | None = None) -> Any:
    if opts.quiet:
        return None
    if not (opts.progress or sys.stderr.isatty()):
        return None
    from sage_cli.observability.progress import Progress, count_records

    # the ETA needs the input's size: worth counting lines only for a model stage
    total = count_records(opts.files or ["-"]) if hasattr(op, "on_progress") else None
    return Progress(prog, total=total, op=op)


def refuse_opted_out(verb: Verb, opts: IOOptions, copies: int | None = None) -> None:
    """Raise UsageError when `opts` (or `copies`, the replicas an engine would start) use a
    flag the verb opts out of: the one refusal every executor gives."""
    n = opts.workers if copies is None else copies
    if n > 1 and "workers" in verb.opts_out:
        flag = "--workers" if copies is None else f"--replicas {verb.name}={n}"
        raise UsageError(
            f"{flag} needs a stateless operator; {verb.prog} keeps state between records: "
            "run it as one process (exactly 1 actor on Ray)"
        )


def operator_command(
    app: typer.Typer, name: str, *, verb: Verb | None = None, **command_kwargs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `build` as the command of the registry's verb `name`: it parses the command's
    own flags and returns an Operator (or `(operator, records)` for a source); the common I/O
    flags are added here (FILE arguments unless the verb reads its own inputs). `verb`: the
    entry of a verb that is not in the registry (a test's own operator)."""
    if verb is None:
        verb = VERBS[name]

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(build, eval_str=True)
        own = list(sig.parameters.values())
        extra = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
            for n, a, d in _COMMON
        ]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        if verb.reads == "records":
            n, a, d = _FILES
            params.append(
                inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
            )
        params.extend(extra)
        common_names = {n for n, _, _ in _COMMON} | {_FILES[0]}

        def command(**kwargs: Any) -> None:
            opts = IOOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in common_names})
            prog = stage_name(name)
            built: Any = None

            def construct() -> None:
                nonlocal built
                if not opts.schema:
                    refuse_opted_out(verb, opts)
                built = build(**kwargs)

            code = guarded(prog, construct)
            if code:
                raise typer.Exit(code)
            op, records = built if isinstance(built, tuple) else (built, None)
            factory = OperatorFactory(name, build, kwargs)
            raise typer.Exit(run_operator(name, op, opts, records, factory))

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = build.__doc__
        command.__name__ = build.__name__
        app.command(name, **command_kwargs)(command)
        return build

    return decorate


def single_command_app() -> typer.Typer:
    """The typer app a one-command module registers into."""
    return typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
