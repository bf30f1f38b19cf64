"""Scoring answers and retrieval against gold labels (`sage eval`).

Answer metrics, when a record has `gold` (a string or a list of strings): `exact_match`, `f1`
(token F1) and `contains`, each the best over the golds, after SQuAD normalisation (lowercase,
punctuation and the articles a/an/the removed, whitespace collapsed).

Retrieval metrics, when a record has `gold_ids` (a string or a list of strings): `recall@k`,
`mrr` and `ndcg@k` (binary relevance) of the ids of the first k `docs`, in list order. A hit
matches a gold id when its `id`, its `parent_id`, its `metadata.parent_id` or the part of a
chunk id `doc#3` before the last `#` equals it; each gold id counts once, at its first hit.

Groundedness, when a record has `answer` and `docs` (no gold needed): `groundedness`, the share
of the answer's content words (not stop words; citation markers `[n]` left out) found in the
text of the retrieved docs (operators.citations.groundedness). An answer with no content word
gets none.

Each record gets an `eval` object with the metrics that apply to it. `close()` returns one
summary record, `{"id": "_summary", "_summary": true, "count": N, "eval": {metric: mean}}`,
with every mean taken over the records that carry that metric.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from .base import Operator, OptionError, Record, RecordError

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

#: the order metrics appear in tables and summaries
ANSWER_METRICS = ("exact_match", "f1", "contains", "groundedness")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(answer: str, gold: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(gold))


def token_f1(answer: str, gold: str) -> float:
    """SQuAD token F1; two answers that normalise to nothing agree (1.0)."""
    pred = normalize_answer(answer).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _contains_form(text: str) -> str:
    """Like `normalize_answer`, but punctuation separates words instead of vanishing, so a
    code answer (`object.__new__(cls)`) still holds the gold (`__new__`) as a whole token."""
    return normalize_answer(text.translate(_PUNCT_TO_SPACE))


def contains(answer: str, gold: str) -> float:
    """1.0 when the gold appears in the answer as whole tokens (punctuation splits tokens)."""
    ref = _contains_form(gold)
    pred = _contains_form(answer)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def _best(metric: Callable[[str, str], float], answer: str, golds: list[str]) -> float:
    return max(metric(answer, g) for g in golds)


def answer_scores(answer: str, golds: list[str]) -> dict[str, float]:
    """Exact match, token F1 and contains of `answer`, each the best over `golds`."""
    return {
        "exact_match": _best(exact_match, answer, golds),
        "f1": _best(token_f1, answer, golds),
        "contains": _best(contains, answer, golds),
    }


def _hit_keys(hit: Any) -> set[str]:
    if isinstance(hit, str):
        return {hit}
    if not isinstance(hit, dict):
        return set()
    hit_id = hit.get("id")
    keys = {hit_id, hit.get("parent_id")}
    if isinstance(hit_id, str) and "#" in hit_id:
        keys.add(hit_id.rsplit("#", 1)[0])  # a chunk id `<doc id>#<n>`
    meta = hit.get("metadata")
    if isinstance(meta, dict):
        keys.add(meta.get("parent_id"))
    return {str(k) for k in keys if k is not None}


def retrieval_scores(hits: list[Any], gold_ids: list[str], k: int) -> dict[str, float]:
    """recall@k, MRR (first relevant hit within k) and binary nDCG@k of `hits` (in order)."""
    relevant = set(gold_ids)
    found: set[str] = set()
    dcg = 0.0
    first_rank = 0
    for rank, hit in enumerate(hits[:k], start=1):
        new = (_hit_keys(hit) & relevant) - found
        if not new:
            continue
        found |= new
        dcg += 1.0 / math.log2(rank + 1)
        if not first_rank:
            first_rank = rank
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, len(relevant)) + 1))
    return {
        f"recall@{k}": len(found) / len(relevant),
        "mrr": 1.0 / first_rank if first_rank else 0.0,
        f"ndcg@{k}": dcg / ideal if ideal else 0.0,
    }


def _string_list(record: Record, field: str) -> list[str]:
    value = record[field]
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value)
    ):
        raise RecordError(f"field {field!r} must be a string or a non-empty list of strings")
    return [str(v) for v in value]


class Eval(Operator):
    """Score `answer` against `gold` and `docs` against `gold_ids`; a summary at the end."""

    name = "eval"
    requires = {}
    produces = {
        "eval": {
            "type": "object",
            "description": "exact_match, f1, contains (with gold); recall@k, mrr, ndcg@k "
            "(with gold_ids)",
            "additionalProperties": {"type": "number"},
        }
    }
    memory = "streaming"
    stateless = False

    def __init__(self, k: int = 5, summary: bool = True) -> None:
        if k < 1:
            raise OptionError(f"-k must be at least 1, got {k}")
        self.k = k
        self.emit_summary = summary
        self.metrics = [*ANSWER_METRICS, f"recall@{k}", "mrr", f"ndcg@{k}"]
        self.sums: dict[str, float] = dict.fromkeys(self.metrics, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(self.metrics, 0)
        self.count = 0

    def score(self, record: Record) -> dict[str, float]:
        """The metrics that apply to one record."""
        from .citations import groundedness

        has_gold = "gold" in record
        has_ids = "gold_ids" in record
        grounded = "answer" in record and isinstance(record.get("docs"), list)
        if not has_gold and not has_ids and not grounded:
            have = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
            raise RecordError(
                f"record has neither 'gold' (answers) nor 'gold_ids' (documents), nor an "
                f"'answer' with 'docs' (fields: {have})"
            )
        # Score what the record carries: a gold file is often run against retrieval alone
        # (`retrieve | eval`) before any answer exists.
        can_answer = has_gold and "answer" in record
        can_retrieve = has_ids and "docs" in record
        if not can_answer and not can_retrieve and not grounded:
            missing = "'answer' (run sage generate)" if has_gold else "'docs' (run sage retrieve)"
            raise RecordError(f"nothing to score: the record has no {missing}")
        scores: dict[str, float] = {}
        if can_answer:
            golds = _string_list(record, "gold")
            answer = record["answer"]
            if answer is None:
                answer = ""
            if not isinstance(answer, str):
                raise RecordError(f"field 'answer' must be str, got {type(answer).__name__}")
            scores.update(answer_scores(answer, golds))
        if grounded:
            answer = record["answer"]
            if not isinstance(answer, str | None):
                raise RecordError(f"field 'answer' must be str, got {type(answer).__name__}")
            share = groundedness(answer or "", record["docs"])
            if share is not None:
                scores["groundedness"] = share
        if can_retrieve:
            gold_ids = _string_list(record, "gold_ids")
            docs = record["docs"]
            if not isinstance(docs, list):
                raise RecordError(f"field 'docs' must be a list, got {type(docs).__name__}")
            scores.update(retrieval_scores(docs, gold_ids, self.k))
        return scores

    def process(self, batch: list[Record]) -> list[Record]:
        # score every record first, so a failing one leaves the running sums untouched
        scored = [(r, None if r.get("_summary") else self.score(r)) for r in batch]
        out = []
        for record, scores in scored:
            if scores is None:  # an earlier eval's summary passes through
                out.append(record)
                continue
            self.count += 1
            for name, value in scores.items():
                self.sums[name] += value
                self.counts[name] += 1
            out.append({**record, "eval": scores})
        return out

    def summary_record(self) -> Record:
        means = {
            name: self.sums[name] / self.counts[name] for name in self.metrics if self.counts[name]
        }
        return {"id": "_summary", "_summary": True, "count": self.count, "eval": means}

    def close(self) -> list[Record]:
        if not self.emit_summary or not self.count:
            return []
        return [self.summary_record()]

    def summary(self) -> str:
        """The table of means that the command shows on a terminal's stderr at the end."""
        if not self.count:
            return ""
        return "means\n" + format_table(self.summary_record()).rstrip("\n")


def format_table(summary: Record) -> str:
    """A plain-text table of a summary record, for a terminal."""
    means: dict[str, float] = summary.get("eval", {})
    rows = [(name, f"{value:.4f}") for name, value in means.items()]
    width = max([len("metric"), *(len(n) for n, _ in rows)])
    lines = [f"{'metric':<{width}}  mean    (n={summary.get('count', 0)})"]
    lines.append(f"{'-' * width}  ------")
    lines.extend(f"{name:<{width}}  {value}" for name, value in rows)
    return "\n".join(lines) + "\n"
