"""sage generate: add an `answer` to each record with a local model or an OpenAI-compatible API."""

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import Threads

app = single_command_app()


class Backend(StrEnum):
    llama = "llama"
    openai = "openai"


@operator_command(app, "generate")
def generate_records(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", metavar="NAME|PATH", help="Local GGUF chat model (llama backend)."
        ),
    ] = "smollm2-135m",
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most tokens in an answer.")
    ] = 256,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", min=0.0, help="0 is greedy decoding: the same answer every time."
        ),
    ] = 0.0,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Sampling seed: repeatable answers at temperature > 0."),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", metavar="TEXT", help="Stop the answer at this text (repeatable)."),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option(
            "--system", metavar="TEXT", help="System message (replaces the record's own)."
        ),
    ] = None,
    n_ctx: Annotated[
        int,
        typer.Option(
            "--n-ctx", min=16, help="Context in tokens (prompt + answer); longer prompts are cut."
        ),
    ] = 2048,
    threads: Threads = None,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            metavar="FILE",
            help="Constrain the answer to JSON matching this "
            "schema; the parsed value goes to `answer_json`.",
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the answer cache.")
    ] = False,
    backend: Annotated[
        Backend,
        typer.Option(
            "--backend",
            help="llama: local llama.cpp; openai: an OpenAI-compatible server.",
            case_sensitive=False,
        ),
    ] = Backend.llama,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            metavar="URL",
            help="Server for --backend openai, e.g. "
            "http://127.0.0.1:8080/v1 (key from OPENAI_API_KEY).",
        ),
    ] = None,
    api_model: Annotated[
        str | None,
        typer.Option("--api-model", metavar="NAME", help="Model name sent to the server."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.001, help="Seconds to wait for the server, per attempt."),
    ] = 60.0,
    retries: Annotated[
        int,
        typer.Option(
            "--retries", min=0, help="Retries after a failed call (backoff doubles each time)."
        ),
    ] = 2,
    backoff: Annotated[
        float, typer.Option("--backoff", min=0.0, help="Seconds before the first retry.")
    ] = 0.5,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            min=1,
            help="Sequences the local model decodes together (continuous batching; default "
            "16; 1 decodes one record at a time).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            min=1,
            help="Requests in flight to the server with --backend openai (default 4).",
        ),
    ] = None,
):
    """Answer each record's `messages` (or `prompt`, or `query`) with a chat model.

    Adds `answer` and `usage` {prompt_tokens, completion_tokens, seconds}. The local model
    loads once and uses its own chat template. A prompt that leaves fewer than --max-tokens
    free in --n-ctx is cut in the middle (start and end kept) and the record gets
    `prompt_truncated: true` and `_warnings`. At temperature 0 (or with --seed) answers are
    cached in $SAGE_CACHE_DIR (default ~/.cache/sage) by model hash, parameters and messages.
    The local model decodes up to --parallel records together (output stays in input order;
    at temperature 0 an answer can differ from one-at-a-time decoding in rare near-ties).
    With --backend openai, --concurrency requests are in flight; a call that still fails
    after --retries is that record's error (exit 75 under --on-error fail). The API key is
    read from OPENAI_API_KEY and never shown.

    \b
    Examples:
      sage prompt --template qa < retrieved.ndjson | sage generate --max-tokens 64
      echo '{"prompt": "Name a colour."}' | sage generate --temperature 0.8 --seed 1
      sage generate --json-schema person.json < bios.ndjson | sage map 'r["answer_json"]'
      sage generate --parallel 8 --max-tokens 48 < prompts.ndjson
      sage generate --backend openai --base-url http://127.0.0.1:8080/v1 --concurrency 8
    """
    from sage_cli.operators.generate import Generate
    from sage_cli.resources import cache_dir, default_threads, hash_cache_file, model_dirs

    return Generate(
        model=model,
        model_dirs=model_dirs(),
        backend=backend.value,
        base_url=base_url,
        api_model=api_model,
        api_key=os.environ.get("OPENAI_API_KEY") if backend is Backend.openai else None,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stop=stop or [],
        system=system,
        n_ctx=n_ctx,
        threads=threads or default_threads(),
        json_schema=json_schema,
        cache_dir=None if no_cache else cache_dir(),
        hash_cache=hash_cache_file(),
        parallel=parallel,
        concurrency=concurrency,
    )
