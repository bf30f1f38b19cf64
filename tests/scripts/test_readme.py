"""Every example in the README's tour runs as written (in a copy of scripts/examples/)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

TOUR = re.compile(r"<!-- tour.*?-->(.*?)<!-- /tour -->", re.S)
BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def tour_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = TOUR.search(readme)
    assert match, "README.md lost its <!-- tour --> ... <!-- /tour --> markers"
    return BLOCK.findall(match.group(1))


def test_the_tour_has_examples_for_every_area():
    text = "\n".join(tour_blocks())
    for command in (
        "source",
        "map",
        "window",
        "join",
        "chunk",
        "embed",
        "retrieve",
        "generate",
        "eval",
        "models",
        "run",
        "trace",
        "--workers",
    ):
        assert command in text, f"the README tour has no example of {command}"


@pytest.mark.model
@pytest.mark.slow
def test_every_tour_example_runs(tmp_path: Path) -> None:
    work = tmp_path / "examples"
    shutil.copytree(ROOT / "scripts" / "examples", work)
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        SAGE_CACHE_DIR=str(tmp_path / "cache"),
    )
    for block in tour_blocks():
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=600,
        )
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 0, f"README example failed:\n{block}\n--- stderr:\n{stderr}"
        assert "Traceback" not in stderr, block
        assert result.stdout.strip(), f"README example printed nothing:\n{block}"


def test_python_examples_run_and_print_what_the_readme_says(capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README lost its Python example"
    for block in blocks:
        code = [line for line in block.splitlines() if not line.startswith("# ")]
        expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
        *body, last = [line for line in code if line.strip()]
        namespace: dict = {}
        exec("\n".join(body), namespace)  # noqa: S102 - our own README
        assert [repr(eval(last, namespace))] == expected  # noqa: S307
