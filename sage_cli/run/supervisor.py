"""The supervisor behind `sage run` (DESIGN §5): it starts, signals, times out, restarts and
reaps the stages of one pipeline. Its other jobs live beside it: the records in flight and
their replay (flight.py), the relays between stages (relay.py), record ids in a stream
(ids.py), a stage across its attempts (stage.py), the run's record (record.py).

It starts every stage of a parsed pipeline itself (`sage` stages as `python -m sage_cli` in this
interpreter, others as they are), each in its own process group and killed with the supervisor
(PR_SET_PDEATHSIG), connects them with pipes, forwards SIGINT/SIGTERM to every group, reaps every
process, records each stage's exit status, CPU time and peak memory, and exits as bash's
`set -o pipefail` would: the status of the last (rightmost) stage that failed, 0 if none did.

Between two stages the pipe is either direct (the default: no cost) or relayed through the
supervisor (`--retries`, `--resume`, and the run's output when it goes to stdout). A relay knows
which records each stage has taken in and not finished, by `id` and lineage (`parent_id`,
`query_id`), so a stage that crashes can be restarted and fed them again, and it drops the
results the new process repeats. That holds for operators whose output keeps input order
(every streaming sage operator).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from sage_cli.exitcodes import ExitCode
from sage_cli.observability.redact import redact_argv
from sage_cli.run.directory import RunDirectory
from sage_cli.run.env import THREADS, StageEnv
from sage_cli.run.flight import FLIGHT_MEMORY, Flight, Replay
from sage_cli.run.record import Events
from sage_cli.run.relay import READ_SIZE, Relay, RelayHooks
from sage_cli.run.script import Pipeline, Stage
from sage_cli.run.stage import StageRun

TIMEOUT_STATUS = 124  # like timeout(1)
KILL_GRACE_SECONDS = 5.0
#: exit statuses a restart cannot fix
NO_RETRY = {
    int(ExitCode.USAGE),
    int(ExitCode.UNAVAILABLE),
    int(ExitCode.INTERRUPTED),
    int(ExitCode.TERMINATED),
}

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl: Any = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


#: util-linux setpriv sets the parent-death signal and execs the stage (no Python in the child)
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _child_setup() -> None:
    """In the child, before exec: die with the supervisor (even on its kill -9)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def exit_status(wait_status: int) -> int:
    """A wait status as bash reports it: the exit code, or 128 + the signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def pipefail(statuses: list[int | None]) -> int:
    """bash's `set -o pipefail`: the last non-zero status, or 0."""
    result = 0
    for s in statuses:
        if s:
            result = s
    return result


# -- the supervisor -------------------------------------------------------------------------------


@dataclass
class RunOptions:
    retries: int = 0
    backoff: float = 0.5
    timeout: float | None = None
    quiet: bool = False
    progress: bool = False
    resume: bool = False
    trace: str = "full"  # full: a span per record; batches: no ids; off: no stage traces


class Supervisor:
    """Runs one pipeline to the end and returns its exit status."""

    def __init__(
        self,
        pipeline: Pipeline,
        run: RunDirectory,
        opts: RunOptions,
        script_args: list[str] | None = None,
        events: Events | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.run_dir = run
        self.opts = opts
        self.retries = opts.retries
        self.script_args = script_args or []
        self.stages = [self._stage_run(s) for s in pipeline.stages]
        self.by_pid: dict[int, StageRun] = {}
        self.relays: list[Relay] = []
        self.signalled: int | None = None
        self.timed_out = False
        self.stderr_lock = threading.Lock()
        # the run's stream (sage_cli.run.record.Run), or one of its own
        self._own_events = events is None
        self.events = events if events is not None else Events(run.events_path)
        self._stderr_threads: list[threading.Thread] = []
        self._dead_lock = threading.Lock()
        self._kill_timer: threading.Timer | None = None
        self.output_desc = "stdout"
        mb = os.environ.get("SAGE_RUN_FLIGHT_MB", "")
        self.flight_memory = int(float(mb) * 1024 * 1024) if mb.strip() else FLIGHT_MEMORY

    # -- building the processes -----------------------------------------------------------

    def _stage_run(self, stage: Stage) -> StageRun:
        env = dict(self.pipeline.env)
        env.update(stage.env)
        threads = None
        if stage.is_model and THREADS not in stage.env:
            threads = max(1, (os.cpu_count() or 1) // len(self.pipeline.model_stages))
        if stage.is_sage:
            # -P: the pipeline's directory is not put on sys.path (a `typer.py` there would run)
            argv = [sys.executable, "-P", "-m", "sage_cli", *stage.argv[1:]]
            traced = self.opts.trace != "off"
            StageEnv(
                trace_dir=str(self.run_dir.stages_dir.resolve()) if traced else None,
                trace_stage=stage.name if traced else None,
                trace_ids=self.opts.trace != "batches",
                run_id=self.run_dir.id,
                threads=threads,
            ).apply(env)
        else:
            argv = list(stage.argv)
            if threads:
                env[THREADS] = str(threads)
        return StageRun(stage, argv, env)

    def warn(self, message: str) -> None:
        if self.opts.quiet:
            return
        with self.stderr_lock:
            try:
                sys.stderr.write(f"sage run: warning: {message}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _open_redirect(self, stage: Stage, op: str, target: str) -> int:
        path = target if os.path.isabs(target) else os.path.join(self.pipeline.cwd, target)
        if op == "<":
            return os.open(path, os.O_RDONLY)
        append = op.endswith(">>") or (self.opts.resume and stage is self.pipeline.stages[-1])
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        return os.open(path, flags, 0o644)

    def _spawn(self, sr: StageRun, stdin: int, stdout: int) -> None:
        """Start one attempt of a stage with the given fds (closed here in the parent)."""
        stage = sr.stage
        err_fd: int | None = None
        err_r: int | None = None
        redirect = stage.redirect("2>", "2>>")
        if stage.redirect("2>&1", "&>", "&>>"):
            err_fd = stdout
        elif redirect is not None:
            err_fd = self._open_redirect(
                stage, ">>" if redirect.op.endswith(">>") else ">", redirect.target
            )
        else:
            err_r, err_fd = os.pipe()
        sr.attempts += 1
        status: int | None = None
        try:
            argv = sr.argv
            if _SETPRIV:  # exec'd, it lets Popen use vfork: far faster starts than preexec_fn
                program = shutil.which(argv[0], path=sr.env.get("PATH"))
                if program is None:
                    raise FileNotFoundError(argv[0])
                argv = [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]]
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=err_fd,
                env=sr.env,
                cwd=self.pipeline.cwd,
                process_group=0,
                preexec_fn=None if _SETPRIV else _child_setup,
            )
        except FileNotFoundError:
            status = 127
            message = f"{stage.argv[0]}: command not found"
        except PermissionError:
            status = 126
            message = f"{stage.argv[0]}: permission denied"
        finally:
            for fd in {stdin, stdout, err_fd}:
                if fd is not None and fd > 2:
                    os.close(fd)
        sr.started = time.time()
        if status is not None:
            if err_r is not None:
                os.close(err_r)
            self.warn(f"stage {stage.index + 1}: {message}")
            self.events.emit("stage_start", stage=sr.name, attempt=sr.attempts, pid=None)
            self._finalize(sr, status, 0.0, 0.0)
            return
        proc.returncode = 0  # we reap it ourselves (os.wait4); keep Popen from trying
        sr.pid = proc.pid
        self.by_pid[proc.pid] = sr
        self.events.emit(
            "stage_start",
            stage=sr.name,
            attempt=sr.attempts,
            pid=proc.pid,
            argv=redact_argv(stage.argv),
            threads=sr.env.get(THREADS),
        )
        if self.signalled is not None:  # a signal came while we were starting it
            self._kill(sr, self.signalled)
        if err_r is not None:
            t = threading.Thread(target=self._pump_stderr, args=(sr, err_r), daemon=True)
            t.start()
            self._stderr_threads.append(t)

    def _pump_stderr(self, sr: StageRun, fd: int) -> None:
        """Copy a stage's stderr to its file in the run directory and to our stderr."""
        out = os.open(
            self.run_dir.stderr_path(sr.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        try:
            while True:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except OSError:
                    break
                if not chunk:
                    break
                os.write(out, chunk)
                with self.stderr_lock:  # the stages' own messages show even with --quiet
                    try:
                        sys.stderr.write(chunk.decode("utf-8", "replace"))
                        sys.stderr.flush()
                    except (OSError, ValueError, AttributeError):
                        pass
        finally:
            os.close(fd)
            os.close(out)

    def _start_all(
        self, ledger_fd: int | None, skip_keys: set[Any] | None, skip_ids: set[Any] | None
    ) -> None:
        stages = self.stages
        last = self.pipeline.stages[-1]
        relay_all = self.retries > 0
        # where the last stage's output goes
        out_redirect = last.redirect(">", ">>", "&>", "&>>")
        if out_redirect is not None:
            target_fd = self._open_redirect(last, out_redirect.op, out_redirect.target)
            self.output_desc = out_redirect.target
        else:
            target_fd = os.dup(1)
        relay_out = relay_all or skip_ids is not None or ledger_fd is not None
        # the first stage's input
        in_redirect = stages[0].stage.redirect("<")
        if relay_all:
            for sr in stages[1:]:
                sr.flight = Flight(self.run_dir.path, self.flight_memory)
        stdin_fds: list[int] = []
        stdout_fds: list[int] = []
        hooks = RelayHooks(self.warn, self.replay_for, self.events.emit, retries=relay_all)
        for i, sr in enumerate(stages):
            if i == 0:
                stdin_fds.append(
                    self._open_redirect(sr.stage, "<", in_redirect.target)
                    if in_redirect
                    else os.dup(0)
                )
            is_last = i == len(stages) - 1
            relayed = relay_out if is_last else (relay_all or (i == 0 and skip_keys is not None))
            if is_last and not relayed:
                stdout_fds.append(target_fd)
                target_fd = -1
                continue
            r, w = os.pipe()
            stdout_fds.append(w)
            if relayed:
                sr.stdout_r = r
                if not is_last:
                    r2, w2 = os.pipe()
                    stages[i + 1].stdin_w = w2
                    stdin_fds.append(r2)
            else:
                stdin_fds.append(r)
        for i, sr in enumerate(stages):
            if sr.stdout_r is not None:
                is_last = i == len(stages) - 1
                down = None if is_last else stages[i + 1]
                self.relays.append(
                    Relay(
                        hooks,
                        sr,
                        down,
                        target_fd=target_fd if is_last else None,
                        ledger_fd=ledger_fd if is_last else None,
                        skip_keys=skip_keys if i == 0 else None,
                        skip_ids=skip_ids if is_last else None,
                    )
                )
        self._target_fd = target_fd
        for i, sr in enumerate(stages):
            self._spawn(sr, stdin_fds[i], stdout_fds[i])
        for relay in self.relays:
            relay.start()

    def _restart(self, sr: StageRun) -> None:
        """Start a new attempt of a crashed stage with fresh pipes to its relays."""
        index = sr.stage.index
        with sr.cond:  # the relay must have read all the dead process wrote first
            deadline = time.monotonic() + 10
            while sr.drained_gen < sr.generation and time.monotonic() < deadline:
                sr.cond.wait(0.1)
        if sr.flight is not None:
            sr.isolated = sr.flight.note_crash(sr.isolated)
            isolated = sr.isolated and sr.stage.is_sage  # batches of one, each flushed at once
            replace(
                StageEnv.read(sr.env),
                flush_every_batch=isolated,
                batch_size=1 if isolated else None,
            ).apply(sr.env)
        if index == 0:
            in_redirect = sr.stage.redirect("<")
            stdin = (
                self._open_redirect(sr.stage, "<", in_redirect.target) if in_redirect else os.dup(0)
            )
            new_w = None
        else:
            stdin, new_w = os.pipe()
        out_r, out_w = os.pipe()
        with sr.cond:
            sr.stdin_w = new_w
            sr.stdout_r = out_r
            self._spawn(sr, stdin, out_w)
            sr.generation += 1
            sr.cond.notify_all()

    def replay_for(self, sr: StageRun) -> Replay:
        """The records to feed a restarted stage; a record it crashed on twice is dead."""
        assert sr.flight is not None
        replay, poison = sr.flight.restart()
        if poison is not None:
            key, line = poison
            try:
                raw: Any = orjson.loads(line)
            except orjson.JSONDecodeError:
                raw = line.decode("utf-8", "replace")
            entry = {
                "stage": sr.name,
                "error": f"the stage crashes on this record (exit status {sr.last_crash})",
                "raw": raw,
            }
            with self._dead_lock:
                with open(self.run_dir.dead_path, "ab") as fh:
                    fh.write(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
            self.events.emit("dead_letter", stage=sr.name, id=key)
            self.warn(
                f"stage {sr.stage.index + 1} ({sr.stage.label}) crashes on record "
                f"{key!r}; it went to {self.run_dir.dead_path}"
            )
        return replay

    # -- signals and the end ----------------------------------------------------------------

    def _kill(self, sr: StageRun, signo: int) -> None:
        if sr.pid is None:
            return
        try:
            os.killpg(sr.pid, signo)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover
            pass

    def _kill_all(self, signo: int) -> None:
        for sr in list(self.by_pid.values()):
            self._kill(sr, signo)

    def _on_signal(self, signo: int, frame: Any) -> None:
        first = self.signalled is None
        self.signalled = signo if first else self.signalled
        self._kill_all(signo if first else signal.SIGKILL)
        if first:
            self._arm_kill()

    def _on_timeout(self) -> None:
        if self.signalled is not None or not self.by_pid:
            return
        self.timed_out = True
        self.signalled = signal.SIGTERM
        self.warn(f"timed out after {self.opts.timeout:g}s; stopping the stages")
        self._kill_all(signal.SIGTERM)
        self._arm_kill()

    def _arm_kill(self) -> None:
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(
                KILL_GRACE_SECONDS, self._kill_all, args=(signal.SIGKILL,)
            )
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _finalize(self, sr: StageRun, status: int, cpu: float, rss_mb: float) -> None:
        with sr.cond:
            sr.status = status
            sr.final = True
            sr.cond.notify_all()
        self._emit_exit(sr, status, cpu, rss_mb, final=True)

    def _emit_exit(self, sr: StageRun, status: int, cpu: float, rss_mb: float, final: bool) -> None:
        self.events.emit(
            "stage_exit",
            stage=sr.name,
            attempt=sr.attempts,
            status=status,
            cpu=round(cpu, 4),
            rss_mb=round(rss_mb, 1),
            final=final,
        )

    def _should_restart(self, sr: StageRun, status: int) -> bool:
        if status == 0 or self.signalled is not None or sr.attempts > self.retries:
            return False
        if status in NO_RETRY or status == 128 + signal.SIGPIPE:
            return False
        return sr.stdout_r is not None and (sr.stage.index == 0 or sr.flight is not None)

    def _reap(self) -> None:
        while self.by_pid:
            try:
                pid, wstatus, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            sr = self.by_pid.pop(pid, None)
            if sr is None:
                continue
            status = exit_status(wstatus)
            cpu = usage.ru_utime + usage.ru_stime
            rss_mb = usage.ru_maxrss / 1024.0
            sr.cpu += cpu
            sr.rss_mb = max(sr.rss_mb, rss_mb)
            if self._should_restart(sr, status):
                sr.last_crash = status
                delay = self.opts.backoff * (2 ** (sr.attempts - 1))
                in_flight = len(sr.flight) if sr.flight is not None else sr.stage.index
                self._emit_exit(sr, status, cpu, rss_mb, final=False)
                self.events.emit(
                    "restart",
                    stage=sr.name,
                    attempt=sr.attempts + 1,
                    after_status=status,
                    backoff=delay,
                    in_flight=in_flight,
                )
                self.warn(
                    f"stage {sr.stage.index + 1} ({sr.stage.label}) exited with status "
                    f"{status}; restarting it in {delay:g}s "
                    f"(attempt {sr.attempts + 1} of {self.retries + 1})"
                )
                end = time.monotonic() + delay
                while time.monotonic() < end and self.signalled is None:
                    time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                if self.signalled is None:
                    self._restart(sr)
                    continue
            self._finalize(sr, status, cpu, rss_mb)

    def run(
        self,
        ledger_fd: int | None = None,
        skip_keys: set[Any] | None = None,
        skip_ids: set[Any] | None = None,
    ) -> int:
        self.events.emit(
            "run_start",
            pid=os.getpid(),
            script=str(self.pipeline.script),
            args=redact_argv(self.script_args),
            resume=self.opts.resume,
            retries=self.retries,
        )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        timer = None
        try:
            self._start_all(ledger_fd, skip_keys, skip_ids)
            if self.opts.timeout:
                timer = threading.Timer(self.opts.timeout, self._on_timeout)
                timer.daemon = True
                timer.start()
            self._reap()
        finally:
            for sr in self.stages:  # a stage that never started (spawn failed) is final
                if not sr.final and sr.pid is None:
                    self._finalize(sr, sr.status or 127, 0.0, 0.0)
            if timer is not None:
                timer.cancel()
            for relay in self.relays:
                relay.join(timeout=10)
            for sr in self.stages:
                if sr.flight is not None:
                    sr.flight.close()
            for t in self._stderr_threads:
                t.join(timeout=5)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if getattr(self, "_target_fd", -1) > 2:
                os.close(self._target_fd)
            for s, h in handlers.items():
                signal.signal(s, h)
        status = pipefail([sr.status for sr in self.stages])
        if self.timed_out:
            status = TIMEOUT_STATUS
        elif self.signalled == signal.SIGINT:
            status = int(ExitCode.INTERRUPTED)
        elif self.signalled == signal.SIGTERM:
            status = int(ExitCode.TERMINATED)
        self.events.emit(
            "run_stop",
            status=status,
            stages={sr.name: sr.status for sr in self.stages},
            relay={r.up.name: r.records for r in self.relays},
        )
        for relay in self.relays:
            self.events.emit("relay", stage=relay.up.name, records_out=relay.records)
            if relay.down is not None:
                self.events.emit("relay", stage=relay.down.name, records_in=relay.records)
        if self._own_events:
            self.events.close()
        return status
