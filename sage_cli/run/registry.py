"""How a `sage` stage started by bash inside `sage run` (a loop, a function, a subshell: anywhere)
finds its name in the run: `<pipeline>.<position>-<command>`, e.g. `2.3-embed`.

bash, not sage, starts these stages, so nobody hands them a name. Each one works it out from
what the kernel knows: the processes of one pipeline are siblings (children of the same shell)
joined by pipes, so a stage follows its stdin pipe to the sibling whose stdout is that pipe, and
that one's stdin to the next, back to the first command of the pipeline. How many it passes is
its position (non-sage commands such as `jq` count: they are in /proc too); the pipe leaving the
first command identifies the pipeline. Pipelines are numbered in the order their first stage
registered, in `registry.ndjson` beside the traces, under an flock: every run of a loop's body
is a pipeline of its own (it has new pipes). A predecessor that has already exited is counted
but cannot be followed further: a chain of commands that all finished before the stage started
is counted as one.

Only stages under `sage run` pay for this (SAGE_RUN_DIR set, no SAGE_TRACE_STAGE), once, at
start-up: a few /proc reads.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import orjson

from sage_cli.run.env import RUN_PID, RUN_PLACE, RUN_WORKER
from sage_cli.run.procs import children, parent_of

REGISTRY = "registry.ndjson"


def _pipe(path: str) -> int | None:
    """The inode of the pipe at a /proc fd link (`pipe:[123]`), None for anything else."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    if target.startswith("pipe:["):
        return int(target[6:-1])
    return None


def _siblings(parent: int, me: int) -> list[int]:
    return [pid for pid in children(parent) if pid != me]


def _writer_of(pipe: int, parent: int, me: int) -> int | None:
    """The sibling process whose stdout is `pipe`. bash forks a pipeline's commands left to
    right, and this stage is a Python process that has been starting for tens of milliseconds
    since its fork: a predecessor has long set up its pipes, or has already exited."""
    for pid in _siblings(parent, me):
        if _pipe(f"/proc/{pid}/fd/1") == pipe:
            return pid
    return None


def place_in_pipeline(pid: int | None = None, top: int | None = None) -> tuple[int, int]:
    """(position from 1, the pipe that leaves the pipeline's first command, or a key of its own
    when the stage stands alone) for process `pid` (this one). `top`: the process that started
    the script's shell (`sage run`); the walk never goes above the shell it started."""
    position, key, _ = _walk(pid, top)
    return position, key


def _walk(pid: int | None, top: int | None) -> tuple[int, int, int | None]:
    """place_in_pipeline's (position, key), and the process writing `pid`'s stdin when it is
    a sibling (None when it exited already, or stdin came from the shell)."""
    feeder = None
    me = os.getpid() if pid is None else pid
    parent = parent_of(me) or 0
    position = 1
    current = me
    first_out = _pipe(f"/proc/{me}/fd/1")
    inbound = _pipe(f"/proc/{me}/fd/0")
    seen = {me}
    while inbound is not None:
        if inbound == _pipe(f"/proc/{parent}/fd/0"):
            # stdin came from the shell that started this one: a function or a `{ }`/`( )`
            # group in a pipeline runs in a subshell, which takes the command's place in it;
            # the script's own shell reads what came from outside the script
            grand = parent_of(parent)
            if grand is None or parent == top or grand == top or grand <= 1:
                break
            current, parent = parent, grand
            continue
        writer = _writer_of(inbound, parent, current)
        if writer is None:  # it ran and exited already (`echo ... | sage map`): count it
            position += 1
            first_out = inbound
            break
        if writer in seen:
            break
        if current == me:
            feeder = writer
        seen.add(writer)
        position += 1
        current = writer
        first_out = inbound
        inbound = _pipe(f"/proc/{writer}/fd/0")
    key = first_out if first_out is not None else -me  # alone: a key nobody else has
    return position, key, feeder


_PLACE: tuple[int, int] | None = None
#: the sibling process writing this one's stdin, when note_place saw one
_FEEDER: int | None = None


def _top() -> int | None:
    top = os.environ.get(RUN_PID, "")
    return int(top) if top.isdigit() else None


def note_place() -> None:
    """Work out this process's place now, at start-up (sage_cli/__init__.py): before Python has
    loaded the rest, while a quick neighbour (`echo`, `jq` over a few records) is still there."""
    global _PLACE, _FEEDER
    given = os.environ.get(RUN_PLACE, "")  # a keeper's worker: the keeper's place
    if given:
        at, _, pipe = given.partition(",")
        _PLACE = (int(at), int(pipe))
        return
    try:
        position, key, _FEEDER = _walk(None, _top())
        _PLACE = (position, key)
    except (OSError, ValueError):
        _PLACE = None


def sage_feeder() -> int | None:
    """The pid of the sage operator stage (one that traces its output) writing this stage's
    stdin, as note_place saw it, or None: this stage's input ids are then that one's output."""
    words = _stage_argv(_FEEDER) if _FEEDER is not None else None
    if not words or _pipe(f"/proc/{_FEEDER}/fd/2") == _pipe(f"/proc/{_FEEDER}/fd/1"):
        return None  # not sage, or its messages go down the pipe too (`2>&1 |`)
    from sage_cli.verbs import is_operator_stage

    return _FEEDER if is_operator_stage(["sage", *words]) else None


def noted_place() -> tuple[int, int] | None:
    """The place note_place found (None: not under `sage run`, or not worked out)."""
    return _PLACE


def register(trace_dir: str, command: str, argv: list[str]) -> str:
    """Give this stage its name in the run whose traces go to `trace_dir` and record it in the
    registry (what `sage run` reads for run.json, the summary and the live table)."""
    position, key = _PLACE if _PLACE is not None else place_in_pipeline(top=_top())
    verb = command.replace(" ", "-")
    path = Path(trace_dir) / REGISTRY
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries = _entries(os.pread(fd, os.fstat(fd).st_size, 0))
        numbers = {e["key"]: e["pipeline"] for e in entries}
        pipeline = numbers.get(key, max(numbers.values(), default=0) + 1)
        name = f"{pipeline}.{position}-{verb}"
        taken = {e["name"] for e in entries}
        if name in taken and os.environ.get(RUN_PLACE):  # a keeper's restarted worker
            return name  # goes on with the same stage's trace
        if name in taken:  # two stages of a pipeline we could not tell apart: keep both traces
            name = f"{name}-{os.getpid()}"
        entry = {
            "name": name,
            "pipeline": pipeline,
            "position": position,
            "key": key,
            "command": command,
            "argv": argv,
            "pid": os.getpid(),
            "t": time.time(),
        }
        if os.environ.get(RUN_WORKER) == "1":  # the process its neighbours see is its keeper
            entry["keeper"] = os.getppid()
        os.write(fd, orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
    finally:
        os.close(fd)  # closing drops the lock
    return name


def _entries(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out


def read_registry(trace_dir: str | Path) -> list[dict[str, Any]]:
    """The stages that registered so far, in order."""
    try:
        return _entries((Path(trace_dir) / REGISTRY).read_bytes())
    except OSError:
        return []


def _stage_argv(pid: int) -> list[str] | None:
    """The sage words of process `pid`'s command line (`embed --model m`), None if not sage."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().decode("utf-8", "replace").split("\0")[:-1]
    except OSError:
        return None
    for i, word in enumerate(words):
        if word == "sage" or word.endswith("/sage"):
            return words[i + 1 :]
        if word == "sage_cli" and i and words[i - 1] == "-m":
            return words[i + 1 :]
    return None


def pipeline_members(me: int | None = None) -> list[int]:
    """The processes of this process's pipeline: its siblings joined to it by pipes, both ways."""
    me = os.getpid() if me is None else me
    parent = parent_of(me) or 0
    siblings = _siblings(parent, me)
    ends = {pid: (_pipe(f"/proc/{pid}/fd/0"), _pipe(f"/proc/{pid}/fd/1")) for pid in siblings}
    ends[me] = (_pipe(f"/proc/{me}/fd/0"), _pipe(f"/proc/{me}/fd/1"))
    members, todo = {me}, [me]
    while todo:
        stdin, stdout = ends[todo.pop()]
        for pid, (other_in, other_out) in ends.items():
            joined = (stdout is not None and other_in == stdout) or (
                stdin is not None and other_out == stdin
            )
            if joined and pid not in members:
                members.add(pid)
                todo.append(pid)
    return sorted(members)


def model_share() -> int | None:
    """A model stage's share of the cores under `sage run` when bash started it: every core over
    the model stages of its pipeline (as the parsed path gives them), None if not under a run."""
    if not os.environ.get(RUN_PID):
        return None
    from sage_cli.verbs import is_model_stage

    me = os.getpid()
    if os.environ.get("SAGE_RUN_WORKER") == "1":  # a keeper's worker: the keeper is in the pipe
        me = parent_of(me) or me
    try:
        members = pipeline_members(me)
    except OSError:
        return None
    models = sum(
        1 for pid in members if (words := _stage_argv(pid)) and is_model_stage(["sage", *words])
    )
    return max(1, (os.cpu_count() or 1) // max(1, models))
