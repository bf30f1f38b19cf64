"""The supervisor behind `sage run` for a script of simple commands and pipelines (DESIGN §5):
it starts, signals, times out and reaps the stages of one pipeline. Beside it: the relay of the
last stage's output (relay.py), a stage's process (stage.py), the run's record (record.py).

It starts every stage of a parsed pipeline itself (`sage` stages as forks of this process that
run their command at once, sage_cli/run/fork.py, or as `python -m sage_cli` where it cannot fork;
others as they are), each in its own process group and killed with the supervisor
(PR_SET_PDEATHSIG), connects them with direct pipes, forwards SIGINT/SIGTERM to every group,
reaps every process, records each stage's exit status, CPU time and peak memory, and exits as
bash's `set -o pipefail` would: the status of the last (rightmost) stage that failed, 0 if none.
`--retries` and `--resume` do not come here: bash runs those scripts (sage_cli.run.session), every
stage a keeper (keeper.py), a resume a replay (output.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sage_cli.exitcodes import ExitCode
from sage_cli.observability.redact import redact_argv
from sage_cli.run.directory import RunDirectory
from sage_cli.run.env import RUN_FORK, THREADS, StageEnv
from sage_cli.run.fork import can_fork, fork_command
from sage_cli.run.lifeline import dies_with_parent
from sage_cli.run.options import KILL_GRACE_SECONDS, TIMEOUT_STATUS, RunOptions
from sage_cli.run.record import Events
from sage_cli.run.relay import READ_SIZE, Relay
from sage_cli.run.script import Pipeline, Stage
from sage_cli.run.stage import StageRun
from sage_cli.verbs import is_operator_stage


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
        self._kill_timer: threading.Timer | None = None
        self.output_desc = "stdout"
        #: sage stages start as forks of this process (SAGE_RUN_FORK=0: as new interpreters)
        self._forks = os.environ.get(RUN_FORK) != "0"

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
                trace_fed_by=self._feeder(stage) if traced else None,
                run_id=self.run_dir.id,
                threads=threads,
            ).apply(env)
        else:
            argv = list(stage.argv)
            if threads:
                env[THREADS] = str(threads)
        sr = StageRun(stage, argv, env)
        if stage.is_sage:
            sr.fork_argv = list(stage.argv[1:])
        return sr

    def _feeder(self, stage: Stage) -> str | None:
        """The sage stage whose output alone is `stage`'s input (its trace names the records
        `stage` reads, which then needs not name them again), or None."""
        if stage.index == 0 or stage.redirect("<") is not None:
            return None
        before = self.pipeline.stages[stage.index - 1]
        if before.redirect("2>&1", "&>", "&>>", ">", ">>") is not None:
            return None
        return before.name if is_operator_stage(before.argv) else None

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
        append = op.endswith(">>")
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
        pid = None
        try:
            if sr.fork_argv is not None and self._forks and can_fork(sr.env):
                pid = self._fork(sr, stdin, stdout, err_fd)
            if pid is None:
                program = shutil.which(sr.argv[0], path=sr.env.get("PATH"))
                if program is None:
                    raise FileNotFoundError(sr.argv[0])
                argv, die_with_us = dies_with_parent([program, *sr.argv[1:]])
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=err_fd,
                    env=sr.env,
                    cwd=self.pipeline.cwd,
                    process_group=0,
                    preexec_fn=die_with_us,
                )
                proc.returncode = 0  # we reap it ourselves (os.wait4); keep Popen from trying
                pid = proc.pid
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
        assert pid is not None
        sr.pid = pid
        self.by_pid[pid] = sr
        self.events.emit(
            "stage_start",
            stage=sr.name,
            attempt=sr.attempts,
            pid=pid,
            argv=redact_argv(stage.argv),
            threads=sr.env.get(THREADS),
        )
        if self.signalled is not None:  # a signal came while we were starting it
            self._kill(sr, self.signalled)
        if err_r is not None:
            t = threading.Thread(target=self._pump_stderr, args=(sr, err_r), daemon=True)
            self._stderr_threads.append(t)

    def _fork(self, sr: StageRun, stdin: int, stdout: int, stderr: int) -> int | None:
        """A sage stage as a fork of this interpreter (sage_cli.run.fork): it reads its first
        record at once instead of ~70 ms later; None where the fork failed (then it is started
        as a new interpreter)."""
        assert sr.fork_argv is not None
        verb = sr.fork_argv[0] if sr.fork_argv else ""
        # typer and the command group, once, here: `sage run` may have started without them
        # (sage_cli.run.argv), and every child would import them again. Not the verb's own
        # module: one that loads a native library may start threads a fork cannot copy.
        import sage_cli.cli.group  # noqa: F401

        try:
            return fork_command(
                sr.fork_argv,
                sr.env,
                stdin,
                stdout,
                stderr,
                cwd=self.pipeline.cwd,
                name=f"sage {verb}",
            )
        except OSError:
            return None

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

    def _start_all(self, ledger_fd: int | None) -> None:
        stages = self.stages
        last = self.pipeline.stages[-1]
        # where the last stage's output goes
        out_redirect = last.redirect(">", ">>", "&>", "&>>")
        if out_redirect is not None:
            target_fd = self._open_redirect(last, out_redirect.op, out_redirect.target)
            self.output_desc = out_redirect.target
        else:
            target_fd = os.dup(1)
        in_redirect = stages[0].stage.redirect("<")
        stdin_fds = [
            self._open_redirect(stages[0].stage, "<", in_redirect.target)
            if in_redirect
            else os.dup(0)
        ]
        stdout_fds: list[int] = []
        for _ in stages[:-1]:
            r, w = os.pipe()
            stdout_fds.append(w)
            stdin_fds.append(r)
        if ledger_fd is None:  # the last stage writes where the run's output goes
            stdout_fds.append(target_fd)
            target_fd = -1
        else:  # ... or through the relay that keeps the run's copy of it
            r, w = os.pipe()
            stdout_fds.append(w)
            stages[-1].stdout_r = r
            self.relays.append(Relay(self.warn, stages[-1], target_fd, ledger_fd))
        self._target_fd = target_fd
        try:
            for i, sr in enumerate(stages):
                self._spawn(sr, stdin_fds[i], stdout_fds[i])
        finally:
            # the stderr pumps start once every stage has: Thread.start waits for the new
            # thread to run, which took 4-8 ms each while the stages' start-ups held both cores
            for t in self._stderr_threads:
                t.start()
        for relay in self.relays:
            relay.start()

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
        sr.status = status
        sr.final = True
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
            self._finalize(sr, status, cpu, rss_mb)

    def run(
        self, ledger_fd: int | None = None, on_started: Callable[[], None] | None = None
    ) -> int:
        """Run the pipeline to its end; `on_started` is called once every stage has started
        (the live table, whose thread must not exist while stages are forked)."""
        self.events.emit(
            "run_start",
            pid=os.getpid(),
            script=str(self.pipeline.script),
            args=redact_argv(self.script_args),
            resume=False,
            retries=0,
        )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        timer = None
        try:
            self._start_all(ledger_fd)
            if on_started is not None:
                on_started()
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
        if self._own_events:
            self.events.close()
        return status
