import time

import pytest

from sage_cli.operators.base import (
    OperatorError,
    OptionError,
    RecordError,
    ResourceUnavailable,
    TransientError,
)
from sage_cli.operators.generate import (
    Generate,
    OpenAIBackend,
    chat_completions_url,
    record_messages,
    safe_url,
)
from tests.openai_stub import StubServer, closed_port_url

SECRET = "sk-test-SECRET-0123456789"


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


def openai(url, **kwargs):
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff", 0.0)
    kwargs.setdefault("timeout", 5)
    op = Generate(backend="openai", base_url=url, **kwargs)
    op.setup()
    return op


# -- messages ----------------------------------------------------------------------------------


def test_messages_prompt_and_query():
    assert record_messages({"prompt": "hi", "query": "q"}, None) == [
        {"role": "user", "content": "hi"}
    ]
    assert record_messages({"query": "q"}, "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
    ]
    chat = {
        "messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "u"}],
        "prompt": "ignored",
    }
    assert record_messages(chat, None)[0]["content"] == "old"
    assert record_messages(chat, "new") == [
        {"role": "system", "content": "new"},
        {"role": "user", "content": "u"},
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "x"}, "no 'messages' or 'prompt' field"),
        ({"prompt": "   "}, "'prompt' is empty"),
        ({"query": ""}, "'query' is empty"),
        ({"prompt": 3}, "'prompt' must be str"),
        ({"messages": [{"role": "user"}]}, "'messages' must be"),
        ({"messages": []}, "'messages' must be"),
    ],
)
def test_bad_records_name_the_field(record, message):
    with pytest.raises(RecordError, match=message):
        record_messages(record, None)


def test_options_are_checked_up_front(tmp_path):
    with pytest.raises(OptionError, match="--base-url"):
        Generate(backend="openai")
    with pytest.raises(OptionError, match="http"):
        Generate(backend="openai", base_url="ftp://x")
    with pytest.raises(OptionError, match="less than --n-ctx"):
        Generate(max_tokens=512, n_ctx=512)
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(OptionError, match="not JSON"):
        Generate(json_schema=bad)
    with pytest.raises(OptionError, match="cannot read"):
        Generate(json_schema=tmp_path / "missing.json")


def test_url_helpers():
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert (
        chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    )
    assert safe_url("http://user:pw@h:1/v1?key=abc") == "http://h:1/v1"


# -- the OpenAI-compatible backend against a local server ---------------------------------------


def test_openai_proper_completion_and_request(stub):
    op = openai(
        f"{stub.url}/ok/v1",
        api_model="m1",
        api_key=SECRET,
        seed=7,
        stop=["\n\n"],
        max_tokens=20,
        system="be brief",
    )
    out = op.process([{"id": "a", "prompt": "hello", "keep": 1}])[0]
    assert out["answer"] == "echo: hello" and out["keep"] == 1 and out["id"] == "a"
    assert out["usage"]["prompt_tokens"] == 11 and out["usage"]["completion_tokens"] == 3
    assert out["usage"]["seconds"] >= 0
    (request,) = stub.requests
    assert request["path"] == "/ok/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "m1" and body["seed"] == 7 and body["stop"] == ["\n\n"]
    assert body["max_tokens"] == 20 and body["temperature"] == 0.0
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]


def test_answers_record_the_docs_they_cite(stub):
    # the stub echoes the prompt: "[2]" in it is a citation of the second doc
    docs = [{"id": "a#0", "text": "x"}, {"id": "b#3", "text": "y"}]
    op = openai(f"{stub.url}/ok/v1")
    cited, bare = op.process(
        [{"prompt": "as [2] says", "docs": docs}, {"prompt": "no docs here [1]"}]
    )
    assert cited["answer"] == "echo: as [2] says" and cited["citations"] == ["b#3"]
    assert "citations" not in bare


def test_openai_no_key_no_header(stub):
    openai(f"{stub.url}/ok/v1").process([{"prompt": "x"}])
    assert "Authorization" not in stub.requests[0]["headers"]


def test_openai_json_schema(stub, tmp_path):
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    out = openai(f"{stub.url}/ok/v1", json_schema=schema).process([{"prompt": "hi"}])[0]
    assert out["answer_json"] == {"echo": "hi"}
    assert stub.requests[0]["body"]["response_format"]["json_schema"]["schema"] == schema


def test_refused_connection_is_transient():
    op = openai(closed_port_url(), retries=1, backoff=0.01)
    with pytest.raises(TransientError, match="cannot connect.*2 attempts"):
        op.process([{"prompt": "x"}])


def test_hanging_server_times_out(stub):
    op = openai(f"{stub.url}/hang/v1", timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="no answer within 0.3 s"):
        op.process([{"prompt": "x"}])
    # the server holds the request for 60 s: ending well before that is the timeout's doing
    assert time.monotonic() - t0 < 30
    assert len(stub.requests) == 1  # retries=0: one attempt


def test_garbage_is_retried_then_transient(stub):
    op = openai(f"{stub.url}/garbage/v1", retries=2, backoff=0.01)
    with pytest.raises(TransientError, match="not a chat completion.*3 attempts"):
        op.process([{"prompt": "x"}])
    assert len(stub.requests) == 3
    with pytest.raises(TransientError, match="not a chat completion"):
        openai(f"{stub.url}/empty/v1").process([{"prompt": "x"}])


def test_500_then_200_retries_with_backoff(stub):
    stub.flaky_failures = 2
    op = openai(f"{stub.url}/flaky/v1", retries=3, backoff=0.05)
    out = op.process([{"prompt": "again"}])[0]
    assert out["answer"] == "echo: again"
    assert len(stub.requests) == 3
    backend = op.backend
    assert isinstance(backend, OpenAIBackend)
    assert backend.slept == pytest.approx(0.05 + 0.1)  # exponential: 0.05, then 0.1


def test_500_without_retries_fails(stub):
    with pytest.raises(TransientError, match="HTTP 500"):
        openai(f"{stub.url}/flaky/v1", retries=0).process([{"prompt": "x"}])


def test_429_is_retried(stub):
    with pytest.raises(TransientError, match="HTTP 429"):
        openai(f"{stub.url}/busy/v1", retries=1, backoff=0.01).process([{"prompt": "x"}])
    assert len(stub.requests) == 2


def test_client_errors_are_not_retried(stub):
    with pytest.raises(ResourceUnavailable, match="OPENAI_API_KEY"):
        openai(f"{stub.url}/denied/v1", retries=3, api_key=SECRET).process([{"prompt": "x"}])
    with pytest.raises(RecordError, match="context length exceeded"):
        openai(f"{stub.url}/bad/v1", retries=3).process([{"prompt": "x"}])
    with pytest.raises(OperatorError, match="--base-url"):
        openai(f"{stub.url}/nothing-here", retries=3).process([{"prompt": "x"}])
    assert len(stub.requests) == 3  # one each: 401, 400 and 404 are not retried


def test_the_key_never_leaks(stub):
    for mode in ("denied", "bad", "garbage", "flaky"):
        op = openai(f"{stub.url}/{mode}/v1", api_key=SECRET)
        assert SECRET not in repr(op.backend) and SECRET not in repr(vars(op))
        with pytest.raises(Exception) as info:
            op.process([{"prompt": "x"}])
        assert SECRET not in str(info.value)
    out = openai(f"{stub.url}/ok/v1", api_key=SECRET).process([{"prompt": "x"}])[0]
    assert SECRET not in str(out)


# -- the cache ---------------------------------------------------------------------------------


def test_cache_hits_at_temperature_0(stub, tmp_path):
    for _ in range(2):
        op = openai(f"{stub.url}/ok/v1", cache_dir=tmp_path)
        out = op.run([{"prompt": "cached?"}])[0]
    assert len(stub.requests) == 1
    assert out["usage"]["cached"] is True and out["answer"] == "echo: cached?"
    assert op.summary().startswith("1 answer(s), 0 tokens") and "1 from the cache" in op.summary()
    assert (tmp_path / "generate.sqlite").is_file()


def test_cache_key_includes_parameters(stub, tmp_path):
    openai(f"{stub.url}/ok/v1", cache_dir=tmp_path).run([{"prompt": "p"}])
    openai(f"{stub.url}/ok/v1", cache_dir=tmp_path, max_tokens=9).run([{"prompt": "p"}])
    openai(f"{stub.url}/ok/v1", cache_dir=tmp_path, api_model="other").run([{"prompt": "p"}])
    openai(f"{stub.url}/ok/v1", cache_dir=tmp_path, system="s").run([{"prompt": "p"}])
    assert len(stub.requests) == 4


def test_no_cache_when_sampling_without_seed(stub, tmp_path):
    for _ in range(2):
        openai(f"{stub.url}/ok/v1", cache_dir=tmp_path, temperature=0.7).run([{"prompt": "p"}])
    assert len(stub.requests) == 2
    for _ in range(2):
        openai(f"{stub.url}/ok/v1", cache_dir=tmp_path, temperature=0.7, seed=3).run(
            [{"prompt": "p"}]
        )
    assert len(stub.requests) == 3


def test_unusable_cache_dir_is_ignored(stub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = openai(f"{stub.url}/ok/v1", cache_dir=blocker / "cache").run([{"prompt": "p"}])[0]
    assert out["answer"] == "echo: p"


def test_a_record_that_just_failed_fails_again_at_once(stub):
    # the driver retries a failed batch record by record: the same record must not wait twice
    op = openai(f"{stub.url}/flaky/v1", retries=0)
    stub.flaky_failures = 10
    record = {"prompt": "x"}
    for _ in range(2):
        with pytest.raises(TransientError):
            op.process([record])
    assert len(stub.requests) == 1
    with pytest.raises(TransientError):
        op.process([{"prompt": "x"}])  # another record (a new object) is tried
    assert len(stub.requests) == 2


# -- the real model (SmolLM2-135M-Instruct) ----------------------------------------------------

PARIS = "Context: Paris is the capital of France. Question: What is the capital of France?"


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    op = Generate(model="smollm2-135m", threads=1, max_tokens=48, n_ctx=512)
    op.setup()
    yield op
    op.close()


@pytest.mark.model
def test_real_model_grounded_answer_and_determinism(smollm):
    first = smollm.process([{"id": "q", "prompt": PARIS}])[0]
    second = smollm.process([{"id": "q", "prompt": PARIS}])[0]
    assert "Paris" in first["answer"]
    assert first["answer"] == second["answer"]  # temperature 0: greedy, no cache involved
    assert "cached" not in second["usage"]
    assert first["usage"]["prompt_tokens"] > 10 and first["usage"]["completion_tokens"] > 0


@pytest.mark.model
def test_real_model_prompt_token_count_matches_llama_cpp(smollm):
    backend = smollm.backend
    messages = [{"role": "user", "content": PARIS}]
    out = smollm.process([{"messages": messages}])[0]
    assert backend.count(messages) == out["usage"]["prompt_tokens"]


@pytest.mark.model
def test_real_model_long_prompt_is_cut_not_crashed(smollm):
    filler = " ".join(f"Fact {i}: the sky was blue on day {i}." for i in range(400))
    out = smollm.process([{"prompt": f"Read this.\n{filler}\n{PARIS}"}])[0]
    assert out["prompt_truncated"] is True and "cut from" in out["_warnings"][0]
    assert out["usage"]["prompt_tokens"] <= 512 - 48
    assert "Paris" in out["answer"]  # the end (the question) was kept


@pytest.mark.model
def test_real_model_json_schema():
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    op = Generate(threads=1, max_tokens=48, n_ctx=512, json_schema=schema)
    out = op.run([{"prompt": "Paris is the capital of France. Reply in JSON."}])[0]
    assert set(out["answer_json"]) == {"city", "country"}
    assert all(isinstance(v, str) for v in out["answer_json"].values())


@pytest.mark.model
def test_real_model_seed_makes_sampling_repeatable():
    outs = []
    for _ in range(2):
        op = Generate(threads=1, max_tokens=24, n_ctx=256, temperature=1.0, seed=42)
        outs.append(op.run([{"prompt": "Name a colour."}, {"prompt": "Name a colour."}]))
    assert outs[0][0]["answer"] == outs[1][0]["answer"] == outs[0][1]["answer"]


# -- plumbing with the tiny random-weight llama (gibberish answers, fast) -------------------------


def tiny(path, **kwargs):
    kwargs.setdefault("threads", 1)
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("n_ctx", 256)
    op = Generate(model=str(path), **kwargs)
    op.setup()
    return op


def test_tiny_model_answers_with_usage(tiny_llama):
    op = tiny(tiny_llama)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello there"}]
    out = op.process([{"id": "x", "messages": messages, "keep": [1]}])[0]
    assert isinstance(out["answer"], str) and out["keep"] == [1] and out["id"] == "x"
    usage = out["usage"]
    assert usage["prompt_tokens"] == op.backend.count(messages)  # our count is llama.cpp's
    assert 1 <= usage["completion_tokens"] <= 8 and usage["seconds"] > 0
    assert "prompt_truncated" not in out and "_warnings" not in out
    again = op.process([{"id": "x", "messages": messages, "keep": [1]}])[0]
    assert again["answer"] == out["answer"]  # temperature 0 is greedy
    op.close()


def test_tiny_model_cache_uses_the_model_hash(tiny_llama, tmp_path):
    hashes = tmp_path / "hashes.json"
    first = tiny(tiny_llama, cache_dir=tmp_path, hash_cache=hashes).run([{"prompt": "abc"}])[0]
    second = tiny(tiny_llama, cache_dir=tmp_path, hash_cache=hashes).run([{"prompt": "abc"}])[0]
    assert "cached" not in first["usage"] and second["usage"]["cached"] is True
    assert second["answer"] == first["answer"]
    assert str(tiny_llama.resolve()) in hashes.read_text()
    other = tiny(tiny_llama, cache_dir=tmp_path, n_ctx=128).run([{"prompt": "abc"}])[0]
    assert "cached" not in other["usage"]  # n_ctx is part of the key


def test_tiny_model_long_prompt_is_cut_keeping_both_ends(tiny_llama):
    op = tiny(tiny_llama, n_ctx=96, max_tokens=16)
    prompt = "START " + "x" * 2000 + " THE END?"
    messages, warning = op.backend.fit([{"role": "user", "content": prompt}], 16)
    content = messages[0]["content"]
    assert content.startswith("START") and content.endswith("THE END?") and "\n...\n" in content
    assert op.backend.count(messages) <= 96 - 16 and "cut from" in warning
    out = op.process([{"prompt": prompt, "_warnings": ["earlier"]}])[0]
    assert out["prompt_truncated"] is True and out["_warnings"][0] == "earlier"
    assert out["usage"]["prompt_tokens"] <= 96 - 16


def test_tiny_model_system_messages_too_long_is_a_record_error(tiny_llama):
    op = tiny(tiny_llama, n_ctx=64, max_tokens=16)
    messages = [{"role": "system", "content": "y" * 500}, {"role": "user", "content": "q"}]
    with pytest.raises(RecordError, match="raise --n-ctx"):
        op.process([{"messages": messages}])


def test_tiny_model_json_schema_is_grammar_constrained(tiny_llama):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    out = tiny(tiny_llama, json_schema=schema, max_tokens=64).run([{"prompt": "json"}])[0]
    assert set(out["answer_json"]) == {"ok"} and isinstance(out["answer_json"]["ok"], bool)


def test_tiny_model_json_cut_short_is_a_record_error(tiny_llama):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    op = tiny(tiny_llama, json_schema=schema, max_tokens=2)
    with pytest.raises(RecordError, match="not valid JSON"):
        op.process([{"prompt": "json"}])


def test_bad_json_schema_is_an_option_error(tiny_llama):
    with pytest.raises(OptionError, match="grammar"):
        tiny(tiny_llama, json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}})


# -- streaming (on_text), as sage serve and sage chat use it ----------------------------------


def test_on_text_gets_the_answer_piece_by_piece(tiny_llama, tmp_path):
    op = Generate(model=str(tiny_llama), max_tokens=12, n_ctx=256, threads=1, cache_dir=tmp_path)
    op.setup()
    try:
        pieces: list[str] = []
        out = op.answer({"prompt": "hello"}, pieces.append)
        assert len(pieces) > 1
        assert "".join(pieces).strip() == out["answer"]
        assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 0
        # the streamed answer was cached: the same request now arrives whole, from the cache
        again: list[str] = []
        cached = op.answer({"prompt": "hello"}, again.append)
        assert cached["usage"].get("cached") and "".join(again).strip() == out["answer"]
    finally:
        op.close()


def test_on_text_returning_false_stops_the_answer_and_nothing_is_cached(tiny_llama, tmp_path):
    op = Generate(model=str(tiny_llama), max_tokens=12, n_ctx=256, threads=1, cache_dir=tmp_path)
    op.setup()
    try:
        pieces: list[str] = []

        def two(piece: str) -> bool:
            pieces.append(piece)
            return len(pieces) < 2

        cut = op.answer({"prompt": "stop early"}, two)
        assert len(pieces) == 2 and cut["answer"] == "".join(pieces).strip()
        full = op.answer({"prompt": "stop early"})
        assert not full["usage"].get("cached")
    finally:
        op.close()
