"""A stage that restarts itself exactly: the keeper (`SAGE_RUN_RETRIES=N sage map ...`).

A sage stage whose environment has SAGE_RUN_RETRIES=N does not run its operator: very early
in start-up (sage_cli.app.main, before anything heavy is imported) it becomes a keeper that
forks a worker child running the same command (SAGE_RUN_WORKER=1; forked, not exec'd, so it
skips the interpreter's start-up), keeps the pid bash knows, relays its own stdin to the worker
and the worker's output to its own stdout, and restarts the worker when it dies, up to N times.

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

A worker that opens its `--errors FILE` first says how long the file was (`\\x1e@<size>\\n`);
the workers after it read the entries written since and write none of them again (a restarted
worker meets again the lines a dead one met: past its last commit, or all of them in a replay).

The relay loop is byte-level: big os.read/os.write blocks, bytes.find/count, no record objects.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys
import time
from collections import deque
from typing import Any

from sage_cli.run.env import (
    RUN_ATTEMPT,
    RUN_BACKOFF,
    RUN_BATCH_SIZE,
    RUN_DIR,
    RUN_ERRORS_FROM,
    RUN_FLUSH,
    RUN_PLACE,
    RUN_REPLAY,
    RUN_RETRIES,
    RUN_WORKER,
)

MARK = b"\x1e"  # the first byte of every marker
PASS_MARKER = b"\x1e-\n"
#: first from a worker of a stateful operator: keep all input; a restart replays it all
REPLAY_MARKER = b"\x1e=\n"
#: exit statuses a restart cannot change: usage, data error under fail, unavailable, stopped
FINAL = frozenset({2, 65, 69, 130, 143})
#: stdin is read in blocks the allocator reuses (1 MiB blocks cost a fresh page per 4 KiB)
READ_SIZE = 64 * 1024
PIPE_SIZE = 1 << 20
#: chunks read from stdin ahead of the worker: reading further ahead only touches fresh pages
AHEAD = PIPE_SIZE // READ_SIZE
#: input a keeper holds in memory (SAGE_RUN_FLIGHT_MB overrides): past it, backpressure for a
#: stateless worker, a spill file for a stateful one
KEEP_MEMORY = 32 * 1024 * 1024


def commit_marker(line: int) -> bytes:
    return b"\x1e%d\n" % line


def errors_marker(size: int) -> bytes:
    """From a worker that opens its `--errors FILE` first: the size the file had then."""
    return b"\x1e@%d\n" % size


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
        #: (data, or None when spilled, newlines before, in it, spill offset, length)
        self.chunks: deque[tuple[bytes | None, int, int, int, int]] = deque()
        self.first = 0  # absolute index of chunks[0]
        self.newlines = 0  # newlines read so far
        self.eof = False
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

    def room(self) -> bool:
        """Whether to read more now: under `memory`, or the worker has no whole line to work
        on (one longer line is read on: no deadlock), or everything is kept anyway."""
        return self.held < self.memory or self.keep_all or self.newlines <= self.committed

    def read_from(self, fd: int) -> None:
        """One read of stdin (it is readable: this does not block)."""
        try:
            data = os.read(fd, READ_SIZE)
        except OSError:  # closed or unreadable stdin: the input ends here, as at EOF
            data = b""
        if not data:
            self.eof = True
            return
        n = data.count(b"\n")
        self._keep(data, n)
        self.newlines += n

    def keep_everything(self) -> None:
        """The worker is stateful: a restart replays from line 1, so keep all (spilling)."""
        self.keep_all = True

    def commit(self, lines: int) -> None:
        """Input lines 1..`lines` are done: drop the chunks that hold nothing after them. A
        chunk whose last newline ends line `lines` still holds the start of the next line
        unless that newline is its last byte (a pipe cuts chunks anywhere)."""
        self.committed = max(self.committed, lines)
        chunks = self.chunks
        while chunks:
            _, before, n, _, _ = chunks[0]
            if before + n > lines or (before + n == lines and not self.data(0).endswith(b"\n")):
                break
            self._drop_first()

    def drop_before(self, index: int) -> None:
        """Forget the chunks before absolute index `index` (a worker that is never restarted
        has had them)."""
        while self.chunks and self.first < index:
            self._drop_first()

    def _drop_first(self) -> None:
        data = self.chunks.popleft()[0]
        if data is not None:
            self.held -= len(data)
        self.first += 1

    def start_of(self, lines: int) -> tuple[int, int]:
        """(absolute chunk index, offset) where input line `lines`+1 starts."""
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


class _Feed:
    """Writes the kept input from a place on to a worker's stdin, as far as its pipe takes
    without blocking (the keeper is one thread: it must never block on a worker's input)."""

    def __init__(self, inp: _Input, start: tuple[int, int], fd: int) -> None:
        self.inp = inp
        self.index, self.offset = start
        self.fd = fd
        os.set_blocking(fd, False)

    def unfed(self) -> int:
        """Chunks read and not yet given to the worker."""
        return self.inp.first + len(self.inp.chunks) - self.index

    def caught_up(self) -> bool:
        return self.index - self.inp.first >= len(self.inp.chunks)

    def write(self) -> None:
        inp = self.inp
        try:
            while not self.caught_up():
                at = self.index - inp.first
                if at < 0:  # dropped by a commit: the worker had it all
                    self.index, self.offset, at = inp.first, 0, 0
                data = inp.data(at)
                self.offset += os.write(self.fd, memoryview(data)[self.offset :])
                if self.offset < len(data):
                    return  # the pipe is full: wait until it takes more
                self.index += 1
                self.offset = 0
        except BlockingIOError:
            return
        except OSError:  # the worker closed its stdin or is gone (EPIPE): no more input
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class _Output:
    """A worker's output as it comes: what a marker commits is passed on (one writev per read
    of the worker's pipe, however many markers it held), the rest waits for the next marker."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []  # output after the last marker (copied out of the buffer)
        self.pending_lines = 0
        self.partial = b""  # the start of a marker whose end has not come yet
        self.live = False  # PASS_MARKER seen: everything is passed on as it comes
        self.forwarded = 0  # output lines passed on

    def take(self, buf: bytearray, n: int) -> tuple[list[bytes | memoryview], list[bytes]]:
        """(what to write now, the markers found) for one read of the worker's output, the
        first `n` bytes of `buf`. The parts to write are views of `buf`, valid until it is
        read into again; what waits is copied."""
        view = memoryview(buf)[:n]
        if self.live:
            return [view], []
        data: bytes | bytearray = buf
        if self.partial:
            data, self.partial = self.partial + bytes(view), b""
            n = len(data)
            view = memoryview(data)
        out: list[bytes | memoryview] = []
        markers: list[bytes] = []
        pos = 0
        while True:
            at = data.find(MARK, pos, n)
            if at < 0:
                if pos < n:
                    self.pending.append(bytes(view[pos:]))
                    self.pending_lines += data.count(b"\n", pos, n)
                break
            end = data.find(b"\n", at, n)
            if end < 0:  # the marker's end comes with the next read
                if at > pos:
                    self.pending.append(bytes(view[pos:at]))
                    self.pending_lines += data.count(b"\n", pos, at)
                self.partial = bytes(view[at:])
                break
            out += self.pending  # every marker commits the output before it
            self.forwarded += self.pending_lines + data.count(b"\n", pos, at)
            self.pending, self.pending_lines = [], 0
            if at > pos:
                out.append(view[pos:at])
            marker = bytes(view[at + 1 : end])
            markers.append(marker)
            pos = end + 1
            if marker == b"-":  # from here on the worker's output is passed on as it comes
                self.live = True
                if pos < n:
                    out.append(view[pos:])
                break
        return out, markers

    def complete_lines(self) -> bytes:
        """What a worker that ended on its own terms left after its last marker, cut after the
        last complete line."""
        tail = b"".join(self.pending)
        return tail[: tail.rfind(b"\n") + 1]


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    while parts:
        batch = parts[:512]  # under IOV_MAX
        n = os.writev(fd, batch)
        done = 0
        while done < len(batch) and n >= len(batch[done]):
            n -= len(batch[done])
            done += 1
        if done < len(batch):
            rest = memoryview(batch[done])[n:]
            parts = [rest, *parts[done + 1 :]]
        else:
            parts = parts[done:]


def _dead_letter(inp: _Input, committed: int, prog: str, code: int, run_dir: str) -> int:
    """Put the first record after line `committed` in the run's dead.ndjson; return its line."""
    index, offset = inp.start_of(committed)
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


class _Worker:
    """A worker forked from the keeper: it skips the interpreter's start-up and the imports the
    keeper already made (about 35 ms of every worker start), then runs the command as
    `python -m sage_cli ARGV` would, and never returns into the keeper's code."""

    def __init__(self, argv: list[str], env: dict[str, str], keep_fd: int) -> None:
        from sage_cli.run.fork import fork_command

        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        # in the keeper's process group (a signal to the script's stages reaches it too)
        pid = fork_command(
            argv, env, in_r, out_w, own_group=False, dies_with_parent=False, keep_fd=keep_fd
        )
        os.close(in_r)
        os.close(out_w)
        self.pid = pid
        self.stdin = in_w
        self.stdout = out_r
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # pragma: no cover - reaped elsewhere
                self.returncode = 1
                break
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _widen_pipe(fd: int) -> None:
    """A keeper's pipes to its worker hold 1 MiB: fewer, bigger reads and writes on both
    sides (a 64 KiB pipe made the worker read and flush in small pieces)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):  # over /proc/sys/fs/pipe-max-size, or not Linux
        pass


def _relay(
    inp: _Input,
    feed: _Feed,
    out_fd: int,
    output: _Output,
    proc: _Worker,
    on_marker: Any,
) -> bool:
    """One worker's life, in one thread: stdin into the kept input, the kept input into the
    worker, its committed output to stdout, until its output ends (and, while it still reads,
    until its input is all given or it exits). True when the next stage closed its end."""
    out_open = True
    buf = bytearray(PIPE_SIZE)  # read into, again and again: no fresh pages per read
    while True:
        if output.live:  # never restarted: what it was given need not be kept
            inp.drop_before(feed.index)
        if feed.fd >= 0 and inp.eof and feed.caught_up():
            feed.close()  # all of the input is given: the worker sees its end
        if not out_open and (feed.fd < 0 or proc.poll() is not None):
            return False
        poller = select.poll()
        if out_open:
            poller.register(out_fd, select.POLLIN)
        if feed.fd >= 0:
            if not feed.caught_up():
                poller.register(feed.fd, select.POLLOUT)
            if not inp.eof and inp.room() and feed.unfed() < AHEAD:
                poller.register(0, select.POLLIN)
        for fd, _ in poller.poll(None if out_open else 50):
            if fd == out_fd:
                n = os.readv(out_fd, [buf])
                if not n:
                    out_open = False
                    continue
                parts, markers = output.take(buf, n)
                if parts:
                    try:
                        _writev_all(1, parts)
                    except BrokenPipeError:
                        return True
                for marker in markers:
                    on_marker(marker)
            elif fd == 0:
                inp.read_from(0)
            elif fd == feed.fd:
                feed.write()


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
    mb = os.environ.get("SAGE_RUN_FLIGHT_MB", "").strip()
    inp = _Input(
        int(float(mb) * 1024 * 1024) if mb else KEEP_MEMORY, os.environ.get(RUN_DIR) or None
    )
    committed = 0  # input lines whose outputs are forwarded
    replay_all = False  # a stateful operator: a restart replays the input from line 1
    stuck = 0  # deaths in a row with no input line committed in between
    isolating = False  # the worker runs batches of one, each flushed and committed at once
    attempts = 0
    launches = 0  # workers started (attempts, less the one a dead-lettered record gives back)
    forwarded = 0  # output lines passed on (committed), for the workers' traces
    died_with = 0  # the status the last worker died with
    stopping: list[int] = []
    child: list[_Worker] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child:
            try:
                child[0].send_signal(signum)
            except OSError:
                pass

    def on_marker(marker: bytes) -> None:
        nonlocal committed, replay_all
        if marker == b"=":
            replay_all = True
            inp.keep_everything()
        elif marker.startswith(b"@"):  # the workers after it write no errors entry twice
            env.setdefault(RUN_ERRORS_FROM, marker[1:].decode())
        elif marker != b"-":
            committed = max(committed, int(marker))
            if not replay_all:
                inp.commit(committed)

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
            proc = _Worker(argv, env, direct)
        finally:
            os.close(direct)
        child[:] = [proc]
        started_at = committed
        # a stateless worker is fed from the first line not committed, and numbers its lines
        # from there (SAGE_RUN_ATTEMPT), so its markers and errors name input lines as they are
        feed = _Feed(inp, inp.start_of(0 if replay_all else committed), proc.stdin)
        out_fd = proc.stdout
        for fd in (feed.fd, out_fd):
            _widen_pipe(fd)
        output = _Output()
        output.forwarded = forwarded
        broken = _relay(inp, feed, out_fd, output, proc, on_marker)
        forwarded = output.forwarded
        live = output.live
        feed.close()
        os.close(out_fd)
        if broken:  # the next stage wants no more: like any stage, end quietly
            proc.kill()
            proc.wait()
            return 0
        code = proc.wait()
        if code == 0 or live or code in FINAL or stopping:
            # the worker ended on its own terms: what it wrote completely is its output
            try:
                _writev_all(1, [output.complete_lines()] if code else list(output.pending))
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
        time.sleep(delay)
