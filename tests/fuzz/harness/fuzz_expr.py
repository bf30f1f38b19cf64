"""The expression compiler of map/filter/flatmap (operators/expr.py).

The first byte picks the mode:
- even: the rest, decoded as UTF-8 (invalid bytes become lone surrogates, as argv bytes do), is
  an expression: `compile_expression` gives a plain lambda of `r` or an OptionError. It is only
  compiled, never run: arbitrary Python must not run in a fuzzer;
- odd: the bytes drive the expression grammar of tests/fuzz/expressions.py (safe to run), the
  rest is the record (JSON when it parses as an object); Map, Filter and FlatMap give records
  or a RecordError, nothing else.
"""

from __future__ import annotations

import types
import warnings

import orjson

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.expr import Filter, FlatMap, Map, compile_expression
from sage_cli.operators.ndjson import printable
from tests.fuzz.expressions import build

SEEDS: list[bytes] = [
    b'\x00r["text"].lower()',
    b"\x001), (2",
    b"\x00{**r, 'n': len(r)}",
    b"\x00[x for x in r if x]",
    b"\x00yield r",
    b"\x00(" + b"-" * 200 + b"1)",
    b"\x00\xff\xfe",
    b'\x01\x05\x01\x02\x03{"a": 1, "text": "Hello", "docs": [{"text": "x"}]}',
    b'\x01\x10\x11\x12\x13\x14\x15\x16\x17{"a": "10", "b": [1, 2], "metadata": {"a": null}}',
]
MAX_LEN = 1024

# "perhaps you missed a comma?" on every odd expression would flood the log
warnings.simplefilter("ignore", SyntaxWarning)


class Chooser:
    """`choose(n)` from the input bytes, one byte a choice; 0 once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __call__(self, n: int) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1] % n


def compiles_or_option_error(text: str) -> bool:
    try:
        func = compile_expression(text)
    except OptionError as exc:
        assert printable(str(exc)) == str(exc)
        return False
    assert isinstance(func, types.FunctionType) and func.__name__ == "<lambda>"
    assert func.__code__.co_argcount == 1 and func.__code__.co_varnames[0] == "r"
    return True


def run(op, record) -> None:
    try:
        out = op.process([record])
    except RecordError as exc:
        assert str(exc)
        return
    assert isinstance(out, list) and all(type(r) is dict for r in out)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        compiles_or_option_error(data[1:].decode("utf-8", errors="surrogateescape"))
        return
    choose = Chooser(data[1:65])
    expr = build(choose)
    assert compiles_or_option_error(expr), expr
    try:
        record = orjson.loads(data[1 + choose.pos :])
    except orjson.JSONDecodeError:
        record = {"a": data[1 + choose.pos :].decode("utf-8", errors="replace")}
    if type(record) is not dict:
        record = {"a": record, "text": str(record)}
    for op in (Map(expr), Filter(expr), FlatMap(expr)):
        run(op, dict(record))
