#!/usr/bin/env bash
# Local RAG over CPython's own help topics (pydoc_data.topics, on every Python install):
# index the corpus, answer the bundled questions with SmolLM2 through llama.cpp, show each
# answer with its sources and citations, and score answers (contains, groundedness) and
# retrieval against the gold labels.
#
# Usage: scripts/rag.sh [OUT_DIR]          (default: demo/out; needs `sage` on PATH)
#        SAGE_QUESTIONS=my.ndjson scripts/rag.sh   ({"id","query"} per line; gold optional)
# Re-runs take seconds: embeddings and answers are cached by content (SAGE_CACHE_DIR).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-demo/out}"
questions="${SAGE_QUESTIONS:-$here/rag_questions.ndjson}"
mkdir -p "$out"

echo "1/3 corpus: CPython help topics -> $out/corpus.ndjson" >&2
python "$here/pydoc_corpus.py" > "$out/corpus.ndjson"

echo "2/3 index: chunk, embed (MiniLM), build -> $out/index" >&2
sage source "$out/corpus.ndjson" \
  | sage chunk --size 400 --overlap 60 \
  | sage embed \
  | sage index build "$out/index" > "$out/index.json"

echo "3/3 answer: retrieve (hybrid: embeddings + BM25), prompt, generate (SmolLM2), eval -> $out/answers.ndjson" >&2
sage source "$questions" \
  | sage retrieve --index "$out/index" -k 5 \
  | sage prompt --template qa --context-tokens 300 \
  | sage generate --temperature 0 --max-tokens 48 \
  | sage eval -k 5 --on-error emit > "$out/answers.ndjson"

# Each answer with the documents it was drawn from (and those it cites), then the scores:
# contains (the gold answer is in the answer), groundedness (the share of the answer's words
# found in the retrieved text), recall@5, MRR.
sage filter 'not r.get("_summary")' "$out/answers.ndjson" \
  | sage map '{"id": r["id"], "question": r["query"], "answer": r.get("answer"),
               "sources": [d["id"] for d in r.get("docs", [])], "cited": r.get("citations", [])}' \
  | sage sink
sage filter 'r.get("_summary", False)' "$out/answers.ndjson" | sage sink
