"""The HTTP request bodies of `sage serve` (sage_cli/serve/protocol.py: parse_json, check_model,
parse_chat, parse_embeddings): any body bytes give checked values or an APIError with a 4xx
status and a one-line message, never another exception (which the server would answer 500).

What a parse returns is what the engine may trust: a ChatRequest's messages are (role, str) with
role system/user/assistant and at least one user message, 1 <= max_tokens < n_ctx, 0 <=
temperature <= 2, at most 4 non-empty stop strings, k None or 1..100 (and only with an index);
an embeddings request is 1..2048 non-blank strings in float or base64. The model is one served.

The first input byte picks the endpoint (bit 0: chat or embeddings), whether the server has an
index (bit 1) and its n_ctx (bits 2-7); the rest is the body.
"""

from __future__ import annotations

from sage_cli.serve.errors import APIError
from sage_cli.serve.protocol import (
    MAX_EMBED_INPUTS,
    MAX_STOP,
    check_model,
    parse_chat,
    parse_embeddings,
    parse_json,
)

SERVED = ["qwen", "other-model"]
DEFAULT_MAX_TOKENS = 48
DIM = 384
MAX_LEN = 4096


def check_error(err: APIError) -> None:
    assert 400 <= err.status < 500, err.status
    assert isinstance(err.message, str) and err.message.strip(), repr(err.message)
    assert "\n" not in err.message and "\r" not in err.message, repr(err.message)
    body = err.body()["error"]
    assert body["message"] == err.message and isinstance(body["type"], str)


def parse(flags: int, raw: bytes) -> None:
    body = parse_json(raw)
    assert isinstance(body, dict)
    assert check_model(body, SERVED) in SERVED
    if flags & 1:
        texts, fmt = parse_embeddings(body, DIM)
        assert 1 <= len(texts) <= MAX_EMBED_INPUTS and fmt in ("float", "base64")
        assert all(isinstance(t, str) and t.strip() for t in texts), texts
        return
    with_index = bool(flags & 2)
    n_ctx = 2 + (flags >> 2) * 64
    request, stream, include_usage = parse_chat(
        body,
        default_max_tokens=min(DEFAULT_MAX_TOKENS, n_ctx - 1),
        n_ctx=n_ctx,
        with_index=with_index,
    )
    assert isinstance(stream, bool) and isinstance(include_usage, bool)
    assert request.messages and any(role == "user" for role, _ in request.messages)
    for role, content in request.messages:
        assert role in ("system", "user", "assistant") and isinstance(content, str)
    assert isinstance(request.max_tokens, int) and 1 <= request.max_tokens < n_ctx
    assert isinstance(request.temperature, float) and 0.0 <= request.temperature <= 2.0
    assert request.seed is None or isinstance(request.seed, int)
    assert len(request.stop) <= MAX_STOP and all(isinstance(s, str) and s for s in request.stop)
    assert request.k is None or (with_index and 1 <= request.k <= 100)
    hash(request)  # requests group by value in the batcher


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    try:
        parse(data[0], data[1:])
    except APIError as err:
        check_error(err)


SEEDS: list[bytes] = [
    b'\x00{"messages": [{"role": "user", "content": "Hi"}]}',
    b'\x02{"model": "qwen", "messages": [{"role": "developer", "content": "Be brief."}, '
    b'{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],'
    b' "max_tokens": 8, "temperature": 0.7, "seed": -1, "stop": ["\\n", ""], "k": 3,'
    b' "stream": true, "stream_options": {"include_usage": true}, "top_p": 0.9, "n": 1}',
    b'\x00{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1e3,'
    b' "temperature": 2.5, "stop": [1], "tools": [{}], "model": 3}',
    b'\x04{"messages": [{"role": "assistant", "content": null}], "k": 4, "n": 2,'
    b' "max_tokens": 18446744073709551616, "stream": "yes"}',
    b'\x01{"input": "some text", "model": "other-model", "encoding_format": "base64",'
    b' "dimensions": 384}',
    b'\x01{"input": ["a", " ", 3], "encoding_format": "hex", "dimensions": 0}',
    b'\x01{"input": [[1, 2], 3]}',
    b"\x01[]",
    b"\x00   ",
    b"\x00{bad json",
    b'\x00{"messages": "\\ud800"}',
]
