"""Running a Python pipeline: one Driver per stage, chained in-process. A stage's output goes
to the next stage's Driver as the list of dicts it is (no JSON between stages), a batch at a
time, so an unbounded source runs in memory bounded by the batch sizes."""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sage_cli.api.stages import BuiltStage, build
from sage_cli.errors import SageError, UsageError
from sage_cli.execution.driver import (
    Driver,
    ErrorMode,
    ErrorPolicy,
    Stats,
    convert_operator_error,
)
from sage_cli.execution.executor import Executor
from sage_cli.exitcodes import ExitCode
from sage_cli.operators.base import OperatorError, Record, RecordError

_ONLY_DICTS = frozenset((dict,))
#: what a Python stage's input is called in messages and `_error` records: its position in
#: that stage's input stream, from 1
ORIGIN = "input"


class PipelineError(SageError):
    """A pipeline stopped: a record failed under on_error="fail", an option cannot work, a
    model or index is missing. `stage` names the stage, `code` is the exit code the CLI would
    give (65 bad data, 69 missing model or index, 2 usage, 1 other)."""

    def __init__(
        self, message: str, code: int = ExitCode.FAILURE, stage: str | None = None
    ) -> None:
        super().__init__(message, ExitCode(code))
        self.stage = stage
        #: the exception of the record that failed (the user's own, for a callable)
        self.original: BaseException | None = None


@dataclass
class StageCounts:
    """What one stage did: records in and out, errors (handled by the policy), skipped."""

    pipeline: int
    stage: str
    records_in: int
    records_out: int
    errors: int
    skipped: int
    seconds: float  # time spent in the operator

    @classmethod
    def of(cls, pipeline: int, stage: str, stats: Stats) -> StageCounts:
        return cls(
            pipeline,
            stage,
            stats.records_in,
            stats.records_out,
            stats.errors,
            stats.skipped,
            round(stats.busy_seconds, 6),
        )


class _Policy(ErrorPolicy):
    """The CLI's error policy; a stop names the stage and says how to go on in Python."""

    go_on_hint = ' (on_error="skip" or "emit" to go on)'

    #: the exception of the record being judged
    _judged: BaseException | None = None

    def bad_record(
        self, record: Record, origin: str, line: int, exc: BaseException
    ) -> list[Record]:
        self._judged = exc
        try:
            return super().bad_record(record, origin, line, exc)
        finally:
            self._judged = None

    def _apply(self, dead: Record, message: str, code: Any, emitted: Record) -> list[Record]:
        try:
            return super()._apply(dead, message, code, emitted)
        except SageError as err:
            # the cause shown is the user's own exception (with its traceback), not the
            # operator's wrapper of it (`raise RecordError(...) from None`)
            cause = self._judged
            while cause is not None and cause.__suppress_context__ and cause.__context__:
                cause = cause.__context__
            failed = PipelineError(f"{self.stage}: {err}", err.code, self.stage)
            failed.original = cause
            raise failed from cause


class _Link:
    """The writer of one stage: hands its output to the next stage's Driver."""

    def __init__(self, driver: Driver, downstream: _Link | None) -> None:
        self.next = driver
        self.position = 0
        #: the last block fed to `next` known clean: an operator that passes its batch on as
        #: it is (a source, `keyby`) hands the link after it the same list, known clean
        self.clean_block: list[Record] | None = None
        if downstream is not None:
            downstream.upstream = self
        self.upstream: _Link | None = None

    @property
    def done(self) -> bool:
        """The next stage wants no more input (`head`): the Driver feeding it stops."""
        return self.next.done

    def write(self, records: list[Record]) -> None:
        nxt = self.next
        if not records or nxt.done:
            return
        first = self.position + 1
        self.position += len(records)
        up = self.upstream
        # a clean block (dicts without `_error`) is cut into batches with no per-record work
        clean = (up is not None and records is up.clean_block) or (
            _ONLY_DICTS.issuperset(map(type, records))
            and not any(map(dict.__contains__, records, itertools.repeat("_error")))
        )
        self.clean_block = records if clean else None
        nxt.feed_block(ORIGIN, first, records, None, clean)

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        self.next.idle()  # input is idle (or ends): time-driven stages emit what is due


class _Discard:
    """The end of a pipeline with no stage writing to stdout: records are counted only."""

    done = False  # the end of a pipeline always takes more

    def write(self, records: list[Record]) -> None:
        pass

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


def _driver(stage: BuiltStage, writer: Any, ray_cpus: float | None) -> Driver:
    """The stage's Driver, with the executor its options choose: inline (this process),
    `workers=N` processes, or Ray actors (`engine="ray"`; `workers=N` actors)."""
    opts = stage.opts
    policy = _Policy(stage.spec.label, opts.on_error, opts.errors, Stats())
    batch_size = opts.batch_size or stage.op.default_batch_size
    stop = policy.mode is ErrorMode.fail
    executor: Executor | None = None
    if stage.spec.engine == "ray":
        from sage_cli.execution.ray import RayExecutor

        if stage.factory is None:
            raise UsageError(
                f'{stage.spec.label}: engine="ray" builds the operator again in each actor; '
                "write the stage as a verb or a function"
            )
        replicas = opts.workers if opts.workers > 1 else (2 if stage.op.stateless else 1)
        executor = RayExecutor(
            stage.factory,
            replicas,
            replayable=stage.op.stateless,
            stop_at_error=stop,
            actor_cpus=ray_cpus or 0.25,
        )
    elif opts.workers > 1 and stage.factory is not None:
        from sage_cli.execution.pool import ProcessPoolExecutor

        executor = ProcessPoolExecutor(stage.factory, opts.workers, stop_at_error=stop)
    return Driver(
        stage.op, writer, policy, batch_size, executor=executor, ordered=not opts.unordered
    )


def _start_ray(stages: list[BuiltStage], address: str | None) -> tuple[float | None, bool]:
    """Connect to Ray when a stage runs on it: (CPUs per actor, whether Ray was started here).
    The actors of a pipeline together reserve at most half the cluster's CPUs, as under
    `sage run --engine ray`; Python's own SIGINT and SIGTERM handlers are kept."""
    on_ray = [s for s in stages if s.spec.engine == "ray"]
    if not on_ray:
        return None, False
    import signal

    import ray

    from sage_cli.execution.ray import ACTOR_CPUS, connect

    started = not ray.is_initialized()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    connect(address, from_here=True)  # the program's own modules, as it imports them
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
    total = float(ray.cluster_resources().get("CPU", 1.0))
    actors = sum(max(2, s.opts.workers) for s in on_ray)
    return max(0.01, min(ACTOR_CPUS, total / 2 / actors)), started


class _Calls(_Discard):
    """The end of a pipeline with a callable sink: the `_error` records the Driver passes
    around the operator reach the callable too (on_error="emit" is seen in Python)."""

    def __init__(self, func: Callable[[Record], Any]) -> None:
        self.func = func

    def write(self, records: list[Record]) -> None:
        for record in records:
            self.func(record)


def _has_stdout_fd() -> bool:
    try:
        sys.stdout.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _last_writer(stage: BuiltStage) -> Any:
    """A `sink` verb writes what it passes on to stdout, as `sage sink` does; a callable sink
    gets the `_error` records too; any other last stage's output is counted and dropped."""
    if stage.spec.verb == "sink":
        from sage_cli.cli.io import RecordWriter, dump_record

        if not _has_stdout_fd():  # a notebook: sys.stdout is a Python object, not fd 1
            return _Calls(lambda r: sys.stdout.write(dump_record(r).decode()))
        return RecordWriter()
    if stage.spec.method == "sink" and stage.spec.func is not None:
        return _Calls(stage.spec.func)
    return _Discard()


def run(
    number: int,
    specs: list[Any],
    on_stage: Callable[[list[StageCounts]], None],
    address: str | None = None,
) -> None:
    """Run one pipeline to the end. `on_stage` receives the counts (also when it stops early:
    an error, Ctrl-C). `address`: the Ray cluster of stages with engine="ray"."""
    stages: list[BuiltStage] = []
    drivers: list[Driver] = []
    current = specs[0].label
    ray_started = False
    try:
        for spec in specs:
            current = spec.label
            stages.append(build(spec))
        current = specs[0].label
        ray_cpus, ray_started = _start_ray(stages, address)
        writer: Any = _last_writer(stages[-1])
        link: _Link | None = None
        for stage in reversed(stages):
            driver = _driver(stage, writer, ray_cpus)
            drivers.insert(0, driver)
            writer = link = _Link(driver, link)
        for stage, driver in zip(stages, drivers, strict=True):
            current = stage.spec.label
            with _main_hidden(stage.spec.verb is not None):
                driver.start()  # every model loads before the first record is read
        current = stages[0].spec.label
        _run_source(stages[0], drivers[0], writer)
        for stage, driver in zip(stages[1:], drivers[1:], strict=True):
            current = stage.spec.label
            driver.finish()
    except PipelineError as err:
        _stop(drivers)
        # the Driver re-raises errors `from None` to name its stage: the cause shown is the
        # user's own exception again (its traceback is what they need)
        raise err from err.original
    except (SageError, OperatorError) as exc:
        _stop(drivers)
        stage_name = getattr(exc, "stage", None) or current  # the Driver names its stage
        converted = exc if isinstance(exc, SageError) else convert_operator_error(exc)
        if converted is None:
            converted = SageError(str(exc))
        raise PipelineError(f"{stage_name}: {converted}", converted.code, stage_name) from exc
    except BaseException:  # Ctrl-C, a bug: what is complete is written, partial files dropped
        _stop(drivers)
        raise
    finally:
        for driver in drivers:
            try:
                driver.shutdown()  # workers, actors: stopped however the run ended
            finally:
                driver.policy.close()
        if ray_started:
            import ray

            ray.shutdown()
        on_stage(
            [
                StageCounts.of(number, s.spec.label, d.stats)
                for s, d in zip(stages, drivers, strict=False)
            ]
        )


@contextlib.contextmanager
def _main_hidden(hide: bool) -> Iterator[None]:
    """While `workers=N` processes of a verb stage start: hide the main script's path, so
    multiprocessing's spawn does not run the user's script again in each worker (a verb's
    factory needs nothing from it; a script then needs no `if __name__ == "__main__":`)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not hide or main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _stop(drivers: list[Driver]) -> None:
    if drivers:
        try:
            drivers[-1].writer.flush()
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            pass
    for driver in drivers:
        try:
            driver.abandon()
        except Exception:  # noqa: BLE001
            pass


def _run_source(stage: BuiltStage, driver: Driver, feed: _Link) -> None:
    """Read the source into the first stage's Driver (`feed`: the link that stands for its
    input, so the link after it knows a block it passes on as it is is clean)."""
    if stage.spec.records is None:  # a verb source (`source`, `merge`): the CLI's own loop
        assert stage.records is not None
        driver.run_records(stage.records, origin=stage.spec.label)
        return
    driver.start()
    size = driver.batch_size
    it = iter(stage.records or ())
    position = 1
    while not driver.done:
        batch = list(itertools.islice(it, size))
        if not batch:
            break
        if not _ONLY_DICTS.issuperset(map(type, batch)):
            batch = _as_records(batch, position, driver.policy)
        clean = not any(map(dict.__contains__, batch, itertools.repeat("_error")))
        feed.clean_block = batch if clean else None
        driver.feed_block(ORIGIN, position, batch, None, clean)
        position += len(batch)
    driver.finish()


def _as_records(items: list[Any], position: int, policy: ErrorPolicy) -> list[Record]:
    """from_batch items as records: a dict as it is, a str as {"text": str}; anything else is
    that item's error (the policy decides)."""
    out: list[Record] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            out.append(item if type(item) is dict else dict(item))
        elif isinstance(item, str):
            out.append({"text": item})
        else:
            error = RecordError(
                f"item is {type(item).__name__}, not a record (a dict) or a str: {item!r:.60}"
            )
            out.extend(policy.bad_record({"item": repr(item)}, ORIGIN, position + i, error))
    return out
