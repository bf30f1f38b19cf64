"""The checks behind `sage doctor`: each one says what it found and, when it fails, how to fix it.

A check is `Check(name, ok, detail, fix, kind)`; `kind` "model" failures make the exit code 69
(EX_UNAVAILABLE), any other failure 1. A "warn" check is shown but never fails the run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sage_cli.exitcodes import ExitCode

MIN_PYTHON = (3, 11)
#: distribution name -> module name, where they differ
IMPORT_NAMES = {"llama-cpp-python": "llama_cpp", "pyyaml": "yaml", "python-docx": "docx"}
#: what pyproject.toml declares, used when the installed metadata cannot be read
FALLBACK_REQUIREMENTS = [
    "typer",
    "rich",
    "orjson",
    "numpy",
    "annoy==1.17.3",
    "llama-cpp-python==0.3.36",
    "watchfiles",
    "gguf",
]
INSTALL_FIX = (
    "reinstall sage into this environment (`pip install sage-pipes`, or `make install` in a clone)"
)


@dataclass
class Check:
    name: str
    status: str  # "ok" | "FAIL" | "warn"
    detail: str
    fix: str = ""
    kind: str = "other"  # "model" failures exit 69

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def to_json(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def check_python() -> Check:
    v = sys.version_info
    version = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check(
            "python",
            "FAIL",
            version,
            "use Python 3.11 or newer: `make clean install PYTHON=python3.11`",
        )
    return Check("python", "ok", version)


def requirements() -> list[str]:
    try:
        reqs = importlib.metadata.requires("sage-pipes") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    core = [r for r in reqs if "extra ==" not in r]
    return core or FALLBACK_REQUIREMENTS


def check_dependency(requirement: str) -> Check:
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(==\s*([^;,\s]+))?", requirement)
    if not match:
        return Check(requirement, "warn", "cannot parse the requirement")
    dist = match.group(1)
    pinned = match.group(3)
    module = IMPORT_NAMES.get(dist.lower(), dist.lower().replace("-", "_"))
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Check(dist, "FAIL", "not installed", INSTALL_FIX)
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check(
            dist,
            "FAIL",
            f"{version} installed but `import {module}` fails: {type(exc).__name__}: {exc}",
            INSTALL_FIX,
        )
    if pinned and version != pinned:
        return Check(dist, "FAIL", f"{version} installed, {pinned} required", INSTALL_FIX)
    return Check(dist, "ok", version)


def check_llama_cpp() -> list[Check]:
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001
        return [Check("llama.cpp build", "FAIL", f"cannot import llama_cpp: {exc}", INSTALL_FIX)]
    try:
        info = llama_cpp.llama_print_system_info()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    except Exception as exc:  # noqa: BLE001
        return [
            Check("llama.cpp build", "FAIL", f"llama_print_system_info failed: {exc}", INSTALL_FIX)
        ]
    features = [m.group(1) for m in re.finditer(r"(\w+) = 1", text)]
    detail = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}; " + (
        ", ".join(features) or text.strip()
    )
    checks = [Check("llama.cpp build", "ok", detail)]
    if "AVX2" not in features and ("x86" in os.uname().machine or "amd64" in os.uname().machine):
        checks.append(
            Check(
                "cpu features",
                "warn",
                "no AVX2: models run several times slower",
                "rebuild with `CMAKE_ARGS=-DGGML_NATIVE=ON pip install --no-cache-dir "
                "--force-reinstall llama-cpp-python==0.3.36`",
            )
        )
    return checks


def check_models(model_dirs: list[Path], hash_cache: Path | None) -> list[Check]:
    from sage_cli.operators.models import MODELS, status

    checks = []
    for spec in MODELS.values():
        st = status(spec, model_dirs, hash_cache=hash_cache)
        if st.ok:
            size = f"{(st.size or 0) / 2**20:.1f} MiB"
            checks.append(
                Check(
                    f"model {spec.name}",
                    "ok",
                    f"{st.path} ({size}, sha256 {(st.sha256 or '')[:12]})",
                    kind="model",
                )
            )
        else:
            problem = str(st.problem)
            fix = "run `sage models install`"
            if "; run" in problem:
                problem, _, tail = problem.partition("; run")
                fix = "run" + tail
            checks.append(Check(f"model {spec.name}", "FAIL", problem, fix, kind="model"))
    return checks


def check_cache_dir(path: Path) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        return Check(
            "cache dir",
            "FAIL",
            f"{path}: {exc.strerror or exc}",
            "set SAGE_CACHE_DIR to a writable directory (or fix the permissions)",
        )
    return Check("cache dir", "ok", f"{path} (writable)")


def check_threads(default: int) -> Check:
    env = os.environ.get("SAGE_THREADS")
    where = f"SAGE_THREADS={env}" if env else "half the cores"
    return Check(
        "threads",
        "ok",
        f"{os.cpu_count()} cores; model stages default to {default} thread(s) ({where})",
    )


def run_checks() -> list[Check]:
    from sage_cli.resources import cache_dir, default_threads, hash_cache_file, model_dirs

    checks = [check_python()]
    checks.extend(check_dependency(r) for r in requirements())
    checks.extend(check_llama_cpp())
    cache = cache_dir()
    cache_check = check_cache_dir(cache)
    checks.extend(check_models(model_dirs(), hash_cache_file() if not cache_check.failed else None))
    checks.append(cache_check)
    checks.append(check_threads(default_threads()))
    return checks


def exit_code(checks: list[Check]) -> int:
    failed = [c for c in checks if c.failed]
    if not failed:
        return int(ExitCode.OK)
    if any(c.kind == "model" for c in failed):
        return int(ExitCode.UNAVAILABLE)
    return int(ExitCode.FAILURE)
