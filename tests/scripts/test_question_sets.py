"""The retrieval bench's stdlib question sets (tests/bench/bench_quality.py) are answerable:
every gold id is a record of scripts/stdlib_corpus.py's corpus, ids are unique, and the sets
ask about different functions (a held-out set that repeats a tuning set's gold is not held out)."""

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
SETS = (
    "stdlib_questions.ndjson",
    "stdlib_questions_paraphrased.ndjson",
    "stdlib_questions_heldout2.ndjson",
    "stdlib_questions_heldout3.ndjson",
    "stdlib_questions_heldout4.ndjson",
    "stdlib_questions_heldout5.ndjson",
    "stdlib_questions_heldout6.ndjson",
)
#: held-out sets, in the order they were written: each must repeat no gold of any set before it
HELD_OUT = (2, 3, 4, 5, 6)


def load(name: str) -> list[dict]:
    return [orjson.loads(line) for line in (ROOT / "scripts" / name).read_bytes().splitlines()]


def test_every_gold_id_is_in_the_corpus_and_no_set_repeats_another_sets_gold():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stdlib_corpus.py")],
        capture_output=True,
        check=True,
    ).stdout
    corpus = {orjson.loads(line)["id"] for line in out.splitlines()}
    golds: dict[str, set[str]] = {}
    for name in SETS:
        questions = load(name)
        assert len(questions) == 40, name
        assert len({q["id"] for q in questions}) == 40, name
        golds[name] = {g for q in questions for g in q["gold_ids"]}
        missing = golds[name] - corpus
        assert not missing, f"{name}: gold ids not in the corpus: {sorted(missing)}"
        assert all(q["query"].strip() for q in questions), name
    for i in HELD_OUT:
        earlier = set().union(*(golds[name] for name in SETS[:i]))
        repeated = golds[SETS[i]] & earlier
        assert not repeated, f"{SETS[i]} repeats gold of an earlier set: {sorted(repeated)}"
