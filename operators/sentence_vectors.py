"""Sentence vectors of an index: each chunk's first sentences embedded one by one.

A chunk's vector is the mean of everything in it, so the one sentence that answers a question
("Delay execution for a given number of seconds") is blurred by the rest of the chunk. An
index built with a model also keeps the vectors of each chunk's first `LEADING` sentences
(`sentences.npz`: `vectors`, float32 (S, dimension), L2-normalised; `offsets`, int64
(count + 1): the sentences of row r are vectors[offsets[r]:offsets[r + 1]]). The default
`sage retrieve` re-scores its dense candidates with them (`rescore`); `--mode dense` does not.
Measured in docs/retrieval.md ("Fifth round").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from .base import ResourceUnavailable

if TYPE_CHECKING:
    import numpy as np

#: sentences per chunk that get their own vector (the first ones: a docstring or a section
#: says what it is about first)
LEADING = 3
#: the weight of a chunk's best sentence cosine added to its own cosine (`--sentence-weight`)
DEFAULT_WEIGHT = 0.5
FILE = "sentences.npz"


def leading_sentences(text: str, count: int = LEADING) -> list[str]:
    """The first `count` sentences of `text`, as `sage chunk --by sentences` cuts them."""
    from .chunk import sentences

    return sentences(text)[:count]


def save(path: str | os.PathLike[str], per_row: Sequence[np.ndarray], dimension: int) -> None:
    """Write one (n_r, dimension) array of sentence vectors per row as sentences.npz."""
    import numpy as np

    counts = [int(v.shape[0]) for v in per_row]
    offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    stacked = [v for v in per_row if v.shape[0]]
    vectors = (
        np.vstack(stacked).astype(np.float32, copy=False)
        if stacked
        else np.zeros((0, dimension), dtype=np.float32)
    )
    with open(path, "wb") as fh:  # Python's write: a full disk is ENOSPC (see write_index)
        np.savez(fh, vectors=vectors, offsets=offsets)


def _mapped_member(fh: BinaryIO, info: Any) -> np.ndarray | None:
    """The array stored uncompressed as the .npz member `info` (a ZipInfo of the archive open
    in `fh`), memory-mapped read-only (np.savez stores members uncompressed; np.load of an .npz
    reads them whole: about 3x vectors.npy, for every process that opens the index); None when
    it is not stored so (compressed, Fortran order), for np.load to read."""
    import struct
    import zipfile

    import numpy as np

    member = info.filename
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    fh.seek(info.header_offset)
    local = fh.read(30)  # a zip local file header: its name and extra field lengths at 26
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"{member}: no local file header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    fh.seek(info.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        return None
    if fortran or dtype.hasobject:
        return None
    start = fh.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if start + size > os.fstat(fh.fileno()).st_size:
        raise ValueError(f"{member}: cut short")
    if size == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(fh, dtype=dtype, mode="r", offset=start, shape=shape)


class SentenceVectors:
    """The sentence vectors of one index generation, read from an open file."""

    def __init__(self, fh: BinaryIO, name: str, count: int, dimension: int, rebuild: str):
        import numpy as np

        try:
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as archive:
                self.offsets = np.asarray(archive["offsets"])
                # the archive's own directory, not a second read of it
                mapped = _mapped_member(fh, archive.zip.getinfo("vectors.npy"))
                self.vectors = mapped if mapped is not None else np.asarray(archive["vectors"])
        except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError (a method byte)...
            raise ResourceUnavailable(
                f"{name}: corrupt sentence vectors ({exc}); {rebuild}"
            ) from None
        v, o = self.vectors, self.offsets
        ok = (
            v.dtype == np.float32
            and v.ndim == 2
            and v.shape[1] == dimension
            and o.shape == (count + 1,)
            and o.dtype.kind == "i"
            and int(o[0]) == 0
            and int(o[-1]) == v.shape[0]
            and bool(np.all(np.diff(o) >= 0))
        )
        if not ok:
            raise ResourceUnavailable(
                f"{name}: sentence vectors do not fit the index ({v.dtype} {v.shape}, "
                f"{o.shape[0]} offsets for {count} rows of {dimension} dimensions); {rebuild}"
            )

    def of_row(self, row: int) -> np.ndarray:
        return self.vectors[self.offsets[row] : self.offsets[row + 1]]

    def best_cosines(self, query: np.ndarray, rows: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Per row of `rows`, the best cosine between `query` and one of its sentence vectors;
        `own` (the rows' own cosines) for a row without any."""
        import numpy as np

        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        best = np.array(own, dtype=np.float64)
        taken = np.concatenate(
            [np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
            or [np.zeros(0, dtype=np.int64)]
        )
        if taken.size:
            found = np.full(len(rows), -np.inf)
            np.maximum.at(
                found, np.repeat(np.arange(len(rows)), stops - starts), self.vectors[taken] @ query
            )
            best = np.where(stops > starts, found, best)
        return best

    def rescore(
        self, chunk_vectors: Any, query: np.ndarray, rows: Sequence[int], weight: float, k: int
    ) -> list[tuple[int, float]]:
        """(row, cosine + weight * best sentence cosine) of `rows`, the k best, best first
        (ties by the lower row). A row without sentence vectors counts its own cosine twice."""
        import numpy as np

        if not rows:
            return []
        rows_a = np.asarray(sorted(set(rows)), dtype=np.int64)
        cosines = np.asarray(chunk_vectors[rows_a] @ query, dtype=np.float64)
        scores = cosines + weight * self.best_cosines(query, rows_a, cosines)
        order = sorted(range(len(rows_a)), key=lambda i: (-float(scores[i]), int(rows_a[i])))
        return [(int(rows_a[i]), float(scores[i])) for i in order[:k]]
