"""sage serve: an OpenAI-compatible HTTP API over the local models, an index and pipelines."""

from pathlib import Path
from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded
from sage_cli.cli.options import ApiKey, Host, Port, Threads

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)

#: flags `sage serve`, `sage chat` and `sage mcp` share (the chat engine's)
Index = Annotated[
    str | None,
    typer.Option(
        "--index",
        metavar="DIR",
        help="Answer with retrieval from this index (built by `sage index build`).",
        show_default=False,
    ),
]
Model = Annotated[
    str, typer.Option("--model", "-m", metavar="NAME|PATH", help="Local GGUF chat model.")
]
TopK = Annotated[int, typer.Option("-k", "--top-k", min=1, max=100, help="Documents retrieved.")]
MaxTokens = Annotated[
    int, typer.Option("--max-tokens", min=1, help="Most tokens in an answer (default per request).")
]
NCtx = Annotated[int, typer.Option("--n-ctx", min=64, help="Model context in tokens.")]
Template = Annotated[
    str,
    typer.Option(
        "--template", metavar="NAME|FILE", help="Prompt template for retrieval (qa, or a file)."
    ),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the answer cache.")
]


def build_engine(
    index: str | None,
    model: str,
    k: int,
    max_tokens: int,
    n_ctx: int,
    template: str,
    threads: int | None,
    no_cache: bool,
    embeddings: bool = True,
):  # -> ChatEngine (imported lazily)
    """The chat engine the three commands share, with the environment's dirs and threads."""
    from sage_cli.resources import cache_dir, default_threads, hash_cache_file, model_dirs
    from sage_cli.serve.engine import ChatEngine

    if index is not None and not (Path(index) / "manifest.json").is_file():
        from sage_cli.errors import UnavailableError

        raise UnavailableError(
            f"--index {index}: no index there (build one with `sage index build {index}`)"
        )
    return ChatEngine(
        index=index,
        model=model,
        k=k,
        template=template,
        n_ctx=n_ctx,
        max_tokens=max_tokens,
        threads=threads or default_threads(),
        model_dirs=model_dirs(),
        cache_dir=None if no_cache else cache_dir(),
        hash_cache=hash_cache_file(),
        embeddings=embeddings,
    )


@app.command("serve")
def serve(
    pipelines: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[PIPELINE]...",
            help="Pipelines (bash scripts or YAML files, run by `sage run`) served at POST "
            "/v1/pipelines/NAME (NAME=FILE, or FILE named after its stem).",
            show_default=False,
        ),
    ] = None,
    index: Index = None,
    host: Host = "127.0.0.1",
    port: Port = 8080,
    api_key: ApiKey = None,
    model: Model = "smollm2-135m",
    k: TopK = 4,
    max_tokens: MaxTokens = 256,
    n_ctx: NCtx = 2048,
    template: Template = "qa",
    threads: Threads = None,
    no_cache: NoCache = False,
    studio: Annotated[
        bool, typer.Option("--studio", help="Also serve the studio at /studio (runs, traces).")
    ] = False,
    runs: Annotated[
        Path,
        typer.Option("--runs", metavar="DIR", help="Run directories the studio shows."),
    ] = Path(".sage/runs"),
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most chat requests answered together.")
    ] = 32,
    batch_window_ms: Annotated[
        float,
        typer.Option(
            "--batch-window-ms", min=0.0, help="Milliseconds to wait for requests to batch."
        ),
    ] = 2.0,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            min=0.0,
            metavar="SECONDS",
            help="On SIGTERM, wait this long for requests in flight.",
        ),
    ] = 30.0,
):
    """Serve the local models over HTTP: an OpenAI-compatible API, NDJSON pipelines, metrics.

    POST /v1/chat/completions answers chat requests (with --index: the last user message is
    retrieved against the index, prompted with the template and answered, and the documents
    come back in `sources`; `stream: true` gives server-sent events ending with
    `data: [DONE]`). POST /v1/embeddings embeds text with the embedding model; GET /v1/models
    lists both. POST /v1/pipelines/NAME runs a pipeline (script or YAML) with the request's
    NDJSON on stdin and streams its NDJSON back. GET /health and GET /metrics (Prometheus) too; --studio
    adds the studio at /studio. Models load once; requests waiting together are answered by one
    batch. Bad requests get a 4xx JSON error in OpenAI's shape. SIGTERM drains the requests in
    flight, then exits 143. Listening beyond loopback needs an API key.

    \b
    Examples:
      sage serve --index idx/ --port 8080
      curl -s localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Who built the Eiffel Tower?"}]}'
      sage serve --port 8080 ingest=ingest.sh --studio
      SAGE_API_KEY=s3cret sage serve --host 0.0.0.0 --index idx/
    """
    code = 0

    def body() -> None:
        nonlocal code
        from sage_cli.serve.app import ServeConfig, check_binding, parse_pipelines
        from sage_cli.serve.app import serve as run_server

        check_binding(host, api_key)  # before any model loads
        config = ServeConfig(
            host=host,
            port=port,
            api_key=api_key,
            drain_timeout=drain_timeout,
            batch_window=batch_window_ms / 1000.0,
            max_batch=max_batch,
            pipelines=parse_pipelines(list(pipelines or [])),
            studio=studio,
            runs_dir=runs,
        )
        engine = build_engine(index, model, k, max_tokens, n_ctx, template, threads, no_cache)
        code = run_server(engine, config)

    result = guarded("sage serve", body)
    raise typer.Exit(result or code)
