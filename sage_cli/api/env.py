"""LocalEnvironment: where Python pipelines are written and run."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from typing import Any

from sage_cli.api import verbs
from sage_cli.api.runtime import StageCounts, run
from sage_cli.api.stages import StageSpec, verb_stage
from sage_cli.api.stream import DataStream
from sage_cli.errors import UsageError


class LocalEnvironment:
    """Pipelines of sage operators and Python functions, run in this process.

    The seed's quick start, with sage's verbs:

        >>> from sage_cli.api import LocalEnvironment
        >>> env = LocalEnvironment("rag_pipeline")
        >>> (env.from_source("questions.ndjson")
        ...     .map("retrieve", index="idx/", top_k=5)
        ...     .map("prompt", template="qa")
        ...     .map("generate", max_tokens=64)
        ...     .sink(print))  # doctest: +ELLIPSIS
        <DataStream ...>
        >>> counts = env.submit()  # doctest: +SKIP

    Each stage runs under sage's Driver (batching, the error policy, `_error` pass-through);
    stages hand records to each other as dicts, in batches, with no JSON between them.
    `on_error`, `errors`, `batch_size`, `workers` and `engine` given here are every stage's
    default (a stage's own options win). `engine="ray"` runs each stage's batches on a pool of
    Ray actors (`workers=N` actors; default 2, 1 for a stage that keeps state), on the cluster
    at `address` or on a private local Ray started for the run; sources and sinks run here.
    The same pipeline as a bash script: `env.to_script()`; as a YAML file for `sage run`:
    `env.to_yaml()`.
    """

    def __init__(
        self,
        name: str = "pipeline",
        *,
        on_error: str | None = None,
        errors: str | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        engine: str = "local",
        address: str | None = None,
    ) -> None:
        self.name = name
        self.engine = "local"
        self.engine = self.engine_of(engine)
        #: with engine="ray": the cluster to join ("auto", "HOST:PORT"); None starts a private
        #: local Ray for the run (and stops it after)
        self.address = address
        self.defaults: dict[str, Any] = {
            k: v
            for k, v in {
                "on_error": on_error,
                "errors": errors,
                "batch_size": batch_size,
                "workers": workers,
            }.items()
            if v is not None
        }
        self.pipelines: list[list[StageSpec]] = []
        #: the counts of the last submit(), also after it stopped early (an error, Ctrl-C)
        self.counts: list[StageCounts] = []

    def __repr__(self) -> str:
        return f"<LocalEnvironment {self.name}: {len(self.pipelines)} pipeline(s)>"

    def engine_of(self, engine: str | None) -> str:
        """A stage's engine: its own, else the environment's; "local" or "ray"."""
        chosen = self.engine if engine is None else engine
        if chosen not in ("local", "ray"):
            raise UsageError(f"engine={chosen!r}: choose local or ray")
        return chosen

    def split_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(common stage options with this environment's defaults under them, the rest)."""
        common = {k: v for k, v in options.items() if k in verbs.COMMON_OPTIONS}
        own = {k: v for k, v in options.items() if k not in verbs.COMMON_OPTIONS}
        return {**self.defaults, **common}, own

    # -- sources ---------------------------------------------------------------------------

    def from_source(self, *paths: str | PathLike[str], **options: Any) -> DataStream:
        """Read files, directories or globs as records, as `sage source` does (`raw=True`:
        one record per line; `format=`, `id_by=`); no path reads NDJSON from stdin."""
        common, own = self.split_options(options)
        spec = verb_stage("from_source", "source", tuple(str(p) for p in paths), {**own, **common})
        return self._start(spec)

    def from_batch(self, records: Iterable[Any], **options: Any) -> DataStream:
        """Records from any iterable (a list, a generator, unbounded): dicts as they are, a
        str as {"text": ...}; read a batch at a time, so a generator streams."""
        if isinstance(records, str | bytes | dict):
            raise UsageError("from_batch takes an iterable of records (dicts), not one value")
        from sage_cli.api.stages import check_common

        common, own = self.split_options(options)
        if own:
            raise UsageError(f"from_batch: no option {sorted(own)[0]!r}")
        return self._start(
            StageSpec(
                "from_batch",
                "from_batch",
                records=records,
                common=check_common("from_batch", common),
            )
        )

    def _start(self, spec: StageSpec) -> DataStream:
        pipeline = [spec]
        self.pipelines.append(pipeline)
        return DataStream(self, pipeline)

    # -- running ---------------------------------------------------------------------------

    def submit(self, autostop: bool = True) -> list[StageCounts]:
        """Run every pipeline to the end, in the order they were written, in this process;
        return each stage's counts (records in and out, errors, skipped).

        A record that fails stops the run under on_error="fail" (PipelineError naming the
        stage and the record's position in its input); "skip" drops it, "emit" passes it on
        with an `_error` field. Ctrl-C stops cleanly: what is complete is written, a sink's
        partial file is dropped, KeyboardInterrupt reaches the caller (the counts so far are
        in `env.counts`). `autostop` is accepted for SAGE's spelling: submit always returns
        when the sources end.
        """
        if not self.pipelines:
            raise UsageError("nothing to run: start a pipeline with from_source or from_batch")
        self.counts = []
        for number, pipeline in enumerate(self.pipelines, 1):
            run(number, pipeline, self.counts.extend, self.address)
        return list(self.counts)

    # -- other spellings -------------------------------------------------------------------

    def to_script(self) -> str:
        """The same pipelines as a bash script (`sage source ... | sage retrieve ...`), for
        `sage run` or bash. A stage with no command line (a Python callable, an operator
        instance, from_batch) is a UsageError that names it."""
        from sage_cli.api.forms import to_script

        return to_script(self)

    def to_yaml(self) -> str:
        """The same pipelines as YAML, for `sage run pipeline.yaml` or `from_yaml`."""
        from sage_cli.api.forms import to_yaml

        return to_yaml(self)

    @classmethod
    def from_yaml(cls, text_or_path: str | PathLike[str]) -> LocalEnvironment:
        """The environment a YAML pipeline file (or its text) describes."""
        from sage_cli.api.forms import from_yaml

        return from_yaml(text_or_path)
