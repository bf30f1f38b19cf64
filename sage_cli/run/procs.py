"""What /proc says about the processes of a run: a process's children and state, and every
process below one. `sage run` asks before and after the script and every 50 ms while it stops
one (sage_cli.run.session); a stage under bash asks at start-up, to find its neighbours in its
pipeline (sage_cli.run.registry). From each process's children lists where the kernel keeps
them (a few reads), else from every process's parent link (a read per process on the machine)."""

from __future__ import annotations

import os

#: Linux with CONFIG_PROC_CHILDREN: /proc/PID/task/TID/children lists a thread's children
HAS_CHILDREN_LISTS = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(root: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Every live process below `root`, deepest last, leaving out the subtrees of `exclude`
    (processes `sage run` started for itself: a private Ray); no zombie."""
    if not HAS_CHILDREN_LISTS:
        return descendants_by_parent_links(root, exclude)
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            if child in exclude or state(child) in (None, b"Z"):
                continue
            out.append(child)
            todo.append(child)
    return out


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (none when it is gone)."""
    if not HAS_CHILDREN_LISTS:
        return [
            int(entry)
            for entry in os.listdir("/proc")
            if entry.isdigit() and parent_of(entry) == pid
        ]
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as fh:
                out.extend(int(child) for child in fh.read().split())
        except OSError:
            continue
    return out


def parent_of(pid: int | str) -> int | None:
    """A process's parent (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1])


def state(pid: int) -> bytes | None:
    """A process's state letter (b"Z": a zombie), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split(maxsplit=1)[0]


def descendants_by_parent_links(root: int, exclude: frozenset[int]) -> list[int]:
    """`descendants` where the kernel keeps no children lists."""
    below: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] == b"Z":
            continue
        below.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in below.get(todo.pop(), []):
            if child in exclude:
                continue
            out.append(child)
            todo.append(child)
    return out
