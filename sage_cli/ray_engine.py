"""`sage run --engine ray`: the same pipeline on a Ray cluster (DESIGN §5, issue 5).

Each `sage` stage becomes a pool of Ray Core actors. An actor wraps the operator the command
itself builds (same build function, same flags: sage_cli.stages) in the same BatchRunner the
`--workers` processes use, so a model loads once per actor and per-record errors come back as
segments that this driver judges with the stage's own ErrorPolicy (`--on-error`, `--errors`).

Records flow from stdin (or the first stage's files or source) in micro-batches numbered in
input order. Every stage takes its batches in that order (so line numbers in messages and the
input of a stateful stage match a shell pipeline), runs up to 2 per actor at once, and hands
the result to the next stage; the output is written in input order. At most `max_outstanding`
batches are read and not yet written: that, and the bound per stage, is the backpressure, so an
unbounded stdin works (Ray Data is not used: it has no unbounded sources).

Fault tolerance: an actor that dies (its process or its node) is replaced and the batches it
held are sent again; a batch's result is taken once, so every record is in the output exactly
once. A batch that kills its actor MAX_ATTEMPTS times stops the run. A stateful stage cannot be
replayed (its state is gone), so losing its actor stops the run with exit 75.

Only this module imports ray, and only `run_ray_pipeline` imports this module.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import ray

from sage_cli.command import fail, refuse_opted_out, stage_name
from sage_cli.driver import ErrorPolicy, Stats, convert_operator_error
from sage_cli.errors import SageError, TempFailError, UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.io import BadLine, RecordReader, RecordWriter
from sage_cli.operators.base import Operator, Record
from sage_cli.verbs import StageCall, parse_stage, stage_words
from sage_cli.workers import BatchRunner, portable_error, replay, worker_kwargs

#: times a batch is sent again after the actor holding it died
MAX_ATTEMPTS = 3
#: batches one actor holds at once (one running, one queued behind it)
PER_ACTOR = 2
#: most CPUs reserved per actor: fractional, so that actors never starve the driver (on 2
#: cores, whole-CPU actors can deadlock it)
ACTOR_CPUS = 0.25

_ACTOR_LOST: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


@ray.remote
class StageActor:
    """One copy of a stage's operator, built and set up once."""

    def __init__(self, factory: Any, batch_size: int, cwd: str, env: dict[str, str]) -> None:
        self.error: BaseException | None = None
        # The driver's SAGE_* settings (models, caches, threads) and working directory, so
        # relative paths in the stage's flags mean the same on every node that has them.
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        try:
            self.runner = BatchRunner(factory(), batch_size)
            self.runner.setup()
        except BaseException as exc:  # noqa: BLE001 - reported with the first batch
            self.error = portable_error(exc)

    def run(self, origin: str, batch: list[Record], lines: list[int]) -> tuple[Any, ...]:
        if self.error is not None:
            return [("raise", self.error)], 0.0, False
        try:
            segments, busy = self.runner.run(origin, batch, lines)
        except BaseException as exc:  # noqa: BLE001 - ResourceUnavailable and the like
            return [("raise", portable_error(exc))], 0.0, False
        return segments, busy, bool(self.runner.driver.op.done)

    def close(self) -> list[Record]:
        if self.error is not None:
            return []
        return self.runner.close()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Actor:
    handle: Any
    alive: bool = True
    in_flight: int = 0


@dataclass
class _Stage:
    index: int
    name: str  # "2-map": the file name of its trace, as `sage run` names stages
    prog: str  # "sage map"
    call: StageCall
    op: Operator  # built here only to read its class attributes; never set up here
    replicas: int
    batch_size: int
    policy: ErrorPolicy
    stats: Stats
    actors: list[_Actor] = field(default_factory=list)
    inputs: dict[int, tuple[str, list[Any], list[int] | None]] = field(default_factory=dict)
    next_seq: int = 0
    lines: int = 0  # records this stage has read (for FILE:LINE in messages)
    in_flight: int = 0
    closed: bool = False
    tracer: Any = None
    envelope: Any = None  # SAGE_ENVELOPE=1: the `_sage` stamp (sage_cli/envelope.py)

    @property
    def stateful(self) -> bool:
        return not self.call.verb.replicable


@dataclass
class _Task:
    stage: _Stage
    seq: int
    origin: str
    batch: list[Record]
    lines: list[int]
    actor: _Actor
    attempt: int = 1
    sent: float = 0.0


class _Fatal(Exception):
    def __init__(self, stage: _Stage, error: SageError) -> None:
        self.stage = stage
        self.error = error


def sage_env() -> dict[str, str]:
    """The driver's SAGE_* environment, handed to every actor."""
    return {k: v for k, v in os.environ.items() if k.startswith("SAGE_") and k != "SAGE_TRACE_DIR"}


# -- planning --------------------------------------------------------------------------------


def parse_replicas(specs: list[str] | dict[str, int] | None) -> dict[str, int]:
    """`["embed=2", "3=1"]` -> {"embed": 2, "3": 1}: a stage by command name, by its
    1-based position, or by its `sage run` name (`2-embed`)."""
    if specs is None:
        return {}
    if isinstance(specs, dict):
        return {str(k): int(v) for k, v in specs.items()}
    out: dict[str, int] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--replicas {spec!r}: expected STAGE=N with N >= 1 (e.g. embed=2)")
        out[key] = int(value)
    return out


def default_replicas(call: StageCall) -> int:
    """One actor for a stage that keeps state or holds its whole input, two otherwise (a pool
    that survives the loss of one actor without a pause)."""
    return 2 if call.verb.replicable else 1


def plan_stages(stages: list[list[str]], replicas: dict[str, int]) -> list[_Stage]:
    if not stages:
        raise UsageError("the pipeline has no stages")
    plans: list[_Stage] = []
    used: set[str] = set()
    for index, argv in enumerate(stages):
        words = stage_words(argv)
        if not (argv and os.path.basename(argv[0]) == "sage") or not words:
            shown = argv[0] if argv else "(empty)"
            raise UsageError(
                f"stage {index + 1} is `{shown}`: the Ray engine runs only sage "
                "stages (run other programs outside the pipeline)"
            )
        call = parse_stage(argv)
        command = call.factory.command
        if index > 0 and not call.reads_stdin:
            raise UsageError(
                f"stage {index + 1} (sage {command}) reads no input: only the "
                "first stage can be a source"
            )
        try:
            op = call.factory()
        except Exception as exc:  # noqa: BLE001 - an OptionError says what is wrong
            raise convert_operator_error(exc) or exc from None
        name = f"{index + 1}-{command}"
        keys = [k for k in (name, str(index + 1), command) if k in replicas]
        n = replicas[keys[0]] if keys else default_replicas(call)
        used.update(keys)
        refuse_opted_out(call.verb, call.opts, copies=n)
        refuse_opted_out(call.verb, call.opts)
        stats = Stats()
        policy = ErrorPolicy(stage_name(command), call.opts.on_error, call.opts.errors, stats)
        plans.append(
            _Stage(
                index,
                name,
                stage_name(command),
                call,
                op,
                n,
                call.opts.batch_size or op.default_batch_size,
                policy,
                stats,
            )
        )
    unknown = set(replicas) - used
    if unknown:
        raise UsageError(
            f"--replicas {sorted(unknown)[0]}=...: no such stage (use a command "
            "name, a position from 1, or a name such as 2-embed)"
        )
    return plans


# -- the source ------------------------------------------------------------------------------

_EOF = object()


def _cut(
    origin: str, items: list[Any], lines: list[int] | None, first: int, size: int
) -> Iterator[tuple[str, list[Any], list[int]]]:
    numbers = lines if lines is not None else list(range(first, first + len(items)))
    for start in range(0, len(items), size):
        yield origin, items[start : start + size], numbers[start : start + size]


def _read_source(first: _Stage, stdin: Any, out: queue.Queue[Any], stop: threading.Event) -> None:
    """The reader thread: NDJSON blocks (or a source command's records), cut into batches."""
    size = first.batch_size

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        if not first.call.reads_stdin:
            built = first.call.factory.build(**first.call.factory.kwargs)
            records = built[1] if isinstance(built, tuple) else []
            origin = first.call.factory.command
            batch: list[Any] = []
            line = 0
            for record in records:
                if record is not None:
                    batch.append(record)
                if batch and (record is None or len(batch) >= size):
                    if not put((origin, batch, list(range(line + 1, line + 1 + len(batch))))):
                        return
                    line += len(batch)
                    batch = []
            if batch:
                put((origin, batch, list(range(line + 1, line + 1 + len(batch)))))
        else:
            files = first.call.opts.files
            reader = RecordReader(files)
            if stdin is not None and not files:
                blocks = reader._blocks_of(stdin, "stdin")  # noqa: SLF001 - a given stream
            else:
                blocks = reader.blocks()
            for block in blocks:
                for piece in _cut(block.origin, block.items, block.lines, block.first_line, size):
                    if not put(piece):
                        return
    except BaseException as exc:  # noqa: BLE001 - handed to the driver loop
        put(exc)
    finally:
        put(_EOF)


# -- the driver loop -------------------------------------------------------------------------


class RayPipeline:
    """Runs planned stages on Ray actors, reading from `stdin` and writing to `writer`."""

    def __init__(
        self,
        stages: list[_Stage],
        writer: RecordWriter,
        *,
        max_outstanding: int | None = None,
        actor_cpus: float = ACTOR_CPUS,
    ) -> None:
        self.stages = stages
        self.writer = writer
        self.actor_cpus = actor_cpus
        capacity = sum(s.replicas * PER_ACTOR for s in stages)
        self.max_outstanding = max_outstanding or max(8, 2 * capacity)
        self.tasks: dict[Any, _Task] = {}
        self.outputs: dict[int, list[Record]] = {}
        self.next_out = 0
        self.seqs = 0  # batches created so far (input batches and close() tails)
        self.tails: set[int] = set()
        self.eof = False
        self.cutoff: int | None = None  # batches after this one are dropped (error, `head`)
        self.cut_stage = -1  # the stage that cut: stages up to it produce no close() tail
        self.error: _Fatal | None = None
        self.replaced = 0  # actors replaced after a loss (for tests and traces)

    # actors

    def _new_actor(self, stage: _Stage) -> _Actor:
        factory = stage.call.factory
        factory = factory.with_kwargs(worker_kwargs(factory.kwargs, stage.replicas))
        handle = StageActor.options(  # type: ignore[attr-defined]
            num_cpus=self.actor_cpus, max_restarts=0, max_task_retries=0
        ).remote(factory, stage.batch_size, os.getcwd(), sage_env())
        return _Actor(handle)

    def start(self) -> None:
        for stage in self.stages:
            stage.actors = [self._new_actor(stage) for _ in range(stage.replicas)]

    def stop(self) -> None:
        for stage in self.stages:
            for actor in stage.actors:
                try:
                    ray.kill(actor.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    # scheduling

    def _dropped(self, seq: int) -> bool:
        return self.cutoff is not None and seq > self.cutoff and seq not in self.tails

    def _forward(self, stage: _Stage, seq: int, origin: str, records: list[Any]) -> None:
        if self._dropped(seq):
            return
        if stage.index + 1 < len(self.stages):
            self.stages[stage.index + 1].inputs[seq] = ("stdin", records, None)
        else:
            self.outputs[seq] = records

    def _dispatch(self, stage: _Stage) -> None:
        while stage.next_seq < self.seqs:
            seq = stage.next_seq
            if self._dropped(seq):
                stage.inputs.pop(seq, None)
                stage.next_seq += 1
                continue
            if seq not in stage.inputs:
                return
            if stage.in_flight >= stage.replicas * PER_ACTOR:
                return
            origin, items, lines = stage.inputs.pop(seq)
            stage.next_seq += 1
            if lines is None:
                lines = list(range(stage.lines + 1, stage.lines + 1 + len(items)))
            stage.lines += len(items)
            if stage.index == 0 and any(isinstance(i, BadLine) for i in items):
                items, lines = self._judge_bad_lines(stage, seq, items, lines)
            if not any(type(i) is dict and "_error" not in i for i in items):
                stage.stats.records_in += len(items)
                self._forward(stage, seq, origin, items)  # nothing to process: pass through
                continue
            self._submit(_Task(stage, seq, origin, items, lines, self._pick(stage)))

    def _judge_bad_lines(
        self, stage: _Stage, seq: int, items: list[Any], lines: list[int]
    ) -> tuple[list[Any], list[int]]:
        kept: list[Any] = []
        kept_lines: list[int] = []
        for item, line in zip(items, lines, strict=True):
            if not isinstance(item, BadLine):
                kept.append(item)
                kept_lines.append(line)
                continue
            try:
                for record in stage.policy.bad_line(item):
                    kept.append(record)
                    kept_lines.append(line)
            except SageError as err:  # --on-error fail: what came before still goes on
                self._fail(stage, seq, err)
                break
        return kept, kept_lines

    def _pick(self, stage: _Stage) -> _Actor:
        return min((a for a in stage.actors if a.alive), key=lambda a: a.in_flight)

    def _submit(self, task: _Task) -> None:
        task.actor.in_flight += 1
        task.stage.in_flight += 1
        task.sent = time.perf_counter()
        ref = task.actor.handle.run.remote(task.origin, task.batch, task.lines)
        self.tasks[ref] = task

    def _fail(self, stage: _Stage, seq: int, err: SageError) -> None:
        if self.error is None:
            self.error = _Fatal(stage, err)
        self._cut(stage, seq)

    def _cut(self, stage: _Stage, seq: int) -> None:
        if self.cutoff is None or seq < self.cutoff:
            self.cutoff = seq
        self.cut_stage = max(self.cut_stage, stage.index)

    # results

    def _collect(self, timeout: float) -> None:
        refs = list(self.tasks)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            task = self.tasks.pop(ref)
            task.actor.in_flight -= 1
            task.stage.in_flight -= 1
            try:
                segments, busy, done = ray.get(ref)
            except _ACTOR_LOST as exc:
                self._lost(task, exc)
                continue
            self._finished(task, segments, busy, done)

    def _lost(self, task: _Task, exc: BaseException) -> None:
        stage = task.stage
        if task.actor.alive:
            task.actor.alive = False
            stage.actors[stage.actors.index(task.actor)] = self._new_actor(stage)
            self.replaced += 1
        if self._dropped(task.seq):
            return
        if stage.stateful:
            self._fail(
                stage,
                task.seq,
                TempFailError(
                    f"the Ray actor of this stage was lost ({type(exc).__name__}) and it keeps "
                    "state, so it cannot resume; run the pipeline again"
                ),
            )
            return
        if task.attempt >= MAX_ATTEMPTS:
            self._fail(
                stage,
                task.seq,
                SageError(
                    f"{task.origin}:{task.lines[0]}: the batch starting here ended its Ray actor "
                    f"{MAX_ATTEMPTS} times (a crash in the operator or in --fn code); run it "
                    "without --engine ray to see the error"
                ),
            )
            return
        task.attempt += 1
        task.actor = self._pick(stage)
        self._submit(task)

    def _finished(self, task: _Task, segments: list[Any], busy: float, done: bool) -> None:
        stage = task.stage
        if self._dropped(task.seq):
            return
        stats = stage.stats
        stats.records_in += len(task.batch)
        stats.batches += 1
        stats.busy_seconds += busy
        out: list[Record] = []
        try:
            replay(segments, out.extend, stage.policy)
        except SageError as err:
            self._fail(stage, task.seq, err)
        except Exception as exc:  # noqa: BLE001 - ResourceUnavailable and the like
            converted = convert_operator_error(exc) or SageError(f"{type(exc).__name__}: {exc}")
            self._fail(stage, task.seq, converted)
        stats.records_out += len(out)
        if stage.tracer is not None:
            now = time.perf_counter()
            stage.tracer.batch(task.batch, out, now - busy, now)
        if stage.envelope is not None:
            stage.envelope.stamp(out, busy, len(task.batch))
        if done:
            self._cut(stage, task.seq)
        self._forward(stage, task.seq, task.origin, out)

    def _close_ready_stages(self) -> None:
        for stage in self.stages:
            if stage.closed:
                continue
            before = self.stages[stage.index - 1] if stage.index else None
            if (before is not None and not before.closed) or (before is None and not self.eof):
                return
            self._dispatch(stage)
            if stage.next_seq < self.seqs or stage.in_flight:
                return
            stage.closed = True
            if stage.index <= self.cut_stage or self.error is not None:
                continue  # cut off here or above: what it still holds goes nowhere
            tail: list[Record] = []
            for actor in stage.actors:
                try:
                    tail.extend(ray.get(actor.handle.close.remote()))
                except _ACTOR_LOST as exc:
                    if stage.stateful:
                        self._fail(
                            stage,
                            self.seqs,
                            TempFailError(
                                f"the Ray actor of this stage was lost ({type(exc).__name__}) "
                                "before it could emit what it holds; run the pipeline again"
                            ),
                        )
                        return
            seq = self.seqs
            self.seqs += 1
            self.tails.add(seq)
            stage.stats.records_out += len(tail)
            self._forward(stage, seq, "stdin", tail)

    def _write_ready(self) -> None:
        while self.next_out < self.seqs:
            seq = self.next_out
            if self._dropped(seq):
                self.outputs.pop(seq, None)
            elif seq in self.outputs:
                self.writer.write(self.outputs.pop(seq))
            else:
                return
            self.next_out += 1

    def finished(self) -> bool:
        return (
            self.eof
            and all(s.closed for s in self.stages)
            and not self.tasks
            and self.next_out >= self.seqs
        )

    def run(self, stdin: Any) -> None:
        first = self.stages[0]
        source: queue.Queue[Any] = queue.Queue(maxsize=4)
        stop = threading.Event()
        reader = threading.Thread(
            target=_read_source,
            args=(first, stdin, source, stop),
            name="sage-ray-reader",
            daemon=True,
        )
        reader.start()
        try:
            self._loop(source)
        finally:
            stop.set()

    def _loop(self, source: queue.Queue[Any]) -> None:
        first = self.stages[0]
        while not self.finished():
            pulled = False
            while (
                not self.eof
                and self.seqs - self.next_out < self.max_outstanding
                and len(first.inputs) < first.replicas * PER_ACTOR
            ):
                if self.cutoff is not None and self.cut_stage >= 0:
                    self.eof = True  # nothing read from now on would be written
                    break
                try:
                    item = (
                        source.get_nowait() if (self.tasks or pulled) else source.get(timeout=0.05)
                    )
                except queue.Empty:
                    break
                pulled = True
                if item is _EOF:
                    self.eof = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    origin, items, lines = item
                    first.inputs[self.seqs] = (origin, items, lines)
                    self.seqs += 1
            for stage in self.stages:
                self._dispatch(stage)
            self._write_ready()
            self._close_ready_stages()
            self._write_ready()
            if self.tasks:
                self.writer.maybe_flush()
                self._collect(0 if pulled else 0.05)
            else:
                self.writer.flush()  # nothing in flight: never hold output back
        self.writer.flush()


# -- the entry point -------------------------------------------------------------------------


def _writer_for(stdout: Any) -> RecordWriter:
    if stdout is None:
        return RecordWriter()
    if isinstance(stdout, int):
        return RecordWriter(stdout)
    try:
        fd = stdout.fileno()
        stdout.flush()
        return RecordWriter(fd)
    except (AttributeError, OSError, ValueError):
        writer = RecordWriter(-1)
        writer.stream = getattr(stdout, "buffer", stdout)
        return writer


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT") or, with None,
    start a private local one with `num_cpus` CPUs (default: this machine's)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    debug = os.environ.get("SAGE_DEBUG") == "1"
    common: dict[str, Any] = {
        "logging_level": logging.INFO if debug else logging.ERROR,
        "log_to_driver": debug,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **common)


def run_ray_pipeline(
    stages: list[list[str]],
    *,
    address: str | None = None,
    replicas: list[str] | dict[str, int] | None = None,
    stdin: int | BinaryIO | None = None,
    stdout: int | BinaryIO | None = None,
    trace_dir: str | None = None,
    num_cpus: int | None = None,
    shutdown: bool = True,
) -> int:
    """Run `stages` (each `["sage", VERB, ARGS...]`) on Ray; return the exit code.

    `address`: None starts a local Ray instance for this run; "auto" or "HOST:PORT" joins a
    running cluster (`ray start --head` on one node, `ray start --address` on the others).
    `replicas`: ["STAGE=N", ...] or {STAGE: N}; STAGE is a command name, a 1-based position
    or a stage name such as `2-embed`. `stdin`/`stdout`: fds or binary streams (default: the
    process's). `trace_dir`: where `<n>-<command>.trace.ndjson` go (a run's `stages/`).
    Errors print one line, `sage VERB: error: ...`, for the first stage that failed.
    """
    prog = "sage run"
    try:
        plans = plan_stages(stages, parse_replicas(replicas))
    except SageError as err:
        return fail(prog, err)
    writer = _writer_for(stdout)
    pipeline = RayPipeline(plans, writer)
    tracers = _start_traces(plans, trace_dir)
    _start_envelopes(plans)
    code: int = ExitCode.OK

    def body() -> None:
        connect(address, num_cpus)
        total = float(ray.cluster_resources().get("CPU", 1.0))
        actors = sum(s.replicas for s in plans)
        # Fractional CPUs: all actors together reserve at most half the cluster's CPUs, so the
        # driver is never starved and the actors of a lost node fit on the nodes left.
        pipeline.actor_cpus = max(0.01, min(ACTOR_CPUS, total / 2 / max(1, actors)))
        pipeline.start()
        pipeline.run(stdin)

    from sage_cli.command import guarded

    # Ray prints its own error notices (a worker died...) with print() to sys.stdout: send
    # them to stderr, since stdout carries data only (the writer holds the real fd 1).
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        code = guarded(prog, body, on_stop=writer.flush)
        if code == ExitCode.OK and pipeline.error is not None:
            fatal = pipeline.error
            code = fail(fatal.stage.prog, fatal.error)
        if pipeline.replaced:
            sys.stderr.write(
                f"{prog}: warning: replaced {pipeline.replaced} lost Ray actor(s); "
                "their batches were sent again\n"
            )
        for stage in plans:
            if stage.stats.skipped and not stage.call.opts.quiet:
                sys.stderr.write(
                    f"{stage.prog}: warning: skipped {stage.stats.skipped} bad record(s)\n"
                )
    finally:
        for stage in plans:
            stage.policy.close()
        _stop_traces(plans, tracers, pipeline, int(code))
        if ray.is_initialized():
            pipeline.stop()
            if shutdown:
                ray.shutdown()
        sys.stdout = real_stdout
    return int(code)


def _start_envelopes(plans: list[_Stage]) -> None:
    if os.environ.get("SAGE_ENVELOPE", "") in ("", "0"):
        return
    from sage_cli.envelope import Envelope, new_run_id

    run_id = os.environ.get("SAGE_RUN_ID") or new_run_id()
    for stage in plans:
        stage.envelope = Envelope(stage.op.name, run_id)


def _start_traces(plans: list[_Stage], trace_dir: str | None) -> list[Any]:
    if not trace_dir:
        return []
    from sage_cli.trace import Tracer

    tracers = []
    for stage in plans:
        try:
            tracer = Tracer(os.path.join(trace_dir, f"{stage.name}.trace.ndjson"), stage.name)
        except OSError:
            continue
        tracer.start(stage.stats)
        stage.tracer = tracer
        tracers.append(tracer)
    return tracers


def _stop_traces(plans: list[_Stage], tracers: list[Any], pipeline: RayPipeline, code: int) -> None:
    failed = pipeline.error.stage.index if pipeline.error is not None else None
    for stage in plans:
        if stage.tracer is not None:
            status = code if failed == stage.index or (failed is None and code) else 0
            stage.tracer.stop(status)


def main(argv: list[str] | None = None) -> int:
    """`python -m sage_cli.ray_engine [--address A] [--replicas S=N]... 'sage map r' ...`: each
    argument is one stage's command line (until `sage run --engine ray` is wired in)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m sage_cli.ray_engine")
    parser.add_argument("--address", default=None, help="auto, HOST:PORT, or none for local")
    parser.add_argument("--replicas", action="append", default=[], metavar="STAGE=N")
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("stages", nargs="+", metavar="STAGE", help="e.g. 'sage map r'")
    args = parser.parse_args(argv)
    return run_ray_pipeline(
        [shlex.split(s) for s in args.stages],
        address=args.address,
        replicas=args.replicas or None,
        trace_dir=args.trace_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
