"""From a verb and Python options to the command line the CLI would run, and to the stage that
command line builds: the registry's parse step (sage_cli.verbs.parse_stage), so the same
parser, types, checks and build function as `sage VERB ...`.

Keywords are named as the registry names them (`option_names`: a long flag without dashes,
`-` as `_`, `--top-k` -> `top_k`; an argument by its parameter name, `map`'s `expr`). Nothing
here lists a verb's flags: they are read from the verb's own command. Going through the
command line is what keeps the Python, YAML and bash spellings of a pipeline the same
pipeline: the argv built here is what `to_script()` prints.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from os import PathLike
from typing import TYPE_CHECKING, Any

from sage_cli.errors import UsageError

if TYPE_CHECKING:
    from sage_cli.cli.command import IOOptions
    from sage_cli.operators.base import Operator
    from sage_cli.verbs import OperatorFactory

#: the common flags a stage may set (in Python, on a callable stage too)
COMMON_OPTIONS = ("on_error", "errors", "batch_size", "workers", "unordered")


@dataclass
class VerbCall:
    """What `sage VERB ARGS...` runs: its argv (without `sage`), the factory that builds its
    operator (here or in a worker process), its common I/O options, and whether it reads
    records (False for a source)."""

    argv: list[str]
    factory: OperatorFactory
    opts: IOOptions
    reads_records: bool

    def build(self) -> tuple[Operator, Iterable[Any] | None]:
        """(operator, records): records is the iterable a source reads, else None."""
        built = self.factory.build(**self.factory.kwargs)
        return built if isinstance(built, tuple) else (built, None)


def known_verbs() -> list[str]:
    """The verbs that can be a stage (operators over records), from the registry."""
    from sage_cli.verbs import operator_verbs

    return [v.name for v in operator_verbs()]


def is_verb(name: str) -> bool:
    from sage_cli.verbs import VERBS

    verb = VERBS.get(name)
    return verb is not None and verb.is_operator


def _command(verb: str) -> Any:
    """The click command of `verb` ("retrieve", "index build")."""
    from sage_cli.verbs import VERBS, _click_command

    if not is_verb(verb):
        raise UsageError(f"{verb!r} is not a sage verb (verbs: {', '.join(known_verbs())})")
    return _click_command(VERBS[verb])


def _is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"  # type: ignore[no-any-return]


def _word(value: Any) -> str:
    if isinstance(value, Enum):
        word = str(value.value)
    elif isinstance(value, PathLike):
        word = str(value.__fspath__())
    elif isinstance(value, bool | int | float | str):
        word = str(value)
    else:
        raise UsageError(
            f"{value!r} ({type(value).__name__}) cannot be written as a command-line value"
        )
    if "\x00" in word:  # no command line carries one: the bash form could not exist
        raise UsageError(f"{value!r}: a command-line value cannot hold a NUL byte")
    return word


def _keywords(verb: str) -> dict[str, Any]:
    """keyword -> click parameter, for every option a stage of `verb` may set: the verb's own,
    named by the registry (`option_names`), and the common flags in COMMON_OPTIONS (their
    long flag without dashes, the same rule). Its FILE arguments and --schema are not."""
    from sage_cli.verbs import option_names

    by_name = {p.name: p for p in _command(verb).params}
    keywords = {key: by_name[name] for key, name in option_names(verb).items()}
    for name in COMMON_OPTIONS:
        if name in by_name:
            keywords[name] = by_name[name]
    return keywords


def named_options(
    verb: str, args: Sequence[Any] = (), options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`options` with the positional `args` given their argument names, checked against the
    verb's command: an unknown keyword is a UsageError naming the ones it has.

        >>> named_options("keyby", ("user",))
        {'field': 'user'}
    """
    by_key = _keywords(verb)
    named = dict(options or {})
    unknown = sorted(k for k in named if k not in by_key)
    if unknown:
        names = ", ".join(sorted(by_key))
        raise UsageError(f"sage {verb}: no option {unknown[0]!r} (options: {names})")
    rest = list(args)
    for key, param in by_key.items():  # positional values fill the arguments in order
        if not rest or not _is_argument(param):
            continue
        if key in named:
            raise UsageError(f"sage {verb}: {key} given twice")
        if param.nargs == -1:
            named[key], rest = rest, []
        else:
            named[key] = rest.pop(0)
    if rest:
        raise UsageError(f"sage {verb}: too many arguments: {rest!r}")
    return {k: v for k, v in named.items() if v is not None}


def to_argv(verb: str, options: Mapping[str, Any]) -> list[str]:
    """The words of `sage VERB ...` (without `sage`) for `named_options`.

    >>> to_argv("retrieve", {"index": "idx/", "top_k": 5})
    ['retrieve', '--index', 'idx/', '--top-k', '5']
    """
    flags: list[str] = []
    positional: list[str] = []
    for key, param in _keywords(verb).items():
        if options.get(key) is None:
            continue
        value = options[key]
        values = list(value) if isinstance(value, list | tuple) else [value]
        if _is_argument(param):
            positional.extend(_word(v) for v in values)
        elif param.is_flag and isinstance(value, bool):
            if value:
                flags.append(param.opts[0])
            elif param.secondary_opts:
                flags.append(param.secondary_opts[0])
        else:
            if len(values) > 1 and not param.multiple:
                raise UsageError(f"sage {verb}: {key} takes one value, not {value!r}")
            long = next(o for o in param.opts if o.startswith("--"))
            for v in values:
                flags.extend([long, _word(v)])
    if any(w.startswith("-") and w != "-" for w in positional):
        positional.insert(0, "--")  # an argument such as '-1' is not a flag
    return [*verb.split(), *flags, *positional]


def parse(argv: list[str]) -> VerbCall:
    """Parse `VERB ARGS...` with the registry's parse step, exactly as `sage VERB ARGS...`
    would, without running or building anything."""
    from sage_cli.verbs import parse_stage

    call = parse_stage(list(argv))
    return VerbCall(list(argv), call.factory, call.opts, call.reads_stdin)


def shell_words(argv: list[str]) -> str:
    """`sage ARGV...` as one line of bash, quoted."""
    return " ".join(shlex.quote(w) for w in ["sage", *argv])
