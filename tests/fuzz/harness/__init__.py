"""Atheris harnesses, one per parser: `fuzz_<name>.py` exposes `TestOneInput(data: bytes)` and
optionally `SEEDS: list[bytes]` (seed corpus) and `MAX_LEN: int` (longest input tried).
`python -m tests.fuzz.run_atheris` runs them; see docs/testing.md, "Fuzzing"."""
