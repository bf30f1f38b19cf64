"""sage trace: show the trace of a `sage run` run."""

from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command("trace")
def trace(
    words: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[RUN] | list | prune | report RUN | export RUN",
            help="A run id, unique id prefix, `latest` or a directory (default: the latest run); "
            "`list` the runs; `prune --keep N` the oldest; `report RUN --html FILE` or "
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
    keep: Annotated[
        int | None,
        typer.Option("--keep", min=0, metavar="N", help="With `prune`: how many runs to keep."),
    ] = None,
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
      sage trace list                 # every run: id, start, seconds, status, script
      sage trace 20261124-0315 --json # a unique prefix of a run id will do
      sage trace prune --keep 20      # remove all but the newest 20 (running ones stay)
      sage trace --record doc-42      # one record through every stage
      sage trace report 20261124-031500-ab12 --html run.html
      sage trace export 20261124-031500-ab12 --otlp spans.json
    """
    import sys

    from sage_cli.errors import UsageError

    args = list(words or [])

    def body() -> None:
        import orjson

        from sage_cli.observability import views as trace_view
        from sage_cli.observability.views import run_row, runs_table
        from sage_cli.operators.base import terminal_safe
        from sage_cli.run.directory import find_run, list_runs, prune_runs

        action = args[0] if args and args[0] in ("report", "export", "list", "prune") else None
        rest = args[1:] if action else args
        if action in ("list", "prune"):
            if rest:
                raise UsageError(f"{action} takes no run, got {' '.join(rest)}")
            if action == "prune":
                if keep is None:
                    raise UsageError("prune needs --keep N (how many of the newest runs to keep)")
                removed = prune_runs(runs, keep)
                sys.stderr.write(f"sage trace: removed {len(removed)} run(s) from {runs}\n")
                return
            rows = [run_row(r) for r in list_runs(runs)]
            if as_json or not sys.stdout.isatty():
                sys.stdout.buffer.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))
            else:
                sys.stdout.write(terminal_safe(runs_table(rows)))
            sys.stdout.flush()
            return
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
