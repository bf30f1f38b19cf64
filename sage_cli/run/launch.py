"""What `sage run` does with its options, whoever read them: the typer command (commands/run.py)
or, for the common command lines, app.main's quick reading (sage_cli.run.argv), which starts the
run without loading typer."""

from __future__ import annotations

import os

from sage_cli.cli.guard import fail, guarded


def launch(
    script: str | None,
    args: list[str] | None = None,
    *,
    retries: int = 0,
    backoff: float = 0.5,
    timeout: float | None = None,
    run_dir: str | None = None,
    resume: str | None = None,
    lock: bool = False,
    watch: bool = False,
    check: bool = False,
    trace: str = "full",
    engine: str = "local",
    address: str | None = None,
    replicas: list[str] | None = None,
    quiet: bool = False,
    progress: bool = False,
    print_script: bool = False,
) -> int:
    """Run (or check, watch, print) SCRIPT as `sage run` does; returns the exit status."""
    from sage_cli.run.options import RunOptions

    script_args = list(args or [])
    if engine not in ("local", "ray"):
        return fail("sage run", f"--engine {engine}: choose local or ray", 2)
    if engine == "ray" and (retries or resume or watch):
        # Ray replaces dead actors and re-sends their batches itself
        return fail(
            "sage run",
            "--engine ray takes no --retries/--resume/--watch: "
            "Ray replaces lost actors and re-sends their batches",
            2,
        )
    if trace not in ("full", "batches", "off"):
        return fail("sage run", f"--trace {trace}: choose full, batches or off", 2)
    opts = RunOptions(
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        quiet=quiet,
        progress=progress,
        trace=trace,
    )
    result = 0

    def body() -> None:
        nonlocal result, script
        if print_script:
            result = _print_script(script)
            return
        from sage_cli.run.script import is_yaml

        if script == "-" and not os.path.exists("-"):
            from sage_cli.errors import UsageError

            raise UsageError(
                "-: sage run reads its script from a file (its stdin is the script's input, "
                "as for `bash FILE`); write the script to a file and name it"
            )
        # a YAML pipeline runs as its bash form, like any script (the Python API's package,
        # sage_cli.api, is imported for one only: ~3 ms of every `sage run`'s start)
        if is_yaml(script):
            from sage_cli.api.forms import script_for_run

            assert script is not None
            pipeline_file, script = script, script_for_run(script)
            if not quiet:
                import sys

                sys.stderr.write(f"sage run: {pipeline_file} runs as {script}\n")
        if check:
            from sage_cli.run.check import check_pipeline

            if script is None:
                from sage_cli.errors import UsageError

                raise UsageError("missing the pipeline script: sage run --check SCRIPT")
            result = check_pipeline(
                script, script_args, quiet=quiet, engine=engine, replicas=list(replicas or [])
            )
            return
        if watch:
            from sage_cli.run.watch import watch_pipeline

            result = watch_pipeline(script, script_args, opts, run_dir, lock)
            return
        if engine == "ray":
            from sage_cli.run.runner import run_on_ray

            result = run_on_ray(
                script,
                script_args,
                address=address,
                replicas=list(replicas or []),
                opts=opts,
                run_dir=run_dir,
                lock=lock,
            )
            return
        from sage_cli.run.runner import run_pipeline

        result = run_pipeline(script, script_args, opts, run_dir=run_dir, resume=resume, lock=lock)

    code = guarded("sage run", body)
    return code or result


def _print_script(script: str | None) -> int:
    """`sage run --print-script SCRIPT`: the bash a YAML pipeline runs as (a script: itself)."""
    import sys

    from sage_cli.api.forms import yaml_script
    from sage_cli.errors import UsageError
    from sage_cli.run.script import is_yaml

    if script is None:
        raise UsageError("missing the pipeline file: sage run --print-script PIPELINE.yaml")
    if is_yaml(script):
        text = yaml_script(script)
    else:
        try:
            with open(script, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise UsageError(f"{script}: cannot read: {exc.strerror}") from None
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
