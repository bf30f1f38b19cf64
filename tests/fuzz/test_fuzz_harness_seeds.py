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
