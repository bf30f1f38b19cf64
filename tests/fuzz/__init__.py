"""Fuzz tests: hypothesis properties (tests/fuzz/test_fuzz_<thing>.py) and atheris harnesses
(tests/fuzz/harness/fuzz_<thing>.py). Conventions: docs/testing.md, "Fuzzing"."""
