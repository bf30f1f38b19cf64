"""Pass the first N records and stop reading (`sage head`)."""

from __future__ import annotations

from .base import Operator, OptionError, Record


class Head(Operator):
    """Pass the first N records, then tell the driver to stop reading."""

    name = "head"
    stateless = False

    def __init__(self, n: int = 10) -> None:
        if n < 0:
            raise OptionError(f"N must be 0 or more, got {n}")
        self.remaining = n
        self.done = n == 0

    def process(self, batch: list[Record]) -> list[Record]:
        if self.remaining <= 0:
            self.done = True
            return []
        out = batch if len(batch) <= self.remaining else batch[: self.remaining]
        self.remaining -= len(out)
        if self.remaining <= 0:
            self.done = True
        return out
