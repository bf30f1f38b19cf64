"""`sage mcp`: a Model Context Protocol server over stdio exposing `retrieve` and `answer`.

The protocol is JSON-RPC 2.0, one message per line on stdin and stdout (the MCP stdio
transport); it is small enough to speak directly, so serving needs no SDK (the tests use the
official `mcp` client). Handled: `initialize` (the handshake, any revision from 2024-11-05 to
2025-11-25: the client's own when known, else the newest), `ping`, `tools/list`, `tools/call`;
notifications are read and ignored; any other method is -32601, so a client probing for a newer
protocol era (`server/discover`) falls back to the handshake.

Tools:
  retrieve {query, k?}    the indexed documents closest to the query (id, text, score, rank)
  answer {question, k?}   the question retrieved against the index, prompted and answered by
                          the local model; the answer and its sources
A tool that fails on its input (an empty query) answers `isError: true` with the reason, as
the specification asks; protocol errors are JSON-RPC errors.

stdout carries protocol messages only: the process's fd 1 is pointed at stderr before any
model loads, so nothing a native library prints can corrupt the stream.
"""

from __future__ import annotations

import os
import sys
from typing import Any, BinaryIO

import orjson

from sage_cli import __version__
from sage_cli.serve.engine import ChatAnswer, ChatEngine, ChatRequest

VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL = (
    -32700,
    -32600,
    -32601,
    -32602,
    -32603,
)

_K = {
    "type": "integer",
    "minimum": 1,
    "maximum": 100,
    "description": "how many documents to retrieve (default: the server's -k)",
}
RETRIEVE = {
    "name": "retrieve",
    "title": "Retrieve documents",
    "description": "Search the local document index and return the documents most relevant "
    "to the query (id, text, score, rank), best first.",
    "inputSchema": {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to search for"}, "k": _K},
        "required": ["query"],
    },
}
ANSWER = {
    "name": "answer",
    "title": "Answer from the documents",
    "description": "Answer a question with the local model, from the documents the index "
    "retrieves for it; returns the answer and its sources.",
    "inputSchema": {
        "type": "object",
        "properties": {"question": {"type": "string", "description": "the question"}, "k": _K},
        "required": ["question"],
    },
}


class ToolInputError(Exception):
    """The tool's arguments are wrong (reported as a tool error, isError: true)."""


class MCPServer:
    """Answers one JSON-RPC message at a time."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.tools = [RETRIEVE, ANSWER] if engine.retriever is not None else [ANSWER]

    # -- the loop -----------------------------------------------------------------------------

    def serve(self, inp: BinaryIO, out: BinaryIO) -> int:
        for line in inp:
            if not line.strip():
                continue
            reply = self.handle_line(line)
            if reply is not None:
                out.write(orjson.dumps(reply) + b"\n")
                out.flush()
        return 0

    def handle_line(self, line: bytes) -> Any:
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return _error(None, PARSE_ERROR, f"not JSON: {exc}")
        if isinstance(message, list):  # a batch (2025-03-26)
            replies = [r for r in (self.handle(m) for m in message) if r is not None]
            return replies or None
        return self.handle(message)

    def handle(self, message: Any) -> dict[str, Any] | None:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 message")
        method = message.get("method")
        if "id" not in message:
            return None  # a notification (initialized, cancelled ...): nothing to answer
        mid = message["id"]
        if not isinstance(method, str):
            if "result" in message or "error" in message:
                return None  # a response to a request we never send
            return _error(mid, INVALID_REQUEST, "no method")
        params = message.get("params") or {}
        if not isinstance(params, dict):
            return _error(mid, INVALID_PARAMS, "params must be an object")
        try:
            if method == "initialize":
                return _result(mid, self.initialize(params))
            if method == "ping":
                return _result(mid, {})
            if method == "tools/list":
                return _result(mid, {"tools": self.tools})
            if method == "tools/call":
                return self.call(mid, params)
        except Exception as exc:  # noqa: BLE001 - one failed request must not end the server
            return _error(mid, INTERNAL, f"{type(exc).__name__}: {exc}")
        return _error(mid, METHOD_NOT_FOUND, f"method not found: {method}")

    # -- methods ------------------------------------------------------------------------------

    def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        version = asked if asked in VERSIONS else VERSIONS[-1]
        index = f" over the index {self.engine.index}" if self.engine.index else ""
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "sage", "title": "sage", "version": __version__},
            "instructions": f"Local retrieval and answers{index} (model "
            f"{self.engine.model_name}): use `retrieve` for documents, `answer` for an answer.",
        }

    def call(self, mid: Any, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        args = params.get("arguments") or {}
        known = {str(t["name"]) for t in self.tools}
        if name not in known:
            return _error(mid, INVALID_PARAMS, f"unknown tool {name!r}; tools: {sorted(known)}")
        if not isinstance(args, dict):
            return _error(mid, INVALID_PARAMS, "arguments must be an object")
        try:
            if name == "retrieve":
                structured = self.retrieve(args)
                text = orjson.dumps(structured["documents"], option=orjson.OPT_INDENT_2).decode()
            else:
                structured = self.answer(args)
                text = structured["answer"]
                if structured["sources"]:
                    ids = ", ".join(str(s["id"]) for s in structured["sources"])
                    text += f"\n\nsources: {ids}"
        except ToolInputError as exc:
            return _result(mid, {"content": [{"type": "text", "text": str(exc)}], "isError": True})
        return _result(
            mid,
            {
                "content": [{"type": "text", "text": text}],
                "structuredContent": structured,
                "isError": False,
            },
        )

    def retrieve(self, args: dict[str, Any]) -> dict[str, Any]:
        query = _text(args, "query")
        k = _k(args)
        found = self.engine.retrieve([(query, k)])[0]
        if isinstance(found, BaseException):
            raise ToolInputError(str(found))
        return {"documents": found}

    def answer(self, args: dict[str, Any]) -> dict[str, Any]:
        question = _text(args, "question")
        k = _k(args) if self.engine.retriever is not None else None
        request = ChatRequest.of(
            [{"role": "user", "content": question}], max_tokens=self.engine.max_tokens, k=k
        )
        result = self.engine.answer([request])[0]
        if isinstance(result, BaseException):
            raise ToolInputError(str(result))
        assert isinstance(result, ChatAnswer)
        return {"answer": result.text, "sources": result.sources}


def _text(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ToolInputError(f"'{name}' must be a non-empty string")
    return value


def _k(args: dict[str, Any]) -> int | None:
    k = args.get("k")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
        raise ToolInputError("'k' must be an integer from 1 to 100")
    return k


def _result(mid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": mid, "result": result}


def _error(mid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": code, "message": message}}


def protocol_stdout() -> BinaryIO:
    """A private copy of stdout for protocol messages; fd 1 itself now writes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "wb")


def run(engine: ChatEngine) -> int:
    out = protocol_stdout()
    engine.setup()
    return MCPServer(engine).serve(sys.stdin.buffer, out)
