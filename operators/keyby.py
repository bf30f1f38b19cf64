"""Tag each record with a partition key (`sage keyby`).

The key goes into `_key`: keys that start with `_` belong to sage, so it cannot collide with a
user field, and `window` and `dedupe --key _key` read it. One field gives its value; several
give the list of their values.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Operator, OptionError, Record
from .fields import lookup

KEY_FIELD = "_key"


class KeyBy(Operator):
    """Copy the value of one or more fields into `_key`."""

    name = "keyby"
    produces: ClassVar[dict[str, dict[str, Any]]] = {KEY_FIELD: {}}

    def __init__(self, fields: list[str]) -> None:
        if not fields:
            raise OptionError("name the field to key by, e.g. `sage keyby user`")
        self.fields = list(fields)

    @property
    def requires(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        return {f: {} for f in self.fields if "." not in f}

    def process(self, batch: list[Record]) -> list[Record]:
        fields = self.fields
        if len(fields) == 1:
            (field,) = fields
            keys = [lookup(r, field) for r in batch]
        else:
            keys = [[lookup(r, f) for f in fields] for r in batch]
        for record, key in zip(batch, keys, strict=True):
            record[KEY_FIELD] = key
        return batch
