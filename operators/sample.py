"""Keep a random sample of records (`sage sample`)."""

from __future__ import annotations

import random

from .base import Operator, OptionError, Record


class Sample(Operator):
    """Keep each record with probability `rate`, or a uniform sample of `n` records.

    `rate`: a Bernoulli sample, streaming, in input order. `n`: a reservoir sample (Algorithm R)
    held in memory (n records) and emitted at the end of input, in input order. The same `seed`
    over the same input gives the same sample, whatever the batch size.
    """

    name = "sample"
    stateless = False

    def __init__(
        self, rate: float | None = None, n: int | None = None, seed: int | None = None
    ) -> None:
        if (rate is None) == (n is None):
            raise OptionError("give --rate P or --n K (one of them)")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise OptionError(f"--rate must be between 0 and 1, got {rate}")
        if n is not None and n < 0:
            raise OptionError(f"--n must be 0 or more, got {n}")
        self.rate = rate
        self.n = n
        self.rng = random.Random(seed)
        self.seen = 0
        self.reservoir: list[tuple[int, Record]] = []
        # a reservoir holds n records; a Bernoulli sample holds none
        self.memory = "streaming" if rate is not None else "bounded"  # type: ignore[misc]

    def process(self, batch: list[Record]) -> list[Record]:
        if self.rate is not None:
            rnd = self.rng.random
            rate = self.rate
            return [r for r in batch if rnd() < rate]
        k = self.n or 0
        reservoir = self.reservoir
        for record in batch:
            i = self.seen
            self.seen += 1
            if len(reservoir) < k:
                reservoir.append((i, record))
            else:
                j = self.rng.randint(0, i)
                if j < k:
                    reservoir[j] = (i, record)
        return []

    def close(self) -> list[Record]:
        out = [r for _, r in sorted(self.reservoir, key=lambda pair: pair[0])]
        self.reservoir = []
        return out
