"""Drop records whose key was already seen (`sage dedupe`)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from .base import Operator, OptionError, Record
from .fields import lookup
from .ndjson import dumps_value


class Dedupe(Operator):
    """Keep the first record for each key; drop later records with the same key.

    Keys are remembered as 16-byte digests of their canonical JSON. With `max_keys`, only the
    most recently seen keys are remembered (memory stays bounded; a duplicate that comes back
    after more than `max_keys` other keys passes again).
    """

    name = "dedupe"
    stateless = False
    memory = "bounded"

    def __init__(self, keys: list[str] | None = None, max_keys: int | None = None) -> None:
        self.keys = list(keys) if keys else ["id"]
        if max_keys is not None and max_keys < 1:
            raise OptionError(f"--max-keys must be 1 or more, got {max_keys}")
        self.max_keys = max_keys
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        self.dropped = 0

    @property
    def requires(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        return {k: {} for k in self.keys if "." not in k}

    def digest(self, record: Record) -> bytes:
        values = [lookup(record, k) for k in self.keys]
        data = dumps_value(values, sort_keys=True)
        return hashlib.blake2b(data, digest_size=16).digest()

    def process(self, batch: list[Record]) -> list[Record]:
        digests = [self.digest(r) for r in batch]  # every key first: a bad record changes nothing
        seen = self.seen
        out = []
        for record, d in zip(batch, digests, strict=True):
            if d in seen:
                self.dropped += 1
                if self.max_keys is not None:
                    seen.move_to_end(d)
                continue
            seen[d] = None
            if self.max_keys is not None and len(seen) > self.max_keys:
                seen.popitem(last=False)
            out.append(record)
        return out
