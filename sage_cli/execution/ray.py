"""`sage run --engine ray`: the same pipeline on a Ray cluster (DESIGN §5, issues 5 and 11).

Every stage is the one Driver (sage_cli.execution.driver) with a `RayExecutor`: its batches run
on a pool of Ray Core actors, each holding one copy of the operator in a StageRuntime (a model
loads once per actor). The Drivers are chained in this process: what stage k writes, stage k+1
reads (`StageWriter`), so batching, the error policy, `_error` pass-through, order, counters,
traces, the envelope, window ticks and `head` work exactly as in a local stage, with the same
flags. A stage that keeps state or holds its whole input (`index build`) runs as one actor.

Records flow from stdin (or the first stage's files or source); each stage has at most
`replicas * PER_ACTOR` batches in flight (the backpressure), so an unbounded stdin works; when
input is idle every stage drains, ticks and flushes, so nothing is held back.

Fault tolerance: an actor that dies (its process or its node) is replaced and the batches it
held are sent again; a batch's result is taken once, so every record is in the output exactly
once. A batch that kills its actor MAX_ATTEMPTS times stops the run. A stage that keeps state
cannot be replayed (its state is gone), so losing its actor stops the run with exit 75.

Only this module imports ray, and only `run_ray_pipeline`'s callers import this module.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

import ray

from sage_cli.cli.command import make_progress
from sage_cli.cli.guard import fail, forget_signal, reclaim_signals, report_error
from sage_cli.cli.io import RecordReader, RecordWriter
from sage_cli.errors import SageError, TempFailError
from sage_cli.execution.driver import Driver, ErrorMode, ErrorPolicy, Stats
from sage_cli.execution.executor import Done, Executor, Task
from sage_cli.execution.plan import StagePlan, parse_replicas, plan_stages
from sage_cli.execution.pool import worker_kwargs
from sage_cli.execution.runtime import StageRuntime, portable_error
from sage_cli.exitcodes import ExitCode
from sage_cli.operators.base import Record
from sage_cli.run.env import StageEnv, forwarded

#: times a batch is sent again after the actor holding it died
MAX_ATTEMPTS = 3
#: batches one actor holds at once (one running, three queued): the Drivers of a Ray pipeline
#: share one thread, so a stage's actors must have work queued while it waits on another stage
PER_ACTOR = 4
#: most CPUs reserved per actor: fractional, so that actors never starve the driver (on 2
#: cores, whole-CPU actors can deadlock it)
ACTOR_CPUS = 0.25
#: how long one wait for results lasts before signals get a chance to run
WAIT_SECONDS = 0.1
TIMEOUT_STATUS = 124  # like timeout(1) and the local engine

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

    def __init__(self, factory: Any, stop_at_error: bool, cwd: str, env: dict[str, str]) -> None:
        self.error: BaseException | None = None
        # The driver's SAGE_* settings (models, caches, threads) and working directory, so
        # relative paths in the stage's flags mean the same on every node that has them.
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        try:
            self.runtime = StageRuntime(factory, stop_at_error)
            self.runtime.setup()
        except BaseException as exc:  # noqa: BLE001 - reported with the first batch
            self.error = portable_error(exc)

    def run(self, origin: str, batch: list[Record], lines: list[int]) -> tuple[Any, ...]:
        if self.error is not None:
            return [("raise", self.error)], 0.0, False
        return self.runtime.run(origin, batch, lines)

    def tick(self, now: float) -> list[Record]:
        return [] if self.error is not None else self.runtime.tick(now)

    def close(self) -> list[Record]:
        return [] if self.error is not None else self.runtime.close()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Actor:
    handle: Any
    alive: bool = True
    in_flight: int = 0


@dataclass
class _Sent:
    task: Task
    actor: _Actor
    attempt: int = 1


class RayExecutor(Executor):
    """A stage's batches on `replicas` Ray actors (the least busy one takes the next batch)."""

    kind = "ray"

    def __init__(
        self,
        factory: Any,
        replicas: int,
        *,
        replayable: bool,
        stop_at_error: bool,
        actor_cpus: float = ACTOR_CPUS,
    ) -> None:
        self.factory = factory
        self.replicas = replicas
        self.replayable = replayable  # no state: a lost actor's batches can be sent again
        self.stop_at_error = stop_at_error
        self.actor_cpus = actor_cpus
        self.capacity = replicas * PER_ACTOR
        self.actors: list[_Actor] = []
        self.sent: dict[Any, _Sent] = {}
        self.replaced = 0  # actors replaced after a loss (for the warning and the tests)

    def _new_actor(self) -> _Actor:
        handle = StageActor.options(  # type: ignore[attr-defined]
            num_cpus=self.actor_cpus, max_restarts=0, max_task_retries=0
        ).remote(self.factory, self.stop_at_error, os.getcwd(), forwarded())
        return _Actor(handle)

    def start(self) -> None:
        if not self.actors:
            self.actors = [self._new_actor() for _ in range(self.replicas)]

    def _send(self, sent: _Sent) -> None:
        sent.actor.in_flight += 1
        task = sent.task
        lines = task.lines if isinstance(task.lines, list) else list(task.lines)
        self.sent[sent.actor.handle.run.remote(task.origin, task.batch, lines)] = sent

    def submit(self, task: Task) -> None:
        self._send(_Sent(task, self._pick()))

    def _pick(self) -> _Actor:
        return min((a for a in self.actors if a.alive), key=lambda a: a.in_flight)

    def results(self, wait: bool) -> list[Done]:
        out: list[Done] = []
        while self.sent and not out:
            refs = list(self.sent)
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS if wait else 0)
            if not ready:
                if not wait:
                    break
                continue
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                sent = self.sent.pop(ref)
                sent.actor.in_flight -= 1
                try:
                    segments, busy, done = ray.get(ref)
                except _ACTOR_LOST as exc:
                    self._lost(sent, exc)
                    continue
                out.append(Done(sent.task.seq, segments, busy, done))
            if not wait:
                break
        return out

    def _replace(self, actor: _Actor) -> None:
        if actor.alive:
            actor.alive = False
            self.actors[self.actors.index(actor)] = self._new_actor()
            self.replaced += 1

    def _lost(self, sent: _Sent, exc: BaseException) -> None:
        self._replace(sent.actor)
        if not self.replayable:
            raise TempFailError(
                f"the Ray actor of this stage was lost ({type(exc).__name__}) and it keeps "
                "state, so it cannot resume; run the pipeline again"
            )
        if sent.attempt >= MAX_ATTEMPTS:
            task = sent.task
            first = task.lines[0] if len(task.lines) else 1
            raise SageError(
                f"{task.origin}:{first}: the batch starting here ended its Ray actor "
                f"{MAX_ATTEMPTS} times (a crash in the operator or in --fn code); run it "
                "without --engine ray to see the error"
            )
        self._send(_Sent(sent.task, self._pick(), sent.attempt + 1))

    def _each(self, method: str, *args: Any) -> list[Record]:
        out: list[Record] = []
        for actor in list(self.actors):
            try:
                out.extend(ray.get(getattr(actor.handle, method).remote(*args)))
            except _ACTOR_LOST as exc:
                self._replace(actor)
                if not self.replayable:
                    raise TempFailError(
                        f"the Ray actor of this stage was lost ({type(exc).__name__}) before "
                        "it could emit what it holds; run the pipeline again"
                    ) from None
        return out

    def tick(self, now: float) -> list[Record]:
        return self._each("tick", now)

    def close(self) -> list[Record]:
        return self._each("close")

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


class StageWriter(RecordWriter):
    """A stage's output when another stage follows: the next stage's Driver reads it."""

    def __init__(self, next_driver: Driver) -> None:  # no fd: nothing is written here
        self.next = next_driver

    @property
    def done(self) -> bool:  # type: ignore[override]
        return self.next.done

    def write(self, records: list[Record]) -> None:
        self.next.feed_records(records)

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


class RayPipeline:
    """The planned stages as chained Drivers with Ray executors, writing to `writer`."""

    def __init__(
        self,
        plans: list[StagePlan],
        writer: RecordWriter,
        *,
        actor_cpus: float = ACTOR_CPUS,
    ) -> None:
        self.plans = plans
        self.drivers: list[Driver] = []
        self.policies: list[ErrorPolicy] = []
        self.executors: list[RayExecutor] = []
        self.progress: list[Any] = []
        out: Any = writer
        for plan in reversed(plans):
            opts = plan.call.opts
            policy = ErrorPolicy(plan.prog, opts.on_error, opts.errors, Stats())
            factory = plan.call.factory
            executor = RayExecutor(
                factory.with_kwargs(worker_kwargs(factory.kwargs, plan.replicas)),
                plan.replicas,
                replayable=plan.call.verb.replicable,
                stop_at_error=policy.mode is ErrorMode.fail,
                actor_cpus=actor_cpus,
            )
            shown = make_progress(plan.prog, opts)  # the stage's own --progress
            driver = Driver(
                plan.op,
                out,
                policy,
                opts.batch_size or plan.op.default_batch_size,
                on_batch=shown.update if shown is not None else None,
                executor=executor,
                ordered=not opts.unordered,
            )
            self.drivers.insert(0, driver)
            self.policies.insert(0, policy)
            self.executors.insert(0, executor)
            if shown is not None:
                self.progress.append(shown)
            out = StageWriter(driver)
        self.writer = writer
        intervals = [p.op.tick_interval for p in plans if p.op.tick_interval is not None]
        self.tick_interval = min(intervals) if intervals else None

    @property
    def replaced(self) -> int:
        return sum(e.replaced for e in self.executors)

    def idle(self) -> None:
        """Input is idle: every stage in turn drains, ticks and flushes."""
        for driver in self.drivers:
            driver.idle()
        self.writer.flush()

    def run(self, stdin: Any) -> None:
        for driver in self.drivers:
            driver.start()  # every stage's actors start (and load their models) at once
        first, plan = self.drivers[0], self.plans[0]
        if not plan.call.reads_stdin:
            built = plan.call.factory.build(**plan.call.factory.kwargs)
            records = built[1] if isinstance(built, tuple) else []
            first.run_records(records, origin=plan.call.verb.name)
        else:
            reader = RecordReader(
                plan.call.opts.files,
                on_idle=self.idle,
                idle_interval=self.tick_interval,
                stdin=stdin,
            )
            first.run_reader(reader)
        for driver in self.drivers[1:]:
            driver.finish()
        self.writer.flush()

    def salvage(self, failed: int) -> None:
        """Stage `failed` stopped the run: the stages after it write what they have finished
        (no close: a whole-input stage must not commit a partial input)."""
        for driver in self.drivers[failed + 1 :]:
            try:
                driver.drain()
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                break
        self.writer.flush()

    def shutdown(self) -> None:
        for driver in self.drivers:
            driver.shutdown()
        for policy in self.policies:
            policy.close()
        for shown in self.progress:
            shown.close()


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


def connect(address: str | None, num_cpus: int | None = None, from_here: bool = False) -> None:
    """Join the cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT") or, with None,
    start a private local one with `num_cpus` CPUs (default: this machine's). `from_here`: a
    Python program's own pipeline (sage_cli.api), whose functions live in modules of its
    working directory, which its actors must import as the program itself does."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    debug = os.environ.get("SAGE_DEBUG") == "1"
    common: dict[str, Any] = {
        "logging_level": logging.INFO if debug else logging.ERROR,
        "log_to_driver": debug,
        "configure_logging": True,
    }
    # Ray puts the driver's current directory first on its workers' sys.path: an `orjson.py`
    # lying in the data directory would run in every actor (issue 17). So Ray is joined from
    # "/", which holds no modules; the actors still chdir to the stage's directory (StageActor)
    # and a --fn module there is still found (load_function adds its directory itself). A
    # private local Ray's processes also start in "/", not in the data directory.
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not from_here:
            os.chdir(os.sep)
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **common)
    finally:
        os.fchdir(here)
        os.close(here)


def run_ray_pipeline(
    stages: list[list[str]],
    *,
    address: str | None = None,
    replicas: list[str] | dict[str, int] | None = None,
    stdin: int | BinaryIO | None = None,
    stdout: int | BinaryIO | None = None,
    trace_dir: str | None = None,
    trace: str = "full",
    timeout: float | None = None,
    num_cpus: int | None = None,
    shutdown: bool = True,
) -> int:
    """Run `stages` (each `["sage", VERB, ARGS...]`) on Ray; return the exit code.

    `address`: None starts a local Ray instance for this run; "auto" or "HOST:PORT" joins a
    running cluster (`ray start --head` on one node, `ray start --address` on the others).
    `replicas`: ["STAGE=N", ...] or {STAGE: N}; STAGE is a command name, a 1-based position
    or a stage name such as `2-embed`. `stdin`/`stdout`: fds or binary streams (default: the
    process's). `trace_dir`: where `<n>-<command>.trace.ndjson` go (a run's `stages/`), with
    `trace` full (record ids), batches (no ids) or off (none). `timeout`: seconds before the
    run is stopped (exit 124).
    Errors print one line, `sage VERB: error: ...`, for the first stage that failed.
    """
    prog = "sage run"
    try:
        plans = plan_stages(stages, parse_replicas(replicas))
    except SageError as err:
        return fail(prog, err)
    writer = _writer_for(stdout)
    pipeline = RayPipeline(plans, writer)
    tracers = _start_traces(pipeline, trace_dir, trace)
    _start_envelopes(pipeline)
    failed: list[Exception] = []
    timed_out = threading.Event()

    def body() -> None:
        connect(address, num_cpus)
        reclaim_signals()  # a SIGTERM ends the run with 143, like a local stage
        total = float(ray.cluster_resources().get("CPU", 1.0))
        actors = sum(p.replicas for p in plans)
        # Fractional CPUs: all actors together reserve at most half the cluster's CPUs, so the
        # driver is never starved and the actors of a lost node fit on the nodes left.
        cpus = max(0.01, min(ACTOR_CPUS, total / 2 / max(1, actors)))
        for executor in pipeline.executors:
            executor.actor_cpus = cpus
        try:
            pipeline.run(stdin)
        except Exception as exc:  # a stage failed: the stages after it still write theirs
            names = [p.prog for p in plans]
            stage = getattr(exc, "stage", None)
            pipeline.salvage(names.index(stage) if stage in names else len(plans))
            failed.append(exc)

    def on_timeout() -> None:
        timed_out.set()
        sys.stderr.write(f"{prog}: warning: timed out after {timeout:g}s; stopping the stages\n")
        import _thread

        _thread.interrupt_main()  # SIGINT's way in: the Driver stops where it is

    timer = None
    if timeout:
        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()
    # Ray prints its own error notices (a worker died...) with print() to sys.stdout: send
    # them to stderr, since stdout carries data only (the writer holds the real fd 1).
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    ignored = _unignore_signals()
    code: int = ExitCode.OK
    try:
        code = _guarded_run(prog, body, writer)
        if timer is not None:
            timer.cancel()
        if timed_out.is_set():
            forget_signal()
            code = TIMEOUT_STATUS
        elif code == ExitCode.OK and failed:
            exc = failed[0]
            code = report_error(getattr(exc, "stage", None) or prog, exc)
        if pipeline.replaced:
            sys.stderr.write(
                f"{prog}: warning: replaced {pipeline.replaced} lost Ray actor(s); "
                "their batches were sent again\n"
            )
        for plan, driver in zip(plans, pipeline.drivers, strict=True):
            if driver.stats.skipped and not plan.call.opts.quiet:
                sys.stderr.write(
                    f"{plan.prog}: warning: skipped {driver.stats.skipped} bad record(s)\n"
                )
    finally:
        if timer is not None:
            timer.cancel()
        _stop_traces(pipeline, tracers, failed, int(code))
        if ray.is_initialized():
            pipeline.shutdown()
            if shutdown:
                ray.shutdown()
        sys.stdout = real_stdout
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)
    return int(code)


def _unignore_signals() -> list[signal.Signals]:
    """A run owns its stages: started with SIGINT (or SIGTERM) ignored (`nohup`, `trap "" INT`,
    a background job), it must still stop on them (issue 17), like the local supervisor. Their
    default dispositions come back before Ray starts its threads and processes, so `guarded`
    installs its handlers; return the signals to ignore again afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return []
    ignored = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN]
    for sig in ignored:
        signal.signal(sig, signal.SIG_DFL)
    return ignored


def _guarded_run(prog: str, body: Any, writer: RecordWriter) -> int:
    from sage_cli.cli.guard import guarded

    return guarded(prog, body, on_stop=writer.flush)


def _start_envelopes(pipeline: RayPipeline) -> None:
    env = StageEnv.read()
    if not env.envelope:
        return
    from sage_cli.observability.envelope import Envelope, new_run_id

    run_id = env.run_id or new_run_id()
    for plan, driver in zip(pipeline.plans, pipeline.drivers, strict=True):
        driver.envelope = Envelope(plan.op.name, run_id)


def _start_traces(pipeline: RayPipeline, trace_dir: str | None, mode: str) -> list[Any]:
    if not trace_dir or mode == "off":
        return []
    from sage_cli.observability.trace import Tracer

    tracers: list[Any] = []
    for plan, driver in zip(pipeline.plans, pipeline.drivers, strict=True):
        try:
            path = os.path.join(trace_dir, f"{plan.name}.trace.ndjson")
            tracer = Tracer(path, plan.name, with_ids=mode == "full")
        except OSError:
            tracers.append(None)
            continue
        driver.observe(tracer, driver.envelope)
        tracers.append(tracer)
    return tracers


def _stop_traces(
    pipeline: RayPipeline, tracers: list[Any], failed: list[Exception], code: int
) -> None:
    stage = getattr(failed[0], "stage", None) if failed else None
    for plan, tracer in zip(pipeline.plans, tracers, strict=False):
        if tracer is not None:
            status = code if stage == plan.prog or (stage is None and code) else 0
            tracer.stop(status)


def main(argv: list[str] | None = None) -> int:
    """`python -m sage_cli.execution.ray [--address A] [--replicas S=N]... 'sage map r' ...`:
    each argument is one stage's command line (what `sage run --engine ray` runs)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m sage_cli.execution.ray")
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


# -- one stage of a script that bash runs (`sage run --engine ray SCRIPT`) --------------------


def stage_executor(factory: Any, env: StageEnv, *, workers: int, stop_at_error: bool) -> Executor:
    """The executor of one `sage` stage that a script started under `sage run --engine ray`:
    the stage process stays where bash started it (its Driver reads, orders, judges, traces and
    writes as always) and its batches run on Ray actors of the run's cluster (SAGE_RAY_ADDRESS).
    The actors are this process's: they end when it does."""
    from sage_cli.verbs import VERBS

    connect(env.ray_address)
    verb = VERBS[factory.command]
    replicas = (
        parse_replicas((env.ray_replicas or "").replace(" ", "").split(","))
        if env.ray_replicas
        else {}
    )
    keys = [k for k in (env.trace_stage, verb.name, verb.command) if k and k in replicas]
    n = replicas[keys[0]] if keys else (workers if workers > 1 else 2 if verb.replicable else 1)
    if not verb.replicable:
        n = 1  # its state lives in one copy (run_operator refused --workers already)
    return RayExecutor(
        factory.with_kwargs(worker_kwargs(factory.kwargs, n)),
        n,
        replayable=verb.replicable,
        stop_at_error=stop_at_error,
    )


def start_local_cluster(num_cpus: int | None = None) -> str:
    """Start a private Ray on this machine for a run (ended with `ray.shutdown()`) and return
    the address its stages join."""
    connect(None, num_cpus)
    return str(ray.get_runtime_context().gcs_address)
