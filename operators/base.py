"""The operator contract (DESIGN §4) and the exceptions operators raise.

An operator is built once per process with its options. `setup()` loads models and indexes,
`process(batch)` turns a list of records into a list of records (one-to-one, one-to-many or
none), `close()` releases resources and returns whatever a whole-input operator was holding.
Batching, error policy, tracing and ordering belong to the driver, never to an operator.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Record = dict[str, Any]
MemoryClass = Literal["streaming", "bounded", "whole-input"]


class OperatorError(Exception):
    """The operator cannot go on (exit 1)."""


class RecordError(OperatorError):
    """One record cannot be processed (a missing field, bad value); the rest can go on.

    The driver applies the error policy to the record that raised it (exit 65 under `fail`).
    """


class ResourceUnavailable(OperatorError):
    """A model, index or table the operator needs is missing or corrupt (exit 69)."""


class OptionError(OperatorError):
    """The operator was built with options that cannot work (exit 2)."""


class TransientError(OperatorError):
    """A failure a retry may cure: a server that timed out or refused (exit 75)."""


#: what a message about a full disk tells the user to do (the same command works once there is room)
DISK_FULL_HINT = "; free some space and run it again"


class OutputFailed(OperatorError):
    """The operator cannot write its own output file (an index, a sink's `--to FILE`): the
    stage stops at once, never retried record by record. Exit 75 when the disk is full or a
    quota is reached (freeing space and re-running cures it), else 1. Build it with
    `OutputFailed.from_os_error`; the message says what became of the old file."""

    def __init__(self, message: str, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary

    @classmethod
    def from_os_error(cls, what: str, exc: OSError, kept: str) -> OutputFailed:
        """`what`: cannot write ...; `kept`: what the user still has (the old index is untouched)."""
        import errno
        import os
        import re

        code, reason = exc.errno, exc.strerror
        if code is None:  # C extensions (annoy): OSError("Unable to write: <strerror> (28)")
            found = re.search(r"\((\d+)\)\s*$", str(exc))
            code = int(found.group(1)) if found else None
        if not reason:
            reason = os.strerror(code) if code else str(exc) or type(exc).__name__
        full = code in (errno.ENOSPC, errno.EDQUOT)
        hint = DISK_FULL_HINT if full else ""
        return cls(f"{what}: {reason}; {kept}{hint}", temporary=full)


class Operator:
    """Base class for every operator. Subclasses set the class attributes and `process`."""

    #: name of the command that wraps it, for messages and traces
    name: ClassVar[str] = "operator"
    #: fields a record must carry, as JSON Schema property schemas
    requires: ClassVar[dict[str, dict[str, Any]]] = {}
    #: fields this operator adds or replaces, as JSON Schema property schemas
    produces: ClassVar[dict[str, dict[str, Any]]] = {}
    #: how much of its input the operator holds at once
    memory: ClassVar[MemoryClass] = "streaming"
    #: True when the operator holds no state between records (safe to run N copies)
    stateless: ClassVar[bool] = True

    def setup(self) -> None:
        """Load models, indexes and tables. Called once, before the first batch."""

    def process(self, batch: list[Record]) -> list[Record]:
        raise NotImplementedError

    def tick(self, now: float) -> list[Record]:
        """Called when input is idle, for operators that emit on time (windows)."""
        return []

    #: seconds between `tick` calls while input is idle; None: never tick
    tick_interval: float | None = None
    #: set by an operator that needs no more input (`head`); the driver stops reading
    done: bool = False
    #: records per batch when the user gives no --batch-size
    default_batch_size: int = 256

    def close(self) -> list[Record]:
        """Release resources; return what a whole-input or windowed operator still holds."""
        return []

    def abandon(self) -> None:
        """The run is ending early (an error, a signal): drop partial output (a sink's
        temporary file) instead of committing it. close() is not called after this."""

    def run(self, records: list[Record]) -> list[Record]:
        """Convenience for Python callers: setup, one batch, close."""
        self.setup()
        out = self.process(records)
        out.extend(self.close())
        return out


def require_field(record: Record, field: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return `record[field]`, or raise a RecordError that names the field and what to do."""
    if field not in record:
        have = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
        raise RecordError(f"record has no {field!r} field (fields: {have})")
    value = record[field]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(f"field {field!r} must be {names}, got {type(value).__name__}")
    return value


def record_text(record: Record, field: str = "text") -> str:
    """The text of a record: `field`, with `content` accepted as an alias for `text`."""
    if field == "text" and "text" not in record and "content" in record:
        field = "content"
    return require_field(record, field, str)


def add_warning(record: Record, message: str) -> None:
    """Append `message` to the record's `_warnings` list (created when absent).

    One convention for every operator: a record that went through with something worth knowing
    (a lossy decode, a truncated prompt) says so in `_warnings`, a list any stage may append to.
    """
    warnings = record.get("_warnings")
    record["_warnings"] = [*warnings, message] if isinstance(warnings, list) else [message]


#: C0 controls but tab and newline, DEL and C1 controls: what a terminal would act on
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}


def terminal_safe(text: str) -> str:
    """`text` with control characters (ESC, CR, BEL, C1) shown as `\\xNN`, so record content
    printed for a person cannot move the cursor, retitle the window or write the clipboard."""
    return text.translate(_CONTROL)
