"""Reading a named field of a record, shared by the keyed operators (keyby, window, dedupe, join).

A field name is looked up as a key first; if the record has no such key and the name has dots,
it is read as a path into nested objects (`metadata.path`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .base import Record, RecordError
from .ndjson import dumps_value

_MISSING = object()


def lookup(record: Record, field: str, default: Any = _MISSING) -> Any:
    """The value of `field` in `record` (a key, or a dotted path into nested objects).

    Without a default, a missing field is a RecordError that names it.
    """
    if field in record:
        return record[field]
    if "." in field:
        value: Any = record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            return value
    if default is not _MISSING:
        return default
    have = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
    raise RecordError(f"record has no {field!r} field (fields: {have})")


def hashable(value: Any) -> Hashable:
    """A hashable stand-in for a JSON value: the value itself, or its canonical JSON."""
    if value is None or isinstance(value, str | int | float | bool):
        # 1 and 1.0 and True are equal in Python but different JSON values: keep them apart
        return (type(value).__name__, value)
    return ("json", dumps_value(value, sort_keys=True))
