#!/usr/bin/env bash
# Words per document, one `sage source` per file: a loop, which `sage run` runs as bash does.
set -euo pipefail
for f in docs/*; do
  sage source "$f" | sage map '{"id": r["id"], "words": len(r["text"].split())}'
done
