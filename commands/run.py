"""sage run: run a pipeline script under supervision, with traces, restart and resume."""

from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.run.launch import launch

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT)


@app.command(
    "run",
    context_settings={**CONTEXT, "allow_interspersed_args": False, "ignore_unknown_options": True},
)
def run(
    script: Annotated[
        str | None,
        typer.Argument(
            metavar="SCRIPT",
            help="A bash script (any: loops, functions, several pipelines).",
            show_default=False,
        ),
    ] = None,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[ARGS]...", help="Arguments for the script ($1, $2, ...).", show_default=False
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            help="Restart a sage stage that crashes up to N times; it is fed again "
            "exactly the input lines whose outputs it had not committed.",
        ),
    ] = 0,
    backoff: Annotated[
        float,
        typer.Option(
            "--backoff",
            min=0.0,
            metavar="SECONDS",
            help="Wait before the first restart (doubles each time).",
        ),
    ] = 0.5,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0.0, metavar="SECONDS", help="Stop the run after this long (exit 124)."
        ),
    ] = None,
    run_dir: Annotated[
        str | None,
        typer.Option(
            "--run-dir", metavar="DIR", help="Run directory (default .sage/runs/<run id>)."
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="RUN",
            help="Continue a run that was killed: the script runs again and only "
            "what the run had not delivered on stdout is passed on (checked first).",
        ),
    ] = None,
    lock: Annotated[
        bool,
        typer.Option(
            "--lock", help="Refuse to start (exit 75) while the same script runs (for cron)."
        ),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Run again whenever the script or its input files change."),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the pipeline without running it: options parse, every "
            "stage's required fields come from upstream, models and indexes exist.",
        ),
    ] = False,
    trace: Annotated[
        str,
        typer.Option(
            "--trace",
            metavar="full|batches|off",
            help="full: one span per record per stage (default); batches: counts and latency "
            "without record ids; off: no stage traces (status, CPU and memory only).",
        ),
    ] = "full",
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            metavar="local|ray",
            help="local: processes on this machine (default); ray: each stage a pool of Ray "
            "actors (a one-pipeline script).",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            metavar="auto|HOST:PORT",
            help="With --engine ray: the cluster to join (default: a private local Ray).",
        ),
    ] = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option(
            "--replicas",
            metavar="STAGE=N",
            help="With --engine ray: actors for a stage (its command name or position); "
            "repeatable.",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Nothing on stderr but the stages' own errors.")
    ] = False,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress", help="Periodic progress lines even when stderr is not a terminal."
        ),
    ] = False,
    print_script: Annotated[
        bool,
        typer.Option(
            "--print-script",
            help="Print the bash form of a YAML pipeline file (or a script as it is) and exit.",
        ),
    ] = False,
):
    """Run a bash SCRIPT under supervision and trace every sage stage in it.

    SCRIPT may also be a YAML pipeline file (.yaml/.yml: stages with verb and options, see
    docs/python.md): it runs as the bash script `--print-script` shows.

    The script stays ordinary bash: it runs the same with `bash SCRIPT`, and gives the output
    and exit status `bash -o pipefail SCRIPT` gives. A script of simple commands and pipelines
    is run stage by stage by the supervisor; any other (loops, if, functions, &&,
    here-documents, subshells), and any under --retries or --resume, is run whole by bash,
    every sage stage in it tracing itself as <pipeline>.<position>-<command> and, with
    --retries, restarting its own worker without losing or repeating a record. --resume runs
    the script again and skips what the run had delivered. SIGINT/SIGTERM and
    --timeout reach every process of the run; none outlives it. The trace and summary.json
    go to the run directory; `sage trace` shows them.

    \b
    Examples:
      sage run scripts/rag.sh demo/out
      sage run --retries 3 ingest.sh docs/
      sage run nightly.sh        # any script: for f in in/*; do sage ... | sage ...; done
      sage run --resume latest >> out.ndjson
      sage run --check scripts/rag.sh
      sage run pipeline.yaml
      sage run --print-script pipeline.yaml
      sage run --lock --timeout 600 nightly.sh    # from cron
      sage run --engine ray --address auto --replicas embed=4 ingest.sh docs/
    """
    raise typer.Exit(
        launch(
            script,
            args,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            run_dir=run_dir,
            resume=resume,
            lock=lock,
            watch=watch,
            check=check,
            trace=trace,
            engine=engine,
            address=address,
            replicas=replicas,
            quiet=quiet,
            progress=progress,
            print_script=print_script,
        )
    )
