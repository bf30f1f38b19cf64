import errno
import os
import signal
import subprocess
import time

import orjson
import pytest

from tests.conftest import ROOT, clean_env, parse_ndjson, run_sage, sage_argv
from tests.contract.test_bad_input import without_privileges


def test_source_reads_files_and_directories(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": "beta"}\n')
    result = cli("source", "docs")
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [(r["id"], r["text"]) for r in out] == [
        ("docs/a.txt", "alpha"),
        ("docs/b.jsonl:1", "beta"),
    ]
    assert out[0]["metadata"]["bytes"] == 5


def test_source_raw_stdin_lines(cli):
    result = cli("source", "-R", input=b"what is sage?\n\nwhy?\n")
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [
        {"id": "stdin:1", "text": "what is sage?"},
        {"id": "stdin:3", "text": "why?"},
    ]


def test_source_no_path_reads_ndjson_stdin(cli):
    result = cli("source", input=b'{"id": "x", "content": "c"}\n{"text": "t"}\n')
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [{"id": "x", "text": "c"}, {"text": "t", "id": "stdin:2"}]


def test_source_bad_line_in_file_names_file_and_line_after_good_ones(cli, tmp_path):
    f = tmp_path / "in.ndjson"
    f.write_text('{"a": 1}\n{"a": 2}\n{oops\n{"a": 4}\n')
    result = cli("source", str(f))
    assert result.exit_code == 65
    assert f"{f}:3: invalid JSON" in result.stderr and result.stderr.count("\n") == 1
    assert [r["a"] for r in parse_ndjson(result.stdout)] == [1, 2]
    result = cli("source", str(f), "--on-error", "skip")
    assert result.exit_code == 0 and [r["a"] for r in parse_ndjson(result.stdout)] == [1, 2, 4]


def test_source_missing_file_is_exit_2_one_line(cli, tmp_path):
    result = cli("source", str(tmp_path / "missing.txt"))
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"sage source: error: {tmp_path}/missing.txt: no such file or directory; check the path\n"
    )


def test_source_unreadable_directory_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "ok.txt").write_text("fine")
    real = os.scandir

    def scandir(path):  # root ignores chmod 000, so deny the listing the way the OS would
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = cli("source", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"sage source: error: {tmp_path}/locked: permission denied")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_source_unreadable_file_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("x")
    import builtins

    real_open = builtins.open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    result = cli("source", str(f))
    assert result.exit_code == 2
    assert result.stderr == f"sage source: error: {f}: permission denied; check its permissions\n"


@pytest.mark.parametrize("what", ["file", "directory"])
def test_source_without_read_permission_real(tmp_path, what):
    """The same with real permission bits (as root: under setpriv with no capabilities)."""
    prefix = without_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits do not stop root")
    (tmp_path / "a.txt").write_text("first")
    locked = tmp_path / "b_locked"
    if what == "file":
        locked = tmp_path / "b_locked.txt"
        locked.write_text("secret")
    else:
        locked.mkdir()
        (locked / "in.txt").write_text("secret")
    locked.chmod(0)
    try:
        result = subprocess.run(
            [*prefix, *sage_argv("source", str(tmp_path))],
            capture_output=True,
            env=clean_env(),
            cwd=ROOT,
            timeout=60,
        )
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode() == (
        f"sage source: error: {locked}: permission denied; check its permissions\n"
    )
    # a file fails when it is read (what came before is written); a directory when the inputs
    # are listed, before anything is read
    expected = ["first"] if what == "file" else []
    assert [r["text"] for r in parse_ndjson(result.stdout)] == expected


def test_source_id_by_content_and_bad_option(cli, tmp_path):
    (tmp_path / "a.txt").write_text("same")
    (tmp_path / "b.txt").write_text("same")
    result = cli("source", "--id-by", "content", str(tmp_path))
    ids = [r["id"] for r in parse_ndjson(result.stdout)]
    assert result.exit_code == 0 and ids[0] == ids[1] and len(ids[0]) == 16
    result = cli("source", "--id-by", "nope", str(tmp_path))
    assert result.exit_code == 2 and "--id-by" in result.stderr


def test_source_format_flag_reads_txt_as_ndjson(cli, tmp_path):
    (tmp_path / "r.txt").write_text('{"a": 1}\n')
    result = cli("source", "--format", "ndjson", str(tmp_path / "r.txt"))
    assert parse_ndjson(result.stdout) == [{"a": 1, "id": f"{tmp_path}/r.txt:1"}]


def test_source_streams_stdin_lines_before_it_closes():
    proc = subprocess.Popen(
        sage_argv("source", "-R"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        proc.stdin.write(b"first line\n")
        proc.stdin.flush()
        line = proc.stdout.readline()  # arrives while stdin is still open
        assert orjson.loads(line) == {"id": "stdin:1", "text": "first line"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def _read_record(proc, deadline):
    """The next record on proc's stdout. Reads the fd itself: a readline() on the buffered pipe
    could pull two records in and leave the second where select() does not see it."""
    import select

    buf = proc.__dict__.setdefault("_lines", bytearray())
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            raise AssertionError("no record within the deadline")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stdout closed after {bytes(buf)!r}")
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return orjson.loads(line)


def _watch(cwd, *args):
    """`sage source --watch ARGS` started in `cwd`, its output read with `_read_record`."""
    return subprocess.Popen(
        sage_argv("source", "--watch", *args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def test_source_watch_emits_existing_new_and_changed_files_once(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "old.txt").write_text("old")
    proc = _watch(tmp_path, "inbox")
    try:
        deadline = time.monotonic() + 20
        assert _read_record(proc, deadline)["id"] == "inbox/old.txt"
        (inbox / "new.md").write_text("brand new")
        r = _read_record(proc, deadline)
        assert (r["id"], r["text"]) == ("inbox/new.md", "brand new")
        (inbox / "skip.bin").write_text("not a known extension")
        (inbox / "old.txt").write_text("old, edited")
        r = _read_record(proc, deadline)
        assert (r["id"], r["text"]) == ("inbox/old.txt", "old, edited")
        os.utime(inbox / "old.txt")  # no content change: nothing new
        # The watcher reports changes in order (and sorts the paths of one batch): once a file
        # written after the utime comes out, the utime has been seen. Its name sorts after
        # old.txt, so a wrong re-read of old.txt would come out first, in either case.
        (inbox / "zz-after.txt").write_text("after the utime")
        r = _read_record(proc, deadline)
        assert (r["id"], r["text"]) == ("inbox/zz-after.txt", "after the utime")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert rest == b"" and err == b""


def test_source_watch_waits_for_a_half_written_line(tmp_path):
    """A file being written is not bad data yet: a last line without its newline is read once
    the writer finishes it (the default policy used to end the watch with exit 65)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "first.ndjson").write_bytes(b'{"id": "a", "text": "ready"}\n')
    proc = _watch(tmp_path, "inbox")
    try:
        deadline = time.monotonic() + 30
        assert _read_record(proc, deadline)["id"] == "a"
        with open(inbox / "events.ndjson", "wb") as fh:
            fh.write(b'{"id": "b", "text": "whole"}\n{"id": "c", "te')
            fh.flush()
            # the watcher has seen the half line (it re-reads the file on every step) once a
            # second file written after it has come out
            (inbox / "marker.ndjson").write_bytes(b'{"id": "m", "text": "later"}\n')
            assert _read_record(proc, deadline)["id"] == "m"
            assert proc.poll() is None  # still watching: the half line is no error
            fh.write(b'xt": "finished"}\n')
        got = [_read_record(proc, deadline) for _ in range(2)]
        assert [(r["id"], r["text"]) for r in got] == [("b", "whole"), ("c", "finished")]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err == b"", err


def test_source_watch_with_stdin_is_a_usage_error():
    result = run_sage("source", "--watch", "-", input=b"")
    assert result.returncode == 2 and b"--watch" in result.stderr


def test_source_watch_sigterm_exits_143(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    proc = subprocess.Popen(
        sage_argv("source", "--watch", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert _read_record(proc, time.monotonic() + 20)["text"] == "a"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert rest == b"" and err == b""


def test_a_json_array_with_a_big_integer_element_is_a_bad_line_not_a_crash(tmp_path):
    """Found by make fuzz (atheris, source harness): the bad element's text was written with
    orjson, which refuses integers beyond 64 bits (TypeError, exit 1)."""
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"n": 1}, 33333333333333333333333333333331]')
    result = subprocess.run(
        sage_argv("source", str(path), "--on-error", "emit"),
        capture_output=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    records = parse_ndjson(result.stdout)
    assert records[0]["n"] == 1
    assert "33333333333333333333333333333331" in records[1]["_error"]["raw"]
