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


def _sets_state_only(cmd: list[str]) -> bool:
    """Whether --check runs this command of a script with several pipelines: it only sets
    shell state (assignments, `set`, `export`, `cd`...)."""
    from sage_cli.run.script import STATE_COMMANDS, _is_assignment

    return all(_is_assignment(w) for w in cmd) or cmd[0] in STATE_COMMANDS


def pipelines_of(script: str, args: list[str]) -> list[Pipeline]:
    """Every pipeline of the script, expanded. With several pipelines, only the commands that
    set shell state (assignments, set, export, cd...) run, and their failures are ignored:
    --check must not do the script's work (`mkdir`, `python make_corpus.py > x`)."""
    import tempfile

    from sage_cli.run.script import Segment, expand_segment, needs_bash, read_segments

    segments = read_segments(script)
    if len(segments) == 1 and segments[0].pipeline is not None:
        # a script `sage run` hands to bash is checked as bash runs it (below, statically):
        # expanding it here would run the programs before its pipeline
        bash_only = needs_bash(segments, script)
        if bash_only is not None:
            raise bash_only
        return [parse_script(script, args, segments=segments)]
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
    from sage_cli.run.script import CommandsFailed, Unsupported

    try:
        pipelines = pipelines_of(script, args)
    except Unsupported as why:
        return check_bash_script(script, quiet, why)
    except CommandsFailed as err:  # a problem of the script, whatever status its command had
        raise UsageError(f"{err}, reading the script's words; fix the script") from None
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


#: words that open or close a bash block before a command on the same line (`if sage ...`)
_KEYWORDS = frozenset({"if", "then", "else", "elif", "do", "while", "until", "!", "{", "time"})
#: what makes a word bash's business at run time: --check cannot know its value
_DYNAMIC = ("$", "`", "*", "?", "[")


def _static_pipelines(script: str) -> tuple[list[Pipeline], list[str]]:
    """The pipelines of a script bash runs whole that can be read without running it (every
    word of every stage literal), and one note per line with a sage stage that cannot."""
    import shlex

    from sage_cli.run.script import Redirect, ScriptError, _split_stage, _tokenize

    pipelines: list[Pipeline] = []
    skipped: list[str] = []
    buf, start = "", 0
    for number, raw in enumerate(Path(script).read_text(encoding="utf-8").splitlines(), 1):
        if not buf:
            start = number
        if (len(raw) - len(raw.rstrip("\\"))) % 2:
            buf += raw[:-1]
            continue
        line, buf = buf + raw, ""
        if "sage" not in line or line.lstrip().startswith("#"):
            continue
        try:
            commands, seps = _tokenize(line, start, script)
        except ScriptError as err:  # `&&`, a here-document, a subshell...
            skipped.append(f"line {start}: {str(err).split(': ', 2)[-1]}")
            continue
        groups: list[list[list[str]]] = [[]]
        for k, cmd in enumerate(commands):
            while cmd and cmd[0] in _KEYWORDS:
                cmd = cmd[1:]
            if cmd:
                groups[-1].append(cmd)
            if k < len(seps) and seps[k] != "|":
                groups.append([])
        for group in groups:
            if not any(cmd and cmd[0] == "sage" for cmd in group):
                continue
            dynamic = sorted({w for cmd in group for w in cmd if any(c in w for c in _DYNAMIC)})
            if dynamic:
                skipped.append(f"line {start}: `{dynamic[0]}` is expanded by bash at run time")
                continue
            stages = []
            for index, cmd in enumerate(group):
                _, words, redirs = _split_stage(cmd, f"{script}:{start}")
                argv = [shlex.split(w)[0] if w.strip() else w for w in words]
                redirects = [Redirect(op, shlex.split(t)[0] if t else "", t) for op, t in redirs]
                stages.append(Stage(index, argv, {}, redirects, " ".join(cmd), len(pipelines) + 1))
            pipelines.append(Pipeline(Path(script), stages, dict(os.environ), os.getcwd(), start))
    return pipelines, skipped


def check_bash_script(script: str, quiet: bool, why: SageError) -> int:
    """--check on a script bash runs whole: bash's own syntax check, then every pipeline whose
    words are all literal is checked as above; the lines it cannot read are listed."""
    from sage_cli.run.script import check_syntax

    check_syntax(Path(script), script)
    pipelines, skipped = _static_pipelines(script)
    lines: list[str] = []
    made: set[Path] = set()
    for pipeline in pipelines:
        lines.extend(check(pipeline, made))
        made |= outputs_of(pipeline)
    if not quiet:
        for line in lines:
            sys.stderr.write(f"  {line}\n")
        for note in skipped:
            sys.stderr.write(f"  not checked: {note}\n")
        n = sum(len(p.stages) for p in pipelines)
        sys.stderr.write(
            f"sage run --check: {script}: bash runs it whole ({str(why).split(': ', 2)[-1]}); "
            f"{len(pipelines)} pipeline(s), {n} stage(s) OK, {len(skipped)} line(s) with sage "
            "stages not checked\n"
        )
    return 0
