"""sage sample: keep a random sample of records."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "sample")
def sample_records(
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate", metavar="P", help="Keep each record with probability P (streaming)."
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            metavar="K",
            help="Keep a uniform sample of K records (reservoir; written at the end of input).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed: the same seed and input give the same sample."),
    ] = None,
):
    """Keep a random sample of records, in input order: each with probability --rate, or
    exactly --n of them (all of them if there are fewer).

    \b
    Examples:
      sage source docs/ | sage sample --rate 0.1 --seed 7
      sage sample --n 100 --seed 1 < questions.ndjson > dev.ndjson
    """
    from sage_cli.operators.sample import Sample

    return Sample(rate, n, seed)
