import io
import os
import threading
import time

import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.merge import Merge
from sage_cli.operators.ndjson import BadLine


def items(op):
    return [i for i in op.records() if i is not None]


def test_merge_tags_each_record_and_keeps_each_inputs_order(tmp_path):
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    a.write_text("".join(f'{{"i": {i}}}\n' for i in range(50)))
    b.write_text("".join(f'{{"j": {j}}}\n' for j in range(30)))
    out = items(Merge([str(a), str(b)]))
    assert len(out) == 80
    assert [r["i"] for r in out if r["_source"] == str(a)] == list(range(50))
    assert [r["j"] for r in out if r["_source"] == str(b)] == list(range(30))


def test_merge_custom_tag_and_stdin():
    out = items(Merge(["-"], tag="src", stdin=io.BytesIO(b'{"x": 1}\n')))
    assert out == [{"x": 1, "src": "stdin"}]


def test_merge_bad_line_names_its_file_and_line(tmp_path):
    a = tmp_path / "a.ndjson"
    a.write_text('{"x": 1}\n\n"str"\n')
    out = items(Merge([str(a)]))
    assert out[0] == {"x": 1, "_source": str(a)}
    assert isinstance(out[1], BadLine) and out[1].message().startswith(f"{a}:3: expected")


def test_merge_missing_input_and_no_inputs_are_option_errors(tmp_path):
    with pytest.raises(OptionError, match="no such file"):
        Merge([str(tmp_path / "nope")])
    with pytest.raises(OptionError):
        Merge([])
    with pytest.raises(OptionError, match="directory"):
        Merge([str(tmp_path)])


def test_merge_yields_from_a_fifo_as_soon_as_a_line_arrives(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    got = []

    def writer():
        with open(fifo, "wb", buffering=0) as fh:
            fh.write(b'{"n": 1}\n')
            time.sleep(0.5)
            got.append(("written second", time.monotonic()))
            fh.write(b'{"n": 2}\n')

    threading.Thread(target=writer, daemon=True).start()
    seen = []
    for item in Merge([str(fifo)]).records():
        if item is not None:
            seen.append((item["n"], time.monotonic()))
    assert [n for n, _ in seen] == [1, 2]
    assert seen[0][1] < got[0][1]  # the first record came out before the second was written
