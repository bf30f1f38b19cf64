"""Flags that several commands share, declared once so their meaning and help stay the same."""

from typing import Annotated

import typer

#: --threads of every command that runs a local model
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        metavar="N",
        help="CPU threads for the model (default: SAGE_THREADS, which `sage run` sets to a fair "
        "share of the cores, else every core).",
        show_default=False,
    ),
]

#: --fn of the commands that run user code over `r` (map, filter, flatmap)
UserFunction = Annotated[
    str | None,
    typer.Option("--fn", metavar="MODULE:FUNCTION", help="Call a Python function instead of EXPR."),
]

#: --field of the commands that search with a record's query (retrieve, rerank)
QueryField = Annotated[
    str | None,
    typer.Option(
        "--field",
        help="Field holding the query (default: `query`, else `text`).",
        show_default=False,
    ),
]

#: --host, --port and --api-key of the commands that listen (serve, studio)
Host = Annotated[
    str,
    typer.Option("--host", help="Address to listen on; beyond loopback needs --api-key."),
]
Port = Annotated[
    int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="SAGE_API_KEY",
        metavar="KEY",
        help="Require 'Authorization: Bearer KEY' on every request (prefer the SAGE_API_KEY "
        "variable: a flag shows in ps).",
        show_default=False,
    ),
]
