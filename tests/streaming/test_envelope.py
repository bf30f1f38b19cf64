"""The `_sage` trace envelope (DESIGN §2): opt-in with SAGE_ENVELOPE=1, one entry per stage."""

from __future__ import annotations

import subprocess

from sage_cli.observability.envelope import Envelope
from tests.conftest import clean_env, ndjson, parse_ndjson, sage_argv

RECORDS = [{"id": f"r{i}", "x": i} for i in range(10)]


def pipe(*stages: list[str], data: bytes, env: dict[str, str]) -> tuple[list[dict], list[int]]:
    """Run `sage S1 | sage S2 | ...` over real pipes; return the last stage's records and codes."""
    procs: list[subprocess.Popen] = []
    stdin = subprocess.PIPE
    for args in stages:
        proc = subprocess.Popen(sage_argv(*args), stdin=stdin, stdout=subprocess.PIPE, env=env)
        if procs:
            assert procs[-1].stdout is not None
            procs[-1].stdout.close()  # only the next stage holds the read end
        procs.append(proc)
        stdin = proc.stdout
    first = procs[0]
    assert first.stdin is not None
    first.stdin.write(data)
    first.stdin.close()
    out = procs[-1].communicate(timeout=60)[0]
    return parse_ndjson(out), [p.wait(timeout=60) for p in procs]


def test_every_stage_appends_itself_and_the_run_id_is_shared():
    env = clean_env(SAGE_ENVELOPE="1")
    out, codes = pipe(
        ["map", 'r | {"y": r["x"] * 2}'],
        ["filter", 'r["x"] % 2 == 0'],
        ["map", "--workers", "2", "r"],
        data=ndjson(RECORDS),
        env=env,
    )
    assert codes == [0, 0, 0]
    assert [r["id"] for r in out] == ["r0", "r2", "r4", "r6", "r8"]
    assert all(r["y"] == 2 * r["x"] for r in out)
    runs = {r["_sage"]["run"] for r in out}
    assert len(runs) == 1 and next(iter(runs))  # the first stage named the run for the others
    for r in out:
        stages = r["_sage"]["stages"]
        assert [s["stage"] for s in stages] == ["map", "filter", "map"]
        assert all(isinstance(s["ms"], float | int) and s["ms"] >= 0 for s in stages)


def test_without_the_variable_records_are_untouched():
    out, codes = pipe(["map", "r"], ["filter", "True"], data=ndjson(RECORDS), env=clean_env())
    assert codes == [0, 0]
    assert out == RECORDS


def test_error_records_pass_through_unstamped_and_sage_run_names_the_run():
    data = ndjson(RECORDS[:2]) + b"{not json\n"
    env = clean_env(SAGE_ENVELOPE="1", SAGE_RUN_ID="run-42")
    out, codes = pipe(["map", "--on-error", "emit", "r"], ["map", "r"], data=data, env=env)
    assert codes == [0, 0]
    good, bad = out[:2], out[2]
    assert "_error" in bad and "_sage" not in bad
    assert all(r["_sage"]["run"] == "run-42" for r in good)


def test_stamp_keeps_the_records_run_and_never_shares_a_stage_list():
    shared = {"run": "earlier", "stages": [{"stage": "source", "ms": 1.0}]}
    a, b = {"id": "a", "_sage": shared}, {"id": "b", "_sage": shared}  # flatmap children
    Envelope("chunk", "later").stamp([a, b], seconds=0.002, records_in=1)
    assert a["_sage"]["run"] == "earlier"
    assert [s["stage"] for s in a["_sage"]["stages"]] == ["source", "chunk"]
    assert a["_sage"]["stages"][1]["ms"] == 2.0
    assert shared["stages"] == [{"stage": "source", "ms": 1.0}]  # the input is not mutated
    assert a["_sage"]["stages"] is not b["_sage"]["stages"]
