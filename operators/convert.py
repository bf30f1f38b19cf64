"""Convert a local Hugging Face BERT-family folder to a GGUF llama.cpp can embed with.

Torch-free: the safetensors file is read with numpy (a JSON header, then raw little-endian
arrays) and written with the `gguf` package llama.cpp maintains. What comes out matches
llama.cpp's own `convert_hf_to_gguf.py` (BertModel) for f16: tensor names from
`gguf.get_tensor_name_map(MODEL_ARCH.BERT, n_layers)`, 2-D weights in f16, 1-D tensors, norms,
position and token-type embeddings in f32, non-causal attention, the WordPiece vocabulary of
`vocab.txt` in llama.cpp's "phantom space" form (`##ing` -> `ing`, `word` -> `\u2581word`),
special token ids from the tokenizer files, and the pooling of `1_Pooling/config.json`
(mean pooling for sentence-transformers models).

The source folder needs `config.json`, `model.safetensors` and `vocab.txt`; `tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json` and `1_Pooling/config.json` are used when
present. Output is written to a temp file beside `out` and renamed into place.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import OptionError, ResourceUnavailable

if TYPE_CHECKING:
    import numpy as np

#: bump when the output of `convert_bert` changes, so installed conversions count as stale
CONVERTER_VERSION = 1

_SKIP = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
_SKIP_PREFIXES = ("cls.predictions", "cls.seq_relationship")
_BERT_ARCHS = {"BertModel", "BertForMaskedLM", "BertForSequenceClassification"}

# llama.cpp pooling types (llama.h)
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


@dataclass
class ConvertResult:
    out: Path
    n_tensors: int
    n_vocab: int
    n_layers: int
    dim: int
    pooling: str
    bytes: int


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of a .safetensors file, as float32 for floats."""
    import numpy as np

    dtypes = {
        "F32": np.float32,
        "F16": np.float16,
        "F64": np.float64,
        "I64": np.int64,
        "I32": np.int32,
        "BF16": np.uint16,
    }
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ResourceUnavailable(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8:
            raise ResourceUnavailable(f"{path}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise ResourceUnavailable(f"{path}: unreadable safetensors header: {exc}") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes.get(meta.get("dtype"))
        if dtype is None:
            raise ResourceUnavailable(
                f"{path}: tensor {name} has unsupported dtype {meta['dtype']}"
            )
        start, end = meta["data_offsets"]
        if end > len(data) or start > end:
            raise ResourceUnavailable(f"{path}: tensor {name} lies outside the file (truncated?)")
        arr = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        if meta["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arr = arr.reshape(meta["shape"])
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        yield name, arr


def readable(path: str | os.PathLike[str]) -> None:
    """Give a temp file (mkstemp makes them 0600) the permissions a normal file gets."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ResourceUnavailable(f"cannot read {path}: {exc}") from None


def pooling_of(src: Path) -> str:
    """The pooling a sentence-transformers folder declares (mean when it says nothing)."""
    cfg = _read_json(src / "1_Pooling" / "config.json")
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


def _vocab(src: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """WordPiece tokens in llama.cpp's phantom-space form, with their token types."""
    import gguf

    lines = (src / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    special: set[int] = set()
    for tok in _read_json(src / "tokenizer.json").get("added_tokens", []):
        if tok.get("special"):
            special.add(int(tok["id"]))
    if not special:  # no tokenizer.json: the BERT specials by their usual spelling
        special = {
            i for i, t in enumerate(lines) if t in {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
        }
    tokens: list[str] = []
    types: list[int] = []
    for i in range(max(n_vocab, len(lines))):
        if i >= len(lines):
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.USER_DEFINED))
            continue
        tok = lines[i]
        if i in special:
            tokens.append(tok)
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
            types.append(int(gguf.TokenType.NORMAL))
    # llama.cpp aborts on duplicate tokens: make any clash unique (never happens for BERT vocabs)
    seen: set[str] = set()
    for i, tok in enumerate(tokens):
        if tok in seen:
            tokens[i] = f"[DUP{i}]{tok}"
            types[i] = int(gguf.TokenType.UNUSED)
        seen.add(tokens[i])
    return tokens, types


def _add_special_tokens(writer: Any, src_dir: Path, n_vocab: int) -> None:
    """Special token ids (CLS, SEP, UNK, PAD, MASK) from the tokenizer files, quietly."""
    import logging

    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)  # "No handler for special token type cls": llama.cpp knows it
    try:
        special = gguf.SpecialVocab(src_dir, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    finally:
        log.setLevel(level)


def convert_bert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    license: str | None = None,
) -> ConvertResult:
    """Convert the Hugging Face BERT folder `src` into the f16 GGUF file `out`."""
    import gguf
    import numpy as np

    src_dir = Path(src)
    out_path = Path(out)
    if not src_dir.is_dir():
        raise ResourceUnavailable(f"source folder not found: {src_dir}")
    for needed in ("config.json", "model.safetensors", "vocab.txt"):
        if not (src_dir / needed).is_file():
            raise ResourceUnavailable(
                f"{src_dir} has no {needed}: not a Hugging Face BERT folder "
                "(config.json, model.safetensors, vocab.txt)"
            )
    config = _read_json(src_dir / "config.json")
    archs = set(config.get("architectures") or [])
    if config.get("model_type") != "bert" and not archs & _BERT_ARCHS:
        raise OptionError(
            f"{src_dir}: model_type {config.get('model_type')!r} is not BERT; only "
            "BERT-family models convert"
        )
    try:
        n_layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        n_ff = int(config["intermediate_size"])
        n_ctx = int(config.get("max_position_embeddings", 512))
        n_vocab = int(config.get("vocab_size", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ResourceUnavailable(f"{src_dir}/config.json lacks {exc}") from None
    pooling = pooling_of(src_dir)
    arch = gguf.MODEL_ARCH.BERT
    tensor_map = gguf.get_tensor_name_map(arch, n_layers)
    tokens, types = _vocab(src_dir, n_vocab)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    readable(tmp)
    n_tensors = 0
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or config.get("_name_or_path") or src_dir.name)
        if license:
            writer.add_license(license)
        writer.add_block_count(n_layers)
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType(POOLING[pooling]))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
        _add_special_tokens(writer, src_dir, len(tokens))

        f32_kinds = {gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES}
        f32_names = {gguf.TENSOR_NAMES[k] for k in f32_kinds}
        for hf_name, arr in read_safetensors(src_dir / "model.safetensors"):
            key = hf_name.removeprefix("bert.")
            if key.endswith(".gamma"):
                key = key[:-6] + ".weight"
            elif key.endswith(".beta"):
                key = key[:-5] + ".bias"
            if key in _SKIP or key.startswith(_SKIP_PREFIXES):
                continue
            new = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise OptionError(f"{src_dir}: cannot map tensor {hf_name!r} to a BERT GGUF name")
            f32 = (
                arr.ndim <= 1
                or new.endswith("_norm.weight")
                or not new.endswith(".weight")
                or new.removesuffix(".weight") in f32_names
            )
            data = arr.astype(np.float32 if f32 else np.float16)
            writer.add_tensor(new, np.ascontiguousarray(data))
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return ConvertResult(
        out=out_path,
        n_tensors=n_tensors,
        n_vocab=len(tokens),
        n_layers=n_layers,
        dim=hidden,
        pooling=pooling,
        bytes=out_path.stat().st_size,
    )
