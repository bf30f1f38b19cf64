"""Validate a GGUF model file before llama.cpp sees it.

llama.cpp answers a malformed GGUF with a `GGML_ASSERT` that aborts the whole process (SIGABRT,
no Python exception). Every model file therefore passes `check_gguf` first: the header, every
metadata key, every tensor description and the tensor data's extent are checked against the file
in pure Python, and any problem becomes a `ResourceUnavailable` (exit 69) that says how to fix it.

`check_gguf(path)` is the fast check run before every load (tens of milliseconds on a 100 MB
model: it walks the header with `struct`, without building arrays). `check_gguf(path, deep=True)`
also parses the file with the `gguf` package's own `GGUFReader` (seconds on a large vocabulary),
for `sage models verify` and `sage doctor`.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ResourceUnavailable

#: what to run when a model file is missing or damaged
FIX = "run `sage models install` to reinstall the models"

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# value types of the GGUF key/value section: code -> struct format (scalars only)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# metadata worth keeping (small scalars or strings); arrays are only walked
_KEEP_SUFFIXES = (
    "architecture",
    "name",
    "license",
    "context_length",
    "embedding_length",
    "block_count",
    "pooling_type",
    "file_type",
    "model",
    "alignment",
    "vocab_size",
    "size_label",
)


class GGUFError(ValueError):
    """The file is not a well-formed GGUF (the message says where)."""


@dataclass
class GGUFInfo:
    """What the check learnt about a valid GGUF file."""

    path: Path
    size: int
    version: int
    n_tensors: int
    n_kv: int
    data_offset: int
    data_end: int
    metadata: dict[str, Any] = field(default_factory=dict)
    n_vocab: int = 0
    #: the model has learned absolute position embeddings (BERT, GPT-2): a position past
    #: `context_length` makes llama.cpp abort, so the context must never exceed it
    absolute_positions: bool = False

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) and value > 0 else None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


#: ggml type -> (block size, bytes per block) for the common types (F32, F16, Q4_0 ... Q6_K,
#: Q8_K, BF16), so the check needs no `gguf` import (0.14 s) for the usual models
_COMMON_QUANT_SIZES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    30: (1, 2),
}


def _quant_size(ttype: int) -> tuple[int, int] | None:
    """(block size, bytes per block) of a ggml tensor type; None for an unknown type."""
    if ttype in _COMMON_QUANT_SIZES:
        return _COMMON_QUANT_SIZES[ttype]
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return None


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(f"file ends inside {what} (offset {self.pos}): truncated")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what)
        self.need(n, what)
        value = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return value

    def skip_strings(self, count: int, what: str, collect: bool) -> list[bytes]:
        out: list[bytes] = []
        unpack_from = struct.unpack_from
        buf, pos, end = self.buf, self.pos, self.end
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise GGUFError(f"file ends inside {what} (offset {pos}): truncated")
            (n,) = unpack_from("<Q", buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                raise GGUFError(f"file ends inside {what} (offset {pos}): truncated")
            if collect:
                out.append(bytes(buf[pos : pos + n]))
            pos += n
        self.pos = pos
        return out


def _read_value(cur: _Cursor, vtype: int, key: str, keep: bool) -> Any:
    if vtype in _SCALARS:
        value = cur.unpack(_SCALARS[vtype], key)
        if vtype in (6, 12) and not math.isfinite(value):
            # a NaN layer_norm_epsilon makes llama.cpp abort (found by fuzzing)
            raise GGUFError(f"metadata {key!r} is {value}, not a finite number")
        return value
    if vtype == _STRING:
        raw = cur.string(key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"metadata {key!r} is not valid UTF-8") from exc
    if vtype == _ARRAY:
        etype = cur.unpack("I", key)
        count = cur.unpack("Q", key)
        if etype == _STRING:
            # token lists: llama.cpp aborts on duplicate tokens, so collect those to check
            strings = cur.skip_strings(count, key, collect=keep)
            return strings if keep else count
        if etype in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[etype]) * count
            cur.need(size, key)
            cur.pos += size
            return count
        if etype == _ARRAY:
            raise GGUFError(f"metadata {key!r} is a nested array (not supported by llama.cpp)")
        raise GGUFError(f"metadata {key!r} has an unknown array element type {etype}")
    raise GGUFError(f"metadata {key!r} has an unknown value type {vtype}")


#: metadata whose integers may be large (parameter counts, token ids are checked elsewhere)
_FREE_PREFIXES = ("general.", "tokenizer.")
#: ggml types that are never weights: Q8_1, Q8_K
_NOT_WEIGHT_TYPES = {9, 15}
#: llama.cpp's LLAMA_MAX_LAYERS
MAX_LAYERS = 512
#: llama.cpp's pooling types: UNSPECIFIED (-1) .. RANK (4)
_POOLING_TYPES = {-1, 0, 1, 2, 3, 4, 0xFFFFFFFF}
#: tokenizer models whose byte tokens llama.cpp can decode (`<0xXX>`); for the others
#: (gpt2, bert) a BYTE token is a GGML_ABORT
_BYTE_TOKENIZERS = {"llama", "t5"}
_BYTE = 6  # llama_token_type BYTE
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-F]{2}>")
_ALL_BYTES = frozenset(f"<0x{b:02X}>".encode() for b in range(256))


def _int32_array(raw: memoryview) -> list[int]:
    """The elements of an int32 (or uint32) array value: its type, count and data bytes."""
    etype, count = struct.unpack_from("<IQ", raw, 0)
    if etype not in (4, 5) or 12 + 4 * count > len(raw):
        return []
    return list(struct.unpack_from(f"<{count}i", raw, 12))


def _check_hyperparameters(
    metadata: dict[str, Any], tokens: list[bytes], types: list[int] | None, absolute: bool
) -> None:
    """Values llama.cpp trusts and aborts on (found by fuzzing the tiny models)."""
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count")
    if isinstance(layers, int) and not 1 <= layers <= MAX_LAYERS:
        raise GGUFError(f"{arch}.block_count {layers} is not between 1 and {MAX_LAYERS}")
    pooling = metadata.get(f"{arch}.pooling_type")
    if isinstance(pooling, int) and pooling not in _POOLING_TYPES:
        raise GGUFError(f"{arch}.pooling_type {pooling} is not a llama.cpp pooling type")
    context = metadata.get(f"{arch}.context_length")
    if absolute and isinstance(context, int) and 0 < context < 8:
        raise GGUFError(f"{arch}.context_length {context} is too short to run")
    byte_ok = metadata.get("tokenizer.ggml.model") in _BYTE_TOKENIZERS
    # SentencePiece ("llama") falls back to `<0xXX>` tokens whatever the token types say
    has_bytes = bool(tokens) and metadata.get("tokenizer.ggml.model") == "llama"
    if types:
        if len(types) != len(tokens):
            raise GGUFError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        for token, kind in zip(tokens, types, strict=True):
            if kind == _BYTE:
                if not (byte_ok and _BYTE_TOKEN.fullmatch(token)):
                    raise GGUFError(f"byte token {token!r} cannot be decoded by this tokenizer")
                has_bytes = True
    if has_bytes and not _ALL_BYTES <= set(tokens):
        # byte fallback looks every byte up as `<0xXX>` with `at()`: one missing spelling is
        # a std::out_of_range abort on the first text that needs it (found by fuzzing)
        missing = sorted(_ALL_BYTES - set(tokens))[0]
        raise GGUFError(f"the vocabulary falls back to byte tokens but has no {missing.decode()}")


def _parse(buf: memoryview, size: int) -> GGUFInfo:
    cur = _Cursor(buf)
    cur.need(4, "the magic number")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped in SUPPORTED_VERSIONS:
            raise GGUFError("big-endian GGUF file; llama.cpp here needs little-endian")
        raise GGUFError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata count")
    # every key/value takes at least 8+1+4+1 bytes, every tensor description 8+1+4+8+4+8
    if n_kv * 14 > size or n_tensors * 33 > size:
        raise GGUFError(
            f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
            f"a {size}-byte file can hold"
        )

    metadata: dict[str, Any] = {}
    n_vocab = 0
    tokens: list[bytes] = []
    token_types: list[int] | None = None
    seen_keys: set[str] = set()
    for _ in range(n_kv):
        try:
            key = cur.string("a metadata key").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError("a metadata key is not valid UTF-8") from exc
        if key in seen_keys:
            raise GGUFError(f"duplicate metadata key {key!r}")
        seen_keys.add(key)
        vtype = cur.unpack("I", key)
        is_tokens = key == "tokenizer.ggml.tokens"
        start = cur.pos
        value = _read_value(cur, vtype, key, keep=is_tokens)
        if vtype in (6, 12) and key.endswith("epsilon") and value < 0:
            raise GGUFError(f"metadata {key!r} is negative")  # GGML_ASSERT(eps >= 0.0f)
        if vtype in (4, 5, 10, 11) and value >= 1 << 31 and not key.startswith(_FREE_PREFIXES):
            # llama.cpp reads hyperparameters as int32: 2**31 becomes negative (found by
            # fuzzing: context_length 2**31 failed every record with a negative array length)
            raise GGUFError(f"metadata {key!r} is {value}, more than llama.cpp can take")
        if key == "tokenizer.ggml.token_type" and vtype == _ARRAY:
            token_types = _int32_array(buf[start : cur.pos])
        if is_tokens:
            if not isinstance(value, list):
                raise GGUFError("tokenizer.ggml.tokens is not a list of strings")
            n_vocab = len(value)
            tokens = value
            if len(set(value)) != n_vocab:
                raise GGUFError("tokenizer.ggml.tokens has duplicate tokens")
        elif key.endswith(_KEEP_SUFFIXES) and not isinstance(value, list):
            if vtype != _ARRAY:
                metadata[key] = value

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment {alignment!r} is not a power of two")

    names: set[str] = set()
    extents: list[tuple[int, int, str]] = []
    for _ in range(n_tensors):
        try:
            name = cur.string("a tensor name").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError("a tensor name is not valid UTF-8") from exc
        if name in names:
            raise GGUFError(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = cur.unpack("I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (1-{MAX_DIMS} allowed)")
        dims = [cur.unpack("Q", name) for _ in range(n_dims)]
        ttype = cur.unpack("I", name)
        offset = cur.unpack("Q", name)
        sizes = _quant_size(ttype)
        if sizes is None:
            raise GGUFError(f"tensor {name!r} has an unknown type {ttype}")
        block, type_size = sizes
        count = 1
        for d in dims:
            if d <= 0 or d >= 1 << 40:
                raise GGUFError(f"tensor {name!r} has a bad shape {dims}")
            count *= d
        if dims[0] % block:
            raise GGUFError(
                f"tensor {name!r}: row of {dims[0]} is not a multiple of the block size {block}"
            )
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} data offset {offset} is not aligned")
        if ttype in _NOT_WEIGHT_TYPES:
            # Q8_1 and Q8_K only exist inside ggml's dot products: a weight of that type
            # makes the first matrix product crash (SIGSEGV, found by fuzzing)
            raise GGUFError(f"tensor {name!r} has type {ttype}, which is not a weight type")
        if n_dims == 1 and ttype != 0:
            # norms and biases: llama.cpp's converters and quantizer keep them F32, and its
            # graph aborts on anything else (found by fuzzing)
            raise GGUFError(f"tensor {name!r} is one-dimensional but of type {ttype}, not F32")
        extents.append((offset, count // block * type_size, name))

    _check_hyperparameters(metadata, tokens, token_types, "position_embd.weight" in names)

    data_offset = cur.pos + (-cur.pos % alignment)
    data_end = data_offset
    for offset, nbytes, name in extents:
        end = data_offset + offset + nbytes
        if end > size:
            raise GGUFError(
                f"tensor {name!r} ends at byte {end} but the file has {size} bytes: truncated"
            )
        data_end = max(data_end, end)
    # tensor data must not overlap
    extents.sort()
    for (o1, n1, a), (o2, _n2, b) in zip(extents, extents[1:], strict=False):
        if o1 + n1 > o2:
            raise GGUFError(f"tensors {a!r} and {b!r} overlap")
    return GGUFInfo(
        absolute_positions="position_embd.weight" in names,
        path=Path(),
        size=size,
        version=version,
        n_tensors=n_tensors,
        n_kv=n_kv,
        data_offset=data_offset,
        data_end=data_end,
        metadata=metadata,
        n_vocab=n_vocab,
    )


def check_gguf(
    path: str | os.PathLike[str], *, deep: bool = False, what: str = "model"
) -> GGUFInfo:
    """Check that `path` is a well-formed GGUF file llama.cpp can load without aborting.

    Returns what was learnt (version, tensor count, metadata such as `general.architecture`).
    Raises `ResourceUnavailable` naming the file, the problem and the fix (`FIX`).
    `deep=True` also parses the whole file with `gguf.GGUFReader`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ResourceUnavailable(f"{what} file not found: {p}; {FIX}") from None
    except OSError as exc:
        raise ResourceUnavailable(f"cannot read {what} file {p}: {exc.strerror}; {FIX}") from None
    if p.is_dir():
        raise ResourceUnavailable(f"{what} path is a directory, not a GGUF file: {p}")
    size = st.st_size
    if size == 0:
        raise ResourceUnavailable(f"{what} file is empty: {p}; {FIX}")
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                info = _parse(view, size)
            finally:
                view.release()
    except GGUFError as exc:
        raise ResourceUnavailable(f"{what} file is not a valid GGUF: {p}: {exc}; {FIX}") from None
    except OSError as exc:
        raise ResourceUnavailable(f"cannot read {what} file {p}: {exc}; {FIX}") from None
    info.path = p
    if deep:
        _deep_check(p, info, what)
    return info


def _deep_check(p: Path, info: GGUFInfo, what: str) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(p)
        n = len(reader.tensors)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise ResourceUnavailable(
            f"{what} file is not a valid GGUF: {p}: {type(exc).__name__}: {exc}; {FIX}"
        ) from None
    if n != info.n_tensors:
        raise ResourceUnavailable(
            f"{what} file {p}: GGUFReader found {n} tensors, header says {info.n_tensors}; {FIX}"
        )
