"""The suite passes whatever the launcher's signal dispositions (a background job, nohup, a CI
runner that starts jobs that way): the signal tests run here under a parent that ignores SIGINT
and SIGTERM, which its children inherit unless the suite resets them (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow

SIGNAL_TESTS = [
    "tests/streaming/test_pipes.py::test_signal_while_waiting_for_input_flushes_and_exits",
    "tests/streaming/test_pipes.py::test_signal_mid_stream_leaves_only_whole_records",
    "tests/streaming/test_pipes.py::test_signal_during_a_slow_operator_flushes_complete_records",
    "tests/commands/test_sink.py::test_sink_interrupted_keeps_the_old_file",
    "tests/commands/test_source.py::test_source_watch_emits_existing_new_and_changed_files_once",
    "tests/streaming/test_supervisor.py::test_sigint_gives_130_and_leaves_no_process",
]


def _ignore_sigint_and_sigterm() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_signal_tests_pass_when_the_launcher_ignores_sigint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SIGNAL_TESTS],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        preexec_fn=_ignore_sigint_and_sigterm,
        timeout=600,
    )
    tail = result.stdout.decode(errors="replace")[-3000:]
    assert result.returncode == 0, tail
    assert re.search(rf"\b{len(SIGNAL_TESTS) + 2} passed", tail), tail  # 2 tests run twice


def test_sage_run_started_ignoring_sigint_still_stops_its_stages(tmp_path) -> None:
    """`sage run` from a background job: its stages start with default dispositions, so the
    SIGINT it forwards ends them (130, no process left behind)."""
    (tmp_path / "p.sh").write_text("sage source -R | sage map 'r'\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_cli", "run", "p.sh"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_ignore_sigint_and_sigterm,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"first\n")
    proc.stdin.flush()
    assert b'"text":"first"' in proc.stdout.readline()  # both stages are up and streaming
    pids = [
        int(p)
        for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).stdout.split()
    ]
    assert pids
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
