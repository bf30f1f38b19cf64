"""Reorder retrieved `docs` (`sage rerank`).

- `sentence` (default): the phrase score (below) plus SENTENCE_WEIGHT (1) times the best
  cosine between the query and one of the doc's first SENTENCES_PER_DOC (3) sentences, all
  embedded in one batched call with the embedding model (the index's own with `index`, else
  `model`, default minilm-l6); with `index`, the sentence vectors the index keeps
  (sentences.npz) are used for the docs it holds with the same text, so only the query and
  what it lacks are embedded. A mean-pooled chunk vector blurs the one sentence that answers
  a question with the rest of the chunk; matching sentence by sentence finds it. About 40-60
  short sentences per query of 20 docs: a few tenths of a second on 2 cores. Since the default
  `sage retrieve` ranks by sentence vectors itself (operators.sentence_vectors), the weight
  is 1 (it was 2 over chunk-vector retrieval): measured in docs/retrieval.md ("Fifth round"),
  it raises recall@1 on most question sets and lowers it on one, and lowers recall@5 on two.
- `phrase`: relevance from the retrieval scores and the query's word pairs. Each doc's
  `score` is min-max scaled to 0..1 over the record's docs (no scores: 1 for the first doc
  down to 0 for the last), and 0.1 is added for every pair of adjacent query words (not both
  stop words) that occurs, in order and adjacent, in the doc's title, heading or text:
  "leading whitespace", "repeated execution". BM25 and embeddings both ignore word order;
  this is the one signal they miss. No model, under a millisecond per query.
- `mmr` (maximal marginal relevance, Carbonell & Goldstein 1998): diversity, not relevance.
  Picks documents one at a time, each maximising `lambda * cos(query, doc) - (1 - lambda) *
  max cos(doc, already picked)`, so near-duplicates of a picked document sink. `lambda` = 1 is
  pure relevance, 0 pure diversity. Vectors come from, in order: the doc's own `embedding`;
  the index given with `index` (looked up by the doc's id, no model needed for the docs); the
  embedding model (the index's own, sha256-checked, or `model`, default minilm-l6). The query
  vector is the record's `embedding` when it has the right dimension, else the query embedded
  with the same model. It lowers recall@5 on every measured set: use it to spread a context
  over more documents, not to find the right one.
- `llm`: the local generation model (default smollm2-135m) judges each document: asked (in its
  own chat template) whether the document helps answer the question, its next-token
  probabilities of "yes" and "no" give the score 10 * P(yes) / (P(yes) + P(no)), from 0 to 10.
  Nothing is sampled, so the order is deterministic. (Asking a 135M model to write a 0-10
  rating, even grammar-constrained, gave the same rating to every document: useless.)
  Documents are sorted by score, ties kept in their retrieved order. With SmolLM2-135M it
  lowers recall and costs one model call (seconds on 2 cores) per document: kept for larger
  local models.

Each doc keeps its fields; `score` becomes the reranker's (the phrase score, the MMR objective
when the doc was picked, or the 0-10 rating) and the previous score moves to
`retrieval_score`; `rank` is renumbered from 1. `k` keeps only the first k. A record with no
docs passes through.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Operator, OptionError, Record, RecordError
from .chunk import sentences
from .index import Index, make_embedder, normalise, record_vector
from .retrieve import QueryEmbedder, query_text
from .tokenize import STOP_WORDS, terms

if TYPE_CHECKING:
    import numpy as np

METHODS = ("phrase", "sentence", "mmr", "llm")
DEFAULT_METHOD = "sentence"
#: what each query word pair found in a doc adds to its 0..1 retrieval score
PHRASE_WEIGHT = 0.1
#: sentence: what the best query-sentence cosine (-1..1) of a doc adds to its phrase score
SENTENCE_WEIGHT = 1.0
#: sentence: the sentences of each doc compared with the query (the first ones)
SENTENCES_PER_DOC = 3
#: characters of a document shown to the judging model
LLM_DOC_CHARS = 1500
#: (query, document) pairs the llm method judges together (sequences of the batched decoder)
LLM_PARALLEL = 8
LLM_SYSTEM = "You judge whether a document helps answer a question. Answer yes or no."
LLM_PROMPT = (
    "Question: {query}\nDocument: {doc}\n"
    "Does the document help answer the question? Answer yes or no."
)


class LLMJudge:
    """Relevance of a document to a question, 0-10, from a chat model's yes/no probabilities."""

    def __init__(self, llm: Any) -> None:
        import numpy as np

        self.llm = llm
        template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
        self.formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def token_text(token: int) -> str:
                return llm.detokenize([token], special=True).decode("utf-8", "replace")

            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=token_text(llm.token_eos()),
                bos_token=token_text(llm.token_bos()),
            )
        self.yes = self._first_tokens(("yes", "Yes", " yes", " Yes", "YES"))
        self.no = self._first_tokens(("no", "No", " no", " No", "NO"))
        self._np = np
        #: the batched decoder of `score_many`, made on first use
        self.decoder: Any = None

    def _first_tokens(self, words: Sequence[str]) -> list[int]:
        ids = {self.llm.tokenize(w.encode(), add_bos=False, special=False)[0] for w in words}
        return sorted(ids)

    def prompt(self, query: str, doc: str) -> str:
        user = LLM_PROMPT.format(query=query, doc=doc[:LLM_DOC_CHARS])
        if self.formatter is None:
            return f"{LLM_SYSTEM}\n\n{user}\nAnswer:"
        messages: Any = [
            {"role": "system", "content": LLM_SYSTEM},
            {"role": "user", "content": user},
        ]
        return str(self.formatter(messages=messages).prompt)

    def _tokens(self, query: str, doc: str) -> list[int]:
        tokens = self.llm.tokenize(
            self.prompt(query, doc).encode("utf-8"), add_bos=False, special=True
        )
        return tokens[-(self.llm.n_ctx() - 1) :]  # the end (the question) matters most

    def score(self, query: str, doc: str) -> float:
        """One document judged with one model call."""
        import llama_cpp

        llm = self.llm
        llm.reset()
        llm.eval(self._tokens(query, doc))
        row = llama_cpp.llama_get_logits(llm.ctx)
        return self._rating(self._np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)))

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Many (query, document) pairs judged by the batched decoder (`operators/batched.py`,
        the one generate uses): up to LLM_PARALLEL prompts in flight, each prefilled whole."""
        from .batched import BatchedDecoder, Request

        if self.decoder is None:
            self.decoder = BatchedDecoder(
                self.llm,
                n_seq=LLM_PARALLEL,
                n_ctx_seq=self.llm.n_ctx(),
                threads=self.llm.context_params.n_threads,
                reuse_prefix=False,  # the scores of one-at-a-time calls, not close to them
            )
        requests = [Request(self._tokens(q, d), max_tokens=1, logits=True) for q, d in pairs]
        scores = []
        for done in self.decoder.run(requests):
            if isinstance(done, Exception):
                raise done
            scores.append(self._rating(done.logits))
        return scores

    def _rating(self, row: Any) -> float:
        np = self._np
        logits = np.asarray(row, dtype=np.float64)
        top = logits.max()
        p_yes = float(np.exp(logits[self.yes] - top).sum())
        p_no = float(np.exp(logits[self.no] - top).sum())
        return 10.0 * p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0


def word_pairs(text: str) -> set[tuple[str, str]]:
    """Adjacent term pairs of `text` (`operators.tokenize.terms`), but pairs of two stop words."""
    words = terms(text)
    return {
        (a, b)
        for a, b in zip(words, words[1:], strict=False)
        if not (a in STOP_WORDS and b in STOP_WORDS)
    }


def _doc_words(doc: Record) -> str:
    meta = doc.get("metadata")
    parts = [doc.get("text")]
    if isinstance(meta, dict):
        parts = [meta.get("title"), meta.get("heading"), *parts]
    return "\n".join(p for p in parts if isinstance(p, str))


def scaled_scores(docs: list[Record]) -> list[float]:
    """The docs' `score`s min-max scaled to 0..1 (all equal: 1); without a numeric score on
    every doc, their order: 1 for the first down to 0 for the last."""
    scores = [d.get("score") for d in docs]
    if all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        values = [float(s) for s in scores]  # type: ignore[arg-type]
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 1.0 for v in values]
    n = len(docs)
    return [1.0 - i / (n - 1) if n > 1 else 1.0 for i in range(n)]


def phrase_order(query: str, docs: list[Record], k: int) -> list[tuple[int, float]]:
    """(doc position, score) of the k best docs by scaled retrieval score plus PHRASE_WEIGHT
    per query word pair found in the doc; ties keep the retrieved order."""
    pairs = word_pairs(query)
    scores = [
        base + PHRASE_WEIGHT * len(pairs & word_pairs(_doc_words(doc)))
        for base, doc in zip(scaled_scores(docs), docs, strict=True)
    ]
    order = sorted(range(len(docs)), key=lambda i: (-round(scores[i], 9), i))
    return [(i, scores[i]) for i in order[:k]]


def sentence_order(
    query: str,
    docs: list[Record],
    embed: Callable[[list[str]], Any],
    k: int,
    stored: Callable[[Record, int], np.ndarray | None] | None = None,
) -> list[tuple[int, float]]:
    """(doc position, score) of the k best docs by phrase score (`phrase_order`) plus
    SENTENCE_WEIGHT * the best cosine between the query and one of the doc's first
    SENTENCES_PER_DOC sentences; `embed(texts)` returns unit vectors, called once (the query
    and every distinct sentence not `stored`). `stored(doc, n)`: the unit vectors of the doc's
    first n sentences where they are kept already (an index's sentences.npz), else None.
    Ties keep the retrieved order."""
    import numpy as np

    per_doc = [sentences(doc["text"])[:SENTENCES_PER_DOC] for doc in docs]
    kept = [
        stored(doc, len(doc_sentences)) if stored is not None and doc_sentences else None
        for doc, doc_sentences in zip(docs, per_doc, strict=True)
    ]
    distinct = list(
        dict.fromkeys(
            s
            for doc_sentences, vectors in zip(per_doc, kept, strict=True)
            if vectors is None
            for s in doc_sentences
        )
    )
    vectors = np.asarray(embed([query, *distinct]), dtype=np.float32)
    cosine = dict(zip(distinct, (vectors[1:] @ vectors[0]).tolist(), strict=True))
    phrase = dict(phrase_order(query, docs, len(docs)))
    best = [
        max((cosine[s] for s in doc_sentences), default=0.0)
        if own is None
        else float(np.max(own @ vectors[0]))
        for doc_sentences, own in zip(per_doc, kept, strict=True)
    ]
    scores = [phrase[i] + SENTENCE_WEIGHT * best[i] for i in range(len(docs))]
    order = sorted(range(len(docs)), key=lambda i: (-round(scores[i], 9), i))
    return [(i, scores[i]) for i in order[:k]]


def mmr_order(query: np.ndarray, docs: np.ndarray, lam: float, k: int) -> list[tuple[int, float]]:
    """(doc position, MMR score) of k documents in MMR order; ties go to the earlier document."""
    import numpy as np

    n = docs.shape[0]
    relevance = docs @ query
    similarity = docs @ docs.T
    chosen: list[tuple[int, float]] = []
    redundancy = np.full(n, -np.inf)
    left = list(range(n))
    while left and len(chosen) < k:
        best, best_score = left[0], -np.inf
        for i in left:
            penalty = redundancy[i] if chosen else 0.0
            score = lam * relevance[i] - (1 - lam) * penalty
            if score > best_score:
                best, best_score = i, score
        chosen.append((best, float(best_score)))
        left.remove(best)
        redundancy = np.maximum(redundancy, similarity[best])
    return chosen


class Reranker(Operator):
    """Reorder `docs` by relevance (phrase), diversity (MMR) or the local model's judgement."""

    name = "rerank"
    requires: ClassVar[dict[str, dict[str, Any]]] = {
        "query": {"type": "string", "description": "the query (`text` if absent)"},
        "docs": {"type": "array", "items": {"type": "object"}},
    }
    produces: ClassVar[dict[str, dict[str, Any]]] = {
        "docs": {
            "type": "array",
            "description": "reordered; score, retrieval_score, rank",
            "items": {"type": "object"},
        },
    }
    default_batch_size = 16

    def __init__(
        self,
        method: str = DEFAULT_METHOD,
        *,
        lam: float = 0.5,
        k: int | None = None,
        index: str | os.PathLike[str] | None = None,
        model: str | None = None,
        field: str | None = None,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        threads: int | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
        embedder_factory: Callable[[Path, int | None], Any] | None = None,
        judge_factory: Callable[[Path, int | None], Any] | None = None,
        batched: bool = True,
    ) -> None:
        if method not in METHODS:
            raise OptionError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 <= lam <= 1.0:
            raise OptionError(f"--lambda must be between 0 and 1, got {lam}")
        if k is not None and k < 1:
            raise OptionError(f"-k must be at least 1, got {k}")
        self.method = method
        #: llm: a record's documents judged together by the batched decoder (False: one model
        #: call per document, the path it replaced, kept for the bench's baseline)
        self.batched = batched
        self.lam = lam
        self.k = k
        self.index_dir = Path(index) if index is not None else None
        self.model = model
        self.field = field
        self.model_dirs = list(model_dirs)
        self.threads = threads
        self.hash_cache = hash_cache
        self.embedder_factory = embedder_factory
        self.judge_factory = judge_factory
        self.index: Index | None = None
        self._embedder: Any = None
        self._query_embedder: QueryEmbedder | None = None
        self._llm: Any = None
        self._judge: Any = None

    def setup(self) -> None:
        if self.method == "sentence" and self.index_dir is None and self._embedder is None:
            from .models import DEFAULT_EMBED, locate

            # every record needs the model: an unknown or missing one fails the start (exit
            # 2 or 69), not the first record
            locate(self.model or DEFAULT_EMBED, self.model_dirs)
        if self.index_dir is not None and self.index is None:
            self.index = Index(self.index_dir)
            self._query_embedder = QueryEmbedder(
                self.index,
                self.model,
                self.model_dirs,
                self.threads,
                self.embedder_factory,
                self.hash_cache,
            )

    # -- models, loaded on first use -------------------------------------------------------

    def embedder(self) -> Any:
        if self._query_embedder is not None:
            return self._query_embedder.get()
        if self._embedder is None:
            from .models import DEFAULT_EMBED, locate

            path = locate(self.model or DEFAULT_EMBED, self.model_dirs)
            self._embedder = make_embedder(
                path, self.threads, self.embedder_factory, self.hash_cache
            )
        return self._embedder

    def judge(self) -> Any:
        """Something with `score(query, text) -> float`: an LLMJudge on the generation model."""
        if self._judge is None:
            from .models import DEFAULT_GENERATE, locate

            path = locate(self.model or DEFAULT_GENERATE, self.model_dirs)
            if self.judge_factory is not None:
                self._judge = self.judge_factory(path, self.threads)
            else:
                from .llm import load_llama

                self._llm = load_llama(path, n_ctx=1024, n_threads=self.threads)
                self._judge = LLMJudge(self._llm)
        return self._judge

    # -- the operator ----------------------------------------------------------------------

    def process(self, batch: list[Record]) -> list[Record]:
        self.setup()
        out = []
        for record in batch:
            docs = record.get("docs")
            if docs is None:
                raise RecordError("record has no 'docs' field (run sage retrieve first)")
            if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
                raise RecordError("field 'docs' must be a list of objects")
            query = query_text(record, self.field)
            if not docs:
                out.append(record)
                continue
            if self.method in ("phrase", "sentence"):
                for i, doc in enumerate(docs):
                    if not isinstance(doc.get("text"), str):
                        raise RecordError(f"doc {i + 1} has no `text` to rerank by")
                if self.method == "phrase":
                    order = phrase_order(query, docs, self.k or len(docs))
                else:
                    order = sentence_order(
                        query,
                        docs,
                        self.embedder().embed,
                        self.k or len(docs),
                        stored=self._stored_sentences if self.index is not None else None,
                    )
            elif self.method == "mmr":
                order = self._mmr(record, query, docs)
            else:
                order = self._llm_order(query, docs)
            result = dict(record)
            result["docs"] = [
                self._reranked(docs[i], score, rank) for rank, (i, score) in enumerate(order, 1)
            ]
            out.append(result)
        return out

    def _stored_sentences(self, doc: Record, count: int) -> np.ndarray | None:
        """The vectors of the doc's first `count` sentences from the index's sentences.npz,
        where the index holds this doc (by id) with this very text and kept that many for
        it (a chunk of one sentence has none there: embedded here as before)."""
        index = self.index
        if index is None or "id" not in doc or index.sentences is None:
            return None
        row = index.row_of(doc["id"])
        if row is None or index.records[row].get("text") != doc["text"]:
            return None
        vectors = index.sentences.of_row(row)
        return vectors if len(vectors) == count else None

    @staticmethod
    def _reranked(doc: Record, score: float, rank: int) -> Record:
        new = dict(doc)
        if "score" in doc:
            new["retrieval_score"] = doc["score"]
        new["score"] = round(score, 6)
        new["rank"] = rank
        return new

    def _mmr(self, record: Record, query: str, docs: list[Record]) -> list[tuple[int, float]]:
        import numpy as np

        vectors: list[Any] = [None] * len(docs)
        todo = []
        for i, doc in enumerate(docs):
            vec = record_vector(doc)
            if vec is None and self.index is not None and "id" in doc:
                row = self.index.row_of(doc["id"])
                if row is not None:
                    vec = np.asarray(self.index.vectors[row])
            if vec is None:
                if not isinstance(doc.get("text"), str):
                    raise RecordError(f"doc {i + 1} has no `text` and no embedding to rerank by")
                todo.append(i)
            vectors[i] = vec
        qvec = record_vector(record)
        dims = {v.shape[0] for v in vectors if v is not None}
        if qvec is not None and dims != {qvec.shape[0]}:
            qvec = None  # no doc vector to check it against, or it does not fit: embed the query
        texts = [docs[i]["text"] for i in todo] + ([query] if qvec is None else [])
        if texts:
            rows = self.embedder().embed(texts)
            for i, row in zip(todo, rows, strict=False):
                vectors[i] = row
            if qvec is None:
                qvec = rows[-1]
        assert qvec is not None
        if len({v.shape[0] for v in vectors} | {qvec.shape[0]}) != 1:
            raise RecordError("docs and query have embeddings of different dimensions")
        matrix = normalise(np.vstack(vectors).astype(np.float32))
        return mmr_order(normalise(qvec.astype(np.float32)), matrix, self.lam, self.k or len(docs))

    def _llm_order(self, query: str, docs: list[Record]) -> list[tuple[int, float]]:
        judge = self.judge()
        texts = []
        for i, doc in enumerate(docs):
            text = doc.get("text")
            if not isinstance(text, str):
                raise RecordError(f"doc {i + 1} has no `text` to judge")
            texts.append(text)
        if self.batched and hasattr(judge, "score_many"):
            scores = [float(s) for s in judge.score_many([(query, t) for t in texts])]
        else:
            scores = [float(judge.score(query, t)) for t in texts]
        order = sorted(range(len(docs)), key=lambda i: (-round(scores[i], 6), i))
        return [(i, scores[i]) for i in order][: self.k or len(docs)]

    def close(self) -> list[Record]:
        if self._query_embedder is not None:
            self._query_embedder.close()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._llm is not None:
            try:
                if self._judge is not None and self._judge.decoder is not None:
                    self._judge.decoder.close()
                self._llm.close()
            except Exception:  # noqa: BLE001 - releasing native memory must not fail a run
                pass
            self._llm = None
        self._judge = None
        return []
