"""Enrich records from a lookup table (`sage join`).

The table is a list of records (the command reads it from NDJSON). A stream record matches the
table rows whose `on` field has the same JSON value. Each match gives one output record: the
stream record plus the row's other fields. Without a prefix, a field the stream record already
has is kept (the table does not overwrite it); with `prefix`, the row's fields are added as
`<prefix><field>` and overwrite. `how="inner"` drops records with no match; `how="left"` passes
them unchanged. A stream record without the `on` field is a record error.
"""

from __future__ import annotations

from typing import Any

from .base import Operator, OptionError, Record
from .fields import hashable, lookup


class Join(Operator):
    """Enrich each record with the fields of the lookup-table rows that share its key."""

    name = "join"

    def __init__(
        self,
        table: list[Record],
        on: str,
        how: str = "inner",
        prefix: str | None = None,
        table_name: str = "table",
    ) -> None:
        if how not in ("inner", "left"):
            raise OptionError(f"--how {how!r}: expected inner or left")
        self.on = on
        self.how = how
        self.prefix = prefix
        self.index: dict[Any, list[Record]] = {}
        missing = 0
        for row in table:
            value = lookup(row, on, None)
            if value is None and on not in row:
                missing += 1
                continue
            extra = {k: v for k, v in row.items() if k != on}
            self.index.setdefault(hashable(value), []).append(extra)
        if table and missing == len(table):
            raise OptionError(f"no row of {table_name} has the field {on!r}; check --on")

    @property
    def requires(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        return {} if "." in self.on else {self.on: {}}

    def process(self, batch: list[Record]) -> list[Record]:
        keys = [hashable(lookup(r, self.on)) for r in batch]
        out: list[Record] = []
        index = self.index
        prefix = self.prefix
        for record, key in zip(batch, keys, strict=True):
            rows = index.get(key)
            if not rows:
                if self.how == "left":
                    out.append(record)
                continue
            for row in rows:
                if prefix is None:
                    # keep the stream record's field order first, then the new fields
                    merged = {**record, **{k: v for k, v in row.items() if k not in record}}
                else:
                    merged = {**record, **{prefix + k: v for k, v in row.items()}}
                out.append(merged)
        return out
