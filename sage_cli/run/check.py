"""`sage run --check`: validate a pipeline without running it (no model loads).

For every stage: the program exists; a sage stage's options parse (`sage <op> ARGS --schema`
builds the operator without setting it up); the fields it requires are produced upstream (from
each stage's JSON Schema); files it reads with `<`, and `--index`/`--model`/`--table` paths,
exist. The first problem is reported with the stage and the field or path named.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from sage_cli.errors import SageError, UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.run.script import Pipeline, Stage, parse_script
from sage_cli.verbs import Verb, lookup

_ALIAS_IN_DOC = re.compile(r"`(\w+)`(?: if absent| is accepted)")
TEXT_SUFFIXES = (".txt", ".md", ".markdown")


class CheckError(SageError):
    """The pipeline would fail: names the stage and what is wrong."""


def stage_schema(pipeline: Pipeline, stage: Stage) -> dict[str, Any]:
    """Run `sage <op> ARGS --schema` for a stage, in the stage's environment."""
    env = dict(pipeline.env)
    env.update(stage.env)
    # -P: the stage's directory is not put on sys.path (a `typer.py` there would run)
    argv = [sys.executable, "-P", "-m", "sage_cli", *stage.argv[1:], "--schema"]
    proc = subprocess.run(
        argv, capture_output=True, env=env, cwd=pipeline.cwd, stdin=subprocess.DEVNULL, timeout=60
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        why = re.sub(r"^sage [\w-]+: error: ", "", why)
        raise CheckError(
            f"stage {stage.index + 1} ({stage.label}): {why}",
            ExitCode(proc.returncode)
            if proc.returncode in {int(c) for c in ExitCode}
            else ExitCode.USAGE,
        )
    try:
        return orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        raise CheckError(
            f"stage {stage.index + 1} ({stage.label}): --schema printed no JSON schema"
        ) from None


def _paths_to_check(stage: Stage, verb: Verb) -> list[tuple[str, str]]:
    options = verb.input_paths
    out = []
    argv = stage.argv
    for i, word in enumerate(argv):
        for opt in options:
            if word == opt and i + 1 < len(argv):
                out.append((opt, argv[i + 1]))
            elif word.startswith(opt + "="):
                out.append((opt, word.split("=", 1)[1]))
    return out


def _satisfied(field: str, available: set[str], schema_doc: str, verb: Verb) -> bool:
    if field in available:
        return True
    aliases = set(verb.aliases.get(field, ())) | set(_ALIAS_IN_DOC.findall(schema_doc))
    return bool(aliases & available)


def _source_is_closed(stage: Stage) -> bool:
    """A source whose records have only the fields its schema lists (text files, -R)."""
    args = stage.argv[2:]
    if "-R" in args or "--raw" in args:
        return True
    paths = [a for a in args if not a.startswith("-")]
    return bool(paths) and all(p.endswith(TEXT_SUFFIXES) or os.path.isdir(p) for p in paths)


def outputs_of(pipeline: Pipeline) -> set[Path]:
    """Paths a pipeline creates: `sage index build DIR` and `> FILE` targets."""
    cwd = Path(pipeline.cwd)
    made: set[Path] = set()
    for stage in pipeline.stages:
        for r in stage.redirects:
            if r.op in (">", ">>", "&>", "&>>"):
                made.add((cwd / r.target).resolve())
        if stage.is_sage and stage.argv[1:3] == ["index", "build"]:
            dirs = [a for a in stage.argv[3:] if not a.startswith("-")]
            if dirs:
                made.add((cwd / dirs[0]).resolve())
    return made


def check(pipeline: Pipeline, made_before: set[Path] | None = None) -> list[str]:
    """Validate `pipeline`; return one line per stage, or raise CheckError.

    `made_before`: paths that earlier pipelines of the same script create (an index built by
    the first pipeline and searched by the second is not missing).
    """
    made_before = made_before or set()
    report: list[str] = []
    available: set[str] | None = None  # None: fields unknown (anything may be there)
    cwd = Path(pipeline.cwd)
    for stage in pipeline.stages:
        where = f"stage {stage.name.split('-')[0]} ({stage.label})"
        for r in stage.redirects:
            source = cwd / r.target
            if r.op == "<" and not source.exists() and source.resolve() not in made_before:
                raise CheckError(f"{where}: input file {r.target} does not exist", ExitCode.USAGE)
        if not stage.is_sage:
            if shutil.which(stage.argv[0], path=pipeline.env.get("PATH")) is None:
                raise CheckError(f"{where}: {stage.argv[0]}: command not found", ExitCode.USAGE)
            available = None
            report.append(f"{stage.name}: {stage.argv[0]} (not a sage stage: fields unknown)")
            continue
        try:
            verb = lookup(stage.argv[1:])
        except UsageError:
            raise CheckError(
                f"{where}: unknown command; see `sage --help`", ExitCode.USAGE
            ) from None
        for opt, value in _paths_to_check(stage, verb):
            path = cwd / value
            if not path.exists() and path.resolve() not in made_before:
                raise CheckError(
                    f"{where}: {opt} {value} does not exist; build it first", ExitCode.UNAVAILABLE
                )
        schema = stage_schema(pipeline, stage)
        defs = schema.get("$defs", {})
        inp = defs.get("input", {})
        required = list(inp.get("required", []))
        produced = list(defs.get("output", {}).get("properties", {}))
        if available is not None:
            for fld in required:
                doc = orjson.dumps(inp.get("properties", {}).get(fld, {})).decode()
                if not _satisfied(fld, available, doc, verb):
                    have = ", ".join(sorted(f for f in available if not f.startswith("_")))
                    raise CheckError(
                        f"{where}: needs field {fld!r}, which no stage before it produces "
                        f"(fields there: {have or 'none'})",
                        ExitCode.USAGE,
                    )
        if verb.open_output:
            available = None
        elif stage.command == "source" and stage.index == 0:
            available = set(produced) if _source_is_closed(stage) else None
        elif available is not None:
            available |= set(produced)
        needs = ", ".join(required) or "nothing"
        report.append(f"{stage.name}: needs {needs}; adds {', '.join(produced) or 'nothing'}")
    return report


#: commands --check runs from a script with several pipelines (they only set shell state)
_STATE_COMMANDS = frozenset({"set", "export", "cd", "shopt", "unset", "declare", "readonly"})


def _sets_state_only(cmd: list[str]) -> bool:
    from sage_cli.run.script import _is_assignment

    return all(_is_assignment(w) for w in cmd) or cmd[0] in _STATE_COMMANDS


def pipelines_of(script: str, args: list[str]) -> list[Pipeline]:
    """Every pipeline of the script, expanded. With several pipelines, only the commands that
    set shell state (assignments, set, export, cd...) run, and their failures are ignored:
    --check must not do the script's work (`mkdir`, `python make_corpus.py > x`)."""
    import tempfile

    from sage_cli.run.script import Segment, expand_segment, read_segments

    segments = read_segments(script)
    if len(segments) == 1 and segments[0].pipeline is not None:
        return [parse_script(script, args)]
    out: list[Pipeline] = []
    number = 0
    with tempfile.TemporaryDirectory(prefix="sage-check-") as tmp:
        state_in: str | None = None
        for k, seg in enumerate(segments):
            commands = [c + ["||", "true"] for c in seg.commands if _sets_state_only(c)]
            state_out = os.path.join(tmp, f"state{k}.sh")
            if seg.pipeline is not None:
                number += 1
            pipeline, _, _ = expand_segment(
                script,
                Segment(commands, seg.pipeline, seg.line),
                args,
                state_in=state_in,
                state_out=state_out,
                group=number,
            )
            state_in = state_out
            if pipeline is not None:
                out.append(pipeline)
    return out


def check_engine(pipelines: list[Pipeline], engine: str, replicas: list[str] | None) -> None:
    """Raise what the engine would refuse. `ray`: exactly what `sage run --engine ray` checks
    before it joins a cluster (one pipeline, sage stages only, `--replicas` that fit)."""
    if engine != "ray":
        return
    if len(pipelines) != 1:
        raise UsageError("--engine ray runs scripts that hold one pipeline")
    from sage_cli.execution.plan import parse_replicas, plan_stages

    try:
        plan_stages([s.argv for s in pipelines[0].stages], parse_replicas(replicas))
    except SageError as err:
        raise CheckError(f"--engine ray: {err}", err.code) from None


def check_pipeline(
    script: str,
    args: list[str],
    quiet: bool = False,
    engine: str = "local",
    replicas: list[str] | None = None,
) -> int:
    if not Path(script).exists():
        raise UsageError(f"{script}: no such script; check the path")
    pipelines = pipelines_of(script, args)
    lines: list[str] = []
    made: set[Path] = set()
    for pipeline in pipelines:
        lines.extend(check(pipeline, made))
        made |= outputs_of(pipeline)
    check_engine(pipelines, engine, replicas)
    if not quiet:
        for line in lines:
            sys.stderr.write(f"  {line}\n")
        n = sum(len(p.stages) for p in pipelines)
        sys.stderr.write(
            f"sage run --check: {script}: {len(pipelines)} pipeline(s), {n} stage(s) OK\n"
        )
    return 0
