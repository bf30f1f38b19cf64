"""Record ids in a byte stream, read without parsing every line: what the relays and
`--resume` use to know which records a stage has finished (its `id`, else the lineage:
`parent_id`, `query_id`)."""

from __future__ import annotations

import re
from typing import Any

import orjson

_FAST_ID = re.compile(rb'\{"id":(?:"([^"\\]*)"|(-?[0-9]{1,18})[,}])')


def record_id(line: bytes) -> Any:
    """The `id` of an NDJSON line (fast for lines that start with a plain string id)."""
    m = _FAST_ID.match(line)
    if m is not None:
        text = m.group(1)
        return text.decode("utf-8", "surrogateescape") if text is not None else int(m.group(2))
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return _hashable(value.get("id")) if type(value) is dict else None


def lineage_key(line: bytes) -> Any:
    """The key of the input record an output line came from: parent_id, query_id or id."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict:
        return None
    for k in ("parent_id", "query_id", "id"):
        if value.get(k) is not None:
            return _hashable(value[k])
    return None


def _hashable(v: Any) -> Any:
    return v if isinstance(v, str | int | float | type(None)) else orjson.dumps(v)


_ID_TOKEN = re.compile(rb'\{"id":("[^"\\]*"|-?[0-9]{1,18})[,}]')


def id_token(line: bytes) -> bytes | None:
    """The `id` of a line as its JSON text (b'"doc1"', b'12'): the key the relays track."""
    m = _ID_TOKEN.match(line)
    if m is not None:
        return m.group(1)
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or value.get("id") is None:
        return None
    return orjson.dumps(value["id"])


def _key_of(line: bytes) -> list[bytes]:
    """The tokens an output line can be matched to its input by: id, parent_id, query_id."""
    m = _ID_TOKEN.match(line)
    first = [m.group(1)] if m is not None else []
    if m is not None and b'"parent_id"' not in line and b'"query_id"' not in line:
        return first
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return first
    if type(value) is not dict:
        return first
    return [
        orjson.dumps(value[k]) for k in ("id", "parent_id", "query_id") if value.get(k) is not None
    ]
