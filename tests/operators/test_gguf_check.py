"""GGUF validation: a damaged model file is a ResourceUnavailable with the fix, never an abort."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.gguf_check import FIX, check_gguf
from tests.conftest import ROOT, clean_env


def test_valid_tiny_models_pass(tiny_llama, tiny_bert):
    llama = check_gguf(tiny_llama)
    assert llama.architecture == "llama" and llama.version == 3
    assert llama.n_tensors == 3 + 2 * 9 and llama.n_vocab == 261
    assert llama.data_end == llama.size and not llama.absolute_positions
    bert = check_gguf(tiny_bert, deep=True)
    assert bert.architecture == "bert" and bert.metadata["bert.pooling_type"] == 1
    assert bert.absolute_positions and bert.context_length == 512


def _expect_unavailable(path: Path, *words: str) -> str:
    with pytest.raises(ResourceUnavailable) as err:
        check_gguf(path)
    message = str(err.value)
    assert str(path) in message and FIX in message
    for word in words:
        assert word in message, message
    return message


def test_missing_file(tmp_path):
    _expect_unavailable(tmp_path / "nope.gguf", "not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _expect_unavailable(path, "empty")


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    _expect_unavailable(path, "not a GGUF file")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ResourceUnavailable, match="directory"):
        check_gguf(tmp_path)


def test_magic_only(tmp_path):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGUF")
    _expect_unavailable(path, "truncated")


def test_unsupported_version(tmp_path, tiny_bert):
    data = bytearray(tiny_bert.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    path = tmp_path / "v99.gguf"
    path.write_bytes(bytes(data))
    _expect_unavailable(path, "version 99")


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated_anywhere(tmp_path, tiny_llama, fraction):
    data = tiny_llama.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    _expect_unavailable(path, "truncated")


def test_every_truncation_of_the_header_is_caught(tmp_path, tiny_bert):
    """Cut the file at every 97th byte of its header and metadata: always a clean error."""
    data = tiny_bert.read_bytes()
    info = check_gguf(tiny_bert)
    path = tmp_path / "cut.gguf"
    for cut in range(1, info.data_offset, 97):
        path.write_bytes(data[:cut])
        with pytest.raises(ResourceUnavailable):
            check_gguf(path)


def test_unknown_tensor_type(tmp_path, tiny_bert):
    # the first tensor description follows the metadata: corrupt its ggml type
    data = bytearray(tiny_bert.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name)
    type_at = at + 8 + len(name) + 4 + 8 * 2  # n_dims, two dims
    data[type_at : type_at + 4] = struct.pack("<I", 250)
    path = tmp_path / "type.gguf"
    path.write_bytes(bytes(data))
    _expect_unavailable(path, "unknown type")


def test_duplicate_tokens_are_refused(tmp_path, tiny_bert):
    # llama.cpp aborts on a vocabulary with duplicate tokens: make "▁b" equal "▁a"
    data = bytearray(tiny_bert.read_bytes())
    a, b = "\u2581a".encode(), "\u2581b".encode()
    at = data.index(struct.pack("<Q", len(b)) + b)
    data[at + 8 : at + 8 + len(b)] = a
    path = tmp_path / "dup.gguf"
    path.write_bytes(bytes(data))
    _expect_unavailable(path, "duplicate tokens")


def test_huge_counts_in_header(tmp_path):
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + b"\0" * 64)
    _expect_unavailable(path, "more than")


_LOAD = """
import sys
from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.llm import load_llama, Embedder
kind, paths = sys.argv[1], sys.argv[2:]
for path in paths:
    try:
        if kind == "embed":
            Embedder(path, 1).embed(["hello world"])
        else:
            load_llama(path, n_ctx=64)
    except ResourceUnavailable as exc:
        print("unavailable:", exc, flush=True)
        continue
    print("loaded:", path, flush=True)
"""


def _load_in_subprocess(kind: str, paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _LOAD, kind, *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )


def _damaged(tmp_path: Path, source: Path) -> list[Path]:
    data = source.read_bytes()
    info = check_gguf(source)
    files = {
        "empty": b"",
        "junk": b"\x00\xff" * 4096,
        "magic": b"GGUF",
        "header": data[:24],
        "metadata": data[: info.data_offset // 2],
        "tensor-infos": data[: info.data_offset - 10],
        "data": data[: info.data_offset + (len(data) - info.data_offset) // 2],
        "last-byte": data[:-1],
    }
    # duplicate tokens: raw llama.cpp aborts on these (SIGABRT, checked by hand)
    first, second = ("\u2581a", "\u2581b") if b"bert" in data[:200] else ("<0x00>", "<0x01>")
    dup = bytearray(data)
    at = dup.index(struct.pack("<Q", len(second.encode())) + second.encode())
    dup[at + 8 : at + 8 + len(second.encode())] = first.encode()
    files["dup-tokens"] = bytes(dup)
    out = []
    for name, blob in files.items():
        path = tmp_path / f"{source.stem}-{name}.gguf"
        path.write_bytes(blob)
        out.append(path)
    return out


@pytest.mark.parametrize("kind", ["llama", "embed"])
def test_loading_damaged_files_never_aborts(tmp_path, tiny_llama, tiny_bert, kind):
    """In a real process: every damaged file is a clean ResourceUnavailable, never SIGABRT
    (an abort would end the process early with -6 and fewer lines)."""
    source = tiny_llama if kind == "llama" else tiny_bert
    damaged = _damaged(tmp_path, source)
    proc = _load_in_subprocess(kind, [*damaged, source])
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-800:])
    lines = proc.stdout.splitlines()
    assert len(lines) == len(damaged) + 1, proc.stdout
    for path, line in zip(damaged, lines, strict=False):
        assert line.startswith("unavailable:") and path.name in line and FIX in line, line
    assert lines[-1] == f"loaded: {source}"


def test_bert_context_never_exceeds_its_position_embeddings(tmp_path):
    """A BERT trained on 64 positions, asked for 1024 and fed 1000 words: truncated, no abort."""
    from sage_cli.operators.convert import convert_bert
    from tests.fixtures.tiny_models import write_tiny_hf_bert

    write_tiny_hf_bert(tmp_path / "hf", n_pos=64)
    out = convert_bert(tmp_path / "hf", tmp_path / "short.gguf").out
    code = (
        "import sys\n"
        "from operators.llm import load_llama, Embedder\n"
        "llm = load_llama(sys.argv[1], embedding=True, n_ctx=1024, n_batch=1024)\n"
        "print(len(llm.embed('the cat sits ' * 1000)), llm.n_ctx())\n"
        "e = Embedder(sys.argv[1], 1, n_ctx=512)\n"
        "print(e.embed(['the cat sits ' * 1000, 'a dog']).shape, e.n_ctx)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.splitlines() == ["32 256", "(2, 32) 64"]


def test_builtin_type_sizes_match_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from sage_cli.operators.gguf_check import _COMMON_QUANT_SIZES, _quant_size

    for code, sizes in _COMMON_QUANT_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(code)] == sizes
    assert (
        _quant_size(int(GGMLQuantizationType.IQ4_NL))
        == GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL]
    )
    assert _quant_size(9999) is None
