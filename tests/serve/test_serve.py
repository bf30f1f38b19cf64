"""`sage serve` on loopback with real clients (the official `openai` package, curl, jq) and the
real models: chat completions with an index (plain and streamed), embeddings, models, health,
metrics, OpenAI-shaped errors, micro-batching, the API key, binding rules and SIGTERM drain."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest

from tests.conftest import clean_env, run_sage
from tests.serve.server import Server, http, serve_env

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"


def client(server: Server, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=120)


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` (with any labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- chat completions --------------------------------------------------------------------------


def test_chat_completion_with_index_answers_and_returns_sources(server):
    resp = client(server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], temperature=0
    )
    assert resp.object == "chat.completion"
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 20 and resp.usage.completion_tokens > 0
    sources = resp.model_extra["sources"]
    assert sources[0]["id"] == "paris" and sources[0]["rank"] == 1
    assert "Paris is the capital" in sources[0]["text"]


def test_k_extension_changes_how_many_sources(server):
    resp = client(server).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "How do I open a file in Python?"}],
        max_tokens=8,
        extra_body={"k": 2},
    )
    assert [s["rank"] for s in resp.model_extra["sources"]] == [1, 2]
    assert resp.model_extra["sources"][0]["id"] == "file"


def test_streaming_with_openai_client_matches_the_plain_answer(server):
    messages = [{"role": "user", "content": "Where does the cat sit?"}]
    oai = client(server)
    stream = oai.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, first = [], None, None, None
    for chunk in stream:
        if first is None:
            first = chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 1, "streamed in pieces, not in one block"
    # the same answer, now from the answer cache (temperature 0)
    plain = oai.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24)
    assert "".join(pieces).strip() == plain.choices[0].message.content
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert first.model_extra["sources"][0]["id"] == "cat"


def test_streaming_with_curl_is_server_sent_events_ending_with_done(server):
    body = json.dumps(
        {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 12}
    )
    out = curl(
        "-N",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        server.url + "/v1/chat/completions",
    )
    assert out.returncode == 0, out.stderr
    events = [e for e in out.stdout.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "Paris" in text


def test_models_with_curl_and_jq(server):
    out = subprocess.run(
        f"curl -sS {server.url}/v1/models | jq -r '.data[].id'",
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert out.stdout.decode().split() == ["smollm2-135m", "minilm-l6"]
    assert [m.id for m in client(server).models.list().data] == ["smollm2-135m", "minilm-l6"]


def test_embeddings_with_openai_client(server):
    oai = client(server)
    texts = ["The cat sits on the mat", "A kitten is on the rug", "The stock market fell"]
    resp = oai.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64
    vecs = np.array([d.embedding for d in resp.data])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2
    assert resp.usage.prompt_tokens > 10
    floats = oai.embeddings.create(model="minilm-l6", input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vecs[0], atol=1e-5)


def test_health(server):
    status, body = server.get("/health")
    health = orjson.loads(body)
    assert status == 200 and health["status"] == "ok" and health["index"] == "idx"


# -- errors ------------------------------------------------------------------------------------


def _error(status: int, body: bytes) -> dict:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (b'{"messages": "hello"}', "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', "n"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop"),
    ],
)
def test_bad_chat_requests_get_400_in_openai_shape(server, body, param):
    status, raw = server.post("/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 400, raw
    err = _error(status, raw)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_too_long_prompt_is_400_context_length_exceeded(server):
    long = " ".join(f"word{i}" for i in range(3000))
    body = orjson.dumps({"messages": [{"role": "user", "content": long}]})
    status, raw = server.post("/v1/chat/completions", body)
    assert status == 400
    err = _error(status, raw)
    assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    huge = orjson.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]})
    status, raw = server.post("/v1/chat/completions", huge)
    assert status == 400 and _error(status, raw)["code"] == "context_length_exceeded"


def test_openai_client_sees_bad_requests_as_its_own_errors(server):
    import openai

    oai = client(server)
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="minilm-l6", input=[[1, 2, 3]])


def test_other_errors_keep_the_shape_and_the_server_carries_on(server):
    status, raw = server.get("/no/such/route")
    assert status == 404 and _error(status, raw)["code"] == "not_found"
    status, raw = server.get("/v1/chat/completions")
    assert status == 405 and _error(status, raw)
    status, raw = server.post("/v1/embeddings", b'{"input": ""}')
    assert status == 400 and _error(status, raw)["param"] == "input"
    # a body announced as too large is refused before it is read
    import http.client

    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(9 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and _error(resp.status, resp.read())["code"] == "too_large"
    conn.close()
    # after all that, a good request is answered
    resp = client(server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    assert resp.choices[0].message.content


# -- batching and metrics ----------------------------------------------------------------------


def test_concurrent_requests_are_micro_batched_and_counted(server):
    _, before = server.get("/metrics")
    before_text = before.decode()
    oai = client(server)
    questions = [f"Question {i}: what do Python lists do?" for i in range(8)]

    def ask(q: str) -> str:
        r = oai.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": q}], max_tokens=16
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert all(answers)
    _, after = server.get("/metrics")
    text = after.decode()
    batches = metric(text, "sage_batch_size_count") - metric(before_text, "sage_batch_size_count")
    answered = metric(text, "sage_batch_size_sum") - metric(before_text, "sage_batch_size_sum")
    assert answered == 8
    assert batches < 8, f"8 concurrent requests took {batches} model calls: not batched"
    ok = 'sage_requests_total{route="/v1/chat/completions",method="POST",status="200"}'
    assert metric(text, ok.split("{")[0]) >= 8
    assert metric(text, "sage_tokens_total") > metric(before_text, "sage_tokens_total")
    assert "sage_request_duration_seconds_bucket" in text
    assert 'sage_errors_total{route="/v1/chat/completions",kind="client"}' in text


# -- keys, binding, signals --------------------------------------------------------------------


def test_api_key_is_checked_on_every_request(served_dir):
    env = serve_env(served_dir, SAGE_API_KEY="s3cret-key")
    srv = Server(["--index", "idx", "--max-tokens", "8"], served_dir, env)
    try:
        for path in ("/health", "/metrics", "/v1/models"):
            status, raw = srv.get(path)
            assert status == 401 and _error(status, raw)["code"] == "invalid_api_key"
        status, _ = srv.get("/v1/models", {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _ = srv.get("/v1/models", {"Authorization": "Bearer s3cret-key"})
        assert status == 200
        import openai

        with pytest.raises(openai.AuthenticationError):
            client(srv, "nope").models.list()
        resp = client(srv, "s3cret-key").chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}]
        )
        assert resp.choices[0].message.content
    finally:
        srv.stop()
    assert "s3cret-key" not in srv.stderr_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_binding_beyond_loopback_needs_a_key(tmp_path, host):
    out = run_sage("serve", "--host", host, "--port", "0", env=serve_env(tmp_path), timeout=60)
    assert out.returncode == 2
    err = out.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("sage serve: error: ")
    assert "--api-key" in err and "Traceback" not in err


def test_port_in_use_is_one_line_exit_75(server, served_dir):
    port = server.url.rsplit(":", 1)[1]
    out = run_sage("serve", "--port", port, env=serve_env(served_dir), timeout=60)
    assert out.returncode == 75
    assert "already in use" in out.stderr.decode() and out.stderr.decode().count("\n") == 1


def test_missing_index_is_exit_69(tmp_path):
    out = run_sage(
        "serve", "--index", str(tmp_path / "nope"), "--port", "0", env=serve_env(tmp_path)
    )
    assert out.returncode == 69 and "sage index build" in out.stderr.decode()


def test_sigterm_drains_requests_in_flight_then_exits_143(served_dir):
    srv = Server(["--index", "idx"], served_dir, serve_env(served_dir))
    result: dict = {}

    def ask() -> None:
        body = orjson.dumps(
            {
                "messages": [{"role": "user", "content": "Tell me all about Python lists."}],
                "max_tokens": 64,
                "temperature": 0.7,
                "seed": 3,
            }
        )
        result["status"], result["body"] = http(srv.url + "/v1/chat/completions", body)

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the request is in flight
        _, metrics = srv.get("/metrics")
        if metric(metrics.decode(), "sage_requests_in_flight") >= 2:  # it and this request
            break
    srv.signal(signal.SIGTERM)
    asker.join(120)
    code = srv.wait(120)
    assert result["status"] == 200, result
    answer = orjson.loads(result["body"])
    assert answer["choices"][0]["message"]["content"]
    assert code == 143
    assert re.search(r"SIGTERM: draining [12] request\(s\) in flight", srv.stderr_text())
    # and nothing listens there any more
    with pytest.raises(OSError):
        http(srv.url + "/health", timeout=5)


# -- start-up cost -----------------------------------------------------------------------------


def test_cli_start_up_does_not_import_the_web_stack():
    code = (
        "import sys, sage_cli.app, sage_cli.commands.serve;"
        "heavy = ('starlette', 'uvicorn', 'numpy', 'llama_cpp', 'openai', 'mcp', 'h11');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=clean_env(), timeout=60
    )
    assert out.stdout.decode().strip() == "[]", out.stdout
