"""Numbers pass through without loss (issue: JSON integers beyond 64 bits were rewritten as
floats by every command). orjson reads such an integer as a float; sage re-reads a line that may
hold one with the standard library and writes it back the same way, so the digits survive every
command, and values compare exactly (two different 21-digit account numbers stay apart)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ndjson, run_sage


def parse_ndjson(data: bytes) -> list[dict]:
    """The standard library keeps big integers as int (orjson, the suite's parser, would not)."""
    return [json.loads(line) for line in data.splitlines() if line.strip()]


BIG = [18446744073709551616, -9223372036854775809, 123456789012345678901234567890]
RECORDS = [{"id": f"r{i}", "acct": n, "nested": {"v": [n, 1.5]}} for i, n in enumerate(BIG)]
INPUT = ndjson(RECORDS)


def assert_exact(stdout: bytes, count: int = len(BIG)) -> None:
    for n in BIG[:count]:
        assert str(n).encode() in stdout, stdout[:500]
    assert b"e+" not in stdout, stdout[:500]  # no float spelling of any of them


@pytest.mark.parametrize(
    "argv",
    [
        ["map", "r"],
        ["map", 'r | {"double": r["acct"] * 2}'],
        ["filter", "True"],
        ["flatmap", "[r]"],
        ["head", "10"],
        ["dedupe", "--key", "acct"],
        ["sample", "--n", "10"],
        ["keyby", "acct"],
        ["sink"],
        ["source", "-"],
    ],
    ids=lambda a: " ".join(a),
)
def test_integers_beyond_64_bits_keep_their_digits(argv):
    proc = run_sage(*argv, input=INPUT)
    assert proc.returncode == 0, proc.stderr
    assert_exact(proc.stdout)
    got = parse_ndjson(proc.stdout)
    by_id = {r["id"]: r for r in got}
    for want in RECORDS:
        assert by_id[want["id"]]["acct"] == want["acct"]  # exact int, not a float
        assert type(by_id[want["id"]]["acct"]) is int


def test_map_computes_with_the_exact_value():
    proc = run_sage("map", '{"id": r["id"], "next": r["acct"] + 1}', input=INPUT)
    assert parse_ndjson(proc.stdout)[0]["next"] == 18446744073709551617


def test_dedupe_keeps_two_different_21_digit_account_numbers_apart():
    rows = [
        {"acct": 123456789012345678901},
        {"acct": 123456789012345678902},
        {"acct": 123456789012345678902},
    ]
    proc = run_sage("dedupe", "--key", "acct", input=ndjson(rows))
    assert proc.returncode == 0, proc.stderr
    assert [r["acct"] for r in parse_ndjson(proc.stdout)] == [
        123456789012345678901,
        123456789012345678902,
    ]


def test_files_and_sink_to_keep_the_digits(tmp_path):
    src = tmp_path / "in.ndjson"
    src.write_bytes(INPUT)
    (tmp_path / "in.json").write_bytes(b"[" + b",".join(INPUT.splitlines()) + b"]")
    out = tmp_path / "out.ndjson"
    proc = run_sage("source", str(src), str(tmp_path / "in.json"))
    assert proc.returncode == 0, proc.stderr
    assert_exact(proc.stdout)
    assert len(parse_ndjson(proc.stdout)) == 2 * len(BIG)
    sink = run_sage("sink", "--to", str(out), input=INPUT)
    assert sink.returncode == 0, sink.stderr
    assert out.read_bytes() == INPUT.replace(b": ", b":").replace(b", ", b",")


def test_join_lookup_on_a_big_integer_key(tmp_path):
    table = tmp_path / "accounts.ndjson"
    table.write_bytes(
        ndjson(
            [
                {"acct": 123456789012345678901, "name": "alice"},
                {"acct": 123456789012345678902, "name": "bob"},
            ]
        )
    )
    events = ndjson([{"id": "e1", "acct": 123456789012345678902}])
    proc = run_sage("join", str(table), "--on", "acct", input=events)
    assert proc.returncode == 0, proc.stderr
    assert parse_ndjson(proc.stdout)[0]["name"] == "bob"
