import time

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage
from tests.openai_stub import StubServer, closed_port_url

SECRET = "sk-test-SECRET-cli-0123456789"


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return tmp_path / "cache"


def openai_args(url, *more):
    return ["generate", "--backend", "openai", "--base-url", url, "--backoff", "0", *more]


def test_openai_backend_answers(cli, stub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = cli(
        *openai_args(f"{stub.url}/ok/v1", "--api-model", "m", "--stop", "a", "--stop", "b"),
        input=ndjson([{"id": "1", "prompt": "hi"}, {"id": "2", "query": "q"}]),
    )
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["answer"] for r in out] == ["echo: hi", "echo: q"]
    assert out[0]["usage"]["completion_tokens"] == 3
    assert stub.requests[0]["body"]["stop"] == ["a", "b"]
    assert stub.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_refused_server_is_exit_75_in_one_line(cli):
    result = cli(*openai_args(closed_port_url(), "--retries", "1"), input=ndjson([{"prompt": "x"}]))
    assert result.exit_code == 75
    assert result.stderr.count("\n") == 1 and "cannot connect" in result.stderr
    assert "stdin:1" in result.stderr


def test_emit_turns_a_failed_call_into_an_error_record(cli, stub):
    records = [{"id": "1", "prompt": "x"}]
    result = cli(
        *openai_args(f"{stub.url}/garbage/v1", "--retries", "0"),
        "--on-error",
        "emit",
        input=ndjson(records),
    )
    assert result.exit_code == 0
    (out,) = parse_ndjson(result.stdout)
    assert out["id"] == "1" and "not a chat completion" in out["_error"]["error"]


def test_hanging_server_times_out_once_per_attempt(cli, stub):
    t0 = time.monotonic()
    result = cli(
        *openai_args(f"{stub.url}/hang/v1", "--timeout", "0.3", "--retries", "1"),
        input=ndjson([{"prompt": "x"}]),
    )
    assert result.exit_code == 75 and "no answer within 0.3 s" in result.stderr
    # two attempts, not four (no second pass by the driver): counted, not timed
    assert [r["path"] for r in stub.requests] == ["/hang/v1/chat/completions"] * 2
    # the server holds each request for 60 s: ending well before that is the timeout's doing
    assert time.monotonic() - t0 < 30


def test_flaky_server_recovers(cli, stub):
    result = cli(
        *openai_args(f"{stub.url}/flaky/v1", "--retries", "2"), input=ndjson([{"prompt": "x"}])
    )
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout)[0]["answer"] == "echo: x"


def test_cache_and_no_cache(cli, stub, cache_dir):
    args = openai_args(f"{stub.url}/ok/v1")
    for _ in range(2):
        result = cli(*args, input=ndjson([{"prompt": "same"}]))
    assert parse_ndjson(result.stdout)[0]["usage"]["cached"] is True
    assert len(stub.requests) == 1 and (cache_dir / "generate.sqlite").is_file()
    cli(*args, "--no-cache", input=ndjson([{"prompt": "same"}]))
    assert len(stub.requests) == 2


def test_json_schema_file(cli, stub, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"echo": {"type": "string"}}}')
    result = cli(
        *openai_args(f"{stub.url}/ok/v1", "--json-schema", str(schema)),
        input=ndjson([{"prompt": "hi"}]),
    )
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout)[0]["answer_json"] == {"echo": "hi"}


def test_missing_prompt_is_a_record_error(cli, stub):
    result = cli(*openai_args(f"{stub.url}/ok/v1"), input=ndjson([{"text": "x"}]))
    assert result.exit_code == 65 and "'prompt'" in result.stderr
    assert stub.requests == []


def test_bad_options_are_usage_errors(cli):
    result = cli("generate", "--backend", "openai", input=b"")
    assert result.exit_code == 2 and "--base-url" in result.stderr
    result = cli("generate", "--max-tokens", "4096", "--n-ctx", "1024", input=b"")
    assert result.exit_code == 2 and "--n-ctx" in result.stderr


def test_missing_model_file_is_exit_69(cli, tmp_path):
    result = cli(
        "generate", "--model", str(tmp_path / "nope.gguf"), input=ndjson([{"prompt": "x"}])
    )
    assert result.exit_code == 69 and "nope.gguf" in result.stderr


def test_corrupt_model_file_is_exit_69_not_an_abort(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    result = run_sage("generate", "--model", str(bad), input=ndjson([{"prompt": "x"}]))
    assert result.returncode == 69, result.stderr


@pytest.mark.parametrize("mode", ["denied", "bad", "garbage", "flaky"])
def test_api_key_never_appears_in_output_errors_or_dead_letters(stub, tmp_path, mode):
    dead = tmp_path / "dead.ndjson"
    env = clean_env(OPENAI_API_KEY=SECRET, SAGE_DEBUG="1", SAGE_CACHE_DIR=str(tmp_path))
    result = run_sage(
        *openai_args(f"{stub.url}/{mode}/v1", "--retries", "0"),
        "--on-error",
        "emit",
        "--errors",
        str(dead),
        input=ndjson([{"prompt": "x"}]),
        env=env,
    )
    everything = result.stdout + result.stderr + (dead.read_bytes() if dead.exists() else b"")
    assert SECRET.encode() not in everything
    assert stub.requests and stub.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    if mode != "flaky":
        assert b"_error" in result.stdout or result.returncode == 69


@pytest.mark.model
def test_real_pipeline_prompt_generate_eval(tmp_path):
    """sage prompt --template qa | sage generate | sage eval, as real processes and pipes."""
    import subprocess

    from tests.conftest import sage_argv

    question = {
        "id": "q1",
        "query": "What is the capital of France?",
        "docs": [
            {"id": "d1", "text": "Berlin is the capital of Germany.", "score": 0.5, "rank": 1},
            {"id": "d2", "text": "Paris is the capital of France.", "score": 0.4, "rank": 2},
        ],
        "gold": "Paris",
        "gold_ids": ["d2"],
    }
    env = clean_env(SAGE_CACHE_DIR=str(tmp_path), SAGE_THREADS="1")
    script = " | ".join(
        [
            " ".join(sage_argv("prompt", "--template", "qa")),
            " ".join(sage_argv("generate", "--max-tokens", "32", "--n-ctx", "1024", "--no-cache")),
            " ".join(sage_argv("eval", "-k", "2")),
        ]
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        input=ndjson([question]),
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer, summary = parse_ndjson(result.stdout)
    assert "Paris" in answer["answer"], answer["answer"]
    assert answer["eval"]["contains"] == 1.0 and answer["eval"]["mrr"] == 0.5
    assert answer["messages"][-1]["role"] == "user" and answer["usage"]["completion_tokens"] > 0
    assert summary["id"] == "_summary" and summary["eval"]["contains"] == 1.0


def test_tiny_model_through_the_command(cli, tiny_llama, cache_dir):
    args = [
        "generate",
        "--model",
        str(tiny_llama),
        "--max-tokens",
        "4",
        "--n-ctx",
        "64",
        "--threads",
        "1",
    ]
    records = [{"id": "1", "prompt": "hi"}, {"id": "2", "prompt": "long " * 200}]
    result = cli(*args, input=ndjson(records))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == ["1", "2"]
    assert all(isinstance(r["answer"], str) and r["usage"]["completion_tokens"] <= 4 for r in out)
    assert "prompt_truncated" not in out[0] and out[1]["prompt_truncated"] is True
    assert out[1]["usage"]["prompt_tokens"] <= 60
    again = parse_ndjson(cli(*args, input=ndjson(records)).stdout)
    assert [r["answer"] for r in again] == [r["answer"] for r in out]
    assert all(r["usage"].get("cached") for r in again)
