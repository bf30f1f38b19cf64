"""Attach the indexed documents most relevant to each record's query (`sage retrieve`).

The query is the record's `query` field, or `text` when it has no `query` (`field` picks one
explicitly, with no fallback). Modes:

- `hybrid` (default): the dense and the BM25 ranking (each cut at max(k, 50)) fused by
  relative score: each list's scores are min-max normalised to 0..1 over that list, a hit
  missing from a list scores 0 there, and the fused score is `(1 - w) * dense + w * bm25`.
  `fusion="adaptive"` (default) sets BM25's weight per query by how well the query matches
  the corpus's words: `w = (1 - alpha) * lexical_strength` (alpha 0.5; `lexical_strength`
  below, 0..1), so a query whose words the corpus lacks is ranked by its embedding alone.
  `fusion="relative"` uses the fixed `w = 1 - alpha` (the default before issue 14's third
  round); `fusion="rrf"` fuses by reciprocal rank instead: sum of 1 / (60 + rank).
  Measured (docs/retrieval.md, `make bench`): fixed-weight fusion beat dense by 55 points of
  recall@1 on the demo questions and tied it on the stdlib and paraphrased sets, but lost to
  it on a held-out set in a user's words (recall@1 0.475 -> 0.35, recall@5 0.775 -> 0.725),
  where BM25 is weak; adaptive fusion keeps the demo and stdlib figures and ties or beats
  dense there (0.475 / 0.825). On a third held-out set, measured once after it was chosen:
  0.35 / 0.725 against dense's 0.325 / 0.70 and fixed weights' 0.25 / 0.625.
  When the index has sentence vectors (operators.sentence_vectors: an index built with its
  model at hand), the dense list is re-scored before fusion: every row of either list scores
  its cosine + `sentence_weight` (0.5) x the best cosine of one of its first sentences, so a
  chunk with the one sentence that answers the question rises (docs/retrieval.md, fifth
  round). `sentence_weight=0`, or an index without them: chunk vectors alone.
- `dense`: the query is embedded with the index's own model (found through the
  registry by the name in the manifest, its sha256 checked against the manifest: a different
  model is `ResourceUnavailable`, exit 69) and searched in the annoy forest with a `search_k`
  that keeps recall@10 against exact search at or above 0.95 (`Index.default_search_k`);
  `exact=True` scans every vector with numpy instead. Scores are cosine similarities.
  A record that already carries an `embedding` of the index's dimension (from `sage embed
  --field query`) is searched with it and the model is not loaded.
- `bm25`: Okapi BM25 over the indexed text (operators.bm25); scores are BM25 scores.

`docs` is replaced by the hits, best first: each is the indexed record (id, text, metadata,
parent_id and any other field it was indexed with) plus `score`, `rank` (from 1) and `query_id`
(the query record's id, when it has one). `min_score` drops hits scoring below it (in the
mode's own scale).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Operator, OptionError, Record, RecordError, ResourceUnavailable
from .index import Index, ModelRef, make_embedder, record_vector
from .sentence_vectors import DEFAULT_WEIGHT as SENTENCE_WEIGHT
from .tokenize import content_terms

if TYPE_CHECKING:
    import numpy as np

    from .bm25 import BM25

MODES = ("hybrid", "dense", "bm25")
DEFAULT_MODE = "hybrid"
FUSIONS = ("adaptive", "relative", "rrf")
DEFAULT_FUSION = "adaptive"
#: the weight of the dense ranking in relative-score fusion (BM25 gets 1 - alpha; adaptive
#: fusion scales BM25's share down by the query's lexical strength)
DEFAULT_ALPHA = 0.5
#: lexical strength, first signal: the BM25 top score as a share of the query's highest
#: possible score counts 0 at or below the first share, 1 at or above the second (linear between)
SCORE_SHARE_RANGE = (0.1, 0.2)
#: lexical strength, second signal: the share of the query's content-word IDF mass that the
#: BM25 top hit contains counts 1 at or above this share (linear from 0)
COVERAGE_FULL = 0.8
#: hits taken from each ranking before fusion (more when -k asks for more)
HYBRID_DEPTH = 50
#: the constant of reciprocal rank fusion (Cormack et al. 2009)
RRF_K = 60


def rrf(
    rankings: Sequence[Sequence[int]], k: int, constant: int = RRF_K
) -> list[tuple[int, float]]:
    """Fuse rankings (lists of rows, best first) by reciprocal rank; the k best, best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (constant + rank)
    fused = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return fused[:k]


def relative_fusion(
    lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float], k: int
) -> list[tuple[int, float]]:
    """Fuse scored lists ((row, score), best first) by relative score: each list's scores
    min-max normalised to 0..1 (all equal: 1), a row missing from a list gets 0 there, the
    weighted sum over lists; the k best, best first, ties by the lower row. A list of weight
    0 adds nothing (its rows are not candidates)."""
    fused: dict[int, float] = {}
    for hits, weight in zip(lists, weights, strict=True):
        if not hits or weight <= 0:
            continue
        scores = [s for _, s in hits]
        lo, hi = min(scores), max(scores)
        for row, score in hits:
            norm = (score - lo) / (hi - lo) if hi > lo else 1.0
            fused[row] = fused.get(row, 0.0) + weight * norm
    ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:k]


def lexical_strength(bm25: BM25, query: str, hits: Sequence[tuple[int, float]]) -> float:
    """How well `query` matches the corpus's words, 0..1, from its BM25 hits (best first):
    the mean of two signals, each clipped to 0..1,

    - the top hit's score as a share of the most any document could score for the query
      (`BM25.max_score`), mapped linearly from 0 at 0.1 to 1 at 0.2 (`SCORE_SHARE_RANGE`);
    - the share of the IDF mass of the query's content words (not `STOP_WORDS`; a word the
      corpus lacks counts with the highest IDF) that the top hit contains, over 0.8
      (`COVERAGE_FULL`).

    0 when BM25 found nothing. Chosen on the tuning sets of docs/retrieval.md: questions in
    the corpus's own words score 0.6-1 (the demo and stdlib sets, median 1.0 and 0.95),
    questions in a user's words 0.05-1 (median 0.37 and 0.49)."""
    if not hits:
        return 0.0
    row, score = hits[0]
    most = bm25.max_score(query)
    lo, hi = SCORE_SHARE_RANGE
    share = (score / most - lo) / (hi - lo) if most > 0 else 0.0
    coverage = bm25.idf_coverage(content_terms(query), row) / COVERAGE_FULL
    return (min(max(share, 0.0), 1.0) + min(max(coverage, 0.0), 1.0)) / 2


def adaptive_weights(alpha: float, strength: float) -> tuple[float, float]:
    """(dense, bm25) weights of adaptive fusion: BM25 gets (1 - alpha) * strength, dense the
    rest, so the weights add up to 1 and fused scores stay in 0..1."""
    bm25 = (1.0 - alpha) * strength
    return 1.0 - bm25, bm25


def query_text(record: Record, field: str | None) -> str:
    """The query of a record: `field`, or `query` falling back to `text`, then `content` (the
    text field of simonw's `llm`)."""
    if field is None:
        field = next((f for f in ("query", "text", "content") if f in record), "query")
    if field not in record:
        raise RecordError(
            f"record has no {field!r} field to search with (fields: "
            f"{', '.join(sorted(k for k in record if not k.startswith('_'))) or 'none'})"
        )
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"empty query in field {field!r}")
    return value


class QueryEmbedder:
    """The index's embedding model, loaded on first use and checked against the manifest."""

    def __init__(
        self,
        index: Index,
        model: str | None,
        model_dirs: Sequence[str | os.PathLike[str]],
        threads: int | None,
        factory: Callable[[Path, int | None], Any] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.index = index
        self.hash_cache = hash_cache
        self.model = model
        self.model_dirs = list(model_dirs)
        self.threads = threads
        self.factory = factory
        self._embedder: Any = None

    def get(self) -> Any:
        if self._embedder is not None:
            return self._embedder
        from .models import locate

        where = self.index.directory
        recorded = self.index.model
        name = self.model or (recorded.name if recorded else None)
        if not name:
            raise ResourceUnavailable(
                f"index {where} does not record its embedding model; pass "
                "--model NAME|PATH (the model its vectors came from)"
            )
        try:
            path = locate(name, self.model_dirs)
        except OptionError:
            raise ResourceUnavailable(
                f"index {where} was built with model {name!r}, which is "
                "not installed here; pass --model PATH to its file"
            ) from None
        embedder = make_embedder(path, self.threads, self.factory, self.hash_cache)
        if recorded and recorded.sha256 and embedder.model_sha256 != recorded.sha256:
            raise ResourceUnavailable(
                f"index {where} was built with {recorded.label()}, but {path} has sha256 "
                f"{embedder.model_sha256[:12]}: a different model; rebuild the index with this "
                "model (sage index build) or install the one it was built with"
            )
        if embedder.dim != self.index.dimension:
            raise ResourceUnavailable(
                f"model {path} makes {embedder.dim}-dimensional vectors, index {where} holds "
                f"{self.index.dimension}-dimensional ones; use the model the index was built with"
            )
        self._embedder = embedder
        return embedder

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None


class Retriever(Operator):
    """Attach `docs`: the indexed records most relevant to the record's query."""

    name = "retrieve"
    requires: ClassVar[dict[str, dict[str, Any]]] = {
        "query": {"type": "string", "description": "what to search for (`text` if absent)"},
    }
    produces: ClassVar[dict[str, dict[str, Any]]] = {
        "query": {"type": "string", "description": "what was searched for (kept if present)"},
        "docs": {
            "type": "array",
            "description": "hits, best first",
            "items": {
                "type": "object",
                "required": ["id", "text", "score", "rank"],
                "properties": {
                    "id": {},
                    "text": {"type": "string"},
                    "score": {"type": "number"},
                    "rank": {"type": "integer"},
                    "metadata": {"type": "object"},
                    "parent_id": {},
                    "query_id": {},
                },
            },
        },
    }
    default_batch_size = 32

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        k: int = 5,
        mode: str = DEFAULT_MODE,
        fusion: str = DEFAULT_FUSION,
        alpha: float = DEFAULT_ALPHA,
        sentence_weight: float = SENTENCE_WEIGHT,
        exact: bool = False,
        search_k: int | None = None,
        min_score: float | None = None,
        field: str | None = None,
        model: str | None = None,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        threads: int | None = None,
        embedder_factory: Callable[[Path, int | None], Any] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if k < 1:
            raise OptionError(f"-k must be at least 1, got {k}")
        if mode not in MODES:
            raise OptionError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if fusion not in FUSIONS:
            raise OptionError(f"--fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= alpha <= 1.0:
            raise OptionError(f"--alpha must be between 0 and 1, got {alpha}")
        if not 0.0 <= sentence_weight <= 10.0:
            raise OptionError(f"--sentence-weight must be between 0 and 10, got {sentence_weight}")
        if search_k is not None and search_k < 1:
            raise OptionError(f"--search-k must be at least 1, got {search_k}")
        self.index_dir = Path(index)
        self.k = k
        self.mode = mode
        self.fusion = fusion
        self.alpha = alpha
        self.sentence_weight = sentence_weight
        self.exact = exact
        self.search_k = search_k
        self.min_score = min_score
        self.field = field
        self.model = model
        self.model_dirs = list(model_dirs)
        self.threads = threads
        self.embedder_factory = embedder_factory
        self.hash_cache = hash_cache
        self.index: Index | None = None
        self.embedder: QueryEmbedder | None = None

    def setup(self) -> None:
        if self.index is None:
            self.index = Index(self.index_dir)
            self.embedder = QueryEmbedder(
                self.index,
                self.model,
                self.model_dirs,
                self.threads,
                self.embedder_factory,
                self.hash_cache,
            )

    def process(self, batch: list[Record]) -> list[Record]:
        self.setup()
        assert self.index is not None
        queries = [query_text(r, self.field) for r in batch]
        vectors = self._query_vectors(batch, queries) if self.mode != "bm25" else None
        out = []
        for i, (record, query) in enumerate(zip(batch, queries, strict=True)):
            hits = self.search(query, None if vectors is None else vectors[i])
            result = dict(record)
            # name what was searched for, so `source -R | retrieve | prompt` has its {query}
            result.setdefault("query", query)
            result["docs"] = self._docs(hits, record.get("id"))
            out.append(result)
        return out

    def _query_vectors(self, batch: list[Record], queries: list[str]) -> list[np.ndarray]:
        """One unit vector per record: its own `embedding` when it fits, else embedded."""
        from .index import normalise

        assert self.index is not None and self.embedder is not None
        vectors: list[Any] = [None] * len(batch)
        todo = []
        for i, record in enumerate(batch):
            vec = record_vector(record)
            if vec is not None and vec.shape[0] == self.index.dimension:
                ref = ModelRef.parse(record.get("embedding_model"))
                if ref is None or self.index.model is None or ref.same_as(self.index.model):
                    vectors[i] = normalise(vec)
                    continue
            todo.append(i)
        if todo:
            rows = self.embedder.get().embed([queries[i] for i in todo])
            for i, row in zip(todo, rows, strict=True):
                vectors[i] = row
        return vectors

    def search(self, query: str, vector: np.ndarray | None) -> list[tuple[int, float]]:
        """(row, score) of the hits for one query, best first, after --min-score."""
        assert self.index is not None
        index, k = self.index, self.k
        if self.mode == "dense":
            assert vector is not None
            hits = index.dense(vector, k, exact=self.exact, search_k=self.search_k)
        elif self.mode == "bm25":
            hits = index.bm25.search(query, k)
        else:
            assert vector is not None
            depth = max(k, HYBRID_DEPTH)  # the same lists, so -k 5 = the top 5 of -k 20
            dense = index.dense(vector, depth, exact=self.exact, search_k=self.search_k)
            sparse = index.bm25.search(query, depth)
            sentences = index.sentences if self.sentence_weight > 0 else None
            if sentences is not None:  # both lists' rows, by chunk + best sentence cosine
                rows = [r for r, _ in dense] + [r for r, _ in sparse]
                dense = sentences.rescore(index.vectors, vector, rows, self.sentence_weight, depth)
            if self.fusion == "rrf":
                hits = rrf([[r for r, _ in dense], [r for r, _ in sparse]], k)
            elif self.fusion == "adaptive":
                strength = lexical_strength(index.bm25, query, sparse)
                weights = adaptive_weights(self.alpha, strength)
                hits = relative_fusion([dense, sparse], weights, k)
            else:
                hits = relative_fusion([dense, sparse], [self.alpha, 1.0 - self.alpha], k)
        if self.min_score is not None:
            hits = [(r, s) for r, s in hits if s >= self.min_score]
        return hits

    def _docs(self, hits: list[tuple[int, float]], query_id: Any) -> list[Record]:
        assert self.index is not None
        docs = []
        for rank, (row, score) in enumerate(hits, 1):
            doc = dict(self.index.records[row])
            doc.setdefault("metadata", {})
            doc["score"] = round(score, 6)
            doc["rank"] = rank
            if query_id is not None:
                doc["query_id"] = query_id
            docs.append(doc)
        return docs

    def close(self) -> list[Record]:
        if self.embedder is not None:
            self.embedder.close()
        return []
