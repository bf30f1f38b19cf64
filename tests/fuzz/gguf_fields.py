"""Where every header field of a (valid) GGUF file lies, for structured mutation in the fuzz
tests and the atheris harness: `fields(data)` walks the header as the format describes it
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) and lists each number it reads
(magic, version, counts, key lengths, value types, scalar values, array element types and
counts, string lengths, tensor dims, types and offsets) with its offset and width.
`mutate(data, field, value)` writes one new value into one field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # bytes: 1, 2, 4 or 8 (little-endian integer or float)
    kind: str  # what it is: "version", "n_tensors", "key_len", "vtype", "value:<key>", ...


def fields(data: bytes, max_array_strings: int = 8) -> list[Field]:
    out: list[Field] = [Field(0, 4, "magic"), Field(4, 4, "version")]
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    out += [Field(8, 8, "n_tensors"), Field(16, 8, "n_kv")]
    pos = 24

    def string(kind: str) -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append(Field(pos, 8, kind))
        value = data[pos + 8 : pos + 8 + n]
        pos += 8 + n
        return value

    for _ in range(n_kv):
        key = string("key_len").decode()
        (vtype,) = struct.unpack_from("<I", data, pos)
        out.append(Field(pos, 4, f"vtype:{key}"))
        pos += 4
        if vtype in _SCALAR_SIZES:
            out.append(Field(pos, _SCALAR_SIZES[vtype], f"value:{key}"))
            pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            string(f"strlen:{key}")
        else:
            etype, count = struct.unpack_from("<IQ", data, pos)
            out += [Field(pos, 4, f"etype:{key}"), Field(pos + 4, 8, f"count:{key}")]
            pos += 12
            for i in range(count):
                if etype == _STRING:
                    if i < max_array_strings:
                        string(f"element_len:{key}")
                    else:
                        (n,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + n
                else:
                    size = _SCALAR_SIZES[etype]
                    if i < max_array_strings:
                        out.append(Field(pos, size, f"element:{key}"))
                    pos += size
    for _ in range(n_tensors):
        name = string("name_len").decode()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        out.append(Field(pos, 4, f"n_dims:{name}"))
        pos += 4
        for _d in range(n_dims):
            out.append(Field(pos, 8, f"dim:{name}"))
            pos += 8
        out += [Field(pos, 4, f"ttype:{name}"), Field(pos + 4, 8, f"offset:{name}")]
        pos += 12
    return out


def mutate(data: bytes, field: Field, value: int) -> bytes:
    """`data` with `value` (wrapped to the field's width) written into `field`."""
    out = bytearray(data)
    out[field.offset : field.offset + field.size] = (value % (1 << (8 * field.size))).to_bytes(
        field.size, "little"
    )
    return bytes(out)


def interesting(field: Field, current: int) -> list[int]:
    """Values worth trying in a field: edges of its width, neighbours of its current value."""
    top = 1 << (8 * field.size)
    return [
        0,
        1,
        2,
        3,
        7,
        8,
        9,
        12,
        32,
        current - 1,
        current + 1,
        current * 2,
        current // 2,
        top // 2 - 1,
        top // 2,
        top - 1,
        top - 2,
        1 << 31,
        1 << 32,
        1 << 40,
    ]


def current_value(data: bytes, field: Field) -> int:
    return int.from_bytes(data[field.offset : field.offset + field.size], "little")
