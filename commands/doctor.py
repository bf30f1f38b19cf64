"""sage doctor: check the installation and say how to fix what is wrong."""

import sys
from typing import Annotated

import typer

from sage_cli.cli.command import single_command_app
from sage_cli.cli.guard import guarded

app = single_command_app()


@app.command("doctor")
def doctor(
    json_out: Annotated[
        bool,
        typer.Option("--json", help="NDJSON, one object per check (check, status, detail, fix)."),
    ] = False,
) -> None:
    """Check Python, every dependency, the llama.cpp build, the models and the cache dir.

    Prints one row per check (a table on a terminal, aligned text otherwise) and, for each
    failure, the command that fixes it. Exit 0 when all is well, 69 when a model is missing
    or corrupt, 1 for any other failure. `sage models verify` goes further: it loads each
    model and uses it once.

    \b
    Examples:
      sage doctor
      sage doctor --json | jq -r 'select(.status == "FAIL") | .fix'
      SAGE_MODEL_DIR=/srv/models sage doctor
    """
    code = 0

    def body() -> None:
        nonlocal code
        from sage_cli.cli.doctor import exit_code, run_checks

        checks = run_checks()
        if json_out:
            import orjson

            sys.stdout.buffer.write(b"".join(orjson.dumps(c.to_json()) + b"\n" for c in checks))
            sys.stdout.flush()
        else:
            from sage_cli.cli.tables import print_table

            print_table(
                ["check", "status", "detail"],
                [
                    [
                        c.name,
                        c.status,
                        c.detail + (f"\nfix: {c.fix}" if c.fix and sys.stdout.isatty() else ""),
                    ]
                    for c in checks
                ],
                styles=[{"FAIL": "red", "warn": "yellow"}.get(c.status) for c in checks],
                wrap=["detail"],
            )
            if not sys.stdout.isatty():
                for c in checks:
                    if c.fix:
                        sys.stdout.write(f"fix {c.name}: {c.fix}\n")
                sys.stdout.flush()
        code = exit_code(checks)
        failed = [c for c in checks if c.failed]
        if failed:
            sys.stderr.write(
                f"sage doctor: {len(failed)} check(s) failed: {', '.join(c.name for c in failed)}\n"
            )

    result = guarded("sage doctor", body)
    raise typer.Exit(result or code)
