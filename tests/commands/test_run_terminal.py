"""`sage run` on a real terminal (a pty for stdout and stderr): the live table never overwrites
or splits the run's records, which the stages write to the same screen."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import clean_env, sage_argv

BIN = str(Path(sys.executable).parent)

#: 40 records over about 2 seconds: long enough for a live table to redraw several times
PRODUCER = """
import json, time
for i in range(1, 41):
    print(json.dumps({"id": i, "text": f"record number {i}"}), flush=True)
    time.sleep(0.05)
"""
SCRIPT = "python3 producer.py | sage map 'r | {\"seen\": True}'\n"


def _on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    main, side = pty.openpty()
    env = clean_env(TERM="xterm-256color", COLUMNS="120", LINES="40")
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=side, stderr=side
    )
    os.close(side)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_records_on_the_terminal_are_never_overwritten_by_the_live_table(tmp_path):
    (tmp_path / "producer.py").write_text(PRODUCER)
    (tmp_path / "p.sh").write_text(SCRIPT)
    status, screen = _on_a_terminal(sage_argv("run", "p.sh"), tmp_path)
    assert status == 0, screen
    records = [f'{{"id":{i},"text":"record number {i}","seen":true}}' for i in range(1, 41)]
    lines = screen.replace("\r\n", "\n").split("\n")
    # every record is a whole line of its own, in order
    assert [line for line in lines if line.startswith('{"id"')] == records, screen
    # nothing drew on the screen (cursor moves, colours, the table) before the last record
    last = screen.index(records[-1])
    assert "\x1b" not in screen[:last], repr(screen[:last][-400:])
    # the table comes once, after the records
    assert "sage run" in screen[last:] and "map" in screen[last:]
