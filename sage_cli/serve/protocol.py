"""The OpenAI wire format: request bodies checked field by field, responses built.

Every check failure is an `APIError` (400, OpenAI's error shape) naming the field (`param`).
Fields sage does not use (top_p, presence_penalty, user ...) are accepted and ignored, as
OpenAI-compatible servers do; a field whose value sage cannot honour (n > 1, token arrays as
embedding input, tools) is refused rather than silently answered differently.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import orjson

from sage_cli.serve.engine import ChatAnswer, ChatRequest
from sage_cli.serve.errors import APIError, bad_request

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP = 4
MAX_EMBED_INPUTS = 2048


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {_kind(value)}", name)
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise bad_request(f"'{name}' must be {limit}, got {value}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number, got {_kind(value)}", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {_kind(value)}", name)
    return value


def check_model(body: dict[str, Any], served: list[str]) -> str:
    """The model asked for: one of `served` (the first when none is named)."""
    model = body.get("model")
    if model is None:
        return served[0]
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_kind(model)}", "model")
    if model not in served:
        raise APIError(
            404,
            f"the model {model!r} does not exist here; this server has: {', '.join(served)}",
            param="model",
            code="model_not_found",
        )
    return model


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(
                    f"'{where}[{j}]': only text parts are supported "
                    '({"type": "text", "text": ...})',
                    where,
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"'{where}[{j}].text' must be a string", where)
            texts.append(text)
        return "\n".join(texts)
    raise bad_request(f"'{where}' must be a string, got {_kind(value)}", where)


def parse_chat(
    body: dict[str, Any], *, default_max_tokens: int, n_ctx: int, with_index: bool
) -> tuple[ChatRequest, bool, bool]:
    """A chat completion request: (request, stream, include_usage in the stream)."""
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content}", "messages")
    parsed: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object, got {_kind(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            shown = role if isinstance(role, str) else _kind(role)
            raise bad_request(
                f"'{where}.role' must be one of {', '.join(ROLES)}, got {shown!r}", f"{where}.role"
            )
        if "content" not in m or m["content"] is None:
            raise bad_request(f"'{where}.content' is required", f"{where}.content")
        parsed.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content(m["content"], f"{where}.content"),
            }
        )
    if not any(m["role"] == "user" for m in parsed):
        raise bad_request("'messages' has no user message to answer", "messages")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools and function calling are not supported by this server", "tools")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    max_tokens = _int(body, "max_completion_tokens", 1, n_ctx - 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, n_ctx - 1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    seed = _int(body, "seed", -(2**63))
    stop_value = body.get("stop")
    if stop_value is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_value, str):
        stop = (stop_value,) if stop_value else ()
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        if len(stop_value) > MAX_STOP:
            raise bad_request(f"'stop' takes at most {MAX_STOP} strings", "stop")
        stop = tuple(s for s in stop_value if s)
    else:
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    k = _int(body, "k", 1, 100)
    if k is not None and not with_index:
        raise bad_request("'k' needs a server started with --index DIR", "k")
    stream = _bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = _bool(options, "include_usage")
    request = ChatRequest.of(
        parsed,
        max_tokens=max_tokens or default_max_tokens,
        temperature=temperature if temperature is not None else 0.0,
        seed=seed,
        stop=stop,
        k=k,
    )
    return request, stream, include_usage


def parse_embeddings(body: dict[str, Any], dim: int | None) -> tuple[list[str], str]:
    """An embeddings request: (texts, encoding_format)."""
    value = body.get("input")
    if value is None:
        raise bad_request("'input' is required: a string or a list of strings", "input")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        texts = list(value)
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(t, int | list) and not isinstance(t, bool) for t in value)
    ):
        raise bad_request("token arrays are not supported as 'input': send text", "input")
    else:
        raise bad_request("'input' must be a string or a non-empty list of strings", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise bad_request(f"'input' takes at most {MAX_EMBED_INPUTS} strings", "input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise bad_request(f"'input[{i}]' is empty", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be float or base64", "encoding_format")
    dims = _int(body, "dimensions", 1)
    if dims is not None and dim is not None and dims != dim:
        raise bad_request(f"this model's embeddings have {dim} dimensions only", "dimensions")
    return texts, fmt


# -- responses ---------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def chat_response(answer: ChatAnswer, model: str, with_sources: bool) -> dict[str, Any]:
    response: dict[str, Any] = {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(answer),
    }
    if with_sources:
        response["sources"] = answer.sources
    if answer.warnings:
        response["warnings"] = answer.warnings
    return response


def usage(answer: ChatAnswer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    out.update(extra)
    return out


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def embeddings_response(vectors: Any, tokens: int, model: str, fmt: str) -> dict[str, Any]:
    data = []
    for i, row in enumerate(vectors):
        if fmt == "base64":
            value: Any = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        else:
            value = row.astype("f8").round(7).tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_response(names: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sage"} for n in names],
    }
