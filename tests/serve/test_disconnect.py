"""A client that closes its connection mid-answer stops its generation (issue 16): plain and
streamed chat completions, alone and inside a batch, against a real `sage serve` with SmolLM2.
/metrics says how many answers were stopped and how many tokens they had generated."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.server import Server, serve_env

pytestmark = pytest.mark.model

#: a request that generates for a long time (SmolLM2 at temperature 0: over 600 tokens)
LONG = "Write the numbers from 1 to 1000 separated by commas."
MAX_TOKENS = 1500


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("disconnect")
    srv = Server(["--max-tokens", "64", "--n-ctx", "2048"], d, serve_env(d))
    yield srv
    srv.stop()


def metric(server: Server, name: str) -> float:
    _, body = server.get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


def wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_request(server: Server, stream: bool) -> socket.socket:
    """A raw HTTP request for a long answer, left open; the caller closes it."""
    body = json.dumps(
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": LONG}],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def first_chunk(sock: socket.socket) -> None:
    """Read until the first server-sent event: the answer is being generated."""
    got = b""
    while b"data: " not in got:
        more = sock.recv(65536)
        assert more, got
        got += more


def answers(server: Server) -> None:
    status, body = server.post(
        "/v1/chat/completions",
        json.dumps(
            {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8}
        ).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]


def stopped_early(server: Server, cancelled_before: float, tokens_before: float, n: int) -> None:
    """n more answers were stopped, each well before max_tokens; the model thread is free."""
    wait_for(
        lambda: metric(server, "sage_cancelled_total") >= cancelled_before + n,
        "the generation to stop",
    )
    tokens = metric(server, "sage_cancelled_tokens_total") - tokens_before
    assert tokens < n * MAX_TOKENS / 4, f"{n} cancelled answers generated {tokens} tokens"
    wait_for(lambda: metric(server, "sage_model_jobs_running") == 0, "the model thread")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_goes_away_stops_its_generation(server: Server, stream: bool):
    cancelled = metric(server, "sage_cancelled_total")
    tokens = metric(server, "sage_cancelled_tokens_total")
    sock = open_request(server, stream)
    try:
        if stream:
            first_chunk(sock)
        else:
            wait_for(lambda: metric(server, "sage_model_jobs_running") == 1, "the answer to start")
    finally:
        sock.close()
    stopped_early(server, cancelled, tokens, 1)
    answers(server)


def test_a_cancelled_sequence_leaves_its_batch_which_carries_on(server: Server):
    """Two plain requests wait behind a streamed one, then decode together; one client goes
    away: its sequence stops, the other still gets its answer."""
    cancelled = metric(server, "sage_cancelled_total")
    tokens = metric(server, "sage_cancelled_tokens_total")
    busy = open_request(server, True)
    try:
        first_chunk(busy)  # the model thread is busy with this one
        with ThreadPoolExecutor(1) as pool:
            gone = open_request(server, False)
            try:
                kept = pool.submit(
                    server.post,
                    "/v1/chat/completions",
                    json.dumps(
                        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 200}
                    ).encode(),
                    {"Content-Type": "application/json"},
                )
                wait_for(lambda: metric(server, "sage_requests_in_flight") >= 4, "two waiting")
                busy.close()  # the two waiting requests now go into one batch
                wait_for(lambda: metric(server, "sage_model_jobs_running") == 2, "a batch of two")
            finally:
                gone.close()
            stopped_early(server, cancelled, tokens, 2)
            status, body = kept.result(timeout=300)
    finally:
        busy.close()
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] > 0
    answers(server)
