"""DataStream: a pipeline being written, one stage per method call."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from os import PathLike
from typing import TYPE_CHECKING, Any

from sage_cli.api.stages import StageSpec, callable_stage, operator_stage, verb_stage
from sage_cli.errors import UsageError
from sage_cli.operators.base import Operator, Record

if TYPE_CHECKING:
    from sage_cli.api.env import LocalEnvironment

#: what `.map` and friends take: a callable, a verb name, or an operator instance
Step = Callable[..., Any] | str | Operator


class DataStream:
    """The records coming out of the last stage so far. Each method adds a stage and returns
    the stream after it; a stream feeds one next stage (a pipeline is a line, like a pipe).

    Every method takes a Python callable, a sage verb with keyword options named after its
    long flags, or an operator instance, plus the common stage options `on_error`
    ("fail", "skip", "emit"), `errors` (a dead-letter file), `batch_size`, `workers`,
    `unordered` and `engine` ("local" or "ray": where its batches run):

        >>> from sage_cli.api import LocalEnvironment
        >>> env = LocalEnvironment("rag_pipeline")
        >>> (env.from_source("questions.ndjson")
        ...     .map("retrieve", index="idx/", top_k=5)
        ...     .map("prompt", template="qa")
        ...     .map("generate", max_tokens=64)
        ...     .sink("answers.ndjson"))  # doctest: +ELLIPSIS
        <DataStream ...>
    """

    def __init__(self, env: LocalEnvironment, pipeline: list[StageSpec]) -> None:
        self._env = env
        self._pipeline = pipeline
        self._length = len(pipeline)

    def __repr__(self) -> str:
        stages = " | ".join(s.label for s in self._pipeline[: self._length])
        return f"<DataStream {self._env.name}: {stages}>"

    def _add(self, spec: StageSpec) -> DataStream:
        if len(self._pipeline) != self._length:
            raise UsageError(
                f"this stream already feeds {self._pipeline[self._length].label}; a stream "
                "feeds one next stage (run a second pipeline for a second consumer)"
            )
        if self._pipeline[-1].method == "sink":
            raise UsageError("a sink ends the pipeline; nothing can follow it")
        self._pipeline.append(spec)
        return DataStream(self._env, self._pipeline)

    def _step(
        self, method: str, step: Step | None, args: tuple[Any, ...], options: Any
    ) -> DataStream:
        engine = self._env.engine_of(options.pop("engine", None))
        if method == "sink":
            engine = "local"  # a sink writes here: a callable's list, a file, stdout
        common, own = self._env.split_options(options)
        if isinstance(step, Operator):
            if args or own:
                raise UsageError(f".{method}(operator): options go to the operator's constructor")
            return self._add(operator_stage(method, step, common, engine))
        if callable(step):
            if args or own:
                raise UsageError(
                    f".{method}(callable): takes only on_error, errors, batch_size, workers, "
                    f"unordered, engine; got {', '.join(sorted(own)) or args!r}"
                )
            return self._add(callable_stage(method, step, common, engine))
        verb = method if step is None else step
        if not isinstance(verb, str):
            raise UsageError(
                f".{method}({step!r}): give a callable, a verb name or an operator instance"
            )
        return self._add(verb_stage(method, verb, args, {**own, **common}, engine))

    def map(self, step: Step | None = None, *args: Any, **options: Any) -> DataStream:
        """Transform each record: `func(record) -> dict`, or a verb (`.map("retrieve",
        index="idx/", top_k=5)`, `.map(expr='r | {"n": 1}')` for `sage map`), or an operator."""
        return self._step("map", step, args, options)

    def filter(self, step: Step | None = None, *args: Any, **options: Any) -> DataStream:
        """Keep the records for which `func(record)` is true (or a verb: `.filter(expr=...)`,
        `.filter("dedupe", key="id")`)."""
        return self._step("filter", step, args, options)

    def flatmap(self, step: Step | None = None, *args: Any, **options: Any) -> DataStream:
        """Turn each record into zero or more: `func(record)` returns a list or generator of
        dicts (a str becomes {"text": ...}); or a verb (`.flatmap("chunk", size=400)`)."""
        return self._step("flatmap", step, args, options)

    def keyby(self, key: Step, *args: Any, **options: Any) -> DataStream:
        """Set `_key`: `func(record)`, or a field name as `sage keyby FIELD` takes it."""
        if isinstance(key, str):
            return self._step("keyby", None, (key, *args), options)
        return self._step("keyby", key, args, options)

    def window(self, step: Operator | None = None, **options: Any) -> DataStream:
        """Aggregate in windows, with `sage window`'s options: `.window(size=100,
        agg=["count", "mean:score"])`, `.window(seconds=60, time_field="ts")`."""
        return self._step("window", step, (), options)

    def join(
        self, table: str | PathLike[str] | Iterable[Record] | Operator, **options: Any
    ) -> DataStream:
        """Enrich records from a lookup table: an NDJSON file (`sage join TABLE`) or, in
        Python, any iterable of dicts; `on=` names the key, `how="left"` keeps unmatched."""
        if isinstance(table, str | PathLike):
            return self._step("join", None, (str(table),), options)
        if isinstance(table, Operator):
            return self._step("join", table, (), options)
        from sage_cli.operators.join import Join

        engine = self._env.engine_of(options.pop("engine", None))
        common, own = self._env.split_options(options)
        if "on" not in own:
            raise UsageError(".join(rows, on=KEY): name the key field")
        rows = [dict(r) for r in table]
        op = Join(rows, own.pop("on"), own.pop("how", "inner"), own.pop("prefix", None), "rows")
        if own:
            raise UsageError(f".join(rows): no option {sorted(own)[0]!r} (on, how, prefix)")
        return self._add(operator_stage("join", op, common, engine))

    def sink(
        self,
        target: Callable[[Record], Any] | str | PathLike[str] | Operator | None = None,
        **options: Any,
    ) -> DataStream:
        """End the pipeline: `func(record)` for each record, a path (`sage sink --to PATH`,
        written atomically; `format=` csv, json, md), or, with nothing, NDJSON on stdout."""
        if isinstance(target, str | PathLike):
            return self._step("sink", None, (), {"to": str(target), **options})
        return self._step("sink", target, (), options)
