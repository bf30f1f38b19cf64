"""Finding a keeper's workers among real processes (tests only).

A worker is forked from its keeper (sage_cli.run.keeper._Worker) without an exec, so it has its
keeper's command line and its keeper's /proc environ; what tells it apart is its parent: a
process with the same command line whose own parent has another (bash, or `sage run`). A
`--workers N` child of a worker has a worker for parent, whose parent has the same command line
too, so it is not taken for one."""

from __future__ import annotations

from pathlib import Path

from sage_cli.run.procs import descendants, parent_of


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def is_worker(pid: int) -> bool:
    mine = _cmdline(pid)
    keeper = parent_of(pid)
    if not mine or b"sage" not in mine or keeper is None:
        return False
    above = parent_of(keeper)
    return _cmdline(keeper) == mine and above is not None and _cmdline(above) != mine


def workers_under(root: int) -> list[int]:
    """Keeper workers among `root`'s descendants."""
    return [pid for pid in descendants(root) if is_worker(pid)]
