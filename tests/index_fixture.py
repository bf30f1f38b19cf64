"""A tiny real index (MiniLM embeddings) for tests that need one: built once per session,
copied into each test's directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

DOCS = [
    {"id": "cat", "text": "The cat sits on the mat.", "metadata": {"topic": "pets"}},
    {"id": "file", "text": "To open a file in Python, call the open() built-in function."},
    {"id": "stock", "text": "The stock market fell sharply today after the announcement."},
    {"id": "paris", "text": "Paris is the capital and largest city of France."},
    {"id": "list", "text": "Python lists are mutable sequences; append adds an item."},
    {"id": "rain", "text": "Heavy rain is expected across the north this weekend."},
]

_built: Path | None = None


def tiny_index(dest: str | Path) -> Path:
    """Copy the session's tiny MiniLM index to `dest` (building it on first use)."""
    global _built
    if _built is None or not (_built / "manifest.json").exists():
        from sage_cli.operators.index import IndexBuilder
        from sage_cli.resources import hash_cache_file, model_dirs
        from tests.conftest import run_tmp

        base = Path(tempfile.mkdtemp(prefix="index-", dir=run_tmp()))
        IndexBuilder(
            base / "idx", model_dirs=model_dirs(), threads=1, hash_cache=hash_cache_file()
        ).run([dict(d) for d in DOCS])
        _built = base / "idx"
    shutil.copytree(_built, dest)
    return Path(dest)
