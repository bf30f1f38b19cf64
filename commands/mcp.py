"""sage mcp: the index and the local model as tools for MCP clients (stdio)."""

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded
from sage_cli.cli.options import Threads
from sage_cli.commands.serve import Index, MaxTokens, Model, NCtx, NoCache, Template, TopK

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command("mcp")
def mcp(
    index: Index = None,
    model: Model = "smollm2-135m",
    k: TopK = 4,
    max_tokens: MaxTokens = 256,
    n_ctx: NCtx = 2048,
    template: Template = "qa",
    threads: Threads = None,
    no_cache: NoCache = False,
):
    """Serve `retrieve` and `answer` as tools over the Model Context Protocol (stdio).

    An MCP client (an editor, an agent) starts this command and speaks JSON-RPC on its stdin and
    stdout. `retrieve {query, k}` returns the indexed documents closest to the query;
    `answer {question, k}` answers from them with the local model and names its sources
    (without --index, only `answer`, from the model alone). Models load once. Logs go to
    stderr; end of input ends the server (exit 0).

    \b
    Examples:
      sage mcp --index idx/
      # in an MCP client's configuration:
      {"command": "sage", "args": ["mcp", "--index", "/path/to/idx"]}
    """
    code = 0

    def body() -> None:
        nonlocal code
        from sage_cli.commands.serve import build_engine
        from sage_cli.serve.mcp import run

        engine = build_engine(
            index, model, k, max_tokens, n_ctx, template, threads, no_cache, embeddings=False
        )
        try:
            code = run(engine)
        finally:
            engine.close()

    result = guarded("sage mcp", body)
    raise typer.Exit(result or code)
