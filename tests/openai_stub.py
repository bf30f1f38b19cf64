"""A local OpenAI-compatible chat server for tests: http.server on 127.0.0.1 in a thread.

The first path segment picks a behaviour, so one server covers every case:
`{url}/ok/v1` answers properly (the answer echoes the last user message), `/hang/v1` answers
only after `hang_seconds` (60 by default, or when the server stops: far beyond any timeout a
test sets, so a timeout that fires on a loaded machine is still told apart from an answer), `/garbage/v1` returns a page that is not JSON, `/flaky/v1` fails with HTTP 500
`flaky_failures` times then answers, `/busy/v1` answers 429 with Retry-After, `/denied/v1` 401,
`/bad/v1` 400, `/empty/v1` a JSON object without choices, `/slow/v1` answers after `delay`
seconds (requests in flight are counted: `max_in_flight`), `/limited/v1` answers 429 with
`Retry-After: 1` to its first `flaky_failures` requests, anything else 404. Every request is kept in `requests`
(path, headers, body) so tests can check what was sent.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubServer:
    def __init__(
        self, flaky_failures: int = 1, hang_seconds: float = 60.0, delay: float = 0.05
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        self.flaky_failures = flaky_failures
        self.hang_seconds = hang_seconds
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        #: time.monotonic() of each answer sent by /limited/v1 after its 429s
        self.answered_at: list[float] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # ends every hang when the server stops
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                mode = self.path.strip("/").split("/")[0]
                with stub._lock:
                    stub.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": json.loads(body or b"{}"),
                        }
                    )
                    count = sum(1 for r in stub.requests if r["path"] == self.path)
                stub.handle(self, mode, json.loads(body or b"{}"), count)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def handle(
        self, h: BaseHTTPRequestHandler, mode: str, body: dict[str, Any], count: int
    ) -> None:
        if mode == "slow":
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            time.sleep(self.delay)
            with self._lock:
                self.in_flight -= 1
            return self.reply(h, 200, completion(body))
        if mode == "limited":
            if count <= self.flaky_failures:
                h.send_response(429)
                h.send_header("Retry-After", "1")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            with self._lock:
                self.answered_at.append(time.monotonic())
            return self.reply(h, 200, completion(body))
        if mode == "hang":
            self._stopped.wait(self.hang_seconds)
            return self.reply(h, 200, completion(body))
        if mode == "garbage":
            return self.reply(h, 200, b"<html>this is not JSON</html>", "text/html")
        if mode == "empty":
            return self.reply(h, 200, {"object": "chat.completion"})
        if mode == "flaky" and count <= self.flaky_failures:
            return self.reply(h, 500, {"error": {"message": "overloaded"}})
        if mode == "busy":
            h.send_response(429)
            h.send_header("Retry-After", "0")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        if mode == "denied":
            return self.reply(h, 401, {"error": {"message": "invalid api key"}})
        if mode == "bad":
            return self.reply(h, 400, {"error": {"message": "context length exceeded"}})
        if mode in ("ok", "flaky"):
            return self.reply(h, 200, completion(body))
        return self.reply(h, 404, {"error": {"message": f"no route {h.path}"}})

    @staticmethod
    def reply(
        h: BaseHTTPRequestHandler, status: int, payload: Any, content_type: str = "application/json"
    ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        self.server.shutdown()
        self.server.server_close()


def completion(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion whose answer echoes the last user message."""
    last = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"][-1:]
    text = f"echo: {last[0] if last else ''}"
    if body.get("response_format"):
        text = json.dumps({"echo": last[0] if last else ""})
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
