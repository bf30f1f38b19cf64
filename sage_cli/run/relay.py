"""The relay of a parsed pipeline's last stage: its output to the run's stdout and, when stdout
is a pipe or a terminal, to the run directory's copy (`output.ndjson`, what `--resume` reads;
sage_cli.run.output). Every other pipe between stages is direct."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from sage_cli.run.output import RunStdout
from sage_cli.run.stage import StageRun

READ_SIZE = 64 * 1024


class Relay(threading.Thread):
    """Copies the last stage's output to `target_fd` and `ledger_fd`, counting records."""

    def __init__(
        self,
        warn: Callable[[str], None],
        up: StageRun,
        target_fd: int,
        ledger_fd: int | None = None,
    ) -> None:
        super().__init__(name=f"relay-{up.name}", daemon=True)
        self.warn = warn
        self.up = up
        self.target_fd = target_fd
        self.ledger_fd = ledger_fd
        self.records = 0

    def run(self) -> None:
        rfd = self.up.stdout_r
        assert rfd is not None
        out = RunStdout(self.target_fd, self.ledger_fd)
        try:
            while True:
                chunk = os.read(rfd, READ_SIZE)
                self.records += chunk.count(b"\n")
                try:
                    out.write(chunk, last=not chunk)
                except BrokenPipeError:
                    return  # our stdout was closed (`| head`): the stage gets EPIPE and ends
                except OSError as exc:
                    self.warn(f"writing the output failed: {exc.strerror or exc}")
                    return
                if not chunk:
                    break
        except Exception as exc:  # noqa: BLE001 - a relay must never die silently
            self.warn(f"relay after {self.up.name} failed: {type(exc).__name__}: {exc}")
        finally:
            os.close(rfd)
