"""YAML pipelines (sage_cli/api/forms.py `from_yaml`): any text gives a LocalEnvironment or a
UsageError with a one-line message, never another exception; an environment it accepts has a
YAML form that reads back as the same pipelines (`from_yaml(env.to_yaml())`: the same name, the
same `sage VERB ...` argv per stage) and a bash form (`to_script`: no NUL byte, the name on its
comment line; tests/fuzz/test_fuzz_yaml.py runs it under bash).

The input is the YAML text (UTF-8, undecodable bytes replaced), with a newline added so that
from_yaml reads it as text rather than as a path.
"""

from __future__ import annotations

import warnings

from sage_cli.api.env import LocalEnvironment
from sage_cli.api.forms import from_yaml, to_script, to_yaml
from sage_cli.errors import UsageError

MAX_LEN = 2048

warnings.simplefilter("ignore", SyntaxWarning)


def argvs(env: LocalEnvironment) -> list[list[list[str]]]:
    return [[spec.argv for spec in pipeline] for pipeline in env.pipelines]


def check(text: str) -> LocalEnvironment | None:
    """The environment `text` describes (None: a one-line UsageError), checked both ways."""
    try:
        env = from_yaml(text)
    except UsageError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None
    assert isinstance(env, LocalEnvironment) and env.pipelines
    again = from_yaml(to_yaml(env))
    assert again.name == env.name, (env.name, again.name)
    assert argvs(again) == argvs(env), (argvs(env), argvs(again))
    script = to_script(env)
    assert script.startswith("#!/usr/bin/env bash\n") and script.endswith("\n")
    assert "\x00" not in script, script  # bash cannot take it
    assert script.splitlines()[1].startswith("# "), script  # the name stays a comment
    return env


def TestOneInput(data: bytes) -> None:
    check(data.decode("utf-8", "replace") + "\n")


SEEDS: list[bytes] = [
    b"name: rag\nstages:\n  - source: {paths: [questions.ndjson]}\n"
    b"  - retrieve: {index: idx/, top_k: 5}\n  - prompt: {template: qa}\n"
    b"  - generate: {max_tokens: 64}\n  - sink: {to: answers.ndjson}\n",
    b'stages:\n  - source: {}\n  - map: \'r | {"n": len(r["text"])}\'\n'
    b"  - filter: {expr: 'r[\"n\"] > 1', on_error: emit}\n  - keyby: user\n"
    b"  - window: {size: 10, agg: [count, 'sum:n']}\n  - sink: {to: out.ndjson}\n",
    b"name: two\npipelines:\n  - stages:\n      - source: [a.ndjson, b.ndjson]\n"
    b"      - dedupe: {}\n  - stages:\n      - merge: [x.ndjson]\n      - head: 3\n",
    b"stages:\n  - source: {paths: ['-1'], batch_size: 0}\n",
    b"stages: [{source: {}}, {map: {expr: 'r', workers: 2}}, {window: {workers: 2}}]",
    b"name: 12\nstages:\n  - source: {paths: [2020-01-01, .nan, {a: 1}]}\n",
    b"stages:\n  - source: &a [x]\n  - map: *a\n  - nope: {}\n",
    b"[[[[[[[[[[",
    b"stages: !!python/object:os.system {}\n",
    b"name: 'x\ny'\nstages:\n  - source: {paths: [\"a\\nb\", '$(rm -rf /)', \"it's\"]}\n",
]
