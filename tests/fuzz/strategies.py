"""Hypothesis strategies shared by the fuzz tests: JSON values as orjson writes them, and
valid-looking bytes with a few random edits."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy


def json_values(
    text: SearchStrategy[str] | None = None, max_leaves: int = 6, max_size: int = 3
) -> SearchStrategy:
    """Any JSON value: nested lists and objects of scalars (64-bit ints, finite floats, text).

    `text` replaces the plain text strategy for strings and object keys (e.g. with payloads
    that look like templates or code), so each test fuzzes with the strings it cares about.
    """
    strings = text if text is not None else st.text(max_size=20)
    keys = text if text is not None else st.text(max_size=8)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | strings
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=max_size) | st.dictionaries(keys, inner, max_size=max_size)
        ),
        max_leaves=max_leaves,
    )


NASTY = [b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\xef\xbb\xbf", b'"', b",", b"{", b"[", b"\\"]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """Valid-looking bytes with a few random edits (insert, delete, replace, truncate)."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        chunk = draw(st.sampled_from(NASTY) | st.binary(min_size=1, max_size=3))
        if edit == "insert":
            data[pos:pos] = chunk
        elif edit == "delete":
            del data[pos : pos + len(chunk)]
        elif edit == "replace":
            data[pos : pos + len(chunk)] = chunk
        else:
            del data[pos:]
    return bytes(data)
