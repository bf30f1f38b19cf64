"""The Python API (sage_cli.api) on random chains: `from_source` then a few of map, filter,
flatmap, keyby, window, head, dedupe (verbs, with options drawn good and bad: expressions
that fail on some records or do not compile, unknown options, batch sizes of 0, error modes),
then a sink, run on a small NDJSON file.

Writing the chain either works or raises a SageError with a one-line message (never another
exception type). A chain that was written runs (`submit`) or raises a SageError
(PipelineError: a record failed under on_error="fail") with a one-line message; and its bash
form (`to_script`, the same stages as `sage` commands in a real pipe) agrees: it exits 0 when
the Python run succeeded, with the same records in the same order, and non-zero when the
Python run failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sage_cli.api import LocalEnvironment
from sage_cli.errors import SageError
from tests.conftest import clean_env, ndjson, parse_ndjson
from tests.fuzz.conftest import examples

RECORDS = [
    {"id": "a", "text": "hello world. Second sentence here.", "n": 1, "user": "x"},
    {"id": "b", "text": "", "n": "2", "user": "y"},
    {"id": "c", "n": None},
    {"id": "d", "text": "one", "n": 3, "user": "x", "tags": ["t", 1]},
    {"id": "e", "text": "two words", "n": 3.5, "user": None},
]
FIELDS = ["n", "text", "user", "id", "missing"]
fields = st.sampled_from(FIELDS)
EXPRESSIONS = [
    'r | {{"m": r.get("{f}")}}',
    'r | {{"m": r["{f}"] * 2}}',  # fails on a record without the field or a None
    'r | {{"m": len(r["{f}"])}}',
    '{{"id": r["id"], "{f}": r.get("{f}")}}',
    "r[",  # does not parse: fails when the stage is built (submit), as in the CLI
    "[r, r]",
    "1",  # not a record
]
PREDICATES = ['r.get("{f}")', 'r["{f}"] > 1', 'r.get("{f}") == "x"', "r[", "True"]
expressions = st.builds(lambda e, f: e.format(f=f), st.sampled_from(EXPRESSIONS), fields)
predicates = st.builds(lambda e, f: e.format(f=f), st.sampled_from(PREDICATES), fields)
common = st.fixed_dictionaries(
    {},
    optional={
        "on_error": st.sampled_from(["fail", "skip", "emit", "ignore"]),
        "batch_size": st.sampled_from([1, 2, 64, 0]),
    },
)


def _call(method: str, *args: Any, **options: Any) -> tuple[str, tuple[Any, ...], dict]:
    return method, args, options


steps = st.one_of(
    st.builds(lambda e, c: _call("map", expr=e, **c), expressions, common),
    st.builds(lambda e, c: _call("filter", expr=e, **c), predicates, common),
    st.builds(lambda e, c: _call("flatmap", expr=e, **c), expressions, common),
    st.builds(lambda f, c: _call("keyby", f, **c), fields, common),
    st.builds(
        lambda n, a, c: _call("window", size=n, agg=a, **c),
        st.integers(0, 3),
        st.lists(st.sampled_from(["count", "sum:n", "mean:n", "max:n", "bogus"]), max_size=2),
        common,
    ),
    st.builds(lambda n: _call("map", "head", n), st.integers(-1, 6)),
    st.builds(lambda f: _call("filter", "dedupe", key=f), fields),
    st.builds(lambda f: _call("flatmap", "chunk", size=f), st.sampled_from([1, 8, 400, 0])),
    st.builds(lambda k: _call("map", expr="r", **{k: 1}), st.sampled_from(["nope", "exprs"])),
)


def build(env: LocalEnvironment, chain: list[tuple[str, tuple[Any, ...], dict]]) -> None:
    stream = env.from_source("in.ndjson")
    for method, args, options in chain:
        stream = getattr(stream, method)(*args, **options)
    stream.sink("out.ndjson")


def one_line(err: BaseException) -> None:
    assert isinstance(err, SageError), f"{type(err).__name__}: {err}"
    assert str(err) and "\n" not in str(err), repr(str(err))


def run_python(chain: list, workdir: Path) -> tuple[LocalEnvironment | None, bool]:
    """(the environment, whether submit succeeded); None when writing the chain failed."""
    env = LocalEnvironment("fuzz")
    try:
        build(env, chain)
    except Exception as err:  # noqa: BLE001 - the property: only a one-line SageError
        one_line(err)
        return None, False
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        env.submit()
    except Exception as err:  # noqa: BLE001 - the property: only a one-line SageError
        one_line(err)
        return env, False
    finally:
        os.chdir(cwd)
    return env, True


def run_bash(script: str, workdir: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(
        ["bash", "-c", script],
        cwd=workdir,
        env=clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"),
        capture_output=True,
        timeout=120,
    )


def check_chain(chain: list) -> str:
    """Run `chain` in Python and as bash; check they agree; say how it went."""
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as tmp:
        py, sh = Path(tmp) / "py", Path(tmp) / "sh"
        for d in (py, sh):
            d.mkdir()
            (d / "in.ndjson").write_bytes(ndjson(RECORDS))
        env, ok = run_python(chain, py)
        if env is None:
            return "refused when written"
        done = run_bash(env.to_script(), sh)
        stderr = done.stderr.decode("utf-8", "replace")
        assert "Traceback" not in stderr, stderr
        described = json.dumps([list(c) for c in chain], default=str)
        if not ok:
            assert done.returncode != 0, (described, stderr)
            return "failed in submit"
        assert done.returncode == 0, (described, stderr)
        python_out = parse_ndjson((py / "out.ndjson").read_bytes())
        assert parse_ndjson((sh / "out.ndjson").read_bytes()) == python_out, described
        return "ran"


@given(st.lists(steps, max_size=3))
@settings(max_examples=examples(6))
def test_a_random_chain_runs_as_its_bash_form_does_or_fails_in_one_line(chain: list) -> None:
    event(check_chain(chain))


@pytest.mark.parametrize(
    "chain, outcome",
    [
        ([("map", (), {"expr": "r["})], "failed in submit"),  # compiled when it is built
        ([("map", (), {"batch_size": 0, "expr": "r"})], "refused when written"),
        ([("map", ("head", 2), {})], "ran"),
        ([("map", (), {"expr": 'r | {"m": r["n"] * 2}'})], "failed in submit"),
        ([("map", (), {"expr": 'r | {"m": r["n"] * 2}', "on_error": "emit"})], "ran"),
        ([("keyby", ("id",), {}), ("window", (), {"size": 2, "agg": ["count"]})], "ran"),
    ],
)
def test_known_chains(chain: list, outcome: str) -> None:
    """A chain of each outcome, in every `make test` (the property's examples are random)."""
    assert check_chain(chain) == outcome
