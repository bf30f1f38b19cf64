"""Index manifests (operators/index.py `read_manifest`): any bytes as manifest.json give a
manifest or a ResourceUnavailable, never another exception. The index directory around it is
a real one (built once, 20 vectors of 4 dimensions), so a manifest that passes is also opened
with `Index` and searched: that too must answer or raise ResourceUnavailable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import orjson

from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.index import Index, read_manifest, write_index

_DIR: list[Path] = []


def _index() -> Path:
    if not _DIR:
        root = Path(tempfile.mkdtemp(prefix="fuzz-manifest-"))
        vectors = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
        records = [{"id": f"d{i}", "text": f"doc {i} word{i % 3}"} for i in range(20)]
        write_index(root / "idx", vectors, records, None, trees=2)
        _DIR.append(root / "idx")
    return _DIR[0]


def TestOneInput(data: bytes) -> None:
    directory = _index()
    (directory / "manifest.json").write_bytes(data)
    try:
        read_manifest(directory)
        index = Index(directory)
        index.dense(np.ones(4, dtype=np.float32) / 2, 3)
        index.bm25.search("word1 doc", 3)
    except ResourceUnavailable as exc:
        assert str(exc)


_VALID = {
    "format": "sage-index",
    "format_version": 1,
    "model": None,
    "dimension": 4,
    "metric": "angular",
    "count": 20,
    "build": {"trees": 2, "seed": 42},
    "files": {
        "annoy": "index.ann",
        "vectors": "vectors.npy",
        "records": "records.ndjson",
        "bm25": "bm25.npz",
    },
}
SEEDS: list[bytes] = [
    orjson.dumps(_VALID),
    orjson.dumps(_VALID | {"count": 21}),
    orjson.dumps(_VALID | {"dimension": 2**63}),
    orjson.dumps(_VALID | {"build": [], "model": [1]}),
    orjson.dumps(_VALID | {"files": {**_VALID["files"], "annoy": "vectors.npy"}}),  # type: ignore[dict-item]
    b"[]",
    b"",
]
MAX_LEN = 1024
