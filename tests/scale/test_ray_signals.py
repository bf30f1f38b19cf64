"""`sage run --engine ray` stops on SIGINT/SIGTERM even when its launcher ignores SIGINT
(`nohup`, `trap "" INT`, a background job): exit 130/143, and no process of the run (the
private local Ray it started included) is left behind (issue 17)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scale.test_ray import ray_env

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

SLOW = "import time\n\ndef f(r):\n    time.sleep(0.05)\n    return r\n"


def _left(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True)
    return [line for line in out.stdout.decode().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("sig", "status", "script"),
    [
        (signal.SIGINT, 130, "p.sh"),
        (signal.SIGTERM, 143, "p.sh"),
        (signal.SIGINT, 130, "two.sh"),  # bash runs it; its stages join the private Ray
    ],
)
def test_run_on_ray_stops_when_the_launcher_ignored_sigint(
    tmp_path: Path, sig, status, script
) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "in.ndjson").write_text("".join(f'{{"x": {i}}}\n' for i in range(5000)))
    (tmp_path / "p.sh").write_text("sage source in.ndjson | sage map --fn slow:f\n")
    (tmp_path / "two.sh").write_text("true\nsage source in.ndjson | sage map --fn slow:f\n")
    env = ray_env()
    env["PATH"] = str(BIN) + os.pathsep + env["PATH"]
    proc = subprocess.Popen(
        ["bash", "-c", 'trap "" INT; exec sage run --engine ray --quiet "$0"', script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = proc.stdout.readline()  # records flow: Ray and its actors are up
        assert first, proc.stderr.read().decode()
        proc.send_signal(sig)
        proc.stdout.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert code == status, err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while _left(proc.pid):  # the run's session: its Ray processes end with it
        assert time.monotonic() < deadline, _left(proc.pid)
        time.sleep(0.2)
