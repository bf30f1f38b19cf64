"""YAML pipelines (sage_cli/api/forms.py): a pipeline file built from random stages, with
names, paths, fields and expressions full of what a shell cares about (quotes, `$(...)`,
backticks, newlines, `#`, globs), gives either a one-line UsageError or an environment whose
bash form (`to_script`) is a script bash accepts (`bash -n`) and that runs exactly the `sage`
command lines the environment holds: each stage's argv, word for word (the script is run with
`sage` defined as a shell function that records its arguments). Its YAML form reads back as
the same pipelines.

(Any text as YAML, in process and much faster: tests/fuzz/harness/fuzz_yaml.py.)
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_cli.api.env import LocalEnvironment
from sage_cli.api.forms import from_yaml, to_script, to_yaml
from sage_cli.errors import UsageError
from tests.fuzz.conftest import examples

SHELLY = ["'", '"', "$(touch pwned)", "`id`", "\n", "\\", "#", "*", " ", "-", "--x", ";", "!", "é"]
words = st.lists(st.sampled_from(SHELLY) | st.text(max_size=4), max_size=4).map("".join)


def _expr(key: str, value: str, compare: bool) -> str:
    k, v = json.dumps(key), json.dumps(value)
    return f"r.get({k}) == {v}" if compare else f"r | {{{k}: {v}}}"


later_stages = st.one_of(
    st.builds(lambda k, v: {"map": {"expr": _expr(k, v, False)}}, words, words),
    st.builds(lambda k, v: {"filter": _expr(k, v, True)}, words, words),
    st.builds(lambda f: {"keyby": f}, words),
    st.builds(lambda n: {"head": n}, st.integers(-2, 20)),
    st.just({"dedupe": {}}),
    st.builds(lambda n: {"window": {"size": n, "agg": ["count"]}}, st.integers(0, 5)),
    st.builds(lambda p: {"sink": {"to": p}}, words),
    st.builds(
        lambda m, b: {"map": {"expr": "r", "on_error": m, "batch_size": b}},
        st.sampled_from(["fail", "skip", "emit", "nope"]),
        st.integers(0, 3),
    ),
)
first_stages = st.builds(lambda ps: {"source": {"paths": ps}}, st.lists(words, max_size=3)) | (
    st.just({"source": {}})
)
pipelines = st.builds(lambda a, b: [a, *b], first_stages, st.lists(later_stages, max_size=4))
documents = st.builds(
    lambda name, ps: (
        {"name": name, "stages": ps[0]}
        if len(ps) == 1
        else {"name": name, "pipelines": [{"stages": p} for p in ps]}
    ),
    words,
    st.lists(pipelines, min_size=1, max_size=2),
)

RECORDER = 'sage() { printf "%s\\0" "$@" > "$(mktemp -p "$SAGE_ARGV_DIR")"; }\n'


def argvs_run_by(script: str, tmp: Path) -> list[list[str]]:
    """The argv of every `sage` command the script runs (in any order)."""
    out = tmp / "argv"
    out.mkdir()
    body = script.replace("set -euo pipefail\n", "set -euo pipefail\n" + RECORDER, 1)
    done = subprocess.run(
        ["bash", "-c", body],
        cwd=tmp,
        env={"PATH": "/usr/bin:/bin", "SAGE_ARGV_DIR": str(out)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [f.read_bytes().decode().split("\0")[:-1] for f in out.iterdir()]


@given(documents)
@settings(max_examples=examples(10))
def test_a_yaml_pipeline_is_a_one_line_error_or_runs_the_same_argv_under_bash(doc: dict) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    try:
        env = from_yaml(text)
    except UsageError as err:
        assert str(err) and "\n" not in str(err), str(err)
        return
    again = from_yaml(to_yaml(env))
    expected = [spec.argv for pipeline in env.pipelines for spec in pipeline]
    assert again.name == env.name
    assert [spec.argv for p in again.pipelines for spec in p] == expected
    script = to_script(env)
    checked = subprocess.run(["bash", "-n"], input=script.encode(), capture_output=True)
    assert checked.returncode == 0, (script, checked.stderr.decode())
    with tempfile.TemporaryDirectory(prefix="fuzz-yaml-") as tmp:
        ran = argvs_run_by(script, Path(tmp))
        assert sorted(ran) == sorted(expected), script
        assert not (Path(tmp) / "pwned").exists(), script


def test_a_pipeline_name_with_a_newline_stays_a_comment(tmp_path: Path) -> None:
    """Found by the property above: the name went into the script's comment line as it was,
    so a name with a newline put its second line in the script as a command."""
    env = LocalEnvironment("x\ntouch pwned")
    env.from_source("in.ndjson").sink("out.ndjson")
    script = to_script(env)
    assert sorted(argvs_run_by(script, tmp_path)) == [
        ["sink", "--to", "out.ndjson"],
        ["source", "in.ndjson"],
    ]
    assert not (tmp_path / "pwned").exists()


def test_a_nul_byte_in_a_name_or_value_never_reaches_the_script() -> None:
    """Found by the property above: a NUL byte in the name went into the script (bash cannot
    take it); in an option it is refused, as no command line can carry it."""
    env = LocalEnvironment("a\x00b")
    env.from_source("in.ndjson").sink("out.ndjson")
    assert "\x00" not in to_script(env) and "# a b: a sage pipeline" in to_script(env)
    with pytest.raises(UsageError, match="cannot hold a NUL byte"):
        env.from_source("in\x00.ndjson")
