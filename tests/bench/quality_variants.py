"""Retrieval changes tried for issue 14 (second, third and fifth rounds), measured in process on
the tuning sets (demo, stdlib, stdlib_paraphrased, from the third round stdlib_heldout2, from
the fourth stdlib_heldout3, from the fifth stdlib_heldout4)
against the same index `sage retrieve` searches, so docs/retrieval.md's "tried" figures come
from `make bench`.

Every variant starts from the same two lists (dense cosine and BM25, top 50 each, exact dense
search here where `sage retrieve` uses annoy) and changes one thing. Baselines:
`relative_exact` is relative-score fusion with fixed equal weights (the default of the first
two rounds) and `adaptive_exact` today's default (`--fusion adaptive`), both under exact
search.

Third round: BM25's weight w (the dense list gets 1 - w) set per query from how well the query
matches the corpus's words (relative_fusion with weights (1 - w, w); 0.5 = the old default):

- r3_a_coverage: w = 0.5 * c, c = the share of the IDF mass of the query's content words that
  the BM25 top hit contains (`BM25.idf_coverage`); r3_a_coverage_ramp: w = 0.5 * min(1, c / 0.8).
- r3_b_fallback: dense alone when the BM25 top score is under 0.2 of the most possible
  (`BM25.max_score`, s below), else w = 0.5; r3_b_share_ramp: w = 0.5 * clip((s - 0.1) / 0.1).
  (BM25 returned 50 hits for every question of these sets, so "fewer than N hits" never fires.)
- r3_c_agreement: w = 0.5 * o, o = the overlap of the two top 10s (share of 10);
  r3_c_agreement_ramp: w = 0.5 * min(1, o / 0.2).
- adaptive_exact (adopted, the default): w = 0.5 * the mean of the two ramps of r3_a and r3_b
  (`operators.retrieve.lexical_strength`).

Fifth round: sentence vectors (the index's `sentences.npz`: each chunk's first 3 sentences
embedded one by one). `s` = a row's best query-sentence cosine (its own cosine when it has
none), `cos` its chunk cosine; the dense list is the top 50 of a score over every row, then
fused with BM25 by adaptive fusion as the default does:

- r5_sum_W: cos + W * s (W 0.25, 0.5, 0.75, 1, 2); r5_sum_0.5 adopted (`sage retrieve`
  re-scores only the rows of its two lists, which gave the same figures on every set).
- r5_max: max(cos, s); r5_sentences_only: s alone.
- r5_three_lists: cos, s and BM25 as three lists, weights (1 - w, 0.5 * (1 - w), w).

Second round (each a change of `relative_exact`; none adopted):

- prf_dense / prf_hybrid: pseudo-relevance feedback in embedding space,
  q' = normalize(q + b * mean of the top-k doc vectors) (of the dense or the fused list), the
  dense list searched again with q', then fused as the default does.
- rm3_bm25: the 10 most frequent non-query terms of the fused top 3 added to the BM25 query.
- title_vectors: multi-vector documents, the dense score 0.7 * cos(q, chunk) + 0.3 * cos(q,
  the chunk's title) over every chunk.
- doc_aggregation: a chunk's fused score + 0.1 * the fused scores of its document's other
  chunks in the list.
- dense_rescore_bm25: the dense list = the cosine of every row in the BM25 or dense top 50.
- clean_query: question words ("how do I", "which function") stripped before searching.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

DEPTH = 50
QUESTION_WORDS = re.compile(
    r"^\s*(how (do|can|could|should) (i|you|we)|what (is|are|does|gives|returns)|"
    r"which( \w+)? (function|class|tool|type|decorator|iterator|clock)?|i (want|need) to|"
    r"i have)\b",
    re.I,
)


def _prf(index: Any, vector: Any, rows: list[int], b: float) -> list[tuple[int, float]]:
    import numpy as np

    moved = vector + b * index.vectors[rows].mean(0)
    return index.dense(moved / np.linalg.norm(moved), DEPTH, exact=True)


def _clip(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def round3_hits(
    index: Any, query: str, dense: list[tuple[int, float]], sparse: list[tuple[int, float]]
) -> dict[str, list[tuple[int, float]]]:
    """The third round's query-adaptive BM25 weights (module docstring), exact dense lists."""
    from sage_cli.operators.retrieve import (
        DEFAULT_ALPHA,
        adaptive_weights,
        lexical_strength,
        relative_fusion,
    )
    from sage_cli.operators.tokenize import content_terms

    def weighted(w: float) -> list[tuple[int, float]]:
        return relative_fusion([dense, sparse], [1.0 - w, w], DEPTH)

    bm25 = index.bm25
    most = bm25.max_score(query)
    share = sparse[0][1] / most if sparse and most > 0 else 0.0
    coverage = bm25.idf_coverage(content_terms(query), sparse[0][0]) if sparse else 0.0
    overlap = len({r for r, _ in dense[:10]} & {r for r, _ in sparse[:10]}) / 10
    strength = lexical_strength(bm25, query, sparse)
    return {
        "adaptive_exact": relative_fusion(
            [dense, sparse], adaptive_weights(DEFAULT_ALPHA, strength), DEPTH
        ),
        "r3_a_coverage": weighted(0.5 * coverage),
        "r3_a_coverage_ramp": weighted(0.5 * _clip(coverage / 0.8)),
        "r3_b_fallback": weighted(0.0 if share < 0.2 else 0.5),
        "r3_b_share_ramp": weighted(0.5 * _clip((share - 0.1) / 0.1)),
        "r3_c_agreement": weighted(0.5 * overlap),
        "r3_c_agreement_ramp": weighted(0.5 * _clip(overlap / 0.2)),
    }


def variant_hits(
    index: Any, query: str, vector: Any, clean_vector: Any, titles: Any, parents: list[Any]
) -> dict[str, list[tuple[int, float]]]:
    """(row, score) lists, best first: the baselines (exact dense) and every variant."""
    from sage_cli.operators.bm25 import top_k
    from sage_cli.operators.retrieve import relative_fusion
    from sage_cli.operators.tokenize import terms

    def fuse(dense: list[tuple[int, float]], sparse: list[tuple[int, float]]) -> Any:
        return relative_fusion([dense, sparse], [0.5, 0.5], DEPTH)

    cosines = index.vectors @ vector
    dense, sparse = top_k(cosines, DEPTH), index.bm25.search(query, DEPTH)
    default = fuse(dense, sparse)
    out = {"relative_exact": default}
    out.update(round3_hits(index, query, dense, sparse))
    out["prf_dense_k5_b0.5"] = fuse(_prf(index, vector, [r for r, _ in dense[:5]], 0.5), sparse)
    out["prf_hybrid_k3_b1.0"] = fuse(_prf(index, vector, [r for r, _ in default[:3]], 1.0), sparse)
    own = set(terms(query))
    counts = Counter(t for r, _ in default[:3] for t in terms(index.records[r]["text"]))
    extra = [t for t, _ in counts.most_common() if t not in own][:10]
    out["rm3_bm25_10_terms"] = fuse(dense, index.bm25.search(f"{query} {' '.join(extra)}", DEPTH))
    out["title_vectors_0.3"] = fuse(top_k(0.7 * cosines + 0.3 * (titles @ vector), DEPTH), sparse)
    per_doc: dict[Any, float] = {}
    for row, score in default:
        per_doc[parents[row]] = per_doc.get(parents[row], 0.0) + score
    aggregated = [(r, s + 0.1 * (per_doc[parents[r]] - s)) for r, s in default]
    out["doc_aggregation_0.1"] = sorted(aggregated, key=lambda item: (-item[1], item[0]))
    rows = {r for r, _ in sparse} | {r for r, _ in dense}
    rescored = sorted(((r, float(cosines[r])) for r in rows), key=lambda item: -item[1])
    out["dense_rescore_bm25"] = fuse(rescored, sparse)
    cleaned = QUESTION_WORDS.sub("", query).strip() or query
    out["clean_query"] = fuse(
        top_k(index.vectors @ clean_vector, DEPTH), index.bm25.search(cleaned, DEPTH)
    )
    out.update(round5_hits(index, query, vector, cosines, sparse))
    return out


def round5_hits(
    index: Any, query: str, vector: Any, cosines: Any, sparse: list[tuple[int, float]]
) -> dict[str, list[tuple[int, float]]]:
    """The fifth round's sentence-vector variants (module docstring); none without them."""
    import numpy as np

    from sage_cli.operators.bm25 import top_k
    from sage_cli.operators.retrieve import (
        DEFAULT_ALPHA,
        adaptive_weights,
        lexical_strength,
        relative_fusion,
    )

    if index.sentences is None:
        return {}
    best = index.sentences.best_cosines(vector, np.arange(index.count), cosines)
    weights = adaptive_weights(DEFAULT_ALPHA, lexical_strength(index.bm25, query, sparse))

    def fused(score: Any) -> list[tuple[int, float]]:
        return relative_fusion([top_k(score, DEPTH), sparse], weights, DEPTH)

    out = {f"r5_sum_{w}": fused(cosines + w * best) for w in (0.25, 0.5, 0.75, 1.0, 2.0)}
    out["r5_max"] = fused(np.maximum(cosines, best))
    out["r5_sentences_only"] = fused(best)
    dense_w, bm25_w = weights
    out["r5_three_lists"] = relative_fusion(
        [top_k(cosines, DEPTH), top_k(best, DEPTH), sparse],
        [dense_w, 0.5 * dense_w, bm25_w],
        DEPTH,
    )
    return out


def measure(retriever: Any, questions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per variant, one {gold_ids, docs} record per question (docs: the top 20)."""
    import numpy as np

    retriever.setup()
    index = retriever.index
    titles_text = [
        str((r.get("metadata") or {}).get("title") or r.get("parent_id") or r["id"])
        for r in index.records
    ]
    embedder = retriever.embedder.get()
    titles = np.asarray(embedder.embed(titles_text))
    parents = [r.get("parent_id") or r["id"] for r in index.records]
    queries = [q["query"] for q in questions]
    cleaned = [QUESTION_WORDS.sub("", q).strip() or q for q in queries]
    vectors, clean_vectors = embedder.embed(queries), embedder.embed(cleaned)
    out: dict[str, list[dict[str, Any]]] = {}
    for question, query, vector, clean in zip(
        questions, queries, vectors, clean_vectors, strict=True
    ):
        hits = variant_hits(index, query, vector, clean, titles, parents)
        for name, rows in hits.items():
            docs = retriever._docs(rows[:20], None)
            out.setdefault(name, []).append({"gold_ids": question["gold_ids"], "docs": docs})
    return out


#: fourth round (issue 14): rerankers of the default's top 20 tried before `--method
#: sentence` was chosen: name -> (sentences per doc, None = all; weight of the best
#: query-sentence cosine; phrase pairs counted)
SENTENCE_VARIANTS = {
    "r4_sentence_w1_first3": (3, 1.0, True),
    "r4_sentence_w2_first3": (3, 2.0, True),  # adopted: `sage rerank --method sentence`
    "r4_sentence_w3_first3": (3, 3.0, True),
    "r4_sentence_w2_all": (None, 2.0, True),
    "r4_sentence_w2_first1": (1, 2.0, True),
    "r4_sentence_w2_no_phrase": (3, 2.0, False),
}
#: fifth round: the same kind of reranker on the top 20 of the default that ranks by sentence
#: vectors itself (the weight of the sentences then counted twice)
SENTENCE_VARIANTS_R5 = {
    "sentence_w0.5_first3": (3, 0.5, True),
    "sentence_w1_first3": (3, 1.0, True),  # adopted: `sage rerank --method sentence`
    "sentence_w2_first3": (3, 2.0, True),  # the fourth round's default
    "sentence_w1_all": (None, 1.0, True),
    "sentence_w1_no_phrase": (3, 1.0, False),
    "phrase_only": (3, 0.0, True),
}


def rerank_variants(
    embedder: Any,
    answers: list[dict[str, Any]],
    tried: dict[str, tuple[int | None, float, bool]] = SENTENCE_VARIANTS,
    prefix: str = "",
) -> dict[str, list[dict]]:
    """Per variant of `tried` (SENTENCE_VARIANTS: the fourth round's, and `r4_chunk_cosine_w2`:
    the phrase score + 2 * the cosine of the query and the whole chunk), one {gold_ids, docs}
    record per retrieved record of `answers` (a top 20), docs in the variant's order; names
    `prefix` + the variant's."""
    import numpy as np

    from sage_cli.operators.chunk import sentences
    from sage_cli.operators.rerank import phrase_order, scaled_scores

    out: dict[str, list[dict]] = {}
    for record in answers:
        docs = record["docs"]
        per_doc = [sentences(d["text"]) for d in docs]
        distinct = list(dict.fromkeys(s for ss in per_doc for s in ss))
        vectors = np.asarray(
            embedder.embed([record["query"], *distinct] + [d["text"] for d in docs])
        )
        query = vectors[0]
        cosine = dict(zip(distinct, (vectors[1 : 1 + len(distinct)] @ query).tolist(), strict=True))
        chunk = vectors[1 + len(distinct) :] @ query
        phrase = dict(phrase_order(record["query"], docs, len(docs)))
        base = scaled_scores(docs)
        variants: dict[str, list[float]] = {}
        for name, (first, weight, pairs) in tried.items():
            variants[prefix + name] = [
                (phrase[i] if pairs else base[i])
                + weight * max((cosine[s] for s in per_doc[i][:first]), default=0.0)
                for i in range(len(docs))
            ]
        variants[(prefix or "r4_") + "chunk_cosine_w2"] = [
            phrase[i] + 2.0 * chunk[i] for i in range(len(docs))
        ]
        for name, scores in variants.items():
            order = sorted(range(len(docs)), key=lambda i: (-round(scores[i], 9), i))
            out.setdefault(name, []).append(
                {"gold_ids": record["gold_ids"], "docs": [docs[i] for i in order]}
            )
    return out
