"""The keeper (SAGE_RUN_RETRIES=N on a stage): real processes, real kill -9 of the worker, every
record exactly once whatever the ids look like (sage_cli.run.keeper)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from sage_cli.run.keeper import _Input
from tests.streaming.keepers import workers_under

SAGE = [sys.executable, "-m", "sage_cli"]

#: writes N records in paced parts, with json.dumps spacing (`{"id": "r0", ...}`)
PRODUCER = """
import json, sys, time
n, parts = int(sys.argv[1]), int(sys.argv[2])
step = n // parts
for p in range(parts):
    sys.stdout.write("".join(json.dumps({"id": f"r{i}", "n": i}) + "\\n"
                             for i in range(p * step, (p + 1) * step)))
    sys.stdout.flush()
    time.sleep(0.03)
"""


def keeper_env(tmp_path: Path, retries: int = 5) -> dict[str, str]:
    env = dict(os.environ, SAGE_RUN_RETRIES=str(retries), SAGE_RUN_BACKOFF="0.05")
    env["SAGE_CACHE_DIR"] = str(tmp_path / "cache")
    env.pop("SAGE_RUN_WORKER", None)
    return env


def worker_of(pid: int, old: int | None = None, timeout: float = 30.0) -> int:
    """The keeper's worker child (a new one when `old` is given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            except OSError:
                continue
            kids += [int(k) for k in text.split()]
        kids = [k for k in kids if k != old]
        if kids:
            return kids[0]
        time.sleep(0.01)
    raise AssertionError("no worker started")


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def run_with_kills(
    tmp_path: Path,
    argv: list[str],
    n: int,
    kills: int,
    stdin_file: Path | None = None,
    retries: int = 5,
    source: str = PRODUCER,
) -> tuple[int, list[dict], str]:
    """Run `sage argv` as a keeper over n records (paced through a pipe, or a file), SIGKILL
    its worker `kills` times as output grows; return (exit, records out, stderr)."""
    out = tmp_path / "out.ndjson"
    err = tmp_path / "err.txt"
    producer = None
    stdin: IO[bytes]
    if stdin_file is None:
        producer = subprocess.Popen(
            [sys.executable, "-c", source, str(n), "100"], stdout=subprocess.PIPE
        )
        assert producer.stdout is not None
        stdin = producer.stdout
    else:
        stdin = stdin_file.open("rb")
    with out.open("wb") as fo, err.open("wb") as fe:
        keeper = subprocess.Popen(
            SAGE + argv, stdin=stdin, stdout=fo, stderr=fe, env=keeper_env(tmp_path, retries)
        )
    stdin.close()
    worker = None
    for k in range(kills):
        worker = worker_of(keeper.pid, worker)
        goal = lines_in(out) + 1 + k * 10
        deadline = time.monotonic() + 30
        while lines_in(out) < goal and keeper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if keeper.poll() is not None:
            break
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
    code = keeper.wait(timeout=120)
    if producer is not None:
        producer.wait(timeout=30)
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    return code, records, err.read_text()


def test_map_changing_the_id_under_kills_gives_every_record_once(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path, ["map", "{'id': 'x-' + r['id'], 'n': r['n']}"], 30_000, kills=3
    )
    assert code == 0, err
    assert [r["n"] for r in records] == list(range(30_000))
    assert records[5]["id"] == "x-r5"
    assert err.count("restart") >= 1  # the kills landed while it ran


#: the same records, written in raw pieces of 64 KiB that cut lines anywhere (as `sage source`
#: and any block writer do through a pipe)
RAGGED_PRODUCER = """
import json, sys, time
n = int(sys.argv[1])
data = "".join(json.dumps({"id": f"r{i}", "n": i}) + "\\n" for i in range(n)).encode()
for at in range(0, len(data), 65536):
    sys.stdout.buffer.write(data[at : at + 65536])
    sys.stdout.flush()
"""


def test_input_cut_mid_line_is_restarted_at_a_line_start(tmp_path: Path) -> None:
    # a restart must feed the new worker from a line start (one fed it mid-line, exit 65, when
    # a commit ended a kept chunk's last line but not the chunk: the property test below)
    code, records, err = run_with_kills(
        tmp_path,
        [
            "map",
            "(__import__('time').sleep(0.01) if r['n'] % 500 == 0 else 0) or r | {'m': r['n']}",
        ],
        30_000,
        kills=4,
        source=RAGGED_PRODUCER,
    )
    assert code == 0, err
    assert [r["m"] for r in records] == list(range(30_000))
    assert err.count("restart") >= 2


def test_the_kept_input_restarts_after_any_committed_line_however_it_was_read(
    tmp_path: Path,
) -> None:
    """_Input under every chunking: after `commit(L)`, `start_of(L)` is where line L+1 starts."""
    rng = random.Random(7)
    for _ in range(3000):
        parts = [b"x" * rng.randint(0, 12) for _ in range(rng.randint(0, 20))]
        data = b"\n".join(parts) + (b"\n" if rng.random() < 0.7 else b"")
        inp = _Input(memory=rng.choice([8, 1 << 20]), spill_dir=str(tmp_path))
        if rng.random() < 0.5:
            inp.keep_everything()  # a stateful worker's keeper: past `memory`, chunks spill
        for at in range(0, len(data), step := rng.randint(1, 9)):
            chunk = data[at : at + step]
            inp._keep(chunk, chunk.count(b"\n"))
            inp.newlines += chunk.count(b"\n")
        inp.eof = rng.random() < 0.5
        lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
        lines = lines if data else []
        committed = 0
        for _ in range(4):
            committed = rng.randint(committed, len(lines))
            inp.commit(committed)
            index, offset = inp.start_of(committed)
            kept = b"".join(inp.data(i) for i in range(index - inp.first, len(inp.chunks)))
            left = lines[committed:]
            want = b"\n".join(left) + (b"\n" if left and data.endswith(b"\n") else b"")
            assert kept[offset:] == want, (data, committed)


def test_flatmap_outputs_sharing_their_input_id_under_kills(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path,
        ["flatmap", "[{'id': r['id'], 'k': k} for k in range(3)]"],
        20_000,
        kills=3,
    )
    assert code == 0, err
    assert len(records) == 60_000
    assert "restart" in err
    assert [(r["id"], r["k"]) for r in records] == [
        (f"r{i}", k) for i in range(20_000) for k in range(3)
    ]


def test_stdin_a_file_with_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    rows = [json.dumps({"id": f"r{i}", "n": i}) for i in range(200_000)]
    rows[1000] = ""  # blank lines count as lines, as the Driver's reader numbers them
    rows[150_000] = ""
    src.write_text("\n".join(rows))  # the last line has no newline
    code, records, err = run_with_kills(
        tmp_path, ["map", "{'n': r['n'] * 2}"], 0, kills=3, stdin_file=src
    )
    assert code == 0, err
    assert "restart" in err
    want = [2 * i for i in range(200_000) if i not in (1000, 150_000)]
    assert [r["n"] for r in records] == want


#: like PRODUCER, with a line that is not JSON (`oops N`) at every N = 5 mod 97
WITH_BAD_LINES = """
import json, sys, time
n, parts = int(sys.argv[1]), int(sys.argv[2])
step = n // parts
for p in range(parts):
    sys.stdout.write("".join((f"oops {i}" if i % 97 == 5 else json.dumps({"id": f"r{i}", "n": i}))
                             + "\\n" for i in range(p * step, (p + 1) * step)))
    sys.stdout.flush()
    time.sleep(0.03)
"""


def bad_numbers(n: int) -> list[int]:
    return [i for i in range(n) if i % 97 == 5]


def test_errors_of_a_restarted_worker_name_their_input_lines(tmp_path: Path) -> None:
    dead = tmp_path / "dead.ndjson"
    code, records, err = run_with_kills(
        tmp_path,
        ["map", "--on-error", "emit", "--errors", str(dead), "{'n': r['n']}"],
        30_000,
        kills=3,
        source=WITH_BAD_LINES,
    )
    assert code == 0, err
    assert "restart" in err
    errors = [r["_error"] for r in records if "_error" in r]
    # record N is input line N + 1, whichever worker met it
    assert [e["line"] for e in errors] == [i + 1 for i in bad_numbers(30_000)]
    assert [e["raw"] for e in errors] == [f"oops {i}" for i in bad_numbers(30_000)]
    assert [r["n"] for r in records if "_error" not in r] == [
        i for i in range(30_000) if i % 97 != 5
    ]
    entries = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [e["line"] for e in entries] == [i + 1 for i in bad_numbers(30_000)]


def test_a_restarted_worker_keeps_the_entries_an_earlier_run_put_in_errors(
    tmp_path: Path,
) -> None:
    """Two runs of the same stage append to one `--errors FILE` (a loop's iterations): the
    second run's restarted workers skip only what that run's dead workers wrote, not the first
    run's entries for the same lines."""
    dead = tmp_path / "dead.ndjson"
    argv = ["map", "--on-error", "skip", "--errors", str(dead), "{'n': r['n']}"]
    code, _, err = run_with_kills(tmp_path, argv, 30_000, kills=0, source=WITH_BAD_LINES)
    assert code == 0, err
    code, _, err = run_with_kills(tmp_path, argv, 30_000, kills=3, source=WITH_BAD_LINES)
    assert code == 0, err
    assert "restart" in err
    entries = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [e["line"] for e in entries] == [i + 1 for i in bad_numbers(30_000)] * 2


def test_a_replayed_stateful_stage_puts_each_bad_line_in_errors_once(tmp_path: Path) -> None:
    dead = tmp_path / "dead.ndjson"
    code, records, err = run_with_kills(
        tmp_path,
        ["dedupe", "--on-error", "skip", "--errors", str(dead)],
        30_000,
        kills=3,
        source=WITH_BAD_LINES,
    )
    assert code == 0, err
    assert "restart" in err
    assert [r["n"] for r in records] == [i for i in range(30_000) if i % 97 != 5]
    entries = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [e["line"] for e in entries] == [i + 1 for i in bad_numbers(30_000)]


def test_workers_unordered_under_kills_is_exact(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path,
        ["map", "--workers", "2", "--unordered", "{'id': r['id'], 'n': r['n']}"],
        20_000,
        kills=2,
    )
    assert code == 0, err
    assert sorted(r["n"] for r in records) == list(range(20_000))


def test_data_error_under_fail_is_not_retried(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    src.write_text('{"n": 1}\n{"n": 2}\nnot json\n{"n": 4}\n')
    proc = subprocess.run(
        SAGE + ["map", "{'n': r['n']}"],
        stdin=src.open("rb"),
        capture_output=True,
        env=keeper_env(tmp_path, 3),
        timeout=60,
    )
    assert proc.returncode == 65
    assert proc.stdout.splitlines() == [b'{"n":1}', b'{"n":2}']
    assert b"restart" not in proc.stderr
    assert proc.stderr.count(b"error:") == 1


def test_three_outside_kills_with_three_retries_still_finish(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path, ["map", "{'n': r['n']}"], 30_000, kills=3, retries=3
    )
    assert code == 0, err
    assert [r["n"] for r in records] == list(range(30_000))
    assert not list(tmp_path.glob("**/dead.ndjson"))


def test_more_deaths_than_retries_ends_with_the_failure(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path, ["map", "{'n': r['n']}"], 30_000, kills=2, retries=1
    )
    assert code == 137, err
    assert "gave up" in err
    ns = [r["n"] for r in records]
    assert ns == list(range(len(ns)))  # what was forwarded is a prefix, each record once


#: N records whose ids repeat: r0..r{N/3}, each three times, spread out
DUPES = """
import json, sys, time
n = int(sys.argv[1])
for p in range(100):
    sys.stdout.write("".join(json.dumps({"id": f"r{(i * 7) % (n // 3)}", "n": i}) + "\\n"
                             for i in range(p * n // 100, (p + 1) * n // 100)))
    sys.stdout.flush()
    time.sleep(0.03)
"""


def test_dedupe_under_kills_keeps_each_key_once(tmp_path: Path) -> None:
    code, records, err = run_with_kills(tmp_path, ["dedupe"], 30_000, kills=3, source=DUPES)
    assert code == 0, err
    assert "restart" in err
    plain = subprocess.run(
        [sys.executable, "-c", DUPES, "30000"], capture_output=True, check=True
    ).stdout
    want = subprocess.run(SAGE + ["dedupe"], input=plain, capture_output=True, check=True)
    assert [r["n"] for r in records] == [json.loads(x)["n"] for x in want.stdout.splitlines()]
    assert len(records) == 10_000


def test_window_under_kills_gives_the_same_windows(tmp_path: Path) -> None:
    code, records, err = run_with_kills(
        tmp_path, ["window", "--size", "150", "--agg", "count", "--agg", "sum:n"], 30_000, kills=3
    )
    assert code == 0, err
    assert "restart" in err
    assert len(records) == 200
    assert [r["sum_n"] for r in records] == [sum(range(k * 150, (k + 1) * 150)) for k in range(200)]


def test_window_by_arrival_time_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        SAGE + ["window", "--seconds", "1"],
        input=b'{"id": 1}\n',
        capture_output=True,
        env=keeper_env(tmp_path, 3),
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("sage window: error: --retries cannot restart")
    assert proc.stdout == b""


def test_a_source_is_passed_through_live(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    proc = subprocess.run(
        SAGE + ["source", str(tmp_path / "a.txt")],
        capture_output=True,
        env=keeper_env(tmp_path, 3),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"\x1e" not in proc.stdout
    assert json.loads(proc.stdout.splitlines()[0])["text"].startswith("hello")


def test_a_live_worker_reading_stdin_after_a_file_gets_all_of_it(tmp_path: Path) -> None:
    """`sage map r FILE -` is passed through live (never restarted), yet reads stdin after its
    file: more stdin than the keeper holds (SAGE_RUN_FLIGHT_MB) must still all get through.
    (It stalled once the kept input reached the limit: nothing is ever committed live.)"""
    (tmp_path / "first.ndjson").write_text('{"id": "first"}\n')
    rows = "".join(json.dumps({"id": f"r{i}", "pad": "x" * 40}) + "\n" for i in range(60_000))
    env = keeper_env(tmp_path, 1)
    env["SAGE_RUN_FLIGHT_MB"] = "1"
    proc = subprocess.run(
        SAGE + ["map", "r", str(tmp_path / "first.ndjson"), "-"],
        input=rows.encode(),
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["id"] for line in proc.stdout.splitlines()]
    assert ids == ["first"] + [f"r{i}" for i in range(60_000)]


def test_sage_run_retries_restarts_stages_inside_a_loop(tmp_path: Path) -> None:
    (tmp_path / "produce.py").write_text(PRODUCER)
    (tmp_path / "s.sh").write_text(
        "set -euo pipefail\n"
        "for k in 1 2; do\n"
        f"  {sys.executable} produce.py 20000 100 \\\n"
        "    | sage map \"{'id': 'x-' + r['id'], 'n': r['n'], 'k': $k}\" | sage filter 'True'\n"
        "done\n"
    )
    env = keeper_env(tmp_path)
    del env["SAGE_RUN_RETRIES"]
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = tmp_path / "out.ndjson"
    with out.open("wb") as fo:
        run = subprocess.Popen(
            SAGE + ["run", "--retries", "3", "--backoff", "0.05", "--run-dir", "rd", "s.sh"],
            cwd=tmp_path,
            stdout=fo,
            stderr=subprocess.PIPE,
            env=env,
        )
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while len(killed) < 3 and run.poll() is None and time.monotonic() < deadline:
        if lines_in(out) > 1000 * (len(killed) + 1) * 8:
            workers = [w for w in workers_under(run.pid) if w not in killed]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.add(workers[0])
        time.sleep(0.01)
    assert run.stderr is not None
    err = run.stderr.read().decode()
    assert run.wait(timeout=120) == 0, err
    assert len(killed) >= 1
    records = [json.loads(x) for x in out.read_bytes().splitlines()]
    assert [(r["k"], r["n"]) for r in records] == [(k, i) for k in (1, 2) for i in range(20_000)]
    assert not (tmp_path / "rd" / "dead.ndjson").exists()  # outside kills blame no record
    stages = sorted(p.name for p in (tmp_path / "rd" / "stages").glob("*.trace.ndjson"))
    assert stages == [
        "1.2-map.trace.ndjson",
        "1.3-filter.trace.ndjson",
        "2.2-map.trace.ndjson",
        "2.3-filter.trace.ndjson",
    ]


def test_a_record_that_crashes_the_stage_alone_goes_to_the_dead_letter(tmp_path: Path) -> None:
    rows = [json.dumps({"id": f"r{i}", "n": i}) for i in range(2000)]
    (tmp_path / "in.ndjson").write_text("\n".join(rows) + "\n")
    (tmp_path / "s.sh").write_text(
        "set -o pipefail\n"
        'kill9=\'__import__("os").kill(__import__("os").getpid(), 9)\'\n'
        "sage map \"$kill9 if r['n'] == 500 else r\" < in.ndjson | sage filter 'True'\n"
        "for x in 1; do true; done\n"
    )
    env = keeper_env(tmp_path)
    del env["SAGE_RUN_RETRIES"]
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(
        SAGE + ["run", "--retries", "3", "--backoff", "0.05", "--run-dir", "rd", "s.sh"],
        cwd=tmp_path,
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["n"] for x in proc.stdout.splitlines()] == [
        i for i in range(2000) if i != 500
    ]
    dead = [json.loads(x) for x in (tmp_path / "rd" / "dead.ndjson").read_bytes().splitlines()]
    assert [(d["line"], d["raw"]["n"]) for d in dead] == [(501, 500)]
