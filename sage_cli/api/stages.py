"""What one stage of a Python pipeline is (a verb with its options, a Python callable, or an
operator instance) and how it becomes an operator the Driver runs."""

from __future__ import annotations

import functools
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sage_cli.api import verbs
from sage_cli.cli.command import IOOptions
from sage_cli.errors import UsageError
from sage_cli.execution.driver import ErrorMode
from sage_cli.operators.base import Operator, Record

#: what a callable stage does with its function, per DataStream method
CALLABLE_KINDS = ("map", "filter", "flatmap", "keyby", "sink")


@dataclass
class StageSpec:
    """One stage as the user wrote it. Exactly one of `verb`, `func`, `operator`, `records`."""

    method: str  # the DataStream method (or from_source / from_batch) that made it
    label: str  # the stage's name in counts, messages and `_error` records
    verb: str | None = None  # a sage verb ("retrieve", "index build")
    options: dict[str, Any] = field(default_factory=dict)  # its keywords (arguments named)
    func: Callable[..., Any] | None = None  # a Python callable
    operator: Operator | None = None  # an operator instance
    records: Iterable[Any] | None = None  # from_batch's iterable
    common: dict[str, Any] = field(default_factory=dict)  # on_error... for non-verb stages
    engine: str = "local"  # where its batches run: "local" (inline or workers) or "ray"

    @property
    def argv(self) -> list[str]:
        """`sage VERB ...` without `sage` (verb stages only)."""
        assert self.verb is not None
        return verbs.to_argv(self.verb, self.options)

    def spelling(self) -> str:
        """What the stage is, for a message that says why it has no bash or YAML form."""
        if self.records is not None:
            return "from_batch (records held in Python)"
        if self.func is not None:
            return f"{self.label}, a Python callable"
        return f"{self.label}, an operator instance"


@dataclass
class BuiltStage:
    """A stage ready to run: its operator, common options, how to rebuild the operator in a
    worker process (None: it cannot be), and the records a source reads."""

    spec: StageSpec
    op: Operator
    opts: IOOptions
    factory: Callable[[], Operator] | None
    records: Iterable[Any] | None = None


def verb_stage(
    method: str,
    verb: str,
    args: tuple[Any, ...],
    options: dict[str, Any],
    engine: str = "local",
) -> StageSpec:
    """A stage running `sage VERB ...`; the options are checked against the verb now."""
    if not isinstance(verb, str) or not verbs.is_verb(verb):
        known = f"{verb!r} is not a sage verb (verbs: {', '.join(verbs.known_verbs())})"
        if method == "yaml":
            raise UsageError(known)
        raise UsageError(f".{method}(): {known}; or give a callable or an operator instance")
    from sage_cli.cli.command import refuse_opted_out
    from sage_cli.verbs import VERBS

    named = verbs.named_options(verb, args, options)
    call = verbs.parse(verbs.to_argv(verb, named))  # the CLI's own checks, now, not at submit
    refuse_opted_out(VERBS[verb], call.opts)  # --workers on a stateful verb: the CLI's refusal
    return StageSpec(method, verb, verb=verb, options=named, engine=engine)


def check_common(where: str, common: dict[str, Any]) -> dict[str, Any]:
    """The common options of a callable or instance stage, checked as the CLI checks them."""
    unknown = sorted(set(common) - set(verbs.COMMON_OPTIONS))
    if unknown:
        raise UsageError(
            f"{where}: no option {unknown[0]!r} (options: {', '.join(verbs.COMMON_OPTIONS)})"
        )
    out = {k: v for k, v in common.items() if v is not None}
    if "on_error" in out:
        try:
            out["on_error"] = ErrorMode(out["on_error"])
        except ValueError:
            raise UsageError(
                f"{where}: on_error={out['on_error']!r}: choose fail, skip or emit"
            ) from None
    for name in ("batch_size", "workers"):
        value = out.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"{where}: {name}={value!r}: expected an integer >= 1")
    return out


def callable_stage(
    method: str, func: Callable[..., Any], common: dict[str, Any], engine: str = "local"
) -> StageSpec:
    from sage_cli.operators.expr import callable_name

    label = f"{method}({callable_name(func)})"
    checked = check_common(label, common)
    if checked.get("workers", 1) > 1 and engine == "local":  # Ray ships it with cloudpickle
        if not _importable(func):
            raise UsageError(
                f"{label}: workers={checked['workers']} runs the function in other processes, "
                "so it must be importable: define it at module level (not a lambda or closure)"
            )
    return StageSpec(method, label, func=func, common=checked, engine=engine)


def _importable(func: Callable[..., Any]) -> bool:
    """Whether a worker process can import `func` by its module and name (what pickling a
    function sends): a module-level function, not a lambda, closure or method of an object."""
    module = getattr(func, "__module__", None) or ""
    obj: Any = sys.modules.get(module)
    if module == "__main__" and getattr(obj, "__file__", None) is None:
        return False  # a notebook or `python -c`: a worker has no file to import it from
    for part in str(getattr(func, "__qualname__", "")).split("."):
        obj = getattr(obj, part, None)
    return obj is func


def operator_stage(
    method: str, op: Operator, common: dict[str, Any], engine: str = "local"
) -> StageSpec:
    label = f"{method}({type(op).__name__})"
    checked = check_common(label, common)
    if checked.get("workers", 1) > 1 or engine == "ray":
        raise UsageError(
            f'{label}: workers and engine="ray" need a verb or a function, to build the '
            f'operator again in each copy; write .{method}("VERB", ...) instead of an instance'
        )
    return StageSpec(method, label, operator=op, common=checked)


# -- operators for Python callables --------------------------------------------------------


class CallKeyBy(Operator):
    """`_key` = func(record), for `.keyby(func)`."""

    name = "keyby"

    def __init__(self, fn: Callable[[Record], Any]) -> None:
        self.func = fn

    def process(self, batch: list[Record]) -> list[Record]:
        func = self.func
        for record in batch:
            record["_key"] = func(record)
        return batch


class CallSink(Operator):
    """Calls func(record) for each record, for `.sink(func)`; passes nothing on.

    When one call fails the Driver retries the batch record by record: the records of that
    batch already handed to func are not handed again.
    """

    name = "sink"
    stateless = False

    def __init__(self, fn: Callable[[Record], Any]) -> None:
        self.func = fn
        self._delivered = 0  # records of a failed batch that func already took

    def process(self, batch: list[Record]) -> list[Record]:
        if self._delivered and len(batch) == 1:
            self._delivered -= 1
            return []
        rest = iter(batch)
        try:
            deque(map(self.func, rest), maxlen=0)  # the loop stays in C
        except Exception:
            if len(batch) > 1:  # what `rest` still holds was not handed to func
                self._delivered = len(batch) - sum(1 for _ in rest) - 1
            raise
        return []


class BatchSource(Operator):
    """The records of `from_batch`, as they are."""

    name = "from_batch"

    def process(self, batch: list[Record]) -> list[Record]:
        return batch


def _callable_operator(method: str, func: Callable[..., Any]) -> Operator:
    from sage_cli.operators.expr import Filter, FlatMap, Map

    if method == "map":
        return Map(fn=func)
    if method == "filter":
        return Filter(fn=func)
    if method == "flatmap":
        return FlatMap(fn=func)
    if method == "keyby":
        return CallKeyBy(func)
    if method == "sink":
        return CallSink(func)
    raise UsageError(f".{method}() takes a verb or an operator, not a callable")


def build(spec: StageSpec) -> BuiltStage:
    """Build the stage's operator (not set up: no model loads here)."""
    if spec.verb is not None:
        call = verbs.parse(spec.argv)
        op, records = call.build()
        factory: Callable[[], Operator] = call.factory
        if call.opts.workers > 1:
            from sage_cli.execution.pool import worker_kwargs

            factory = call.factory.with_kwargs(
                worker_kwargs(call.factory.kwargs, call.opts.workers)
            )
        return BuiltStage(spec, op, call.opts, factory, records)
    opts = IOOptions(**spec.common)
    if spec.records is not None:
        return BuiltStage(spec, BatchSource(), opts, None, spec.records)
    if spec.func is not None:
        op = _callable_operator(spec.method, spec.func)
        factory = functools.partial(_callable_operator, spec.method, spec.func)
        if opts.workers > 1 and not op.stateless:
            raise UsageError(f"{spec.label}: workers runs a map, filter, flatmap or keyby")
        return BuiltStage(spec, op, opts, factory)
    assert spec.operator is not None
    return BuiltStage(spec, spec.operator, opts, None)
