"""Helpers for the fault tests: a small real file system, records with vectors, tree digests.

`small_fs` mounts a tmpfs of a few hundred KB in a temporary directory (we run as root here and
in CI), so writes past its size fail with a real ENOSPC from the kernel. Where mounting is not
permitted it falls back to RLIMIT_FSIZE in the child (a real EFBIG from the kernel on the write
that crosses the limit): the same code paths, a different errno and exit code (1, not 75).
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import clean_env, sage_argv


@dataclass
class SmallFs:
    """A directory where big writes fail: `run` runs sage with the limit in force."""

    root: Path
    kind: str  # "tmpfs" (ENOSPC, exit 75) or "rlimit" (EFBIG, exit 1)
    limit: int  # bytes

    @property
    def code(self) -> int:
        return 75 if self.kind == "tmpfs" else 1

    @property
    def reason(self) -> str:
        return os.strerror(28) if self.kind == "tmpfs" else os.strerror(27)

    def preexec(self) -> Callable[[], None] | None:
        if self.kind == "tmpfs":
            return None
        limit = self.limit

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return apply

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60) -> Any:
        return subprocess.run(
            sage_argv(*args),
            input=input,
            capture_output=True,
            env=clean_env(),
            timeout=timeout,
            preexec_fn=self.preexec(),
        )

    def fill(self, leave: int) -> Path:
        """Fill the file system with a filler file until about `leave` bytes are free."""
        filler = self.root / "filler"
        if self.kind == "tmpfs":
            free = os.statvfs(self.root).f_bavail * os.statvfs(self.root).f_frsize
            with filler.open("wb") as fh:
                fh.write(b"\0" * max(0, free - leave))
        else:
            filler.write_bytes(b"")  # RLIMIT_FSIZE is per file: nothing to fill
        return filler


def _try_mount(path: Path, size: int) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A 1 MiB file system (tmpfs) or, without mount rights, a 1 MiB per-file limit."""
    root = tmp_path / "small"
    root.mkdir()
    size = 1024 * 1024
    if _try_mount(root, size):
        try:
            yield SmallFs(root, "tmpfs", size)
        finally:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
    else:
        yield SmallFs(root, "rlimit", size)


def vector_records(n: int, dim: int = 32, seed: int = 0, text: str = "doc") -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"d{i}",
            "text": f"{text} {i} " * 4,
            "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(dim)],
        }
        for i in range(n)
    ]


def write_ndjson(path: Path, records: list[dict]) -> Path:
    with path.open("wb") as fh:
        for record in records:
            fh.write(orjson.dumps(record) + b"\n")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """name -> sha256 of every file under `path` (an index directory)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text, text
    assert text.count("\n") == 1 and text.endswith("\n"), f"not one line: {text!r}"
    return text
