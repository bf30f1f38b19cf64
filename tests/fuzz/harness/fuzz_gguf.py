"""The GGUF validator (operators/gguf_check.py): any bytes give a GGUFInfo or a GGUFError,
never another exception, and a GGUFInfo's tensor data lies inside the file.

The first input byte picks the shape: even, the rest is a whole file; odd, the rest is applied
as edits to a tiny fixture model (pairs of bytes: a header field chosen by the first, a value
by the second, see tests/fuzz/gguf_fields.py), so the fuzzer spends its time past the magic.
"""

from __future__ import annotations

import struct

from sage_cli.operators.gguf_check import GGUFError, _parse
from tests.fuzz.gguf_fields import current_value, fields, interesting, mutate

_BASE: dict[str, bytes] = {}


def _base(kind: str) -> bytes:
    if kind not in _BASE:
        import tempfile
        from pathlib import Path

        from tests.fixtures.tiny_models import write_tiny_bert, write_tiny_llama

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.gguf"
            (write_tiny_llama if kind == "llama" else write_tiny_bert)(path)
            _BASE[kind] = path.read_bytes()
    return _BASE[kind]


def build(data: bytes) -> bytes:
    if not data or data[0] % 2 == 0:
        return data[1:]
    model = _base("llama" if data[0] & 2 else "bert")
    table = fields(model)
    for i in range(1, len(data) - 1, 2):
        field = table[data[i] * len(table) // 256]
        values = interesting(field, current_value(model, field))
        model = mutate(model, field, values[data[i + 1] % len(values)])
    return model


def TestOneInput(data: bytes) -> None:
    model = build(data)
    try:
        info = _parse(memoryview(model), len(model))
    except GGUFError as exc:
        assert str(exc)
        return
    if info.n_tensors:
        assert info.data_offset <= info.data_end <= len(model)


SEEDS: list[bytes] = [
    b"\x00GGUF" + struct.pack("<IQQ", 3, 0, 0),
    b"\x00GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\x05\x00\x00\x00\x00\x00\x00\x00hello",
    b"\x01",
    b"\x03",
    b"\x01\x10\x05\x40\x0a",
    b"\x03\x80\x01\xc0\x0f",
]
MAX_LEN = 512
