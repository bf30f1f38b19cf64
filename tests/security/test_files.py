"""What sage writes to disk: modes follow the umask (never world-writable by sage's choice),
temporary files are made safely, nothing listens on the network but `sage serve`.

A cron job's umask (often 077 for jobs that handle private data) must hold for every file sage
creates: the run directory (traces, stderr, output, dead letters), an index, the caches and a
sink's output. A scan of the source checks that temporary files come from mkstemp/mkdtemp (or
NamedTemporaryFile/TemporaryDirectory, which use them) and that no code but `sage serve`'s opens
a server socket.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env, ndjson
from tests.security.test_no_unpickling import _name, python_files, rel

BIN = str(Path(sys.executable).parent)

SCRIPT = """#!/usr/bin/env bash
sage source docs.ndjson | sage embed | sage index build idx
sage source --on-error skip --errors dead.ndjson docs.ndjson bad.ndjson | sage sink --to out.ndjson
"""


def run_everything(tmp_path: Path, umask: int, tiny_model_dir: Path) -> list[Path]:
    """A two-pipeline `sage run` (embed with its cache, index build, sink --to, dead letters)
    under `umask`; returns every path it created."""
    (tmp_path / "docs.ndjson").write_bytes(
        ndjson([{"id": "a", "text": "the cat"}, {"id": "b", "text": "the dog"}])
    )
    (tmp_path / "bad.ndjson").write_bytes(b"not json\n")
    env = clean_env(SAGE_MODEL_DIR=str(tiny_model_dir), SAGE_CACHE_DIR=str(tmp_path / "cache"))
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    script = tmp_path / "p.sh"
    script.write_text(SCRIPT)
    before = set(tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "sage_cli", "run", "--quiet", str(script)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        umask=umask,
    )
    assert result.returncode == 0, result.stderr
    created = sorted(set(tmp_path.rglob("*")) - before)
    names = {p.name for p in created}
    assert {"out.ndjson", "dead.ndjson", "manifest.json", "embed.sqlite", "events.ndjson"} <= names
    return created


def test_nothing_is_world_writable_under_the_usual_umask(tmp_path, tiny_model_dir):
    created = run_everything(tmp_path, 0o022, tiny_model_dir)
    loose = [rel_mode(p) for p in created if p.lstat().st_mode & stat.S_IWOTH]
    assert loose == []
    index_dir = tmp_path / "idx"
    assert stat.S_IMODE(index_dir.stat().st_mode) == 0o755


def test_a_private_umask_is_respected_everywhere(tmp_path, tiny_model_dir):
    """Under umask 077 nothing sage creates is readable by group or others (the index
    directory used to be chmod'ed to 0755 whatever the umask)."""
    created = run_everything(tmp_path, 0o077, tiny_model_dir)
    loose = [rel_mode(p) for p in created if p.lstat().st_mode & 0o077 and not p.is_symlink()]
    assert loose == []


def rel_mode(path: Path) -> str:
    return f"{path} {stat.filemode(path.lstat().st_mode)}"


def test_temporary_files_are_made_safely():
    """No tempfile.mktemp (a race: the name can be taken before it is opened) and no fixed
    paths under /tmp; every temporary file comes from mkstemp/mkdtemp or the wrappers that
    use them (NamedTemporaryFile, TemporaryDirectory)."""
    problems = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func).endswith("mktemp"):
                problems.append(f"{rel(path)}:{node.lineno}: mktemp")
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith(("/tmp/", "/var/tmp/", "/dev/shm/"))
            ):
                problems.append(f"{rel(path)}:{node.lineno}: fixed temp path {node.value}")
    assert problems == []


#: the one module that listens: `sage serve` (loopback by default; any other address needs an
#: API key, checked on every request: tests/serve/test_serve.py)
LISTENER = "sage_cli/serve/app.py"


def test_only_sage_serve_opens_a_server_socket():
    """No HTTP server or listening socket in sage but `sage serve`'s (the live view of `sage
    run` is a table on stderr). Ray, with --engine ray, listens too: see docs/security.md."""
    problems = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            called = _name(node.func) if isinstance(node, ast.Call) else ""
            if called.endswith((".bind", ".listen", "serve_forever", "HTTPServer", "uvicorn.run")):
                if rel(path) != LISTENER:
                    problems.append(f"{rel(path)}:{node.lineno}: {called}")
    assert problems == []
    # every address in the code is loopback; 0.0.0.0 only in `sage serve --help`, with a key
    for path in python_files():
        if "0.0.0.0" in path.read_text():
            assert rel(path) == "commands/serve.py", rel(path)
    assert 'host: str = "127.0.0.1"' in (ROOT / LISTENER).read_text()


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_sink_keeps_the_mode_of_the_file_it_replaces(tmp_path, mode):
    """sink --to writes a temp file (mkstemp, 0600) and renames it over the old file: the old
    file's mode survives, so a private output stays private."""
    out = tmp_path / "out.ndjson"
    out.write_text("old\n")
    os.chmod(out, mode)
    result = subprocess.run(
        [sys.executable, "-m", "sage_cli", "sink", "--to", str(out)],
        input=ndjson([{"id": 1}]),
        capture_output=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode and out.read_bytes() == b'{"id":1}\n'
