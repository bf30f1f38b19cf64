"""sage run's quick reading of its command line (sage_cli.run.argv): where it answers, it gives
what the typer command would; where it cannot, it steps aside; and a run started so loads no
typer."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from commands.run import app
from sage_cli.run.argv import FLAGS, quick_options
from sage_cli.run.launch import launch

COMMAND = typer.main.get_command(app)
DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(launch).parameters.items()
    if p.default is not inspect.Parameter.empty
}

READ_QUICKLY = [
    ["x.sh"],
    ["x.sh", "a", "-q", "--retries", "2"],  # after SCRIPT: the script's own arguments
    ["-q", "x.sh"],
    ["--quiet", "--progress", "--lock", "x.sh"],
    ["--retries", "3", "--backoff", "0.25", "x.sh", "in/"],
    ["--retries=0", "--backoff=2", "--timeout=600", "x.sh"],
    ["--timeout", ".5", "--run-dir", "runs/a", "x.sh"],
    ["--run-dir=runs/b", "--trace", "off", "x.sh"],
    ["--trace", "batches", "--trace", "full", "x.sh"],  # the last one counts
    ["--trace", "sideways", "x.sh"],  # launch() refuses it, whoever read it
    ["--retries", "007", "x.sh"],
    ["--", "x.sh", "--help"],
    ["-q", "--", "-odd-name.sh"],
    ["-", "a"],
]

LEFT_TO_TYPER = [
    [],
    ["-q"],
    ["--help"],
    ["-h"],
    ["--check", "x.sh"],
    ["--engine", "ray", "x.sh"],
    ["--resume", "latest"],
    ["--watch", "x.sh"],
    ["--print-script", "x.yaml"],
    ["--replicas", "embed=2", "x.sh"],
    ["--retries", "-1", "x.sh"],
    ["--retries", "two", "x.sh"],
    ["--retries", "1.5", "x.sh"],
    ["--backoff", "1e3", "x.sh"],
    ["--timeout", "nan", "x.sh"],
    ["--run-dir"],
    ["--run-dir", "-q", "x.sh"],
    ["--run-dir=", "x.sh"],
    ["--lock=yes", "x.sh"],
    ["-qq", "x.sh"],
    ["--unknown", "x.sh"],
    ["--"],
]


def typer_reading(argv: list[str]) -> dict[str, Any]:
    """What the typer command hands its function for `sage run ARGV`, as launch() keywords."""
    ctx = COMMAND.make_context("run", list(argv))
    params = dict(ctx.params)
    params["args"] = list(params["args"] or [])
    params["replicas"] = list(params["replicas"] or []) or None
    return params


@pytest.mark.parametrize("argv", READ_QUICKLY, ids=" ".join)
def test_the_quick_reading_is_the_typer_reading(argv: list[str]) -> None:
    quick = quick_options(argv)
    assert quick is not None, "this command line should start without typer"
    assert {**DEFAULTS, **quick} == typer_reading(argv)


@pytest.mark.parametrize("argv", LEFT_TO_TYPER, ids=lambda a: " ".join(a) or "(none)")
def test_what_it_cannot_read_goes_to_typer(argv: list[str]) -> None:
    assert quick_options(argv) is None


def test_its_flags_and_defaults_are_the_typer_commands() -> None:
    """A flag renamed or a default changed in commands/run.py cannot leave this reading
    behind."""
    params = {p.name: p for p in COMMAND.params}
    for flag, (key, kind) in FLAGS.items():
        assert key in params and flag in params[key].opts, flag
        assert params[key].is_flag == (kind == "flag"), flag
    for name, param in params.items():
        default = param.default if param.default != () else None
        assert DEFAULTS.get(name) == default, name
    assert set(params) == set(DEFAULTS) | {"script"}


def test_a_run_started_so_loads_no_typer(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("echo '{\"a\": 1}'\n")
    probe = (
        "import sys\n"
        "from sage_cli.app import main\n"
        f"code = main(['run', '-q', '--run-dir', {str(tmp_path / 'run')!r}, {str(script)!r}])\n"
        "print(code, 'typer' in sys.modules, 'click' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines()[-1] == "0 False False"
    assert (tmp_path / "run" / "summary.json").is_file()


#: a process that writes, then ends through app._exit_now; {setup} runs first
EXITING = """
import sys
from sage_cli.app import _exit_now
{setup}
sys.stdout.write("o" * 200_000)
sys.stderr.write("e" * 10_000)
_exit_now(3)
print("returned", flush=True)
"""


@pytest.mark.parametrize(
    ("setup", "ends_there"),
    [
        ("", True),
        ("import atexit; atexit.register(lambda: print('atexit ran'))", False),
        (
            "import threading, time; threading.Thread(target=time.sleep, args=(0.3,)).start()",
            False,
        ),
    ],
    ids=["nothing-left", "atexit-callback", "thread-running"],
)
def test_sage_run_ends_at_once_only_when_nothing_is_left(setup: str, ends_there: bool) -> None:
    """sage run's quick path skips the interpreter's teardown (os._exit) with its output
    flushed, and only when no thread and no atexit callback is left to finish."""
    done = subprocess.run(
        [sys.executable, "-c", EXITING.format(setup=setup)], capture_output=True, timeout=60
    )
    assert done.stderr == b"e" * 10_000
    if ends_there:
        assert done.returncode == 3
        assert done.stdout == b"o" * 200_000
    else:  # it returned: Python's own exit ran what was left
        assert done.returncode == 0
        assert done.stdout.startswith(b"o" * 200_000 + b"returned\n")
        if "atexit" in setup:
            assert done.stdout.endswith(b"atexit ran\n")


def test_a_sage_run_process_exits_with_the_scripts_status_and_all_its_output(
    tmp_path: Path,
) -> None:
    script = tmp_path / "s.sh"
    script.write_text("if true; then seq 1 100000; exit 7; fi\n")
    done = subprocess.run(
        [sys.executable, "-m", "sage_cli", "run", "--run-dir", str(tmp_path / "r"), str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 7
    assert done.stdout.split() == [str(i) for i in range(1, 100_001)]
    assert "sage run" in done.stderr  # its own summary line, flushed before the end


def test_a_script_named_dash_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """`sage run -` cannot read its script from stdin: stdin is the script's own input."""
    done = subprocess.run(
        [sys.executable, "-m", "sage_cli", "run", "-q", "-"],
        input="sage head 1\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("sage run: error: -: sage run reads its script from a file")
    assert done.stderr.count("\n") == 1
