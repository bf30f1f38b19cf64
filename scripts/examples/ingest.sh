#!/usr/bin/env bash
# Index a folder: `bash ingest.sh docs/ idx/` or, supervised, `sage run ingest.sh docs/ idx/`.
set -euo pipefail
src="${1:-docs/}"
out="${2:-idx/}"
sage source "$src" | sage chunk --size 400 --overlap 40 | sage embed | sage index build "$out"
