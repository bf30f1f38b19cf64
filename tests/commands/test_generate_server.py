"""sage generate --backend openai --concurrency N against a real OpenAI-compatible server:
llama-cpp-python's own server (the `server` extra) serving the same SmolLM2 file, started here
on 127.0.0.1; ready once GET /v1/models answers."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sage_cli.operators.models import locate
from sage_cli.resources import model_dirs
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(locate("smollm2-135m", model_dirs())),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--n_threads",
            "1",
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if json.loads(response.read())["data"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer GET /v1/models within 120 s")
            time.sleep(0.2)  # polling for readiness, not waiting for a result
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.model
def test_concurrency_against_llama_cpp_server(server, tmp_path):
    questions = [
        ("Context: Paris is the capital of France. What is the capital of France?", "Paris"),
        ("Context: Rome is the capital of Italy. What is the capital of Italy?", "Rome"),
        ("Context: Madrid is the capital of Spain. What is the capital of Spain?", "Madrid"),
        ("Context: Berlin is the capital of Germany. What is the capital of Germany?", "Berlin"),
        ("Context: Lisbon is the capital of Portugal. What is the capital of Portugal?", "Lisbon"),
    ]
    records = [{"id": str(i), "prompt": q} for i, (q, _) in enumerate(questions)]
    result = run_sage(
        "generate",
        "--backend",
        "openai",
        "--base-url",
        server,
        "--concurrency",
        "3",
        "--max-tokens",
        "24",
        input=ndjson(records),
        env=clean_env(SAGE_CACHE_DIR=str(tmp_path)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == [r["id"] for r in records]  # input order
    for r, (_, city) in zip(out, questions, strict=True):
        assert city in r["answer"], r
        assert r["usage"]["prompt_tokens"] > 10 and r["usage"]["completion_tokens"] > 0
