"""Seed inputs shared by the fuzz tests and harnesses."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the JSONTestSuite parsing corpus, carried in the repo (tests/data/jsontestsuite, MIT)
JSONTESTSUITE = ROOT / "tests" / "data" / "jsontestsuite" / "test_parsing"


def jsontestsuite_seeds(limit: int = 4096) -> list[bytes]:
    """The JSONTestSuite parsing corpus (files up to `limit` bytes); empty when absent."""
    if not JSONTESTSUITE.is_dir():
        return []
    return [
        p.read_bytes() for p in sorted(JSONTESTSUITE.glob("*.json")) if p.stat().st_size <= limit
    ]
