"""The other spellings of a pipeline: a bash script and a YAML file.

A YAML pipeline file:

    name: rag_pipeline
    stages:
      - source: {paths: [questions.ndjson]}
      - retrieve: {index: idx/, top_k: 5}
      - prompt: {template: qa}
      - generate: {max_tokens: 64}
      - sink: {to: answers.ndjson}

Each stage is `VERB: OPTIONS`, the options named as in Python (long flags without dashes,
`-` as `_`; arguments by name); a scalar or a list instead of a mapping gives the verb's
arguments (`- keyby: user`). Several pipelines, run in order: `pipelines: [{stages: [...]},
...]`. The first stage of a pipeline reads its own input (`source`, `merge`).
"""

from __future__ import annotations

from enum import Enum
from os import PathLike, fspath
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_cli.api import verbs
from sage_cli.api.stages import StageSpec, verb_stage
from sage_cli.errors import UsageError

if TYPE_CHECKING:
    from sage_cli.api.env import LocalEnvironment

#: verbs that read their own input, so they can start a pipeline
SOURCES = ("source", "merge")


def _verb_stages(env: LocalEnvironment, form: str) -> list[list[StageSpec]]:
    if not env.pipelines:
        raise UsageError(f"{form}: the environment has no pipeline")
    for number, pipeline in enumerate(env.pipelines, 1):
        for position, spec in enumerate(pipeline, 1):
            if spec.verb is None:
                raise UsageError(
                    f"{form}: pipeline {number}, stage {position} ({spec.spelling()}) has no "
                    f"{'bash' if form == 'to_script' else 'YAML'} form; write it as a sage verb "
                    '(e.g. .map("map", expr=...), .sink("out.ndjson"), from_source(...))'
                )
    return env.pipelines


def to_script(env: LocalEnvironment) -> str:
    """`env`'s pipelines as a bash script."""
    lines = [
        "#!/usr/bin/env bash",
        f"# {_comment(env.name)}: a sage pipeline (run it with `sage run` or bash)",
        "set -euo pipefail",
    ]
    for pipeline in _verb_stages(env, "to_script"):
        words = [verbs.shell_words(spec.argv) for spec in pipeline]
        lines.append(" \\\n  | ".join(words))
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    """`text` for a comment line: one line of printable characters (a newline in a name would
    start a command in the script; a NUL byte is not bash)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _plain(value: Any) -> Any:
    """An option value as YAML writes it safely (str, int, float, bool, lists of them)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, PathLike):
        return fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_yaml(env: LocalEnvironment) -> str:
    """`env`'s pipelines as YAML: one line per stage, `- VERB: {options}`."""
    import yaml

    def flow(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False)
        return str(text).strip().removesuffix("\n...").strip()

    def stages(pipeline: list[StageSpec], indent: str) -> list[str]:
        return [
            f"{indent}- {flow(spec.verb)}: " + flow({k: _plain(v) for k, v in spec.options.items()})
            for spec in pipeline
        ]

    pipelines = _verb_stages(env, "to_yaml")
    lines = [f"name: {flow(env.name)}"]
    if len(pipelines) == 1:
        lines += ["stages:", *stages(pipelines[0], "  ")]
    else:
        lines.append("pipelines:")
        for pipeline in pipelines:
            lines += ["  - stages:", *stages(pipeline, "      ")]
    return "\n".join(lines) + "\n"


def _read(text_or_path: str | PathLike[str]) -> tuple[str, str]:
    """(where, text): a path's content, or text given as is (it has a newline)."""
    if isinstance(text_or_path, str) and "\n" in text_or_path:
        return "pipeline", text_or_path
    path = Path(text_or_path)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such pipeline file; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None


def from_yaml(text_or_path: str | PathLike[str]) -> LocalEnvironment:
    """The environment a YAML pipeline describes (every stage checked as `sage run --check`
    parses a stage: unknown verbs, options and values are refused, naming the stage)."""
    import yaml

    from sage_cli.api.env import LocalEnvironment

    where, text = _read(text_or_path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())  # a ReaderError's
        raise UsageError(f"{where}{at}: not valid YAML: {why}") from None  # has 2 lines
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UsageError(f"{where}: not valid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # a constructor's: a date such as 2020-00-01
        raise UsageError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping with `stages:` (see docs/python.md)")
    unknown = sorted(set(doc) - {"name", "stages", "pipelines"}, key=repr)  # keys of any type
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (name, stages, pipelines)")
    if ("stages" in doc) == ("pipelines" in doc):
        raise UsageError(f"{where}: give `stages:` (one pipeline) or `pipelines:` (several)")
    if "stages" in doc:
        pipelines = [doc["stages"]]
    else:
        pipelines = doc["pipelines"]
        if not isinstance(pipelines, list) or not all(
            isinstance(p, dict) and set(p) == {"stages"} for p in pipelines
        ):
            raise UsageError(f"{where}: `pipelines:` is a list of {{stages: [...]}}")
        pipelines = [p["stages"] for p in pipelines]
    env = LocalEnvironment(str(doc.get("name") or Path(where).stem))
    for number, stages in enumerate(pipelines, 1):
        env.pipelines.append(_pipeline(where, number, stages))
    return env


def _pipeline(where: str, number: int, stages: Any) -> list[StageSpec]:
    if not isinstance(stages, list) or not stages:
        raise UsageError(f"{where}: pipeline {number}: `stages:` is a non-empty list")
    out: list[StageSpec] = []
    for position, stage in enumerate(stages, 1):
        at = f"{where}: pipeline {number}, stage {position}"
        if not isinstance(stage, dict) or len(stage) != 1:
            raise UsageError(f"{at}: expected `VERB: {{options}}`, got {stage!r:.80}")
        ((verb, value),) = stage.items()
        verb = str(verb)
        if position == 1 and verb not in SOURCES:
            raise UsageError(
                f"{at}: a pipeline starts with {' or '.join(SOURCES)} "
                "(`- source: {}` reads stdin)"
            )
        args: tuple[Any, ...] = ()
        options: dict[str, Any] = {}
        if isinstance(value, dict):
            options = {str(k): v for k, v in value.items()}
        elif isinstance(value, list):
            args = tuple(value)
        elif value is not None:
            args = (value,)
        try:
            out.append(verb_stage("yaml", verb, args, options))
        except UsageError as err:
            raise UsageError(f"{at}: {err}") from None
    return out


def yaml_script(path: str) -> str:
    """The bash form of a YAML pipeline file (`sage run --print-script pipeline.yaml`)."""
    return to_script(from_yaml(path))


def script_for_run(path: str) -> str:
    """Write the bash form of a YAML pipeline file where `sage run` can run it (and find it
    again for --resume): .sage/pipelines/<name>-<digest>.sh under the current directory."""
    import hashlib

    text = yaml_script(path)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    target = Path(".sage") / "pipelines" / f"{Path(path).stem}-{digest}.sh"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    return str(target)
