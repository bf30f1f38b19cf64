"""`sage run` for any script: bash runs the whole of it, `sage run` owns the session.

bash does what only bash does right (`if`, loops, functions, here-documents, `&&`, subshells,
background jobs, command substitution); `sage run` keeps what a supervisor is for:

- the processes: it is a child subreaper (PR_SET_CHILD_SUBREAPER), so everything the script
  starts stays its descendant, even what a subshell leaves behind; SIGINT and SIGTERM are
  passed to every descendant, `--timeout` stops them all wherever the script is (exit 124), a
  second signal or the grace period ends them with SIGKILL, and nothing outlives the run: what
  is still running when bash exits (a background job nobody waited for) is stopped, and said;
- the record: the run directory, run.json, events.ndjson, summary.json, the line at the end;
  every `sage` stage, wherever the script starts it, writes its trace into the run directory
  under a name it works out itself (sage_cli.run.registry: `<pipeline>.<position>-<command>`);
- the display: the live table reads those traces as stages appear; the script's stderr passes
  through and is kept in the run directory (`stderr`).

The exit status is bash's (`bash -o pipefail SCRIPT ARGS`), except 124 on --timeout and
130/143 when the run was interrupted or terminated.
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
from pathlib import Path
from typing import Any

from sage_cli.errors import UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.observability.redact import redact_argv
from sage_cli.run.directory import RunDirectory
from sage_cli.run.env import (
    RAY_ADDRESS,
    RAY_REPLICAS,
    RUN_BACKOFF,
    RUN_DIR,
    RUN_ID,
    RUN_LIFELINE,
    RUN_PID,
    RUN_RETRIES,
    TRACE_DIR,
    TRACE_IDS,
    TRACE_STAGE,
)
from sage_cli.run.lifeline import dies_with_parent, open_lifeline
from sage_cli.run.options import KILL_GRACE_SECONDS, TIMEOUT_STATUS, RunOptions
from sage_cli.run.output import Delivered, Tap, delivered, describe_stdout
from sage_cli.run.procs import descendants
from sage_cli.run.record import Run
from sage_cli.run.registry import read_registry

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: direct children only
        pass


class _Stage:
    """One registered stage as the live table sees it (the shape of supervisor.StageRun)."""

    class _Shown:
        is_sage = True

        def __init__(self, label: str) -> None:
            self.label = label

    def __init__(self, entry: dict[str, Any]) -> None:
        self.name = entry["name"]
        self.stage = self._Shown(" ".join(str(a) for a in entry.get("argv", []))[:60])
        self.pid = entry.get("pid")
        self.attempts = 1
        self.final = False
        self.status = None


class BashStages:
    """The stages the live table shows: whatever has registered so far."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.ended = False  # bash is gone: every stage shows how it ended

    @property
    def stages(self) -> list[_Stage]:
        out = [_Stage(e) for e in read_registry(self.run.stages_dir)]
        if self.ended:
            from sage_cli.run.directory import iter_events, stage_figures

            for st in out:
                events = iter_events(self.run.trace_path(st.name), ids=False, batches=False)
                st.final = True
                st.status = stage_figures(events)["own_status"]
        return out


def stage_records(run: RunDirectory) -> list[dict[str, Any]]:
    """run.json's `stages`, from the registry: one per sage stage that started."""
    out = []
    for entry in read_registry(run.stages_dir):
        out.append(
            {
                "name": entry["name"],
                "index": int(entry.get("position", 1)) - 1,
                "group": int(entry.get("pipeline", 0)),
                "label": " ".join(["sage", *map(str, entry.get("argv", []))]),
                "argv": ["sage", *entry.get("argv", [])],
                "model": False,
            }
        )
    return out


class BashSession:
    """bash running one script, and everything it starts, until the end."""

    def __init__(
        self,
        script: Path,
        args: list[str],
        opts: RunOptions,
        run: RunDirectory,
        extra_env: dict[str, str] | None = None,
        stdout_fd: int | None = None,
    ) -> None:
        self.extra_env = extra_env or {}
        self.stdout_fd = stdout_fd  # what bash writes to (the tap's pipe), else our stdout
        self.script = script
        self.args = args
        self.opts = opts
        self.run = run
        self.bash: subprocess.Popen[bytes] | None = None
        self.signalled: int | None = None
        self.timed_out = False
        self._sweeper: threading.Thread | None = None
        self.own: frozenset[int] = frozenset()
        self._ended = threading.Event()  # bash and everything it left are gone
        self._lifeline = -1  # the write end of the lifeline, held for the process's life
        self.replay_differs = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(TRACE_STAGE, None)  # every stage names itself
        env[RUN_ID] = self.run.id
        env[RUN_PID] = str(os.getpid())
        env.update(self.extra_env)
        # the script's `sage` is the one running it (as the parsed path's stages are), even
        # when `sage run` was started as `python -m sage_cli` or by its full path
        here = os.path.dirname(sys.executable)
        if os.path.exists(os.path.join(here, "sage")):
            env["PATH"] = here + os.pathsep + env.get("PATH", "")
        if self.opts.retries:  # every sage stage keeps its own worker (sage_cli.run.keeper)
            env[RUN_RETRIES] = str(self.opts.retries)
            env[RUN_BACKOFF] = f"{self.opts.backoff:g}"
        if self.opts.trace != "off":
            env[RUN_DIR] = str(self.run.path.resolve())
            env[TRACE_DIR] = str(self.run.stages_dir.resolve())
            if self.opts.trace == "batches":
                env[TRACE_IDS] = "0"
        return env

    def _signal_all(self, signo: int, skip: set[int] | None = None) -> None:
        for pid in descendants(os.getpid(), self.own):
            if skip is not None:
                if pid in skip:
                    continue
                skip.add(pid)
            try:
                os.kill(pid, signo)
            except (ProcessLookupError, PermissionError):
                pass

    def _stop(self, signo: int) -> None:
        """Pass `signo` to every process of the run, and to any the script starts after it
        (bash goes on to its next command when one exits 130 by itself), until bash ends;
        SIGKILL what is left after the grace period."""
        if self._sweeper is not None:
            return
        self._sweeper = threading.Thread(target=self._sweep, args=(signo,), daemon=True)
        self._sweeper.start()

    def _sweep(self, signo: int) -> None:
        signalled: set[int] = set()
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while not self._ended.is_set():
            if time.monotonic() >= deadline:
                self._signal_all(signal.SIGKILL)
            else:
                self._signal_all(signo, signalled)
            self._ended.wait(0.05)

    def _on_signal(self, signo: int, frame: Any) -> None:
        if self.signalled is None:
            self.signalled = signo
            self._stop(signo)
        else:  # a second Ctrl-C: now
            self._signal_all(signal.SIGKILL)

    def stop_replay(self) -> None:
        """--resume: the replay differs from what the run delivered; end the script."""
        if self.signalled is None:
            self.signalled = signal.SIGTERM
            self.replay_differs = True
            self._stop(signal.SIGTERM)

    def _on_timeout(self) -> None:
        if self.signalled is None:
            self.timed_out = True
            self.signalled = signal.SIGTERM
            _warn(f"timed out after {self.opts.timeout:g}s; stopping the script")
            self._stop(signal.SIGTERM)

    def _copy_stderr(self, fd: int) -> None:
        """The script's stderr: to ours as it comes, and into the run directory."""
        with open(self.run.path / "stderr", "ab") as kept:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                kept.write(data)
                kept.flush()
                try:
                    sys.stderr.buffer.write(data)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
        os.close(fd)

    def run_script(self) -> int:
        bash = shutil.which("bash")
        if bash is None:
            raise UsageError("bash is not on PATH: sage run runs scripts with bash")
        _become_subreaper()
        # what runs below us already is ours, not the script's (a private Ray's processes)
        self.own = frozenset(descendants(os.getpid()))
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        read_end, write_end = os.pipe()
        copier = threading.Thread(target=self._copy_stderr, args=(read_end,), daemon=True)
        timer = None
        # held until this process ends, however it ends (sage_cli.run.lifeline)
        line_fd, self._lifeline, line = open_lifeline()
        env = self._env()
        env[RUN_LIFELINE] = line
        try:
            argv, die_with_us = dies_with_parent(
                [bash, "-o", "pipefail", str(self.script), *self.args]
            )
            self.bash = subprocess.Popen(
                argv,
                env=env,
                stdout=self.stdout_fd,
                stderr=write_end,
                pass_fds=(line_fd,),
                preexec_fn=die_with_us,  # noqa: PLW1509 (None where setpriv is there)
                # its own process group: a Ctrl-C at the terminal reaches `sage run`, which
                # passes it on once to every process of the run
                process_group=0,
            )
            os.close(line_fd)
            if self.stdout_fd is not None:
                os.close(self.stdout_fd)  # bash and its children hold it now
                self.stdout_fd = None
            os.close(write_end)
            write_end = -1
            copier.start()
            if self.opts.timeout:
                timer = threading.Timer(self.opts.timeout, self._on_timeout)
                timer.daemon = True
                timer.start()
            status = self._wait_for_bash()
            left = descendants(os.getpid(), self.own)
            if left and self.signalled is None:
                _warn(f"stopping {len(left)} process(es) the script left running")
            if left:
                self._stop(signal.SIGTERM)
                self._reap_all()
        finally:
            self._ended.set()
            if write_end >= 0:
                os.close(write_end)
            if self.stdout_fd is not None:
                os.close(self.stdout_fd)
                self.stdout_fd = None
            if timer is not None:
                timer.cancel()
            for s, h in handlers.items():
                signal.signal(s, h)
        copier.join(timeout=5)
        if self.replay_differs:
            return int(ExitCode.FAILURE)
        if self.timed_out:
            return TIMEOUT_STATUS
        if self.signalled == signal.SIGINT:
            return int(ExitCode.INTERRUPTED)
        if self.signalled == signal.SIGTERM:
            return int(ExitCode.TERMINATED)
        return status

    def _wait_for_bash(self) -> int:
        """Reap whatever ends (orphans come to us, the subreaper) until bash does."""
        assert self.bash is not None
        while True:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except ChildProcessError:
                return self.bash.returncode if self.bash.returncode is not None else 1
            if pid == self.bash.pid:
                status = os.waitstatus_to_exitcode(wait_status)
                self.bash.returncode = status
                return status if status >= 0 else 128 - status

    def _reap_all(self, timeout: float = KILL_GRACE_SECONDS + 5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                if not descendants(os.getpid(), self.own):
                    return
                time.sleep(0.05)


def _set_aside(run: RunDirectory) -> None:
    """--resume: the earlier attempt's stage traces move to `stages.N`; the replay's start anew."""
    n = 1
    while (run.path / f"stages.{n}").exists():
        n += 1
    if run.stages_dir.exists():
        os.rename(run.stages_dir, run.path / f"stages.{n}")


def _stdout_for(
    run: RunDirectory, before: dict[str, Any] | None, skip: Delivered
) -> tuple[dict[str, Any], Tap | None]:
    """Where this run's stdout goes (run.json's `stdout`) and the tap bash writes through, if
    one is needed: to keep a copy (a pipe, a terminal), or to skip what a resumed run delivered."""
    now = describe_stdout(1, run.output_path.resolve())
    if before and before.get("kind") == "file" and now.get("kind") == "file":
        if (now["dev"], now["ino"]) == (before["dev"], before["ino"]):
            now = before  # the same file: what was delivered is counted from the same place
    elif before and before.get("kind") == "file" and now.get("kind") == "copy" and skip.size:
        _copy_region(before, skip, run.output_path)  # the copy starts with what was delivered
    copy_fd = None
    if now.get("kind") == "copy":
        copy_fd = os.open(run.output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if not (before and before.get("kind") in ("copy", "file")):
            os.ftruncate(copy_fd, 0)
    if copy_fd is None and not skip.size:
        return now, None
    read_fd, write_fd = os.pipe()
    tap = Tap(read_fd, 1, copy_fd, skip)
    tap.write_fd = write_fd
    return now, tap


def _copy_region(before: dict[str, Any], skip: Delivered, to: Path) -> None:
    with open(before["path"], "rb") as src, open(to, "wb") as dst:
        src.seek(int(before.get("offset", 0)))
        left = skip.size
        while left > 0:
            chunk = src.read(min(1 << 20, left))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"sage run: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def run_bash_script(
    script: Path,
    args: list[str],
    opts: RunOptions,
    run_dir: str | None,
    base: str,
    *,
    ray: bool = False,
    address: str | None = None,
    replicas: list[str] | None = None,
    resume: RunDirectory | None = None,
) -> int:
    """Run `script` under bash in a run directory and return its exit status. `ray`: every
    sage stage runs its batches on Ray actors (of the cluster at `address`, or of a private
    one started here for the run). `resume`: run it again in that run's directory, passing on
    only what the run had not delivered (sage_cli.run.output)."""
    from sage_cli.run.runner import stored_args

    ray_env: dict[str, str] = {}
    if ray:
        from sage_cli.execution.ray import start_local_cluster

        if address is None:
            address = start_local_cluster()
        ray_env[RAY_ADDRESS] = address
        if replicas:
            from sage_cli.execution.plan import parse_replicas

            parse_replicas(replicas)  # a malformed one is a usage error before anything runs
            ray_env[RAY_REPLICAS] = ",".join(replicas)

    skip = Delivered()
    if resume is not None:
        run = resume
        earlier = run.read_json("run.json")
        skip = delivered(earlier.get("stdout") or {})
        _set_aside(run)
    else:
        run = RunDirectory.create(run_dir, base)
        earlier = {}
    run.stages_dir.mkdir(parents=True, exist_ok=True)
    stdout, tap = _stdout_for(run, earlier.get("stdout"), skip)
    record = Run(
        run,
        script=str(script),
        **stored_args(args),
        cwd=os.getcwd(),
        mode="bash",
        engine="ray" if ray else "local",
        address=address,
        started=earlier.get("started") or time.time(),
        retries=opts.retries,
        stages=[],
        resumed=resume is not None,
        stdout=stdout,
    )
    record.emit(
        "run_start",
        pid=os.getpid(),
        script=str(script),
        args=redact_argv(args),
        resume=resume is not None,
        skipped_lines=skip.lines,
        retries=opts.retries,
        mode="bash",
    )
    session = BashSession(
        script, args, opts, run, ray_env, stdout_fd=tap.write_fd if tap is not None else None
    )
    if tap is not None:
        tap.on_mismatch = session.stop_replay
        tap.start()
    dashboard = None
    shown = BashStages(run)
    if not opts.quiet:
        from sage_cli.observability.dashboard import start_dashboard

        dashboard = start_dashboard(run, shown, progress=opts.progress)
    try:
        status = session.run_script()
        if tap is not None:
            tap.join()
            if tap.copy_fd is not None:
                os.close(tap.copy_fd)
        if tap is not None and tap.mismatch:
            # the tap may find it only after the script has ended (bash done, the tap behind
            # it on a busy machine): the run fails all the same
            status = int(ExitCode.FAILURE)
            _warn(
                f"error: the replay's first {skip.lines} line(s) differ from what run {run.id} "
                "delivered: its output is not a function of its input (sampling with "
                "--no-cache, the time, a changed input file), so --resume cannot be exact; "
                "nothing more was written. Run the script again from the start"
            )
    finally:
        shown.ended = True
        if dashboard is not None:
            dashboard.stop()
        if ray:
            import ray as ray_module

            ray_module.shutdown()
    stages = stage_records(run)
    record.update(stages=stages)
    record.emit("run_stop", status=status, stages={s["name"]: None for s in stages})
    record.finish(status, quiet=opts.quiet)
    return status
