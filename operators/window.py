"""Aggregate records in tumbling or sliding windows (`sage window`).

Windows are by count (`size` records, a new one every `slide` records) or by time (`seconds`
long, a new one every `slide` seconds, aligned to the epoch). Time is the record's `time_field`
(epoch seconds or ISO 8601; event time) or the moment the record arrived (arrival time).
Tumbling windows are sliding windows whose slide equals their size.

Records are grouped by key: the `key` field, or `_key` (set by `sage keyby`) when no key field
is given, or one global group. Each (window, key) gives one output record:

    {"id": "window:<key>:<start>", "key": ..., "start": ..., "end": ..., "count": ..., ...}

`start`/`end` are record positions within the key (count windows; end exclusive) or epoch
seconds (time windows; end exclusive). Aggregates: `count`, `sum:F`, `mean:F`, `min:F`, `max:F`
(numbers) and `collect:F` (a list), written as `count`, `sum_F`, `mean_F`, ...; a null value is
left out, a missing field or a non-number is the record's error.

A window is emitted when it closes: a count window when its last record arrives; an event-time
window when the largest event time seen passes its end (plus `lateness`); an arrival-time window
when the clock passes its end, checked on every batch and by `tick()` while input is idle.

Arrival time is read from a steady clock (`steady_clock()`): the wall clock read once, at
construction, plus the monotonic time elapsed since. A wall-clock step (NTP, a suspended VM, an
admin's `date -s`) neither flushes open windows early (forward) nor stalls them (backward);
window bounds stay epoch seconds, off from the wall clock by the steps taken during the run.
An injected `clock` that goes backwards is held at its largest value, so no record ever lands in
a window already emitted. `tick(now)` ignores the driver's `now` in favour of that same clock.
What is still open at the end of input is emitted by `close()`. A record whose windows have all
closed already (event time only) is a record error ("late"). Memory holds the open windows'
aggregates, never the records (except what `collect` keeps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any

from .base import Operator, OptionError, Record, RecordError
from .fields import hashable, lookup
from .ndjson import dumps_value

AGGREGATES = ("count", "sum", "mean", "min", "max", "collect")
KEY_FIELD = "_key"
#: the most windows one record may belong to (size / slide): beyond, state and time explode
MAX_OVERLAP = 10_000


def steady_clock() -> Callable[[], float]:
    """Epoch seconds that advance with `time.monotonic()`, immune to wall-clock steps."""
    wall0, mono0 = time.time(), time.monotonic()
    return lambda: wall0 + (time.monotonic() - mono0)


def parse_aggregate(spec: str) -> tuple[str, str | None]:
    """`count` or `OP:FIELD` -> (op, field)."""
    op, _, field = spec.partition(":")
    op = op.strip().lower()
    if op not in AGGREGATES:
        raise OptionError(f"--agg {spec!r}: unknown aggregate; use {', '.join(AGGREGATES)}")
    if op == "count":
        if field:
            raise OptionError(f"--agg {spec!r}: count takes no field")
        return op, None
    if not field:
        raise OptionError(f"--agg {spec!r}: name the field, e.g. {op}:price")
    return op, field


def event_time(value: Any, field: str) -> float:
    """Epoch seconds from a number or an ISO 8601 string (naive times are UTC)."""
    if isinstance(value, bool) or value is None:
        raise RecordError(f"field {field!r} must be epoch seconds or ISO 8601, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise RecordError(f"field {field!r} is not a finite time: {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise RecordError(
                f"field {field!r}: {value!r} is not epoch seconds or ISO 8601"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    raise RecordError(
        f"field {field!r} must be epoch seconds or ISO 8601, got {type(value).__name__}"
    )


def _number(value: Any) -> int | float:
    """Whole floats as ints, so window bounds and ids read cleanly."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Open:
    """One open window of one key: its bounds and the running aggregates."""

    __slots__ = ("khash", "key", "key_order", "start", "end", "count", "state")

    def __init__(
        self, khash: Hashable, key: Any, key_order: int, start: float, end: float, n_aggs: int
    ) -> None:
        self.khash = khash
        self.key = key
        self.key_order = key_order
        self.start = start
        self.end = end
        self.count = 0
        self.state: list[Any] = [None] * n_aggs


class Window(Operator):
    """Aggregate records in tumbling or sliding windows, by count or time, per key."""

    name = "window"
    memory = "bounded"
    stateless = False

    def __init__(
        self,
        size: int | None = None,
        seconds: float | None = None,
        slide: float | None = None,
        key: str | None = None,
        time_field: str | None = None,
        aggs: list[str] | None = None,
        lateness: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if (size is None) == (seconds is None):
            raise OptionError("give --size N (records) or --seconds S (time), one of them")
        if size is not None:
            if size < 1:
                raise OptionError(f"--size must be 1 or more, got {size}")
            if slide is not None and (slide < 1 or slide != int(slide)):
                raise OptionError(f"--slide must be a whole number of records, got {slide}")
            if time_field is not None:
                raise OptionError("--time-field goes with --seconds, not --size")
        if seconds is not None and not seconds > 0:
            raise OptionError(f"--seconds must be more than 0, got {seconds}")
        if slide is not None and not slide > 0:
            raise OptionError(f"--slide must be more than 0, got {slide}")
        if lateness < 0 or not math.isfinite(lateness):
            raise OptionError(f"--lateness must be 0 or more, got {lateness}")
        length = size if size is not None else seconds
        if slide is not None and length is not None and length / slide > MAX_OVERLAP:
            raise OptionError(
                f"--slide {slide:g} is too small for windows of {length:g}: each record would "
                f"be in {length / slide:.0f} windows (at most {MAX_OVERLAP}); raise --slide"
            )
        self.by_count = size is not None
        self.length: float = float(size if size is not None else seconds)  # type: ignore[arg-type]
        self.slide: float = float(slide) if slide is not None else self.length
        self.key_field = key
        self.time_field = time_field
        self.lateness = lateness
        self.clock = clock if clock is not None else steady_clock()
        self._now = -math.inf  # arrival time: the largest clock reading so far
        self.aggs = [parse_aggregate(a) for a in (aggs or ["count"])]
        self.open: dict[tuple[Hashable, float], _Open] = {}
        self.key_orders: dict[Hashable, int] = {}
        self.seen: dict[Hashable, int] = {}  # count windows: records seen per key
        self.watermark = -math.inf  # event time: the largest time seen, less the lateness
        if seconds is not None and time_field is None:
            # arrival time: windows must close even while input is idle
            self.tick_interval = max(0.01, min(0.25, self.slide / 4))

    @property
    def requires(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        fields = {f for _, f in self.aggs if f} | {self.time_field, self.key_field}
        return {f: {} for f in sorted(f for f in fields if f and "." not in f)}

    @property
    def produces(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        out: dict[str, dict[str, Any]] = {
            "id": {"type": "string"},
            "key": {},
            "start": {"type": "number"},
            "end": {"type": "number"},
        }
        for op, field in self.aggs:
            out[self.output_name(op, field)] = (
                {"type": "array"} if op == "collect" else {"type": "number"}
            )
        return out

    @staticmethod
    def output_name(op: str, field: str | None) -> str:
        return op if field is None else f"{op}_{field}"

    # -- per record --------------------------------------------------------------------------

    def _key_of(self, record: Record) -> tuple[Hashable, Any, bool]:
        if self.key_field is not None:
            value = lookup(record, self.key_field)
            return hashable(value), value, True
        if KEY_FIELD in record:
            value = record[KEY_FIELD]
            return hashable(value), value, True
        return None, None, False

    def _values_of(self, record: Record) -> list[Any]:
        values: list[Any] = []
        for op, field in self.aggs:
            if field is None:
                values.append(None)
                continue
            value = lookup(record, field)
            if (
                op != "collect"
                and value is not None
                and (isinstance(value, bool) or not isinstance(value, int | float))
            ):
                raise RecordError(
                    f"{op}:{field} needs a number, got {type(value).__name__} {value!r}"
                )
            values.append(value)
        return values

    def _starts(self, position: float) -> list[float]:
        """Starts of the windows that hold `position` (a record index or a time)."""
        length, slide = self.length, self.slide
        last = math.floor(position / slide)
        first = max(math.floor((position - length) / slide) + 1, 0 if self.by_count else -math.inf)
        return [k * slide for k in range(int(first), last + 1) if k * slide + length > position]

    def process(self, batch: list[Record]) -> list[Record]:
        # Everything that can fail is worked out first, so a bad record changes no state.
        prepared = []
        watermark = self.watermark
        now = self._arrival_now() if (not self.by_count and self.time_field is None) else 0.0
        counted: dict[Hashable, int] = {}  # count windows: records of this batch per key
        for record in batch:
            khash, kvalue, keyed = self._key_of(record)
            closed_before = watermark
            if self.by_count:
                n = self.seen.get(khash, 0) + counted.get(khash, 0)
                counted[khash] = counted.get(khash, 0) + 1
                position = float(n)
            elif self.time_field is not None:
                position = event_time(lookup(record, self.time_field), self.time_field)
                starts = self._starts(position)
                if not starts:  # so far from 1970 that float seconds cannot place it
                    raise RecordError(
                        f"field {self.time_field!r}: {position:g} is out of range for "
                        f"{self.length:g}-second windows"
                    )
                if starts and all(s + self.length <= watermark for s in starts):
                    raise RecordError(
                        f"late record: {self.time_field} {position:g} is before the windows "
                        f"still open (up to {watermark:g}); raise --lateness to wait longer"
                    )
                watermark = max(watermark, position - self.lateness)
            else:
                position = now
            prepared.append(
                (khash, kvalue, keyed, position, closed_before, self._values_of(record))
            )
        for khash, kvalue, keyed, position, closed_before, values in prepared:
            self._add(khash, kvalue, keyed, position, closed_before, values)
        if self.by_count:
            for khash, n in counted.items():
                self.seen[khash] = self.seen.get(khash, 0) + n
            return self._emit_counted()
        if self.time_field is not None:
            self.watermark = watermark
            return self._emit_until(watermark)
        return self._emit_until(now)

    def _add(
        self,
        khash: Hashable,
        kvalue: Any,
        keyed: bool,
        position: float,
        closed_before: float,
        values: list[Any],
    ) -> None:
        order = self.key_orders.setdefault(khash, len(self.key_orders))
        for start in self._starts(position):
            end = start + self.length
            if end <= closed_before:  # (event time only: otherwise it is -inf)
                continue  # this window closed already; the record's later windows take it
            win = self.open.get((khash, start))
            if win is None:
                win = self.open[(khash, start)] = _Open(
                    khash, kvalue if keyed else _UNKEYED, order, start, end, len(self.aggs)
                )
            win.count += 1
            for i, ((op, _), value) in enumerate(zip(self.aggs, values, strict=True)):
                if value is None and op != "count":
                    continue
                state = win.state
                if op == "sum":
                    state[i] = value if state[i] is None else state[i] + value
                elif op == "mean":
                    state[i] = (
                        [value, 1] if state[i] is None else [state[i][0] + value, state[i][1] + 1]
                    )
                elif op == "min":
                    state[i] = value if state[i] is None or value < state[i] else state[i]
                elif op == "max":
                    state[i] = value if state[i] is None or value > state[i] else state[i]
                elif op == "collect":
                    if state[i] is None:
                        state[i] = []
                    state[i].append(value)

    # -- emitting ----------------------------------------------------------------------------

    def _emit_counted(self) -> list[Record]:
        done = [w for (khash, _), w in self.open.items() if self.seen.get(khash, 0) >= w.end]
        return self._emit(done)

    def _emit_until(self, limit: float) -> list[Record]:
        return self._emit([w for w in self.open.values() if w.end <= limit])

    def _emit(self, windows: list[_Open]) -> list[Record]:
        if not windows:
            return []
        windows.sort(key=lambda w: (w.end, w.start, w.key_order))
        out = []
        for win in windows:
            del self.open[(win.khash, win.start)]
            out.append(self._result(win))
        return out

    def _result(self, win: _Open) -> Record:
        start, end = _number(win.start), _number(win.end)
        if win.key is _UNKEYED:
            record: Record = {"id": f"window:{start}"}
        else:
            shown = win.key if isinstance(win.key, str) else dumps_value(win.key).decode()
            record = {"id": f"window:{shown}:{start}", "key": win.key}
        record["start"] = start
        record["end"] = end
        for (op, field), state in zip(self.aggs, win.state, strict=True):
            name = self.output_name(op, field)
            if op == "count":
                record[name] = win.count
            elif op == "mean":
                record[name] = None if state is None else state[0] / state[1]
            elif op == "collect":
                record[name] = state or []
            else:
                record[name] = state
        return record

    def _arrival_now(self) -> float:
        self._now = max(self._now, self.clock())
        return self._now

    def tick(self, now: float) -> list[Record]:
        """Emit the arrival-time windows the steady clock has passed (`now`, the driver's wall
        clock, is not used: see the module docstring)."""
        if self.by_count or self.time_field is not None:
            return []
        return self._emit_until(self._arrival_now())

    def close(self) -> list[Record]:
        return self._emit(list(self.open.values()))


class _Unkeyed:
    """The key of records that have none (one global group)."""

    def __repr__(self) -> str:
        return "<unkeyed>"


_UNKEYED: Any = _Unkeyed()
