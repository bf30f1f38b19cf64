"""Okapi BM25 over a fixed set of documents, in numpy (no search-engine dependency).

Statistics are computed once (at index build) and saved as one `.npz` of plain arrays (loads
with `allow_pickle=False`): the vocabulary, a term -> documents posting list in CSR form, the
term frequencies and the document lengths. Terms come from `operators.tokenize.terms`.

Score of document d for query q (Lucene's variant; IDF never negative):

    sum over distinct terms t of q:
        idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * len(d) / avglen))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

A query term repeated in the query counts once. Documents with no query term score 0 and are
never returned.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from .tokenize import terms

K1 = 1.2
B = 0.75


class BM25:
    """BM25 statistics of a corpus and top-k search over it."""

    def __init__(
        self,
        vocab: np.ndarray,
        indptr: np.ndarray,
        doc_ids: np.ndarray,
        tfs: np.ndarray,
        doc_len: np.ndarray,
        k1: float = K1,
        b: float = B,
    ) -> None:
        self.vocab = vocab
        self.indptr = indptr
        self.doc_ids = doc_ids
        self.tfs = tfs
        self.doc_len = doc_len
        self.k1 = k1
        self.b = b
        self.n_docs = int(doc_len.shape[0])
        self.avg_len = float(doc_len.mean()) if self.n_docs else 0.0
        self._term_index: dict[str, int] | None = None

    @classmethod
    def build(cls, texts: Iterable[str], k1: float = K1, b: float = B) -> BM25:
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths: list[int] = []
        for doc, text in enumerate(texts):
            toks = terms(text)
            lengths.append(len(toks))
            for term, tf in Counter(toks).items():
                postings.setdefault(term, []).append((doc, tf))
        vocab = sorted(postings)
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        for i, term in enumerate(vocab):
            indptr[i + 1] = indptr[i] + len(postings[term])
        doc_ids = np.empty(int(indptr[-1]), dtype=np.int32)
        tfs = np.empty(int(indptr[-1]), dtype=np.float32)
        for i, term in enumerate(vocab):
            pairs = postings[term]
            doc_ids[indptr[i] : indptr[i + 1]] = [d for d, _ in pairs]
            tfs[indptr[i] : indptr[i + 1]] = [t for _, t in pairs]
        vocab_arr = np.array(vocab, dtype=str) if vocab else np.zeros(0, dtype="<U1")
        return cls(vocab_arr, indptr, doc_ids, tfs, np.array(lengths, dtype=np.float32), k1, b)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as fh:
            np.savez(
                fh,
                vocab=self.vocab,
                indptr=self.indptr,
                doc_ids=self.doc_ids,
                tfs=self.tfs,
                doc_len=self.doc_len,
                params=np.array([self.k1, self.b], dtype=np.float64),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | BinaryIO) -> BM25:
        """Read what `save` wrote; ValueError for a file that is damaged in any way (a bad
        zip, a truncated array, arrays that disagree: a search must never index outside)."""
        names = ("vocab", "indptr", "doc_ids", "tfs", "doc_len", "params")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays: dict[str, Any] = {k: data[k] for k in names}
        except (OSError, ValueError, KeyError):
            raise
        except Exception as exc:  # noqa: BLE001 - zipfile, zlib, EOF: all mean a damaged file
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        _check_arrays(arrays)
        k1, b = (float(x) for x in arrays.pop("params"))
        return cls(**arrays, k1=k1, b=b)

    def term_index(self) -> dict[str, int]:
        if self._term_index is None:
            self._term_index = {str(t): i for i, t in enumerate(self.vocab.tolist())}
        return self._term_index

    def idf(self, df: int) -> float:
        return math.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` (float32, length n_docs)."""
        out = np.zeros(self.n_docs, dtype=np.float32)
        if not self.n_docs:
            return out
        index = self.term_index()
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / max(self.avg_len, 1e-9))
        for term in dict.fromkeys(terms(query)):
            t = index.get(term)
            if t is None:
                continue
            lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
            docs = self.doc_ids[lo:hi]
            tf = self.tfs[lo:hi]
            out[docs] += self.idf(hi - lo) * tf * (self.k1 + 1.0) / (tf + norm[docs])
        return out

    def max_score(self, query: str) -> float:
        """The most any document could score for `query`: the sum over its distinct terms that
        the corpus holds of idf * (k1 + 1) (the limit of a term's BM25 part as tf grows)."""
        index = self.term_index()
        total = 0.0
        for term in dict.fromkeys(terms(query)):
            t = index.get(term)
            if t is not None:
                total += self.idf(int(self.indptr[t + 1] - self.indptr[t])) * (self.k1 + 1.0)
        return total

    def idf_coverage(self, query_terms: Iterable[str], doc: int) -> float:
        """The share of the IDF mass of `query_terms` (distinct) that document `doc` contains;
        a term the corpus lacks counts with the highest IDF (df 0). 0 for no terms."""
        index = self.term_index()
        total = found = 0.0
        for term in dict.fromkeys(query_terms):
            t = index.get(term)
            if t is None:
                total += self.idf(0)
                continue
            lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
            weight = self.idf(hi - lo)
            total += weight
            if (self.doc_ids[lo:hi] == doc).any():
                found += weight
        return found / total if total > 0 else 0.0

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (document, score) pairs, best first; documents scoring 0 are left out."""
        return top_k(self.scores(query), k, positive_only=True)


def _check_arrays(a: dict[str, Any]) -> None:
    """ValueError unless the arrays of a saved BM25 are consistent (see BM25.load)."""
    vocab, indptr, doc_ids, tfs, doc_len, params = (
        a[k] for k in ("vocab", "indptr", "doc_ids", "tfs", "doc_len", "params")
    )
    if any(x.ndim != 1 for x in (vocab, indptr, doc_ids, tfs, doc_len, params)):
        raise ValueError("BM25 arrays are not one-dimensional")
    if vocab.dtype.kind != "U" or indptr.dtype.kind != "i" or doc_ids.dtype.kind != "i":
        raise ValueError("BM25 arrays have the wrong types")
    if tfs.dtype.kind != "f" or doc_len.dtype.kind != "f" or params.dtype.kind != "f":
        raise ValueError("BM25 arrays have the wrong types")
    if params.shape != (2,) or not np.isfinite(params).all():
        raise ValueError("bad BM25 parameters")
    if indptr.shape[0] != vocab.shape[0] + 1 or doc_ids.shape != tfs.shape:
        raise ValueError("inconsistent BM25 arrays")
    if indptr[0] != 0 or indptr[-1] != doc_ids.shape[0] or (np.diff(indptr) < 0).any():
        raise ValueError("inconsistent BM25 posting lists")
    if doc_ids.size and (doc_ids.min() < 0 or doc_ids.max() >= doc_len.shape[0]):
        raise ValueError("a BM25 posting names a document that does not exist")
    if not (np.isfinite(tfs).all() and np.isfinite(doc_len).all()):
        raise ValueError("BM25 statistics are not finite")


def top_k(scores: np.ndarray, k: int, positive_only: bool = False) -> list[tuple[int, float]]:
    """(row, score) of the k highest scores, best first, ties broken by the lower row."""
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return []
    k = min(k, n)
    candidates = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    # lexsort: last key is primary -> score descending, then row ascending
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    out = [(int(i), float(scores[i])) for i in order]
    if positive_only:
        out = [(i, s) for i, s in out if s > 0]
    return out
