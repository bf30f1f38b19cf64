"""Running a Python pipeline: one Driver per stage, chained in-process. A stage's output goes
to the next stage's Driver as the list of dicts it is (no JSON between stages), a batch at a
time, so an unbounded source runs in memory bounded by the batch sizes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sage_cli.api.stages import BuiltStage, build
from sage_cli.driver import Driver, ErrorPolicy, Stats, convert_operator_error
from sage_cli.errors import SageError
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

    def _apply(self, dead: Record, message: str, code: Any, emitted: Record) -> list[Record]:
        try:
            return super()._apply(dead, message, code, emitted)
        except SageError as err:
            # the cause shown is the user's own exception (with its traceback), not the
            # operator's wrapper of it (`raise RecordError(...) from None`)
            cause = err.__context__
            while cause is not None and cause.__suppress_context__ and cause.__context__:
                cause = cause.__context__
            raise PipelineError(f"{self.stage}: {err}", err.code, self.stage) from cause


class _Done:
    """Set when a stage needs no more input (`head`): the source stops reading."""

    stop = False


class _Link:
    """The writer of one stage: hands its output to the next stage's Driver."""

    def __init__(self, driver: Driver, done: _Done, downstream: _Link | None) -> None:
        self.next = driver
        self.done = done
        self.position = 0
        #: the last block fed to `next` known clean: an operator that passes its batch on as
        #: it is (a source, `keyby`) hands the link after it the same list, known clean
        self.clean_block: list[Record] | None = None
        if downstream is not None:
            downstream.upstream = self
        self.upstream: _Link | None = None

    def write(self, records: list[Record]) -> None:
        nxt = self.next
        if not records or nxt.op.done:
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
        if nxt.op.done:
            self.done.stop = True

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        self.next.idle()  # input is idle (or ends): time-driven stages emit what is due


class _Discard:
    """The end of a pipeline with no stage writing to stdout: records are counted only."""

    def write(self, records: list[Record]) -> None:
        pass

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


def _driver(stage: BuiltStage, writer: Any) -> Driver:
    opts = stage.opts
    policy = _Policy(stage.spec.label, opts.on_error, opts.errors, Stats())
    batch_size = opts.batch_size or stage.op.default_batch_size
    if opts.workers > 1 and stage.factory is not None:
        from sage_cli.workers import parallel_driver

        return parallel_driver(
            stage.op,
            writer,
            policy,
            batch_size,
            None,
            stage.factory,
            opts.workers,
            ordered=not opts.unordered,
        )
    return Driver(stage.op, writer, policy, batch_size)


class _Calls(_Discard):
    """The end of a pipeline with a callable sink: the `_error` records the Driver passes
    around the operator reach the callable too (on_error="emit" is seen in Python)."""

    def __init__(self, func: Callable[[Record], Any]) -> None:
        self.func = func

    def write(self, records: list[Record]) -> None:
        for record in records:
            self.func(record)


def _last_writer(stage: BuiltStage) -> Any:
    """A `sink` verb writes what it passes on to stdout, as `sage sink` does; a callable sink
    gets the `_error` records too; any other last stage's output is counted and dropped."""
    if stage.spec.verb == "sink":
        from sage_cli.io import RecordWriter

        return RecordWriter()
    if stage.spec.method == "sink" and stage.spec.func is not None:
        return _Calls(stage.spec.func)
    return _Discard()


def run(number: int, specs: list[Any], on_stage: Callable[[list[StageCounts]], None]) -> None:
    """Run one pipeline to the end. `on_stage` receives the counts (also when it stops early:
    an error, Ctrl-C)."""
    stages: list[BuiltStage] = []
    drivers: list[Driver] = []
    current = specs[0].label
    try:
        for spec in specs:
            current = spec.label
            stages.append(build(spec))
        done = _Done()
        writer: Any = _last_writer(stages[-1])
        link: _Link | None = None
        for stage in reversed(stages):
            driver = _driver(stage, writer)
            drivers.insert(0, driver)
            writer = link = _Link(driver, done, link)
        for stage, driver in zip(stages[1:], drivers[1:], strict=True):
            current = stage.spec.label
            driver.op.setup()  # every model loads before the first record is read
        current = stages[0].spec.label
        _run_source(stages[0], drivers[0], done, writer)
        for stage, driver in zip(stages[1:], drivers[1:], strict=True):
            current = stage.spec.label
            driver.finish()
    except PipelineError:
        _stop(stages, drivers)
        raise
    except SageError as err:
        _stop(stages, drivers)
        raise PipelineError(f"{current}: {err}", err.code, current) from err
    except OperatorError as exc:
        _stop(stages, drivers)
        converted = convert_operator_error(exc) or SageError(str(exc))
        raise PipelineError(f"{current}: {converted}", converted.code, current) from exc
    except BaseException:  # Ctrl-C, a bug: what is complete is written, partial files dropped
        _stop(stages, drivers)
        raise
    finally:
        for driver in drivers:
            shutdown = getattr(driver, "shutdown", None)  # workers: stop their processes
            if shutdown is not None:
                shutdown()
            driver.policy.close()
        on_stage(
            [
                StageCounts.of(number, s.spec.label, d.stats)
                for s, d in zip(stages, drivers, strict=False)
            ]
        )


def _stop(stages: list[BuiltStage], drivers: list[Driver]) -> None:
    if drivers:
        try:
            drivers[-1].writer.flush()
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            pass
    for stage in stages:
        try:
            stage.op.abandon()
        except Exception:  # noqa: BLE001
            pass


def _run_source(stage: BuiltStage, driver: Driver, done: _Done, feed: _Link) -> None:
    """Read the source into the first stage's Driver (`feed`: the link that stands for its
    input, so the link after it knows a block it passes on as it is is clean)."""
    if stage.spec.records is None:  # a verb source (`source`, `merge`): the CLI's own loop
        assert stage.records is not None
        driver.run_records(_until(stage.records, done), origin=stage.spec.label)
        return
    driver.op.setup()
    size = driver.batch_size
    it = iter(stage.records or ())
    position = 1
    while not done.stop:
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


def _until(records: Iterable[Any], done: _Done) -> Iterator[Any]:
    for record in records:
        yield record
        if done.stop:
            return


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
