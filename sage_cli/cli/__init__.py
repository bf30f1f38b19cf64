"""The CLI core: the shared shape of every operator command (command.py), NDJSON I/O (io.py),
shared typer options, tables, `sage doctor`'s checks. The verb registry is sage_cli.verbs; app
assembly is sage_cli.cli.group (sage_cli.app is the entry point)."""
