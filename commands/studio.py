"""sage studio: a web page over the runs of `sage run`, live while they go on."""

from pathlib import Path
from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded
from sage_cli.cli.options import ApiKey, Host, Port

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command("studio")
def studio(
    runs: Annotated[
        Path,
        typer.Option("--runs", metavar="DIR", help="Run directories to show."),
    ] = Path(".sage/runs"),
    host: Host = "127.0.0.1",
    port: Port = 8090,
    api_key: ApiKey = None,
):
    """Show the runs in a browser: each run's stages with live records in/out, records/s,
    errors, tokens/s and CPU, the timeline, and one record's content before and after each
    stage (from the samples `sage run` keeps in its traces).

    The page is served at http://127.0.0.1:8090/studio and refreshes itself every second. It
    loads no model (`sage serve --studio` serves the same page beside the API).

    \b
    Examples:
      sage studio
      sage studio --runs /var/lib/pipelines/.sage/runs --port 8091
    """
    code = 0

    def body() -> None:
        nonlocal code
        from sage_cli.serve.app import ServeConfig
        from sage_cli.serve.app import serve as run_server

        config = ServeConfig(
            host=host, port=port, api_key=api_key, studio=True, runs_dir=runs, prog="sage studio"
        )
        code = run_server(None, config)

    result = guarded("sage studio", body)
    raise typer.Exit(result or code)
