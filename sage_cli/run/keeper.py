"""A stage that restarts itself exactly: the keeper (`SAGE_RUN_RETRIES=N sage map ...`).

A sage stage whose environment has SAGE_RUN_RETRIES=N does not run its operator: very early
in start-up (sage_cli.app.main, before anything heavy is imported) it becomes a keeper that
starts the same command as a worker child (SAGE_RUN_WORKER=1), keeps the pid bash knows, relays
its own stdin to the worker and the worker's output to its own stdout, and restarts the worker
when it dies, up to N times.

No guessing from ids: the worker's Driver writes a commit marker inline on stdout after the
outputs of each slot, `\\x1e<L>\\n`, "input lines 1..L are complete and their outputs are
before this marker" (a byte no JSON line holds raw: orjson escapes control characters). The
keeper forwards only committed output; what a dead worker wrote past its last marker is
dropped, and the restarted worker is fed the input from line L+1 on, which the keeper kept
(it reads stdin itself, so a restart never starts mid-line nor loses what the dead one read).
Lines are counted as the Driver's reader numbers them: every `\\n`, blank lines included, and
a last line without one.

Deterministic failures are never retried: exit 2 (usage), 65 (data, `--on-error fail`), 69
(missing model or dependency), and a stop asked for (130, 143) end the keeper at once with that
status, after the worker's complete output lines. A worker that does not read stdin (a source,
files named on the command line) writes PASS_MARKER first: its output is forwarded live and it
is not restarted (nothing to replay from).

A stateful operator (dedupe, window by count or event time, head...) writes REPLAY_MARKER
first: the keeper keeps all its input, and a restarted worker is fed it from line 1 with
SAGE_RUN_REPLAY=L, so its Driver rebuilds the state from lines 1..L writing none of their
outputs (its reader's blocks are cut at L so no batch mixes the two), then goes on exactly. A
window by arrival time would not replay the same: it refuses (exit 2).

The relay loop is byte-level: big os.read/os.write blocks, bytes.find/count, no record objects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

from sage_cli.run.env import (
    RUN_ATTEMPT,
    RUN_BACKOFF,
    RUN_BATCH_SIZE,
    RUN_DIR,
    RUN_FLUSH,
    RUN_PLACE,
    RUN_REPLAY,
    RUN_RETRIES,
    RUN_WORKER,
)

MARK = 0x1E  # the first byte of every marker
PASS_MARKER = b"\x1e-\n"
#: first from a worker of a stateful operator: keep all input; a restart replays it all
REPLAY_MARKER = b"\x1e=\n"
#: exit statuses a restart cannot change: usage, data error under fail, unavailable, stopped
FINAL = frozenset({2, 65, 69, 130, 143})
READ_SIZE = 1 << 20
#: input a keeper holds in memory (SAGE_RUN_FLIGHT_MB overrides): past it, backpressure for a
#: stateless worker, a spill file for a stateful one
KEEP_MEMORY = 32 * 1024 * 1024


def commit_marker(line: int) -> bytes:
    return b"\x1e%d\n" % line


#: a keeper's worker: the descriptor of the keeper's own stdout, for a worker that passes its
#: output through (PASS_MARKER) to write to directly, one pipe hop and one copy fewer
DIRECT_FD = "SAGE_RUN_DIRECT_FD"


def write_direct() -> None:
    """In a worker that wrote PASS_MARKER: make the keeper's stdout this process's stdout (the
    keeper sees the marker, then the end of its pipe, and forwards nothing more)."""
    value = os.environ.pop(DIRECT_FD, "")
    if value.isdigit():
        try:
            os.dup2(int(value), 1)
            os.close(int(value))
        except OSError:
            pass


def close_direct() -> None:
    """In a worker that commits: the keeper's stdout is not ours to hold."""
    value = os.environ.pop(DIRECT_FD, "")
    if value.isdigit():
        try:
            os.close(int(value))
        except OSError:
            pass


def worker_refusal(prog: str, op: Any) -> str | None:
    """Why a keeper's worker cannot run `op` (a restart could not resume it exactly), or None."""
    if not getattr(op, "stateless", True) and getattr(op, "tick_interval", None):
        return (
            f"--retries cannot restart {prog} exactly: its output depends on when records "
            "arrive (windows by arrival time), so a replay would differ; use --time-field or "
            "--size, or run it without --retries (SAGE_RUN_RETRIES)"
        )
    return None


def replay_lines() -> int:
    """In a restarted worker of a stateful operator: the input lines to replay silently."""
    value = os.environ.get(RUN_REPLAY, "")
    return int(value) if value.isdigit() else 0


def retries_asked() -> int | None:
    """N when this process must be a keeper (SAGE_RUN_RETRIES=N, not a worker), else None."""
    if os.environ.get(RUN_WORKER) == "1":
        return None
    value = os.environ.get(RUN_RETRIES, "")
    return int(value) if value.isdigit() else None


class _Input:
    """The input not committed yet: chunks as read from stdin, with the count of newlines
    before each, so a restart finds where line L+1 starts without counting per record.

    Memory stays bounded: past `memory` bytes held, a stateless worker's keeper stops reading
    (backpressure, as a pipe gives) until commits free some; a stateful one's keeper, which
    must keep everything for a replay, writes further chunks to an unlinked spill file."""

    def __init__(self, memory: int = KEEP_MEMORY, spill_dir: str | None = None) -> None:
        self.cond = threading.Condition()
        #: (data, or None when spilled, newlines before, in it, spill offset, length)
        self.chunks: deque[tuple[bytes | None, int, int, int, int]] = deque()
        self.first = 0  # absolute index of chunks[0]
        self.newlines = 0  # newlines read so far
        self.eof = False
        self.last_byte = b"\n"
        self.error: str | None = None
        self.memory = memory
        self.held = 0  # bytes of chunks in memory
        self.committed = 0  # input lines done
        self.keep_all = False  # a stateful worker: nothing is ever dropped, spill instead
        self.spill_dir = spill_dir
        self._spill: Any = None
        self._spilled = 0

    def data(self, index: int) -> bytes:
        """The bytes of chunks[index] (read back from the spill file if they were spilled)."""
        data, _, _, offset, length = self.chunks[index]
        if data is not None:
            return data
        return os.pread(self._spill.fileno(), length, offset)

    def _keep(self, data: bytes, n: int) -> None:
        if self.keep_all and self.held + len(data) > self.memory:
            if self._spill is None:
                import tempfile

                self._spill = tempfile.TemporaryFile(prefix="sage-keep-", dir=self.spill_dir)
            os.pwrite(self._spill.fileno(), data, self._spilled)
            self.chunks.append((None, self.newlines, n, self._spilled, len(data)))
            self._spilled += len(data)
        else:
            self.chunks.append((data, self.newlines, n, 0, len(data)))
            self.held += len(data)

    def read_all(self, fd: int) -> None:
        try:
            while True:
                with self.cond:  # backpressure: wait for commits to free memory, as long as
                    # whole lines wait for the worker (one longer line is read on: no deadlock)
                    while (
                        self.held >= self.memory
                        and not self.keep_all
                        and self.newlines > self.committed
                    ):
                        self.cond.wait(0.5)
                data = os.read(fd, READ_SIZE)
                with self.cond:
                    if not data:
                        self.eof = True
                        self.cond.notify_all()
                        return
                    n = data.count(b"\n")
                    self._keep(data, n)
                    self.newlines += n
                    self.last_byte = data[-1:]
                    self.cond.notify_all()
        except OSError as exc:
            with self.cond:
                self.error = exc.strerror or str(exc)
                self.eof = True
                self.cond.notify_all()

    def keep_everything(self) -> None:
        """The worker is stateful: a restart replays from line 1, so keep all (spilling)."""
        with self.cond:
            self.keep_all = True
            self.cond.notify_all()

    def commit(self, lines: int) -> None:
        """Input lines 1..`lines` are done: drop the chunks that hold nothing after them. A
        chunk whose last newline ends line `lines` still holds the start of the next line
        unless that newline is its last byte (a pipe cuts chunks anywhere)."""
        with self.cond:
            self.committed = max(self.committed, lines)
            chunks = self.chunks
            while chunks:
                data, before, n, _, _ = chunks[0]
                if before + n > lines or (before + n == lines and not self.data(0).endswith(b"\n")):
                    break
                chunks.popleft()
                if data is not None:
                    self.held -= len(data)
                self.first += 1
            self.cond.notify_all()

    def start_of(self, lines: int) -> tuple[int, int]:
        """(absolute chunk index, offset) where input line `lines`+1 starts."""
        with self.cond:
            if lines > self.newlines:  # the last line, without a newline, is done too
                return self.first + len(self.chunks), 0
            for i, (_, before, n, _, _) in enumerate(self.chunks):
                if before < lines <= before + n:  # the chunk with the newline ending `lines`
                    data = self.data(i)
                    offset = 0
                    for _ in range(lines - before):
                        offset = data.index(b"\n", offset) + 1
                    return self.first + i, offset
            # that newline was the last byte of a chunk already dropped: the next one starts it
            return self.first, 0


def _feed(inp: _Input, start: tuple[int, int], fd: int, stop: threading.Event) -> None:
    """Write the input from `start` on to a worker's stdin, following stdin until its end."""
    index, offset = start
    try:
        while not stop.is_set():
            with inp.cond:
                while index - inp.first >= len(inp.chunks) and not inp.eof and not stop.is_set():
                    inp.cond.wait(0.5)
                if stop.is_set():
                    return
                at = index - inp.first
                if at >= len(inp.chunks):
                    return  # end of input
                data = inp.data(max(at, 0))
            view = memoryview(data)[offset:]
            while view:
                view = view[os.write(fd, view) :]
            index += 1
            offset = 0
    except OSError:
        return  # the worker is gone (EPIPE): the keeper decides what follows
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _dead_letter(inp: _Input, committed: int, prog: str, code: int, run_dir: str) -> int:
    """Put the first record after line `committed` in the run's dead.ndjson; return its line."""
    index, offset = inp.start_of(committed)
    with inp.cond:
        data = b"".join(inp.data(i) for i in range(index - inp.first, len(inp.chunks)))[offset:]
    line = committed
    for raw in data.split(b"\n"):
        line += 1
        if raw.strip():
            break
    else:
        return committed
    import orjson

    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = raw.decode("utf-8", "replace")
    why = f"signal {-code}" if code < 0 else f"exit status {code}"
    entry = {
        "stage": prog,
        "line": line,
        "error": f"the stage crashes on this record ({why})",
        "raw": record,
    }
    with open(os.path.join(run_dir, "dead.ndjson"), "ab") as fh:
        fh.write(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
    sys.stderr.write(
        f"{prog}: warning: input line {line} crashes the stage when run alone; it went to "
        f"{os.path.join(run_dir, 'dead.ndjson')}\n"
    )
    return line


def keep(argv: list[str], retries: int) -> int:
    """Run `sage <argv>` as a worker child, restarting it up to `retries` times."""
    prog = f"sage {argv[0]}" if argv else "sage"
    backoff = float(os.environ.get(RUN_BACKOFF) or 0.5)
    env = dict(os.environ)
    env[RUN_WORKER] = "1"
    if RUN_PLACE not in env and sys.modules.get("sage_cli.run.registry") is not None:
        from sage_cli.run.registry import noted_place

        place = noted_place()  # the worker's pipes lead to this keeper: it takes our place
        if place is not None:
            env[RUN_PLACE] = f"{place[0]},{place[1]}"
    cmd = [sys.executable, "-m", "sage_cli", *argv]
    mb = os.environ.get("SAGE_RUN_FLIGHT_MB", "").strip()
    inp = _Input(
        int(float(mb) * 1024 * 1024) if mb else KEEP_MEMORY, os.environ.get(RUN_DIR) or None
    )
    threading.Thread(target=inp.read_all, args=(0,), daemon=True).start()
    committed = 0  # input lines whose outputs are forwarded
    replay_all = False  # a stateful operator: a restart replays the input from line 1
    stuck = 0  # deaths in a row with no input line committed in between
    isolating = False  # the worker runs batches of one, each flushed and committed at once
    attempts = 0
    launches = 0  # workers started (attempts, less the one a dead-lettered record gives back)
    forwarded = 0  # output lines passed on (committed), for the workers' traces
    died_with = 0  # the status the last worker died with
    stopping: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child:
            try:
                child[0].send_signal(signum)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        if replay_all:
            env[RUN_REPLAY] = str(committed)
        if isolating:
            env[RUN_FLUSH], env[RUN_BATCH_SIZE] = "1", "1"
        else:
            env.pop(RUN_FLUSH, None)
            env.pop(RUN_BATCH_SIZE, None)
        launches += 1
        env[RUN_ATTEMPT] = f"{launches},{died_with},{0 if replay_all else committed},{forwarded}"
        direct = os.dup(1)  # for a worker that turns out to pass its output through
        env[DIRECT_FD] = str(direct)
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=(direct,)
            )
        finally:
            os.close(direct)
        child[:] = [proc]
        assert proc.stdin is not None and proc.stdout is not None
        stop = threading.Event()
        feeder = threading.Thread(
            target=_feed,
            args=(
                inp,
                inp.start_of(0 if replay_all else committed),
                os.dup(proc.stdin.fileno()),
                stop,
            ),
            daemon=True,
        )
        proc.stdin.close()
        feeder.start()
        base = 0 if replay_all else committed
        started_at = committed
        held = bytearray()  # output not committed yet (and a marker's start)
        scan = 0  # where in `held` the next marker may start
        live = False  # PASS_MARKER seen: forward as it comes, never restart
        out_fd = proc.stdout.fileno()
        broken = False
        while True:
            try:
                data = os.read(out_fd, READ_SIZE)
            except InterruptedError:  # pragma: no cover - PEP 475
                continue
            if not data:
                break
            if live:
                try:
                    _write_all(1, data)
                except BrokenPipeError:
                    broken = True
                    break
                continue
            held += data
            while True:
                at = held.find(b"\x1e", scan)
                if at < 0:
                    scan = len(held)
                    break
                end = held.find(b"\n", at)
                if end < 0:
                    scan = at  # the marker's end comes with a later read: look here again
                    break
                marker = bytes(held[at + 1 : end])
                forwarded += held.count(b"\n", 0, at)
                try:
                    _write_all(1, memoryview(held)[:at])
                except BrokenPipeError:
                    broken = True
                    break
                del held[: end + 1]
                scan = 0
                if marker == b"-":
                    live = True
                    _write_all(1, held)
                    held.clear()
                    break
                if marker == b"=":
                    replay_all = True
                    inp.keep_everything()
                    continue
                committed = max(committed, base + int(marker))
                if not replay_all:
                    inp.commit(committed)
            if broken:
                break
        if broken:  # the next stage wants no more: like any stage, end quietly
            proc.kill()
            proc.wait()
            stop.set()
            return 0
        code = proc.wait()
        stop.set()
        with inp.cond:
            inp.cond.notify_all()
        if code == 0 or live or code in FINAL or stopping:
            # the worker ended on its own terms: what it wrote completely is its output
            cut = held.rfind(b"\n") + 1 if code else len(held)
            try:
                _write_all(1, memoryview(held)[:cut])
            except BrokenPipeError:
                return 0
            if stopping and code < 0:
                return 143 if stopping[-1] == signal.SIGTERM else 130
            return code if code >= 0 else 128 - code
        died_with = 128 - code if code < 0 else code
        stuck = stuck + 1 if committed == started_at else 0
        if isolating and stuck and not replay_all and os.environ.get(RUN_DIR):
            # it died running one record alone, again: that record goes to the dead letter
            committed = _dead_letter(inp, committed, prog, code, os.environ[RUN_DIR])
            inp.commit(committed)
            isolating = False
            stuck = 0
            attempts -= 1  # the record is out: going on past it is not another try
        elif stuck >= 2:
            isolating = True  # twice on the same input: find the record, one at a time
        if attempts >= retries:
            why = f"signal {-code}" if code < 0 else f"exit {code}"
            sys.stderr.write(f"{prog}: error: worker died ({why}) {attempts + 1} times; gave up\n")
            return 128 - code if code < 0 else code
        attempts += 1
        delay = backoff * (2 ** (attempts - 1))
        why = f"signal {-code}" if code < 0 else f"exit {code}"
        sys.stderr.write(
            f"{prog}: warning: worker died ({why}); restart {attempts}/{retries} from input "
            f"line {committed + 1} in {delay:g}s\n"
        )
        sys.stderr.flush()
        feeder.join(timeout=5)
        time.sleep(delay)
