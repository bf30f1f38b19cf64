"""API keys never reach traces, logs, error records or anything else sage writes.

sage reads one secret, OPENAI_API_KEY (for `sage generate --backend openai`); it is sent in the
Authorization header and nowhere else. These tests set it (and a few look-alike variables) to a
marker, make the call fail in every way (connection refused, 401, garbage, 500), under
`sage run` with full tracing, --on-error emit, a dead-letter file, SAGE_DEBUG=1 tracebacks and
--progress, then look for the marker in stdout, stderr, the dead letters and every file of the
run directory, and in `sage trace` and its HTML report. Keys written on a command line (a URL's
`user:key@`, a `?api_key=` parameter, a `TOKEN=... sage ...` prefix) are masked in the run
directory (sage_cli.observability.redact); a key inside --base-url is refused outright.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_cli.observability.redact import redact_argv, redact_words
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv
from tests.openai_stub import StubServer, closed_port_url

BIN = str(Path(sys.executable).parent)
MARKER = "sk-MARKER-9f8e7d6c5b4a"
#: every variable that could plausibly hold a key; sage reads only OPENAI_API_KEY
KEY_ENV = {
    "OPENAI_API_KEY": MARKER,
    "SAGE_API_KEY": MARKER + "-sage",
    "SAGE_OPENAI_KEY": MARKER + "-sage2",
    "AWS_SECRET_ACCESS_KEY": MARKER + "-aws",
}


@pytest.fixture
def stub():
    with StubServer(flaky_failures=5) as server:
        yield server


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    e = clean_env(SAGE_DEBUG="1", SAGE_CACHE_DIR=str(tmp_path / "cache"), **KEY_ENV, **extra)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


def everything_written(tmp_path: Path, *streams: bytes) -> bytes:
    """stdout, stderr and the bytes of every file under tmp_path (run dirs, dead letters,
    caches, scripts excepted: the test wrote those)."""
    blobs = list(streams)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix != ".sh":
            blobs.append(path.read_bytes())
    return b"\n".join(blobs)


def assert_no_marker(blob: bytes) -> None:
    assert b"MARKER" not in blob, blob[max(0, blob.find(b"MARKER") - 200) :][:400]


def sage_run(tmp_path: Path, script: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "pipeline.sh"
    path.write_text("#!/usr/bin/env bash\n" + script)
    return subprocess.run(
        sage_argv("run", "--progress", str(path), *args),
        capture_output=True,
        env=env(tmp_path, **extra),
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["refused", "denied", "garbage", "flaky", "bad"])
def test_key_from_the_environment_is_in_no_output_trace_or_dead_letter(tmp_path, stub, mode):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1", "prompt": "hello"}]))
    url = closed_port_url() if mode == "refused" else f"{stub.url}/{mode}/v1"
    result = sage_run(
        tmp_path,
        "sage source in.ndjson \\\n"
        f"  | sage generate --backend openai --base-url {url} --retries 1 --backoff 0 "
        "--timeout 2 --on-error emit --errors dead.ndjson --progress \\\n"
        "  | sage map 'r'\n",
    )
    written = everything_written(tmp_path, result.stdout, result.stderr)
    assert_no_marker(written)
    assert list(tmp_path.glob(".sage/runs/*/stages/*.trace.ndjson")), "no trace was written"
    if mode == "denied":  # 401 is exit 69 for the generate stage
        assert result.returncode == 69, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        (out,) = parse_ndjson(result.stdout)
        assert "_error" in out and (tmp_path / "dead.ndjson").exists()
    if mode != "refused":  # the key was really used, in the one place it belongs
        assert stub.requests[0]["headers"]["Authorization"] == f"Bearer {MARKER}"
    run_id = next(tmp_path.glob(".sage/runs/*")).name
    trace = run_sage("trace", run_id, env=env(tmp_path), cwd=tmp_path)
    html = tmp_path / "r.html"
    report = run_sage(
        "trace", "report", run_id, "--html", str(html), env=env(tmp_path), cwd=tmp_path
    )
    assert trace.returncode == 0 and report.returncode == 0, report.stderr
    assert b"generate" in trace.stdout and b"generate" in html.read_bytes()
    assert_no_marker(
        trace.stdout + trace.stderr + report.stdout + report.stderr + html.read_bytes()
    )


def test_key_as_a_stage_prefix_in_the_script_is_masked_in_the_run_directory(tmp_path, stub):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1", "prompt": "hello"}]))
    result = sage_run(
        tmp_path,
        f"export SAGE_SECRET_TOKEN={MARKER}\n"
        "sage source in.ndjson \\\n"
        f"  | OPENAI_API_KEY={MARKER}x sage generate --backend openai "
        f"--base-url '{stub.url}/ok/v1?api_key={MARKER}' \\\n"
        "  | sage map 'r'\n",
    )
    assert result.returncode == 0, result.stderr
    assert stub.requests[0]["headers"]["Authorization"] == f"Bearer {MARKER}x"
    assert MARKER in stub.requests[0]["path"]  # the query parameter still reaches the server
    assert_no_marker(everything_written(tmp_path, result.stdout, result.stderr))
    run_json = next(tmp_path.glob(".sage/runs/*/run.json")).read_text()
    assert "OPENAI_API_KEY=***" in run_json and "api_key=***" in run_json


@pytest.mark.parametrize(
    "secret",
    [
        f"MYKEY={MARKER}",
        f"ACCESSKEY={MARKER}",
        f"secretKey={MARKER}",
        f"DB_PASS={MARKER}",
        f"GITHUB_PAT={MARKER}",
    ],
)
def test_secret_names_the_docs_promise_are_masked_everywhere_sage_run_writes(tmp_path, secret):
    """Every `NAME=value` whose name ends in KEY, PASS, PAT, TOKEN, SECRET... (docs/security.md)
    is masked in run.json, events, the stage traces and the summary: as a stage's prefix, as a
    word of a non-sage stage, and as a script argument."""
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1"}]))
    result = sage_run(
        tmp_path,
        f'{secret} sage source in.ndjson | grep -v "$1" | sage map r\n',
        secret,
    )
    assert result.returncode == 0, result.stderr
    written = everything_written(tmp_path, result.stdout, result.stderr)
    assert_no_marker(written)
    name = secret.partition("=")[0]
    assert f"{name}=***".encode() in written


def test_curl_user_password_is_masked(tmp_path):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1"}]))
    script = f"sage source in.ndjson | echo -u alice:{MARKER} --user 'bob:{MARKER} x' >/dev/null\n"
    result = sage_run(tmp_path, script)
    assert result.returncode == 0, result.stderr
    written = everything_written(tmp_path, result.stdout, result.stderr)
    assert_no_marker(written)
    assert b"alice:***" in written and b"bob:***" in written


def test_run_directories_are_private_whatever_the_umask(tmp_path):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1"}]))
    old = os.umask(0o022)
    try:
        result = sage_run(tmp_path, "sage source in.ndjson | sage map r\n")
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / ".sage" / "runs").iterdir()
    assert run.stat().st_mode & 0o777 == 0o700
    assert (run / "stages").stat().st_mode & 0o777 == 0o700


def test_key_in_a_script_argument_is_masked_and_resume_asks_for_it(tmp_path, stub):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1", "prompt": "hello"}]))
    url = f"{stub.url}/ok/v1?key={MARKER}"
    result = sage_run(
        tmp_path,
        'sage source in.ndjson | sage generate --backend openai --base-url "$1"\n',
        url,
    )
    assert result.returncode == 0, result.stderr
    assert_no_marker(everything_written(tmp_path, result.stdout, result.stderr))
    run_id = next(tmp_path.glob(".sage/runs/*")).name
    resumed = subprocess.run(
        sage_argv("run", "--resume", run_id),
        capture_output=True,
        env=env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )
    assert resumed.returncode == 2
    assert b"give them again" in resumed.stderr


@pytest.mark.parametrize(
    "url", [f"http://user:{MARKER}@127.0.0.1:9/v1", f"https://{MARKER}@example.invalid/v1"]
)
def test_key_inside_base_url_is_refused_without_being_shown_or_sent(tmp_path, url):
    """urllib would look `user:key@host` up as a host name: the key in a DNS query."""
    args = ("generate", "--backend", "openai", "--base-url", url)
    records = ndjson([{"prompt": "x"}])
    plain = run_sage(*args, input=records, env={**env(tmp_path), "SAGE_DEBUG": "0"})
    stderr = plain.stderr.decode()
    assert plain.returncode == 2, stderr
    assert "OPENAI_API_KEY" in stderr and stderr.count("\n") == 1
    debug = run_sage(*args, input=records, env=env(tmp_path))  # with a traceback
    assert debug.returncode == 2 and b"Traceback" in debug.stderr
    assert_no_marker(plain.stdout + plain.stderr + debug.stdout + debug.stderr)


def test_key_inside_base_url_under_sage_run_is_masked_in_the_trace(tmp_path):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "1", "prompt": "hello"}]))
    result = sage_run(
        tmp_path,
        "sage source in.ndjson | sage generate --backend openai "
        f"--base-url http://u:{MARKER}@127.0.0.1:9/v1\n",
    )
    assert result.returncode == 2, result.stderr
    events = next(tmp_path.glob(".sage/runs/*/events.ndjson")).read_text()
    assert "http://***@127.0.0.1:9/v1" in events  # the stage's argv, masked
    assert_no_marker(everything_written(tmp_path, result.stdout, result.stderr))


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (["--base-url", "https://u:s3cr3t@h/v1"], ["--base-url", "https://***@h/v1"]),
        (["http://h/v1?api_key=s3cr3t&x=1"], ["http://h/v1?api_key=***&x=1"]),
        (["curl", "--api-key", "s3cr3t"], ["curl", "--api-key", "***"]),
        (["curl", "--token=s3cr3t"], ["curl", "--token=***"]),
        (
            ["curl", "-H", "Authorization: Bearer s3cr3t"],
            ["curl", "-H", "Authorization: Bearer ***"],
        ),
        (["curl", "-H", "X-Api-Key: s3cr3t"], ["curl", "-H", "X-Api-Key: ***"]),
        (["curl", "-u", "alice:pw", "http://h"], ["curl", "-u", "alice:***", "http://h"]),
        (["curl", "--user=alice:pw"], ["curl", "--user=alice:***"]),
        (
            ["env", "MYKEY=s", "DB_PASS=s", "GITHUB_PAT=s"],
            ["env", "MYKEY=***", "DB_PASS=***", "GITHUB_PAT=***"],
        ),
        (["x", "secretKey=s", "ACCESSKEY=s"], ["x", "secretKey=***", "ACCESSKEY=***"]),
        (["x", "bypass=1", "--key=id"], ["x", "bypass=1", "--key=id"]),
        # sage's own options that only look like secrets stay as they are
        (["dedupe", "--key", "id"], ["dedupe", "--key", "id"]),
        (["generate", "--max-tokens", "64"], ["generate", "--max-tokens", "64"]),
        (["prompt", "--context-tokens", "300"], ["prompt", "--context-tokens", "300"]),
        (["map", 'r | {"token": r["key"]}'], ["map", 'r | {"token": r["key"]}']),
    ],
)
def test_redact_argv(given, shown):
    assert redact_argv(given) == shown


def test_redact_script_text():
    line = "OPENAI_API_KEY='a b' DB_PASSWORD=pw sage generate --api-key \"x y\" --max-tokens 8"
    assert redact_words(line) == (
        "OPENAI_API_KEY=*** DB_PASSWORD=*** sage generate --api-key *** --max-tokens 8"
    )


class EchoKeyServer(StubServer):
    """A server that quotes the key it refused in its error body (some do)."""

    def handle(self, h, mode, body, count):  # type: ignore[no-untyped-def]
        said = f"Incorrect API key provided: {h.headers.get('Authorization', '')[7:]}"
        status = 401 if mode == "denied" else 400
        return self.reply(h, status, {"error": {"message": said}})


@pytest.mark.parametrize("mode", ["denied", "bad"])
def test_key_echoed_back_by_the_server_is_masked(tmp_path, mode):
    dead = tmp_path / "dead.ndjson"
    with EchoKeyServer() as server:
        result = run_sage(
            "generate",
            "--backend",
            "openai",
            "--base-url",
            f"{server.url}/{mode}/v1",
            "--retries",
            "0",
            "--on-error",
            "emit",
            "--errors",
            str(dead),
            input=ndjson([{"prompt": "x"}]),
            env=env(tmp_path),
        )
    assert b"Incorrect API key provided: ***" in result.stdout + result.stderr
    assert_no_marker(result.stdout + result.stderr + (dead.read_bytes() if dead.exists() else b""))


class RedirectServer(StubServer):
    """Answers every call with a redirect to `target` (another host in real life)."""

    target = ""

    def handle(self, h, mode, body, count):  # type: ignore[no-untyped-def]
        h.send_response(int(mode))
        h.send_header("Location", self.target)
        h.send_header("Content-Length", "0")
        h.end_headers()


@pytest.fixture
def elsewhere():
    """A server that records every request, whatever its method, with its headers."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # type: ignore[no-untyped-def]
            pass

        def answer(self) -> None:
            seen.append({"method": self.command, "headers": dict(self.headers)})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = answer  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", ["301", "302", "303", "307", "308"])
def test_redirects_are_not_followed_so_the_key_stays_put(tmp_path, elsewhere, status):
    target, seen = elsewhere
    with RedirectServer() as server:
        server.target = target
        result = run_sage(
            "generate",
            "--backend",
            "openai",
            "--base-url",
            f"{server.url}/{status}/v1",
            input=ndjson([{"prompt": "x"}]),
            env={**env(tmp_path), "SAGE_DEBUG": "0"},
        )
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {MARKER}"
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "redirects" in stderr and stderr.count("\n") == 1
    assert seen == []  # the other host never saw a request, nor the key
