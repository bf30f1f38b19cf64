"""Bounded memory under `sage run` (issue 6), the fast version of `make bench`'s soak area:
the 5-stage pipeline of tests/bench/bench_soak.py (source | map | filter | dedupe --max-keys |
sink --to) over 30k and then 8x as many records. Every record the filter keeps comes out once,
in order; no stage (nor the supervisor) goes over 150 MB, and none grows with the input: the
peak RSS at 240k records is within 25% + 5 MB of that at 30k (a stage that held its input, or
a trace, would add tens of MB here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.bench.bench_soak import (
    RSS_LIMIT_MB,
    STAGES,
    SUPERVISOR,
    check_output,
    expected_out,
    run_soak,
    write_records,
)
from tests.conftest import clean_env

SMALL = 30_000
LARGE = 240_000
TEXT_BYTES = 200


def env() -> dict[str, str]:
    e = clean_env()
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


@pytest.fixture(scope="module")
def soak_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, object]:
    work = tmp_path_factory.mktemp("soak")
    runs = {}
    for n in (SMALL, LARGE):
        data = work / f"in-{n}.ndjson"
        out = work / f"out-{n}.ndjson"
        write_records(data, n, TEXT_BYTES)
        soak = run_soak(
            work,
            data,
            out,
            env=env(),
            sage=[sys.executable, "-m", "sage_cli"],
            keys=2_000,
            sample=False,
            timeout=300,
        )
        assert soak.status == 0, soak.stderr
        runs[n] = (soak, check_output(out, n))
    return runs


def test_every_kept_record_comes_out_once_in_order(soak_runs) -> None:
    for n, (soak, count) in soak_runs.items():
        assert count == expected_out(n)  # check_output also checked ids, order and fields
        by_stage = {s["name"]: s for s in soak.summary["stages"]}
        assert by_stage["1-source"]["records_out"] == n
        assert by_stage["3-filter"]["records_out"] == count
        assert by_stage["4-dedupe"]["records_out"] == count  # no id repeats: nothing dropped
        assert by_stage["5-sink"]["records_in"] == count


@pytest.mark.parametrize("name", [*STAGES, SUPERVISOR])
def test_peak_rss_is_bounded_and_flat(soak_runs, name: str) -> None:
    small, _ = soak_runs[SMALL]
    large, _ = soak_runs[LARGE]
    little, big = small.peak_mb[name], large.peak_mb[name]
    assert 0 < little < RSS_LIMIT_MB
    assert 0 < big < RSS_LIMIT_MB
    assert big <= little * 1.25 + 5, f"{name}: {little:.1f} MB at {SMALL:,}, {big:.1f} at {LARGE:,}"
