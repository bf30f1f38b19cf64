"""Start `sage serve` (or any sage command that announces a URL) as a real subprocess on a free
loopback port and wait for it to say where it listens: no fixed sleeps."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import clean_env, sage_argv

LISTENING = re.compile(rb"listening on (http://127\.0\.0\.1:\d+)")


class Server:
    """A `sage serve` process: `url`, `stop()`, `stderr_text()`."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        timeout: float = 120,
        command: str = "serve",
    ):
        self.proc = subprocess.Popen(
            sage_argv(command, "--port", "0", *args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stderr = b""
        self.url = self._wait_for_url(timeout)

    def _wait_for_url(self, timeout: float) -> str:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.stderr += chunk
                found = LISTENING.search(self.stderr)
                if found:
                    return found.group(1).decode()
            elif self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"sage serve did not start: {self.stderr.decode(errors='replace')}")

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the exit; collect the rest of stderr."""
        _, err = self.proc.communicate(timeout=timeout)
        self.stderr += err or b""
        return self.proc.returncode

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(10)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return http(self.url + path, headers=headers)

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return http(self.url + path, body, headers)


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    """(status, body) of one request, also for 4xx/5xx answers."""
    req = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def serve_env(tmp: Path, **extra: str) -> dict[str, Any]:
    """A clean env with a private cache (answers are cached by content)."""
    return clean_env(SAGE_CACHE_DIR=str(tmp / "cache"), SAGE_THREADS="2", **extra)
