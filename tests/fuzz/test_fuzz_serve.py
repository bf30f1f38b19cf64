"""A soak of `sage serve`'s HTTP front: random raw requests over a socket to a real server (the
tiny random llama of tests/fixtures/tiny_models.py as its chat model, so answers cost
milliseconds; the default embedding model), on 127.0.0.1 and a free port.

Random methods, paths, header lines (no colon, huge, repeated, a Content-Length that lies, a
Transfer-Encoding), truncated bodies, and random JSON bodies for /v1/chat/completions and
/v1/embeddings. Every answer is a valid HTTP response with a status below 500, or the
connection closes without one (HTTP the server cannot parse); after the soak the server is
alive and /health answers 200.

(The request bodies alone, in process and much faster: tests/fuzz/harness/fuzz_serve_protocol.py.)
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import examples
from tests.serve.server import Server, serve_env

PATHS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
    "/studio",
    "/v1/chat/completions?stream=true",
    "/v1/../health",
    "//v1/models",
    "*",
    "/%00",
]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "BREW", "get", ""]
texts = st.text(max_size=30) | st.sampled_from(["", " ", "\n", "\x00", "é" * 10, "x" * 5000])
roles = st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]) | st.text(
    max_size=5
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": texts | st.none() | st.integers(-9, 9)},
    )
    | st.fixed_dictionaries({"role": st.just("user"), "content": st.just("Hi")}),
    max_size=3,
)
small = st.none() | st.integers(0, 3) | st.floats(0, 1)  # mostly what the server takes
numbers = (
    small | small | st.integers(-5, 300) | st.floats(-1, 3) | st.text(max_size=3) | st.booleans()
)
chat_body = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "model": st.sampled_from(["nope", ""]) | st.integers(0, 9),  # absent: the served one
        "max_tokens": numbers,
        "temperature": numbers,
        "stop": st.none() | texts | st.lists(texts, max_size=5),
        "stream": st.booleans() | st.integers(0, 1),
        "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
        "seed": numbers,
        "n": numbers,
        "k": numbers,
    },
)
embed_body = st.fixed_dictionaries(
    {"input": texts | st.lists(texts, max_size=3) | st.lists(st.integers(0, 9), max_size=3)},
    optional={
        "encoding_format": st.sampled_from(["float", "base64", "hex"]),
        "dimensions": numbers,
        "model": st.text(max_size=8),
    },
)
bodies = (
    chat_body.map(orjson.dumps)
    | embed_body.map(orjson.dumps)
    | st.binary(max_size=200)
    | st.sampled_from([b"", b"{", b"[]", b"null", b'{"messages": [' * 50])
)
header_lines = st.lists(
    st.sampled_from(
        [
            b"Content-Type: application/json",
            b"Content-Type: text/plain",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip",
            b"Content-Length: -1",
            b"Content-Length: abc",
            b"Content-Length: 99999999999999999999",
            b"Expect: 100-continue",
            b"Connection: keep-alive",
            b"Authorization: Bearer x",
            b"no colon here",
            b": empty name",
            b"X-Long: " + b"a" * 70_000,
            b"Host: \x00",
        ]
    )
    | st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
    max_size=4,
)


def well_formed(path: str, body: bytes) -> bytes:
    """A POST an OpenAI client would send, with `body`."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS) | st.text(max_size=12).map(lambda t: "/" + t))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", ""]))
    body = draw(bodies)
    length = draw(st.sampled_from(["true", "true", "none", "short", "long"]))  # it may lie
    lines = [f"{method} {path} {version}".encode("utf-8", "surrogatepass"), b"Host: 127.0.0.1"]
    lines += draw(header_lines)
    if length == "true":
        lines.append(f"Content-Length: {len(body)}".encode())
    elif length == "short":
        lines.append(f"Content-Length: {max(len(body) - 3, 0)}".encode())
    elif length == "long":
        lines.append(f"Content-Length: {len(body) + 10}".encode())
    lines.append(b"Connection: close")
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    if draw(st.booleans()) and len(request) > 4:  # truncated anywhere
        request = request[: draw(st.integers(1, len(request) - 1))]
    return request


requests = st.one_of(
    st.tuples(raw_requests(), st.just(True)),
    st.tuples(
        chat_body.map(lambda b: well_formed("/v1/chat/completions", orjson.dumps(b))),
        st.just(False),
    ),
    st.tuples(
        embed_body.map(lambda b: well_formed("/v1/embeddings", orjson.dumps(b))),
        st.just(False),
    ),
)


class SoakServer(Server):
    """A Server whose stderr is read as it comes (a thread), so a long soak never fills the
    pipe (uvicorn logs each request it cannot parse) and the log can be checked after."""

    def drain(self) -> None:
        assert self.proc.stderr is not None
        self.reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self.reader.start()

    def _read(self, pipe: Any) -> None:
        for chunk in iter(lambda: pipe.read1(65536), b""):
            self.stderr += chunk

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.reader.join(10)
        return code


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[SoakServer]:
    d = tmp_path_factory.mktemp("soak")
    srv = SoakServer(
        ["--model", str(tiny_llama), "--max-tokens", "4", "--n-ctx", "256", "--no-cache"],
        d,
        serve_env(d),
    )
    srv.drain()
    yield srv
    srv.stop()


def exchange(url: str, request: bytes, end: bool = True) -> int | None:
    """The status of the server's answer to `request` (None: it closed without one). With
    `end`, the request ends there (the socket is half-closed): the server must answer or
    close, not wait for the rest of a truncated request or of a body shorter than its
    Content-Length. (uvicorn takes that end as the client gone, so a complete request whose
    answer counts is sent without it.)"""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        try:
            sock.sendall(request)
            if end:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # broken pipe, reset, not connected: it refused the request before
            pass  # reading it all (a huge header): what did it say?
        head = request.startswith(b"HEAD ")  # an answer to HEAD has headers only
        response = http.client.HTTPResponse(sock, method="HEAD" if head else "GET")
        try:
            response.begin()
            status = response.status
            response.read()  # the whole body, chunked or not
        except (http.client.RemoteDisconnected, ConnectionResetError):
            # closed without an answer, or reset after it while the rest of a request it
            # refused (a huge header) was unread: what it answered (if it did) still counts
            return response.status if isinstance(response.status, int) else None
        return status


@given(requests)
@settings(max_examples=examples(150))
def test_any_raw_request_gets_a_valid_answer_below_500_or_a_clean_close(
    soak_server: SoakServer, case: tuple[bytes, bool]
) -> None:
    request, end = case
    status = exchange(soak_server.url, request, end)
    event(f"status {status}")
    assert status is None or 100 <= status < 500, (status, request[:300])
    if not end:  # a complete request: answered
        assert status is not None, request[:300]
    assert soak_server.proc.poll() is None, soak_server.stderr_text()


def _in_flight(server: Server) -> int:
    status, body = server.get("/metrics")
    assert status == 200
    (line,) = [x for x in body.decode().splitlines() if x.startswith("sage_requests_in_flight ")]
    return int(line.split()[1])


def _wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_client_gone_before_its_whole_body_is_not_a_crash(
    tmp_path: Path, tiny_llama: Path, path: str
) -> None:
    """Found by the soak (deep profile): a body shorter than its Content-Length, then the
    client's end of the connection, raised starlette's ClientDisconnect out of read_body: a
    "sage serve: error: ... ClientDisconnect" line and uvicorn's traceback in the log."""
    srv = SoakServer(["--model", str(tiny_llama), "--no-cache"], tmp_path, serve_env(tmp_path))
    srv.drain()
    try:
        parts = urlsplit(srv.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n".encode()
                + b'{"input": '
            )
            _wait_for(lambda: _in_flight(srv) == 2)  # it is reading the body (and /metrics)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # an answer nobody reads, then the close
                pass
        _wait_for(lambda: _in_flight(srv) == 1)
        status, body = srv.get("/metrics")
        answered = [x for x in body.decode().splitlines() if x.startswith("sage_requests_total")]
        assert any(path in x and '"499"' in x for x in answered), answered
    finally:
        code = srv.stop()
    assert code == 143
    log = srv.stderr_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log


def test_after_the_soak_the_server_is_alive_and_healthy(soak_server: SoakServer) -> None:
    for request in (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{",
        b"X" * 100_000 + b"\r\n\r\n",
    ):
        exchange(soak_server.url, request)
    status, body = soak_server.get("/health")
    assert status == 200 and orjson.loads(body)["status"] == "ok", body
    assert soak_server.proc.poll() is None
    chat = orjson.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    status, body = soak_server.post(
        "/v1/chat/completions", chat, {"Content-Type": "application/json"}
    )
    assert status == 200 and orjson.loads(body)["choices"][0]["message"]["role"] == "assistant"
    # SIGTERM: drained and stopped (143, as documented), no traceback in its log
    assert soak_server.stop() == 143, soak_server.stderr_text()[-3000:]
    assert "Traceback" not in soak_server.stderr_text(), soak_server.stderr_text()[-3000:]


@pytest.mark.parametrize(
    "request_bytes",
    [
        # answered without reading the body; the malformed chunk came in the same packet
        b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n",
        # refused for its Content-Length before the (chunked, malformed) body is read
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n",
    ],
    ids=["health", "too-large"],
)
def test_an_answer_after_uvicorns_own_400_is_not_a_crash(
    tmp_path: Path, tiny_llama: Path, request_bytes: bytes
) -> None:
    """Found by make fuzz in CI: uvicorn answers 400 for HTTP it cannot parse while the app is
    already answering the same request (its head was fine); h11 then refused the app's answer
    with a LocalProtocolError, a traceback in the log. The client gets uvicorn's 400."""
    srv = SoakServer(["--model", str(tiny_llama), "--no-cache"], tmp_path, serve_env(tmp_path))
    srv.drain()
    try:
        assert exchange(srv.url, request_bytes, end=False) in (None, 400)
        status, _ = srv.get("/health")
        assert status == 200
    finally:
        code = srv.stop()
    assert code == 143
    log = srv.stderr_text()
    assert "Traceback" not in log and "LocalProtocolError" not in log, log
