"""`sage run` killed outright (SIGKILL: what the OOM killer sends) takes the script with it:
bash stops where it is and every sage stage of the script ends, wherever the script started it
(sage_cli.run.lifeline), so nothing goes on writing output nobody supervises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sage_cli.run.directory import read_events
from tests.conftest import clean_env, sage_argv
from tests.readiness import wait_gone

SCRIPT = """
for part in 1 2 3; do
  sage source in.ndjson | sage map "(__import__('time').sleep(0.05) if r['n'] % 50 == 0 else 0) or r" \\
    | sage map r >> out.ndjson
  echo "part $part" >> parts.txt
done
"""


def stage_pids(cwd: Path, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {
            path.name.split(".trace")[0]: e["pid"]
            for path in (cwd / ".sage" / "runs").glob("*/stages/*.trace.ndjson")
            for e in read_events(path)
            if e["ev"] == "start"
        }
        if len(pids) == 3:
            return pids
        time.sleep(0.02)
    raise AssertionError("the stages did not start")


def test_sigkill_of_sage_run_ends_bash_and_every_stage(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(5000)))
    (tmp_path / "loop.sh").write_text(SCRIPT)
    for retries in ("0", "2"):  # stages as they are, and stages that are keepers
        proc = subprocess.Popen(
            sage_argv("run", "-q", "--retries", retries, "loop.sh"),
            cwd=tmp_path,
            env=clean_env(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        pids = stage_pids(tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # each part takes 5 s; the stages end long before they could have finished it
        wait_gone(pids.values(), "every stage to end with sage run", timeout=3)
        assert (tmp_path / "out.ndjson").read_bytes().count(b"\n") < 5000
        # bash did not go on with the loop: no part was finished, none started after the kill
        assert not (tmp_path / "parts.txt").exists()
        time.sleep(0.5)  # anything still alive would start the next part's stages now
        assert len(list((tmp_path / ".sage" / "runs").glob("*/stages/*.trace.ndjson"))) == 3
        subprocess.run(["rm", "-rf", str(tmp_path / ".sage"), str(tmp_path / "out.ndjson")])
