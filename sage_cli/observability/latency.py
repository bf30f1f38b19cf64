"""Batch latency figures, computed the same way by a stage and by a reader of its trace.

A stage's trace has one event per batch (`d`: seconds from its records entering the stage to
its result leaving it, `n`: records). The summary of a run wants the record-weighted p50, p95
and p99 of those, and the times of the first and last batch. A stage that stops normally works
them out itself and puts them in its stop event (`BatchFigures`), so `sage run` need not parse
every batch event of every stage after the run: that took ~35 ms per million records of a
4-stage pipeline, on the run's critical path. A reader falls back to the batch events when an
attempt ended without its stop event (killed) or a stage ran more than once (`--retries`).
"""

from __future__ import annotations

QUANTILES = (0.5, 0.95, 0.99)
#: batches whose latency a stage keeps in memory for its stop event; past this (a stage that
#: has run for days) it keeps none and readers use the batch events, as for a killed stage
MAX_BATCHES = 100_000


def weighted_percentiles(
    pairs: list[tuple[float, int]], qs: tuple[float, ...] = QUANTILES
) -> list[float | None]:
    """Percentiles of values given as (value, weight) pairs."""
    pairs = [p for p in pairs if p[1] > 0]
    if not pairs:
        return [None for _ in qs]
    pairs.sort()
    total = sum(w for _, w in pairs)
    out: list[float | None] = []
    for q in qs:
        target = q * total
        acc = 0
        for value, weight in pairs:
            acc += weight
            if acc >= target:
                out.append(value)
                break
        else:
            out.append(pairs[-1][0])
    return out


class BatchFigures:
    """One attempt's batches as its trace events say them (times rounded to the trace's 6
    decimals, so a reader of the events gets the same figures)."""

    __slots__ = ("pairs", "first", "last")

    def __init__(self) -> None:
        self.pairs: list[tuple[float, int]] | None = []
        self.first: float | None = None
        self.last: tuple[float, float] | None = None  # (t, d) of the batch that left last

    def add_rows(self, rows: list[tuple[float, float, int, int, int, int]]) -> None:
        """Batches as the trace's (t, d, n, o, l, w) numbers, added together: a light stage
        traces thousands a second (with one clock read fewer, a plain batch event went from 2.5 to
        1.8-1.9 us, by hand over 4,576 batches)."""
        if not rows:
            return
        pairs = self.pairs
        if pairs is not None:
            if len(pairs) + len(rows) <= MAX_BATCHES:
                pairs.extend([(row[1], row[2]) for row in rows])
            else:
                self.pairs = None
        first = min([row[0] for row in rows])
        if self.first is None or first < self.first:
            self.first = first
        ends = [row[0] + row[1] for row in rows]
        end = max(ends)
        if self.last is None or end > sum(self.last):
            row = rows[ends.index(end)]
            self.last = (row[0], row[1])

    def event_fields(self) -> dict[str, object]:
        """What the stop event carries: `lat` (p50, p95, p99 in seconds), `first`, `last`;
        nothing when too many batches were seen to keep."""
        if self.pairs is None:
            return {}
        # rounding is monotonic: the pairs sorted as they are pick the value a reader of the
        # rounded events picks; `last` is summed as a reader sums the rounded t and d
        lat = [None if v is None else round(v, 6) for v in weighted_percentiles(self.pairs)]
        last = None if self.last is None else round(self.last[0], 6) + round(self.last[1], 6)
        first = None if self.first is None else round(self.first, 6)
        return {"lat": lat, "first": first, "last": last}
