"""sage window: aggregate records in tumbling or sliding windows."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "window")
def window_records(
    size: Annotated[
        int | None,
        typer.Option(
            "--size", "--count", metavar="N", help="Count windows of N records (per key)."
        ),
    ] = None,
    seconds: Annotated[
        float | None, typer.Option("--seconds", metavar="S", help="Time windows S seconds long.")
    ] = None,
    slide: Annotated[
        float | None,
        typer.Option(
            "--slide",
            metavar="M",
            help="Start a window every M records or seconds (sliding); "
            "default: the window's size (tumbling).",
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            metavar="FIELD",
            help="Group by this field (default: `_key` from `sage keyby`, else one group).",
        ),
    ] = None,
    time_field: Annotated[
        str | None,
        typer.Option(
            "--time-field",
            metavar="FIELD",
            help="Event time: epoch seconds or ISO 8601 in FIELD (default: arrival time).",
        ),
    ] = None,
    agg: Annotated[
        list[str] | None,
        typer.Option(
            "--agg",
            metavar="AGG",
            help="count, sum:F, mean:F, min:F, max:F or collect:F; repeatable (default: count).",
            show_default=False,
        ),
    ] = None,
    lateness: Annotated[
        float,
        typer.Option(
            "--lateness",
            metavar="S",
            help="Event time: keep windows open S seconds past their end for out-of-order records.",
        ),
    ] = 0.0,
):
    """One record per window and key, {"id", "key", "start", "end", <aggregates>}, written
    when the window closes and, for windows still open, at the end of input.

    Count windows close with their last record; event-time windows when a later time has been
    seen (plus --lateness; a record for a closed window is a "late record" error); arrival-time
    windows when the clock passes their end, even while input is idle. Aggregates are named
    count, sum_F, mean_F, min_F, max_F, collect_F.

    \b
    Examples:
      sage window --size 100 --agg count --agg mean:score < scored.ndjson
      sage keyby user < events.ndjson | sage window --seconds 60 --time-field ts --agg sum:bytes
      tail -f access.ndjson | sage window --seconds 10 --slide 5 --agg count
    """
    from sage_cli.operators.window import Window

    return Window(
        size=size,
        seconds=seconds,
        slide=slide,
        key=key,
        time_field=time_field,
        aggs=agg,
        lateness=lateness,
    )
