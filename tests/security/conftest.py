"""Shared pieces of the security tests: payloads that would leave a marker file if anything
ran them, and the check that they did not."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest


class _Touch:
    """Unpickling this creates `path`: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Touch(str(marker)))


def object_npy(marker: Path) -> bytes:
    """A valid .npy file whose object array unpickles the payload when loaded with pickles."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([_Touch(str(marker))], dtype=object), allow_pickle=True)
    return buf.getvalue()


def object_array(marker: Path):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.array([_Touch(str(marker))], dtype=object)


def object_npz(marker: Path) -> bytes:
    """A .npz (zip) holding an object array: what `np.load` returns an NpzFile for."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, payload=object_array(marker))
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a payload would leave its mark; the test asserts it never appears."""
    return tmp_path / "PWNED"


#: strings that would do something if a shell, eval, str.format or a template engine saw them
CODE_STRINGS = [
    "__import__('os').system('touch PWNED')",
    "__import__('pathlib').Path('PWNED').touch()",
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "x\ntouch PWNED\n",
    "' ; touch PWNED ; '",
    '" ; touch PWNED ; "',
    "{__import__}",
    "{r.__class__.__init__.__globals__}",
    "{0.__class__}",
    "{{7*7}}",
    "${{7*7}}",
    "<script>alert(1)</script>",
    "\x1b]0;PWNED\x07\x1b[2J",
]
