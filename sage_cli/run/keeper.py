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


def commit_marker(line: int) -> bytes:
    return b"\x1e%d\n" % line


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
    before each, so a restart finds where line L+1 starts without counting per record."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.chunks: deque[tuple[bytes, int, int]] = deque()  # (data, newlines before, in it)
        self.first = 0  # absolute index of chunks[0]
        self.newlines = 0  # newlines read so far
        self.eof = False
        self.last_byte = b"\n"
        self.error: str | None = None

    def read_all(self, fd: int) -> None:
        try:
            while True:
                data = os.read(fd, READ_SIZE)
                with self.cond:
                    if not data:
                        self.eof = True
                        self.cond.notify_all()
                        return
                    n = data.count(b"\n")
                    self.chunks.append((data, self.newlines, n))
                    self.newlines += n
                    self.last_byte = data[-1:]
                    self.cond.notify_all()
        except OSError as exc:
            with self.cond:
                self.error = exc.strerror or str(exc)
                self.eof = True
                self.cond.notify_all()

    def commit(self, lines: int) -> None:
        """Input lines 1..`lines` are done: drop the chunks that hold only those."""
        with self.cond:
            chunks = self.chunks
            while chunks and chunks[0][1] + chunks[0][2] <= lines:
                if not self.eof and len(chunks) == 1:
                    break  # keep the newest: the next chunk's first line may start in it
                chunks.popleft()
                self.first += 1

    def start_of(self, lines: int) -> tuple[int, int]:
        """(absolute chunk index, offset) where input line `lines`+1 starts."""
        with self.cond:
            for i, (data, before, n) in enumerate(self.chunks):
                if before + n >= lines and (before + n > lines or i == len(self.chunks) - 1):
                    offset = 0
                    for _ in range(lines - before):
                        offset = data.index(b"\n", offset) + 1
                    return self.first + i, offset
            return self.first + len(self.chunks), 0


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
                data = inp.chunks[max(at, 0)][0]
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
        data = b"".join(c[0] for c in list(inp.chunks)[index - inp.first :])[offset:]
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
    inp = _Input()
    threading.Thread(target=inp.read_all, args=(0,), daemon=True).start()
    committed = 0  # input lines whose outputs are forwarded
    replay_all = False  # a stateful operator: a restart replays the input from line 1
    stuck = 0  # deaths in a row with no input line committed in between
    isolating = False  # the worker runs batches of one, each flushed and committed at once
    attempts = 0
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
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
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
            scan = len(held)
            held += data
            while True:
                at = held.find(b"\x1e", scan)
                if at < 0:
                    break
                end = held.find(b"\n", at)
                if end < 0:
                    break  # the marker's end comes with the next read
                marker = bytes(held[at + 1 : end])
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
