"""Check an annoy index file before annoy memory-maps it.

annoy trusts its file: a node whose child index points past the end of the file, or a bucket
whose item count is negative, makes a query read outside the mapping (SIGSEGV) or throw a C++
`std::length_error` (SIGABRT), killing the process with no Python exception. Fuzzing found both
after a few flipped bytes in `index.ann`. `check_annoy` walks the node table with numpy first
and turns any such damage into a `ResourceUnavailable` (exit 69).

The layout (annoylib.h, angular metric, 32-bit ids and floats): the file is `n_nodes` nodes of
`12 + 4 * f` bytes each, `{int32 n_descendants; int32 children[2]; float v[f]}`. Nodes
`0 .. n_items-1` are the items (`n_descendants == 1`). A node with `2 <= n_descendants <= K`
(K = f + 2) is a bucket listing `n_descendants` item ids from `children[0]` on; a node with
more is a split whose two children are nodes built before it (a lower index). The roots come
last, each with `n_descendants == n_items`: annoy takes `n_items` from the last node.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import ResourceUnavailable

#: bytes of a node before its vector: n_descendants and two children, int32 each
NODE_HEADER = 12
#: bucket nodes checked per numpy step (bounds the memory the check takes)
_STEP = 4096


def annoy_node_bytes(dimension: int) -> int:
    return NODE_HEADER + 4 * dimension


def check_annoy(path: str | os.PathLike[str], dimension: int, count: int, fix: str) -> None:
    """Raise ResourceUnavailable (ending with `fix`) unless `path` is an angular annoy index of
    `count` items of `dimension` whose every node refers only to nodes inside the file."""
    import numpy as np

    p = Path(path)

    def corrupt(why: str) -> ResourceUnavailable:
        return ResourceUnavailable(f"{p}: annoy file is corrupt ({why}); {fix}")

    node = annoy_node_bytes(dimension)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ResourceUnavailable(
            f"{p}: cannot read the annoy file: {exc.strerror}; {fix}"
        ) from None
    if size == 0 or size % node:
        raise corrupt(f"{size} bytes is not a whole number of {node}-byte nodes: truncated?")
    n_nodes = size // node
    if n_nodes <= count or n_nodes >= 2**31:
        raise corrupt(f"{n_nodes} nodes cannot hold {count} items and their trees")
    width = node // 4
    try:
        table = np.memmap(p, dtype="<i4", mode="r", shape=(n_nodes, width))
    except (OSError, ValueError) as exc:
        raise corrupt(str(exc)) from None
    try:
        nd = np.array(table[:, 0])
        if (nd[:count] != 1).any():
            bad = int(np.flatnonzero(nd[:count] != 1)[0])
            raise corrupt(f"item {bad} has {int(nd[bad])} descendants, not 1")
        if int(nd[-1]) != count:
            raise corrupt(f"the last root holds {int(nd[-1])} items, the manifest says {count}")
        tail = nd[count:]
        if (tail < 1).any():
            raise corrupt("a tree node has no descendants")
        k = dimension + 2
        own = np.arange(count, n_nodes, dtype=np.int64)
        split = tail > k
        if split.any():
            children = np.array(table[count:, 1:3][split], dtype=np.int64)
            if (children < 0).any() or (children >= own[split][:, None]).any():
                raise corrupt("a tree node points outside the tree")
        buckets = own[~split]
        for start in range(0, buckets.shape[0], _STEP):
            rows = buckets[start : start + _STEP]
            ids = np.array(table[rows, 1 : 1 + k])
            used = np.arange(k)[None, :] < nd[rows][:, None]
            listed = ids[used]
            if (listed < 0).any() or (listed >= count).any():
                raise corrupt("a tree leaf lists an item that does not exist")
    finally:
        mm = getattr(table, "_mmap", None)
        del table
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
