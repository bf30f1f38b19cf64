"""sage trace: show the trace of a `sage run` run."""

from typing import Annotated

import typer

from sage_cli.command import CONTEXT, guarded

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command("trace")
def trace(
    words: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[RUN] | report RUN | export RUN",
            help="A run id or directory (default: the latest run); `report RUN --html FILE` or "
            "`export RUN --otlp FILE`.",
            show_default=False,
        ),
    ] = None,
    record: Annotated[
        str | None,
        typer.Option(
            "--record",
            metavar="ID",
            help="Follow one record (and its chunks ID#n and hits) through every stage.",
        ),
    ] = None,
    html_file: Annotated[
        str | None,
        typer.Option(
            "--html", metavar="FILE", help="With `report`: write a self-contained HTML page."
        ),
    ] = None,
    otlp_file: Annotated[
        str | None,
        typer.Option(
            "--otlp", metavar="FILE", help="With `export`: write OpenTelemetry JSON spans."
        ),
    ] = None,
    batches: Annotated[
        bool,
        typer.Option(
            "--batches", help="With `export`: one span per batch instead of one per record."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print summary.json instead of the table.")
    ] = False,
    runs: Annotated[
        str, typer.Option("--runs", metavar="DIR", help="Where runs are kept.")
    ] = ".sage/runs",
):
    """Show what a run did: per stage records in/out, errors, throughput, latency p50/p95/p99,
    tokens, CPU seconds, peak memory and exit status.

    \b
    Examples:
      sage trace                      # the latest run
      sage trace 20261124-031500-ab12 --json
      sage trace --record doc-42      # one record through every stage
      sage trace report 20261124-031500-ab12 --html run.html
      sage trace export 20261124-031500-ab12 --otlp spans.json
    """
    import sys

    from sage_cli.errors import UsageError

    args = list(words or [])

    def body() -> None:
        import orjson

        from sage_cli import trace_view
        from sage_cli.operators.base import terminal_safe
        from sage_cli.runs import find_run

        action = args[0] if args and args[0] in ("report", "export") else None
        rest = args[1:] if action else args
        if len(rest) > 1:
            raise UsageError(f"expected one run, got {' '.join(rest)}")
        run = find_run(rest[0] if rest else None, runs)
        if action == "report":
            if not html_file:
                raise UsageError("report needs --html FILE")
            with open(html_file, "w", encoding="utf-8") as fh:
                fh.write(trace_view.html_report(run))
            sys.stderr.write(f"sage trace: wrote {html_file}\n")
        elif action == "export":
            if not otlp_file:
                raise UsageError("export needs --otlp FILE")
            data = orjson.dumps(trace_view.otlp_spans(run, per_record=not batches))
            with open(otlp_file, "wb") as fh:
                fh.write(data)
            sys.stderr.write(f"sage trace: wrote {otlp_file}\n")
        elif record is not None:
            sys.stdout.write(terminal_safe(trace_view.follow_record(run, record)))
        elif as_json:
            sys.stdout.buffer.write(
                orjson.dumps(trace_view.load_summary(run), option=orjson.OPT_INDENT_2) + b"\n"
            )
        else:
            sys.stdout.write(terminal_safe(trace_view.summary_table(trace_view.load_summary(run))))
        sys.stdout.flush()

    code = guarded("sage trace", body)
    raise typer.Exit(code)
