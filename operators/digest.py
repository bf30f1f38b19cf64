"""A file's sha256, remembered across runs, and atomic JSON writes: what the model registry
(models.py) and the model loaders (llm.py) both need, in a module neither imports the other
through (it breaks the llm.py <-> models.py cycle)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .base import ResourceUnavailable
from .gguf_check import FIX


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(
    path: str | os.PathLike[str], cache_file: str | os.PathLike[str] | None = None
) -> str:
    """The sha256 of a file, remembered in the JSON file `cache_file` (when given) under the
    file's real path, size and mtime, so a large model is hashed once, not on every run.
    A cache that cannot be read or written is ignored. A file that cannot be read (removed
    since it was located) is ResourceUnavailable (exit 69).
    """
    p = Path(path).resolve()
    try:
        return _sha256_file(p, cache_file)
    except OSError as exc:
        raise ResourceUnavailable(
            f"cannot read model file {path}: {exc.strerror or exc}; {FIX}"
        ) from None


def _sha256_file(p: Path, cache_file: str | os.PathLike[str] | None) -> str:
    st = p.stat()
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns]
    cache: dict[str, dict[str, object]] = {}
    if cache_file is not None:
        try:
            loaded = json.loads(Path(cache_file).read_text())
            if isinstance(loaded, dict):
                cache = loaded
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
            return str(entry["sha256"])
    digest = _hash(p)
    if cache_file is not None:
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:
            write_json_atomic(Path(cache_file), cache)
        except OSError:
            pass
    return digest


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to `path` through a temp file and a rename (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    from .convert import readable

    readable(tmp)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
