"""The verb registry: one declarative entry per `sage` verb (DESIGN §4).

Every fact about a verb that more than one part of sage needs lives here, once: the module that
holds its command, its one-line summary, the function that builds its operator, what it reads,
whether it loads a model, its memory class, whether it can run as several copies, the common
flags it opts out of, and what `sage run --check` must know (output fields it cannot predict,
options that name input paths). The CLI (`sage --help`, subcommand loading), `sage run --check`,
the supervisor (who gets a share of the cores), the Ray engine and the Python API all read it.

Two public ways from a verb to an operator, neither of which runs the CLI:

- `parse_stage(argv)`: `sage VERB ARGS...` -> `StageCall` (the verb's entry, an
  `OperatorFactory` and the common I/O options), the explicit parse step of a command line;
- `build_operator(verb, **options)`: an operator from keyword options named after the verb's
  long flags (`build_operator("retrieve", index="idx/", top_k=5)`).

This module is imported by `sage_cli.cli.group`: it must stay light (no typer, click or operators at
import time).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sage_cli.errors import UsageError

if TYPE_CHECKING:
    from sage_cli.cli.command import IOOptions
    from sage_cli.operators.base import Operator

MemoryClass = Literal["streaming", "bounded", "whole-input"]
#: what a verb reads: NDJSON records (stdin or FILE arguments), or its own inputs (a source:
#: paths; merge: several NDJSON streams), or nothing (a tool such as `models`)
Reads = Literal["records", "own", "nothing"]

#: the flags every operator command takes (sage_cli.cli.command adds them), by parameter name
COMMON_FLAGS = (
    "on_error",
    "errors",
    "batch_size",
    "line_buffered",
    "schema",
    "workers",
    "unordered",
    "quiet",
    "progress",
)
#: what a verb that keeps state between records opts out of: it runs as exactly one copy
ONE_COPY = frozenset({"workers", "unordered"})


@dataclass(frozen=True)
class Verb:
    """One verb. `builder` ("module:function") is None for a verb that is not an operator over
    records (`models`, `run`, a command group such as `index`)."""

    name: str  # "map", "index build"
    module: str  # where its typer app lives
    summary: str  # the line `sage --help` shows
    builder: str | None = None  # the build function: its flags -> an Operator
    reads: Reads = "records"
    model: bool = False  # loads a model: gets a share of the cores under `sage run`
    memory: MemoryClass = "streaming"
    replicable: bool = True  # N copies (--workers, Ray replicas) give the same output
    opts_out: frozenset[str] = frozenset()  # common flags it refuses (names as in COMMON_FLAGS)
    open_output: bool = False  # output fields unknown before it runs (it runs user code)
    input_paths: tuple[str, ...] = ()  # options whose value is a path that must exist
    #: field -> other fields that satisfy it on input (documented aliases)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def is_operator(self) -> bool:
        return self.builder is not None

    @property
    def command(self) -> str:
        """The top-level command: `index` for `index build`."""
        return self.name.split(" ", 1)[0]

    @property
    def prog(self) -> str:
        return f"sage {self.name}"

    def build_function(self) -> Callable[..., Any]:
        """The function that turns the verb's parsed flags into its operator."""
        if self.builder is None:
            raise UsageError(f"{self.prog} is not an operator over records")
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def operator_verb(
    name: str,
    summary: str,
    builder: str,
    *,
    stateful: bool = False,
    module: str | None = None,
    **facts: Any,
) -> Verb:
    """The entry of an operator verb (`builder`: the build function's name in `module`, by
    default sage_cli.commands.<verb>); `stateful` ones run as one copy and opt out of
    --workers. Other facts are Verb's fields."""
    module = module or f"sage_cli.commands.{name.split(' ', 1)[0]}"
    opts_out = set(facts.pop("opts_out", ()))
    if stateful:
        opts_out |= ONE_COPY
    if facts.get("reads") == "own":
        opts_out.add("files")
    return Verb(
        name,
        module,
        summary,
        f"{module}:{builder}",
        replicable=not stateful,
        opts_out=frozenset(opts_out),
        **facts,
    )


def _tool(name: str, summary: str) -> Verb:
    return Verb(name, f"sage_cli.commands.{name}", summary, reads="nothing", replicable=False)


_TEXT = {"text": ("content",)}

#: every verb, in the order `sage --help` lists them
REGISTRY: tuple[Verb, ...] = (
    # dataflow
    operator_verb(
        "source",
        "Read files, directories, globs or stdin as records.",
        "source_records",
        reads="own",
    ),
    operator_verb(
        "map",
        "Transform each record with a Python expression over `r`.",
        "map_records",
        open_output=True,
    ),
    operator_verb(
        "filter", "Keep the records for which a Python expression is true.", "filter_records"
    ),
    operator_verb(
        "flatmap",
        "Turn each record into zero or more records.",
        "flatmap_records",
        open_output=True,
    ),
    operator_verb("keyby", "Tag each record with a partition key from a field.", "keyby_records"),
    operator_verb(
        "window",
        "Aggregate records in tumbling or sliding windows.",
        "window_records",
        stateful=True,
        memory="bounded",
    ),
    operator_verb(
        "join",
        "Enrich records from an NDJSON lookup table.",
        "join_records",
        open_output=True,
    ),
    operator_verb(
        "merge",
        "Interleave several NDJSON inputs as they arrive.",
        "merge_records",
        reads="own",
    ),
    operator_verb(
        "head", "Pass the first N records and stop reading.", "head_records", stateful=True
    ),
    operator_verb(
        "dedupe",
        "Drop records whose key was already seen.",
        "dedupe_records",
        stateful=True,
        memory="bounded",
    ),
    operator_verb("sample", "Keep a random sample of records.", "sample_records", stateful=True),
    operator_verb(
        "sink",
        "Write records to the terminal or a file (ndjson, json, csv, md).",
        "sink_records",
        stateful=True,
    ),
    # RAG
    operator_verb("chunk", "Split `text` into overlapping chunks.", "chunk", aliases=_TEXT),
    operator_verb(
        "embed",
        "Add an `embedding` to each record with a local model.",
        "embed_records",
        model=True,
        aliases=_TEXT,
    ),
    Verb("index", "sage_cli.commands.index", "Build and inspect vector indexes (annoy).", None),
    operator_verb(
        "index build",
        "Build a vector index from embedded records.",
        "build",
        stateful=True,
        memory="whole-input",
        aliases=_TEXT,
    ),
    operator_verb(
        "retrieve",
        "Attach the documents most relevant to `query`.",
        "retrieve",
        model=True,
        input_paths=("--index",),
        aliases={"query": ("text",)},
    ),
    operator_verb(
        "rerank",
        "Reorder retrieved `docs` (best-matching sentences, query word pairs, MMR, or a model).",
        "rerank",
        model=True,
        input_paths=("--index",),
    ),
    operator_verb(
        "prompt",
        "Render a prompt from a template and the record.",
        "prompt_records",
    ),
    operator_verb(
        "generate",
        "Generate an `answer` with a local model or an OpenAI API.",
        "generate_records",
        model=True,
    ),
    operator_verb(
        "eval",
        "Score answers and retrieval against gold labels.",
        "eval_records",
        stateful=True,
    ),
    # operations
    _tool("models", "List, locate, verify and convert the local models."),
    _tool("doctor", "Check the installation and say how to fix what is wrong."),
    _tool("run", "Run a pipeline script under supervision, with traces."),
    _tool("trace", "Show the trace of a run."),
    # serving
    _tool("serve", "Serve the models, an index and pipelines over an OpenAI-compatible HTTP API."),
    _tool("chat", "Chat with the local model in a REPL (with --index: RAG)."),
    _tool("mcp", "Serve retrieve and answer as MCP tools over stdio."),
    _tool("studio", "Show runs, stages and records live in a browser."),
)

VERBS: dict[str, Verb] = {v.name: v for v in REGISTRY}


def commands() -> list[Verb]:
    """The top-level commands, in `sage --help` order (a group such as `index` once)."""
    return [v for v in REGISTRY if " " not in v.name]


def operator_verbs() -> list[Verb]:
    """Every verb that is an operator over records (`index build`, not `index`)."""
    return [v for v in REGISTRY if v.is_operator]


def lookup(words: list[str]) -> Verb:
    """The verb a command line names: `["index", "build", ...]` -> the `index build` entry.
    Raises UsageError for a word that is no sage command."""
    if not words:
        raise UsageError("empty stage: expected `sage COMMAND ...`")
    if len(words) > 1 and f"{words[0]} {words[1]}" in VERBS:
        return VERBS[f"{words[0]} {words[1]}"]
    verb = VERBS.get(words[0])
    if verb is None:
        raise UsageError(f"`{words[0]}` is not a sage command (see `sage --help`)")
    return verb


def is_model_stage(argv: list[str]) -> bool:
    """Whether `sage VERB ...` loads a model (a stage the supervisor gives a share of cores)."""
    words = stage_words(argv)
    if words is argv or not words:  # not a sage command line
        return False
    try:
        return lookup(words).model
    except UsageError:
        return False


def is_operator_stage(argv: list[str]) -> bool:
    """Whether `sage VERB ...` runs an operator over records (one that traces its batches under
    `sage run`), not a tool such as `sage models`."""
    words = stage_words(argv)
    if words is argv or not words:  # not a sage command line
        return False
    try:
        return lookup(words).builder is not None
    except UsageError:
        return False


# -- from a command line or from keyword options to an operator -----------------------------


def stage_words(argv: list[str]) -> list[str]:
    """`argv` without a leading `sage` (or a path to it); `argv` itself when it has none."""
    if argv and os.path.basename(argv[0]) == "sage":
        return list(argv[1:])
    return argv


@dataclass
class OperatorFactory:
    """Builds a verb's operator again, here or in another process (a `--workers` worker, a Ray
    actor): the verb's build function and its parsed flags. Picklable: `build` is the
    module-level function the registry names."""

    command: str  # the verb's name: "map", "index build"
    build: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> Operator:
        built = self.build(**self.kwargs)
        return built[0] if isinstance(built, tuple) else built  # type: ignore[no-any-return]

    def with_kwargs(self, kwargs: dict[str, Any]) -> OperatorFactory:
        return OperatorFactory(self.command, self.build, kwargs)


@dataclass
class StageCall:
    """What one `sage VERB ...` command line would run: its registry entry, its operator factory
    and its common I/O options (`--on-error`, `--batch-size`, input files...)."""

    verb: Verb
    factory: OperatorFactory
    opts: IOOptions

    @property
    def reads_stdin(self) -> bool:
        return self.verb.reads == "records"


def _click_command(verb: Verb) -> Any:
    """The click command of an operator verb (typer builds it from the command module)."""
    import typer.main

    command: Any = typer.main.get_command(importlib.import_module(verb.module).app)
    for word in verb.name.split(" ")[1:]:  # a group member: `index build`
        command = command.get_command(None, word)
    return command


def _as_typer_gives(command: Any, params: dict[str, Any]) -> dict[str, Any]:
    """`params` as click parsed them, converted as typer hands them to the command (an Enum
    member for a choice, a list for a repeated option)."""
    import typer.main

    function = getattr(command.callback, "__wrapped__", command.callback)
    _, convertors, _ = typer.main.get_params_convertors_ctx_param_name_from_function(function)
    return {k: convertors[k](v) if k in convertors else v for k, v in params.items()}


def parse_stage(argv: list[str]) -> StageCall:
    """Parse `sage VERB ARGS...` (with or without the leading `sage`) into the StageCall it
    would run, with the verb's own parser (the same flags, types and checks as the CLI) and
    without running anything: no operator is built here.

    Raises UsageError for an unknown command, a verb that is not an operator over records
    (`run`, `models`, `index info`), or flags the verb rejects.
    """
    import click

    from sage_cli.cli.command import IOOptions

    words = stage_words(argv)
    verb = lookup(words)
    if not verb.is_operator:
        shown = verb.name
        if any(n.startswith(verb.name + " ") for n in VERBS) and len(words) > 1:
            shown = f"{verb.name} {words[1]}"  # a group's member that is not an operator
        raise UsageError(f"sage {shown} is not an operator over records; it cannot be a stage here")
    args = words[len(verb.name.split(" ")) :]
    command = _click_command(verb)
    try:
        ctx = command.make_context(verb.prog, list(args))
    except click.exceptions.Exit:  # --help: nothing to run
        raise UsageError(f"{verb.prog}: --help is not a stage") from None
    except click.ClickException as exc:
        raise UsageError(f"{verb.prog}: {exc.format_message()}") from None
    params = _as_typer_gives(command, ctx.params)
    common = {k: params.pop(k) for k in list(params) if k in COMMON_FLAGS or k == "files"}
    opts = IOOptions(**common)
    return StageCall(verb, OperatorFactory(verb.name, verb.build_function(), params), opts)


def option_names(verb: str | Verb) -> dict[str, str]:
    """A verb's own options as `build_operator` takes them: keyword (the long flag without
    dashes, `-` as `_`; an argument by its parameter name) -> the build function's parameter."""
    entry = verb if isinstance(verb, Verb) else VERBS[verb]
    out: dict[str, str] = {}
    for param in _click_command(entry).params:
        if param.name in COMMON_FLAGS or param.name == "files":
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        key = longs[0][2:].replace("-", "_") if longs else param.name
        out[key] = param.name
    return out


def build_operator(verb: str, **options: Any) -> Operator:
    """Build the operator of `verb` from keyword options named after its long flags.

    `verb` is a registry name (`"map"`, `"retrieve"`, `"index build"`); each keyword is a long
    flag without its dashes, `-` written `_` (`--top-k` -> `top_k`), or an argument's name
    (`map`'s `expr`, `index build`'s `directory`). A flag left out takes the default the CLI
    gives it; values are checked and converted as on the command line (`top_k=0` is refused).
    The operator is built but not set up: call `setup()`, then `process(batch)`, then `close()`
    (or `run(records)`), or hand it to the Driver.

        >>> op = build_operator("map", expr='r | {"n": 1}')
        >>> op.run([{"id": 1}])
        [{'id': 1, 'n': 1}]

    Raises UsageError for an unknown verb, a verb that is not an operator, an unknown or
    missing option, or a value the flag refuses; the operator's own OptionError for options
    that cannot work together.
    """
    import click

    entry = VERBS.get(verb)
    if entry is None:
        raise UsageError(f"`{verb}` is not a sage verb (see `sage --help`)")
    if not entry.is_operator:
        raise UsageError(f"{entry.prog} is not an operator over records")
    command = _click_command(entry)
    names = option_names(entry)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(
            f"{entry.prog}: no option {unknown[0]!r} (options: {', '.join(sorted(names))})"
        )
    ctx = click.Context(command, info_name=entry.prog)
    kwargs: dict[str, Any] = {}
    by_param = {p.name: p for p in command.params}
    for key, pname in names.items():
        param = by_param[pname]
        # a flag left out takes the CLI's default (process_value alone would give None)
        value = options[key] if key in options else param.get_default(ctx)
        if isinstance(value, tuple | list) and not param.multiple and param.nargs == 1:
            value = list(value)
        try:
            kwargs[pname] = param.process_value(ctx, value)
        except click.ClickException as exc:
            raise UsageError(f"{entry.prog}: {key}: {exc.format_message()}") from None
    kwargs = _as_typer_gives(command, kwargs)
    return OperatorFactory(entry.name, entry.build_function(), kwargs)()
