"""Prompt templates (operators/prompt.py): any template text on any record.

The input is `TEMPLATE \\x00 RECORD`: the template text (UTF-8, invalid bytes replaced) and the
record (JSON when it parses as an object, else a record with the bytes as `query` and `text`).
The template builds a Prompt or is an OptionError; rendering gives a prompt or a RecordError.
A prompt holds every placeholder's string value verbatim, and nothing the record holds is
expanded: a value like `{0.__class__}` never turns into `<class ...>`.
"""

from __future__ import annotations

import orjson

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.prompt import Prompt, lookup, parse_template

SEEDS: list[bytes] = [
    b'Question: {query}\n\n{context}\x00{"query": "q", "docs": [{"text": "a"}, "b"]}',
    b"{text} {{literal}} {metadata[title]}\x00"
    b'{"text": "{0.__class__}", "metadata": {"title": "{query}"}}',
    b'{docs[0][text]} {docs[-1]}\x00{"docs": [{"text": "x"}, 2]}',
    b"{a.b} {a!r} {a:>3} {} {0}\x00{}",
    b'{context}\x00{"docs": ["word word word", {"content": "c"}], "context": "own"}',
    b"{\x00{}",
    b"}{\x00{}",
]
MAX_LEN = 2048
EXPANDED = "<class"


def strings(value: object) -> list[str]:
    """Every string (keys too) inside `value`, without recursion (records nest 1024 deep)."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def TestOneInput(data: bytes) -> None:
    head, _, tail = data.partition(b"\x00")
    text = head.decode("utf-8", errors="replace")
    try:
        record = orjson.loads(tail)
    except orjson.JSONDecodeError:
        record = None
    if type(record) is not dict:
        shown = tail.decode("utf-8", errors="replace")
        record = {"query": shown, "text": shown, "docs": [shown]}
    try:
        op = Prompt(template_text=text, n_ctx=512, reserve=64)
    except OptionError as exc:
        assert str(exc)
        return
    try:
        (out,) = op.process([record])
    except RecordError as exc:
        assert str(exc)
        return
    prompt = out["prompt"]
    assert isinstance(prompt, str)
    assert out["messages"][-1] == {"role": "user", "content": prompt}
    if EXPANDED in prompt:
        assert EXPANDED in text or any(EXPANDED in s for s in strings(record))
    for _, path in parse_template(text.removesuffix("\n")):
        if path is None or (path == ("context", ()) and "context" not in record):
            continue
        value = lookup(record, path)
        if isinstance(value, str):
            assert value in prompt, (path, value)
