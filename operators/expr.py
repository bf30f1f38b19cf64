"""User expressions for map, filter and flatmap: Python over the record `r`, compiled once.

Expressions come only from the command line (or a module named with --fn), never from record
content. An exception inside one is that record's error, with the expression in the message.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .base import Operator, OptionError, Record, RecordError

#: names an expression can use besides `r` and the builtins
EXPRESSION_GLOBALS: dict[str, Any] = {"json": json, "math": math, "re": re}


#: longest excerpt of an expression quoted in a message
QUOTE_LIMIT = 80


def quote_expression(expr: str) -> str:
    """`expr` quoted for a message: repr (control characters escaped), cut to QUOTE_LIMIT."""
    return repr(expr) if len(expr) <= QUOTE_LIMIT else repr(expr[:QUOTE_LIMIT]) + "..."


def compile_expression(expr: str) -> Callable[[Record], Any]:
    """Compile `expr` into a function of `r`, or raise OptionError saying what is wrong.

    The text is parsed as the body of `lambda r: (...)` and must be exactly that: a `)` that
    closes the parenthesis early (`1), (2`) is refused, so nothing in it runs at compile time
    and the function is always a plain lambda of `r`.
    """
    if not expr.strip():
        raise OptionError("empty expression; write Python over the record `r`, e.g. 'r[\"text\"]'")
    shown = quote_expression(expr)
    try:
        tree = ast.parse(f"lambda r: ({expr}\n)", "<expression>", mode="eval")
        if not isinstance(tree.body, ast.Lambda):
            raise OptionError(f"invalid expression {shown}: unbalanced brackets")
        if any(isinstance(node, ast.Yield | ast.YieldFrom) for node in ast.walk(tree)):
            raise OptionError(f"invalid expression {shown}: 'yield' is not allowed here")
        code = compile(tree, "<expression>", "eval")
    except SyntaxError as exc:
        raise OptionError(f"invalid expression {shown}: {exc.msg}") from None
    except UnicodeError:  # a lone surrogate: argv bytes that were not UTF-8
        raise OptionError(f"invalid expression {shown}: not valid UTF-8") from None
    except ValueError as exc:  # a NUL character (Python 3.11)
        raise OptionError(f"invalid expression {shown}: {exc}") from None
    except (MemoryError, RecursionError):
        raise OptionError(f"invalid expression {shown}: nested too deeply") from None
    return eval(code, dict(EXPRESSION_GLOBALS))  # noqa: S307 - the user's own command line


def load_function(spec: str) -> Callable[[Record], Any]:
    """Load `module:function` (the module from the current directory or sys.path)."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise OptionError(f"--fn {spec!r}: expected module:function")
    # The current directory is on sys.path only while the module is imported: left there, a
    # `json.py` or `sage_cli.py` lying in it would shadow what sage (or a --workers process
    # started later, which inherits sys.path) imports afterwards.
    here = os.getcwd()
    added = "" not in sys.path and here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OptionError(f"--fn {spec!r}: cannot import {module_name!r}: {exc}") from None
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise OptionError(f"--fn {spec!r}: {module_name} has no function {func_name!r}")
    return func


#: what `fn` may be: a `module:function` spec (the CLI's --fn) or the function itself (Python)
UserFn = str | Callable[[Record], Any] | None


def callable_name(fn: Callable[..., Any]) -> str:
    """A function's name for messages: `clean`, `Cleaner.run`, `<lambda>` (no `<locals>`)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return str(name).rsplit("<locals>.", 1)[-1]


def user_function(expr: str | None, fn: UserFn) -> tuple[Callable[[Record], Any], str]:
    """The callable and a label for messages, from an expression, a --fn spec or a Python
    callable (exactly one)."""
    if (expr is None) == (fn is None):
        raise OptionError("give an expression or --fn module:function (one of them)")
    if callable(fn):
        return fn, callable_name(fn)
    if fn is not None:
        return load_function(fn), f"--fn {fn}"
    assert expr is not None
    return compile_expression(expr), quote_expression(expr)


_ONLY_DICTS = frozenset((dict,))


def _failed(kind: str, label: str, exc: Exception) -> RecordError:
    return RecordError(f"{kind} {label} failed: {type(exc).__name__}: {exc}")


class Map(Operator):
    """Replace each record with what a Python expression over `r` returns (an object)."""

    name = "map"

    def __init__(self, expr: str | None = None, fn: UserFn = None) -> None:
        self.func, self.label = user_function(expr, fn)

    def process(self, batch: list[Record]) -> list[Record]:
        try:
            out = list(map(self.func, batch))
        except Exception as exc:
            if len(batch) == 1:
                raise _failed("map", self.label, exc) from None
            raise
        if not _ONLY_DICTS.issuperset(map(type, out)):  # the check stays in C: see tests/bench
            if len(batch) == 1:
                raise RecordError(
                    f"map {self.label} must return an object (dict), got {type(out[0]).__name__}"
                )
            raise RecordError("map returned a non-object")  # retried one by one
        return out


class Filter(Operator):
    """Keep the records for which a Python expression over `r` is true."""

    name = "filter"

    def __init__(self, expr: str | None = None, fn: UserFn = None, invert: bool = False) -> None:
        self.func, self.label = user_function(expr, fn)
        self.invert = invert

    def process(self, batch: list[Record]) -> list[Record]:
        func = self.func
        try:
            if self.invert:
                return [r for r in batch if not func(r)]
            return [r for r in batch if func(r)]
        except Exception as exc:
            if len(batch) == 1:
                raise _failed("filter", self.label, exc) from None
            raise


class FlatMap(Operator):
    """Replace each record with the records (a list or generator of objects) an expression
    over `r` returns; strings become `{"text": ...}` records."""

    name = "flatmap"

    def __init__(self, expr: str | None = None, fn: UserFn = None) -> None:
        self.func, self.label = user_function(expr, fn)

    def process(self, batch: list[Record]) -> list[Record]:
        out: list[Record] = []
        for r in batch:
            try:
                values = self.func(r)
                if values is None:
                    continue
                if isinstance(values, dict | str):
                    values = [values]
                items = list(values)
            except Exception as exc:
                raise _failed("flatmap", self.label, exc) from None
            for value in items:
                if isinstance(value, str):
                    out.append({"text": value})
                elif isinstance(value, dict):
                    out.append(value)
                else:
                    raise RecordError(
                        f"flatmap {self.label} must yield objects or strings, "
                        f"got {type(value).__name__}"
                    )
        return out
