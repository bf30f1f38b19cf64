"""Disk full while `sage index build DIR` or `sage sink --to FILE` writes (issue 6, faults).

A real ENOSPC from a 1 MiB tmpfs (or EFBIG from RLIMIT_FSIZE where mounting is not allowed; see
conftest.py). What must hold: exit 75 (a retry after freeing space cures it; 1 for other write
errors), one line on stderr saying the old index or file is untouched, the old one byte for
byte as it was, no temporary file or directory left behind, and a retry with space succeeds.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, sage_argv
from tests.faults.conftest import one_line, tree_digest, vector_records, write_ndjson

# what overflows 1 MiB first: the annoy forest (small vectors, many trees) or vectors.npy
BIG = {"annoy": dict(n=3000, dim=32), "vectors": dict(n=1500, dim=256)}


def _leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("overflow", sorted(BIG))
def test_index_build_on_a_full_disk_keeps_the_old_index(small_fs, tmp_path, overflow):
    idx = small_fs.root / "idx"
    old = write_ndjson(tmp_path / "old.ndjson", vector_records(20, dim=BIG[overflow]["dim"]))
    built = small_fs.run("index", "build", str(idx), str(old))
    assert built.returncode == 0, built.stderr
    before = tree_digest(idx)
    assert set(before) >= {"manifest.json", "index.ann", "vectors.npy", "records.ndjson"}

    big = write_ndjson(tmp_path / "big.ndjson", vector_records(seed=1, **BIG[overflow]))
    done = small_fs.run("index", "build", str(idx), str(big))

    assert done.returncode == small_fs.code, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"sage index build: error: {idx}: cannot write the index: ")
    assert small_fs.reason in line
    assert f"the old index in {idx} is untouched" in line
    assert done.stdout == b""
    assert tree_digest(idx) == before  # byte for byte
    assert _leftovers(small_fs.root, {"idx"}) == []  # no .idx.building-* left
    info = small_fs.run("index", "info", str(idx), "--json")
    assert parse_ndjson(info.stdout)[0]["count"] == 20


def test_index_build_on_a_full_disk_without_an_old_index_leaves_nothing(small_fs, tmp_path):
    idx = small_fs.root / "idx"
    big = write_ndjson(tmp_path / "big.ndjson", vector_records(**BIG["annoy"]))
    done = small_fs.run("index", "build", str(idx), str(big))
    assert done.returncode == small_fs.code, done.stderr
    assert f"no index was written to {idx}" in one_line(done.stderr)
    assert list(small_fs.root.iterdir()) == []
    # a reader then says there is no index (69), it never loads a half-written one
    retrieve = small_fs.run("retrieve", "--index", str(idx), input=b'{"query":"x"}\n')
    assert retrieve.returncode == 69
    assert "no index at" in one_line(retrieve.stderr)


def test_index_build_succeeds_once_space_is_freed(small_fs, tmp_path):
    idx = small_fs.root / "idx"
    old = write_ndjson(tmp_path / "old.ndjson", vector_records(20))
    assert small_fs.run("index", "build", str(idx), str(old)).returncode == 0
    mid = write_ndjson(tmp_path / "mid.ndjson", vector_records(400, seed=2))
    filler = small_fs.fill(leave=64 * 1024)
    if small_fs.kind == "tmpfs":
        full = small_fs.run("index", "build", str(idx), str(mid))
        assert full.returncode == 75, full.stderr
        assert "free some space and run it again" in full.stderr.decode()
    filler.unlink()
    retry = small_fs.run("index", "build", str(idx), str(mid))
    assert retry.returncode == 0, retry.stderr
    assert parse_ndjson(retry.stdout)[0]["count"] == 400
    assert _leftovers(small_fs.root, {"idx"}) == []


@pytest.mark.parametrize("fmt", ["ndjson", "json", "csv"])
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_sink_to_a_full_disk_keeps_the_old_file(small_fs, tmp_path, fmt, policy):
    out = small_fs.root / "out.txt"
    out.write_bytes(b'{"old": true}\n')
    out.chmod(0o640)
    # 3 MiB of records: more than the file system (or the file size limit) holds
    records = [{"id": f"r{i}", "text": "x" * 300} for i in range(10_000)]
    done = small_fs.run(
        "sink", "--to", str(out), "--format", fmt, "--on-error", policy, input=ndjson(records)
    )
    assert done.returncode == small_fs.code, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"sage sink: error: --to {out}: cannot write: {small_fs.reason}")
    assert f"{out} is untouched (the partial output was removed)" in line
    assert "stdin:" not in line  # not blamed on a record: the disk is full, the data is fine
    assert out.read_bytes() == b'{"old": true}\n'
    assert out.stat().st_mode & 0o777 == 0o640
    assert _leftovers(small_fs.root, {"out.txt"}) == []  # no .out.txt.*.tmp left


def test_sink_to_a_full_disk_without_an_old_file_creates_none(small_fs):
    out = small_fs.root / "new.ndjson"
    records = [{"id": f"r{i}", "text": "y" * 300} for i in range(10_000)]
    done = small_fs.run("sink", "--to", str(out), input=ndjson(records))
    assert done.returncode == small_fs.code, done.stderr
    assert f"{out} was not created" in one_line(done.stderr)
    assert list(small_fs.root.iterdir()) == []


def test_sink_that_fits_still_replaces_the_file(small_fs):
    """The control: the same command with room to spare writes the file (so the test above
    fails for the right reason)."""
    out = small_fs.root / "out.ndjson"
    out.write_bytes(b'{"old": true}\n')
    records = [{"id": f"r{i}", "text": "z"} for i in range(100)]
    done = small_fs.run("sink", "--to", str(out), input=ndjson(records))
    assert done.returncode == 0, done.stderr
    assert parse_ndjson(out.read_bytes()) == records


def test_stdout_redirected_to_a_full_disk(small_fs):
    """`sage map r > out.ndjson` on a full disk: one line naming stdout, exit 75 (1 for EFBIG)."""
    records = [{"id": f"r{i}", "text": "w" * 300} for i in range(10_000)]
    out = small_fs.root / "out.ndjson"
    with out.open("wb") as fh:
        done = subprocess.run(
            sage_argv("map", "r"),
            input=ndjson(records),
            stdout=fh,
            stderr=subprocess.PIPE,
            env=clean_env(),
            preexec_fn=small_fs.preexec(),
            timeout=60,
        )
    assert done.returncode == small_fs.code, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"sage map: error: stdout: {small_fs.reason}")
    # what was written is whole records up to the failure, never a record cut in two that
    # a later stage would read as valid
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    assert parse_ndjson(complete) == records[: len(parse_ndjson(complete))]


def test_dead_letter_file_on_a_full_disk_stops_the_stage(small_fs):
    """--errors FILE that cannot be written: stop (75), never drop dead letters silently."""
    records = [{"id": f"r{i}", "text": "v" * 300} for i in range(10_000)]
    dead = small_fs.root / "dead.ndjson"
    done = small_fs.run(
        "map", 'r["missing"]', "--on-error", "skip", "--errors", str(dead), input=ndjson(records)
    )
    assert done.returncode == small_fs.code, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"sage map: error: --errors {dead}: cannot write: {small_fs.reason}")
