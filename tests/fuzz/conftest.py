"""Hypothesis profiles for the fuzz tests, chosen by the environment variable
SAGE_FUZZ_PROFILE:

- `default` (plain `make test`): 150 examples per property, enough to catch the easy cases in
  seconds;
- `long` (`make fuzz`): 1000 examples per property, the most that keeps `make fuzz` near three
  minutes on two cores;
- `deep` (by hand, or a nightly job): 10000 examples per property.

A property under `@given` leaves `max_examples` to the profile. One that spawns a subprocess per
example asks for fewer with `examples(n)`: n under the default profile, scaled up by the same
factor as the profile (`@settings(max_examples=examples(5))`).

Failing examples are kept in .sage/hypothesis/ (gitignored) and replayed first on the next run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.conftest import ROOT

DEFAULT_EXAMPLES = 150
PROFILES = {"default": DEFAULT_EXAMPLES, "long": 1000, "deep": 10000}
PROFILE = os.environ.get("SAGE_FUZZ_PROFILE", "default")
if PROFILE not in PROFILES:
    raise ValueError(f"SAGE_FUZZ_PROFILE={PROFILE!r}: use one of {', '.join(PROFILES)}")

for _name, _count in PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=DirectoryBasedExampleDatabase(str(ROOT / ".sage" / "hypothesis")),
        print_blob=True,
    )
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """Examples for a slow property: `n` under the default profile, scaled like the profile."""
    return max(1, n * PROFILES[PROFILE] // DEFAULT_EXAMPLES)
