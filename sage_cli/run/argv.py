"""`sage run`'s common command lines read without typer.

typer and click take ~35 ms to import, and `sage run`'s start is on the critical path of every
script it runs (a cron job's `sage run nightly.sh` is bash plus this). So app.main reads the
usual command lines here, the flags a run takes on its way to bash, and hands them to
sage_cli.run.launch directly. Anything else (`--help`, `--check`, `--engine`, an unknown or
malformed flag, a value out of range) returns None and goes to the typer command
(commands/run.py), which parses it and words its errors. tests/commands/test_run_argv.py holds
the two readings to the same result.
"""

from __future__ import annotations

from typing import Any

#: flag -> (keyword of launch(), kind): "flag" takes no value; "count", "seconds", "text" take one
FLAGS: dict[str, tuple[str, str]] = {
    "-q": ("quiet", "flag"),
    "--quiet": ("quiet", "flag"),
    "--progress": ("progress", "flag"),
    "--lock": ("lock", "flag"),
    "--retries": ("retries", "count"),
    "--backoff": ("backoff", "seconds"),
    "--timeout": ("timeout", "seconds"),
    "--run-dir": ("run_dir", "text"),
    "--trace": ("trace", "text"),
}


def _value(kind: str, text: str) -> Any:
    """`text` as a `kind` value, None where typer should judge it (its wording, its checks)."""
    if kind == "count":
        return int(text) if text.isascii() and text.isdigit() else None
    if kind == "seconds":
        whole, _, part = text.partition(".")
        digits = whole + part
        if digits and digits.isascii() and digits.isdigit():
            return float(text)
        return None
    if not text or text.startswith("-"):  # a missing value, or the next flag taken for one
        return None
    return text


def quick_options(argv: list[str]) -> dict[str, Any] | None:
    """launch()'s keywords for `sage run ARGV`, or None for the typer command to handle."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        name, eq, inline = word.partition("=")
        if name not in FLAGS:
            return None
        key, kind = FLAGS[name]
        if kind == "flag":
            if eq:
                return None
            options[key] = True
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        elif i + 1 < len(argv):
            text = argv[i + 1]
            i += 2
        else:
            return None
        value = _value(kind, text)
        if value is None:
            return None
        options[key] = value
    if i >= len(argv):
        return None  # no script: the typer command says what is missing
    options["script"] = argv[i]
    options["args"] = argv[i + 1 :]
    return options
