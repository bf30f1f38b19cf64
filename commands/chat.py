"""sage chat: ask questions interactively, answered by the local model (with an index: RAG)."""

from pathlib import Path
from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded
from sage_cli.cli.options import Threads
from sage_cli.commands.serve import Index, MaxTokens, Model, NCtx, NoCache, Template, TopK

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command("chat")
def chat(
    index: Index = None,
    model: Model = "smollm2-135m",
    k: TopK = 4,
    max_tokens: MaxTokens = 256,
    n_ctx: NCtx = 2048,
    template: Template = "qa",
    temperature: Annotated[
        float,
        typer.Option("--temperature", min=0.0, max=2.0, help="0: the same answer every time."),
    ] = 0.0,
    threads: Threads = None,
    no_cache: NoCache = False,
    history: Annotated[
        Path | None,
        typer.Option(
            "--history",
            metavar="FILE",
            help="Input history kept between sessions (default: chat-history in SAGE_CACHE_DIR).",
            show_default=False,
        ),
    ] = None,
):
    """Chat with the local model in a REPL; with --index, each question is retrieved first.

    Answers appear as they are generated. The conversation so far goes with each question
    (its last few turns); the retrieval uses the new question only. Commands: /sources shows
    the documents behind the last answer, /k 8 retrieves 8 documents, /reset forgets the
    conversation, /help, /quit. Ctrl-C stops the answer being written, Ctrl-D leaves (exit 0).
    The up arrow recalls earlier questions, also from earlier sessions. Reads questions one per
    line when stdin is not a terminal.

    \b
    Examples:
      sage chat --index idx/
      sage chat --index idx/ -k 8 --max-tokens 128
      echo 'Who designed the Eiffel Tower?' | sage chat --index idx/
    """
    code = 0

    def body() -> None:
        nonlocal code
        from sage_cli.commands.serve import build_engine
        from sage_cli.resources import cache_dir
        from sage_cli.serve.chat import ChatSession

        engine = build_engine(
            index, model, k, max_tokens, n_ctx, template, threads, no_cache, embeddings=False
        )
        try:
            engine.setup()
            session = ChatSession(
                engine,
                history_file=history or cache_dir() / "chat-history",
                temperature=temperature,
            )
            code = session.run()
        finally:
            engine.close()

    result = guarded("sage chat", body)
    raise typer.Exit(result or code)
