"""The atheris harnesses of the NDJSON reader, expressions, prompts, the driver, the document
loaders, YAML pipelines and the server's request parsing run their seed inputs in every `make
test`, so a harness that no longer fits the code fails here, not only under `make fuzz` (the
other harnesses' test files do the same for theirs)."""

from __future__ import annotations

import pytest

from tests.fuzz.run_atheris import load_harness


@pytest.mark.parametrize(
    "name", ["ndjson", "expr", "prompt", "driver", "documents", "yaml", "serve_protocol"]
)
def test_harness_runs_its_seeds(name):
    harness = load_harness(name)
    assert harness.SEEDS, f"fuzz_{name} has no seed inputs"
    for seed in harness.SEEDS:
        harness.TestOneInput(seed)
    harness.TestOneInput(b"")  # an empty input is fine too


def test_an_input_slow_only_once_is_the_machines_stall_and_a_crash_stays_a_crash(tmp_path):
    """`make fuzz` once kept an 11-byte expression as a 33 s "slow unit" (the shared machine
    paused); run again it takes milliseconds. Such an input is said and dropped; a slow input
    that is slow again, or any crash, is not."""
    from tests.fuzz.run_atheris import stalled

    quick = tmp_path / "slow-unit-quick"
    quick.write_bytes(b"r['a'] + 1")
    seconds = stalled("expr", quick, timeout=10)
    assert seconds is not None and seconds < 1
    assert stalled("expr", quick, timeout=0) is None  # over any limit: a finding
    crash = tmp_path / "crash-quick"
    crash.write_bytes(b"r['a'] + 1")
    assert stalled("expr", crash, timeout=10) is None  # a crash is never a stall
