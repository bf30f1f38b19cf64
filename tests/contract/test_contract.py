"""Contract tests over every registered command (DESIGN §7).

Every command that `sage_cli.app.available_commands()` reports (and every sub-command of a group
such as `sage index build`) must have an entry in SPECS below: the minimal arguments that build
it and what kind of command it is. `test_every_command_has_a_spec` fails when a new command
lands without one, so no command slips past these checks.

The checks: `--help` works and has an `Examples:` block; `sage --help` lists the command; for
commands that read NDJSON on stdin: empty input gives empty output and exit 0, a malformed line 3
gives exit 65 naming `stdin:3` in one line of stderr (with lines 1-2 already written where the
operator is one-to-one), unknown fields and `_error` records pass through; `--schema` is JSON
Schema with `$defs.input` and `$defs.output`; never a traceback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ndjson, parse_ndjson, run_sage

# -- the table ---------------------------------------------------------------------------------

#: kinds of command
OPERATOR = "operator"  # reads NDJSON records on stdin, runs an operator through the driver
SOURCE = "source"  # an operator that makes records from elsewhere (reads_stdin=False)
TOOL = "tool"  # not a record stream (doctor, trace, models ...): --help only

#: how output records relate to input records
ONE_TO_ONE = (
    "one-to-one"  # one output per input, same order: lines 1-2 come out before line 3 fails
)
STREAM = "stream"  # zero or more outputs per input, each carrying the input's other fields
AGGREGATE = "aggregate"  # outputs are new records (windows, index build): fields do not pass


@dataclass
class Spec:
    """How to run one command in the contract tests."""

    args: list[str]
    kind: str = OPERATOR
    shape: str = ONE_TO_ONE
    #: needs the real models (tests that run records through it are marked `model`)
    model: bool = False
    #: fields every input record carries so the operator can work on it
    record: dict[str, Any] = field(default_factory=dict)
    #: the command prints --schema (every operator and source does)
    schema: bool = True


_DOC = {"text": "The cat sits on the mat. It is warm there."}
_QA = {
    "query": "Where is the cat?",
    "answer": "On the mat.",
    "docs": [{"id": "d1", "text": "The cat sits on the mat.", "score": 0.9, "rank": 1}],
}

#: command path -> minimal arguments. `{table}` becomes an NDJSON lookup table, `{tmp}` a fresh
#: directory, `{index}` a directory path for an index.
SPECS: dict[str, Spec] = {
    # dataflow
    "source": Spec(["-"], kind=SOURCE),
    "map": Spec(["r"]),
    "filter": Spec(["True"]),
    "flatmap": Spec(["[r]"], shape=STREAM),
    "keyby": Spec(["id"]),
    "window": Spec(["--count", "2"], shape=AGGREGATE),
    "join": Spec(["{table}", "--on", "id", "--how", "left"]),
    "merge": Spec(["-"]),
    "head": Spec(["10"]),
    "dedupe": Spec(["--key", "id"]),
    "sample": Spec(["--rate", "1"]),
    "sink": Spec([]),
    # RAG
    "chunk": Spec([], shape=STREAM, record=_DOC),
    "embed": Spec([], model=True, record=_DOC),
    "index build": Spec(["{index}"], shape=AGGREGATE, model=True, record=_DOC),
    "index info": Spec(["{index}"], kind=TOOL),
    "retrieve": Spec(["--index", "{index}"], model=True, record=_QA),
    "rerank": Spec([], model=True, record=_QA),
    "prompt": Spec([], record=_QA),
    "generate": Spec([], model=True, record=_QA),
    # --no-summary: the summary record at the end would break the one-to-one checks
    "eval": Spec(["--no-summary"], record={**_QA, "gold": "on the mat", "gold_ids": ["d1"]}),
    # operations
    "models list": Spec([], kind=TOOL),
    "models path": Spec(["minilm-l6"], kind=TOOL),
    "models verify": Spec([], kind=TOOL),
    "models convert": Spec(["{tmp}", "{tmp}/out.gguf"], kind=TOOL),
    "models install": Spec([], kind=TOOL),
    "doctor": Spec([], kind=TOOL),
    "run": Spec(["{tmp}/pipeline.sh"], kind=TOOL),
    "trace": Spec(["{tmp}"], kind=TOOL),
    # serving
    "serve": Spec([], kind=TOOL),
    "chat": Spec([], kind=TOOL),
    "mcp": Spec([], kind=TOOL),
    "studio": Spec([], kind=TOOL),
}


def registered_commands() -> list[str]:
    """Every command path the CLI offers: `map`, and `index build` for a group's members."""
    import typer

    from sage_cli.app import COMMANDS, available_commands

    paths: list[str] = []
    for name in available_commands():
        module = importlib.import_module(COMMANDS[name][0])
        command = typer.main.get_command(module.app)
        if hasattr(command, "list_commands"):  # a group: `sage index build|info`
            paths.extend(f"{name} {sub}" for sub in command.list_commands(None))
        else:
            paths.append(name)
    return paths


REGISTERED = registered_commands()
GROUPS = sorted({p.split()[0] for p in REGISTERED if " " in p})
SPECIFIED = [p for p in REGISTERED if p in SPECS]
STDIN_OPS = [p for p in SPECIFIED if SPECS[p].kind == OPERATOR]
SCHEMA_OPS = [p for p in SPECIFIED if SPECS[p].kind in (OPERATOR, SOURCE) and SPECS[p].schema]


def _params(paths: list[str]) -> list[Any]:
    """pytest params, marked `model` where the command needs the real models to run records."""
    return [
        pytest.param(p, id=p.replace(" ", "-"), marks=[pytest.mark.model] if SPECS[p].model else [])
        for p in paths
    ]


def argv(path: str, tmp_path: Path) -> list[str]:
    """The argv that builds `path` with its minimal arguments (files created in tmp_path)."""
    table = tmp_path / "table.ndjson"
    table.write_bytes(ndjson([{"id": f"r{i}", "joined": i} for i in range(1, 4)]))
    subs = {"{table}": str(table), "{tmp}": str(tmp_path), "{index}": str(tmp_path / "index")}
    if path == "retrieve":  # reads an index: give it a real one (tests/index_fixture.py)
        from tests.index_fixture import tiny_index

        tiny_index(tmp_path / "index")
    args = []
    for arg in SPECS[path].args:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        args.append(arg)
    return [*path.split(), *args]


def records(path: str, n: int) -> list[dict[str, Any]]:
    """n valid input records for `path`, ids r1..rn, each with an unknown nested field."""
    base = SPECS[path].record
    return [
        {
            "id": f"r{i}",
            "text": f"record number {i}",
            **base,
            "zz_unknown": {"nested": [i, None, "é"]},
        }
        for i in range(1, n + 1)
    ]


def assert_one_clean_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), f"not one line: {stderr!r}"


# -- completeness ------------------------------------------------------------------------------


def test_every_command_has_a_spec():
    missing = [p for p in REGISTERED if p not in SPECS]
    assert not missing, (
        f"commands with no entry in tests/contract/test_contract.py SPECS: {missing}; add the "
        "minimal arguments that build each one so the contract tests cover it"
    )


def test_specs_name_real_commands():
    from sage_cli.app import COMMANDS

    unknown = [p for p in SPECS if p.split()[0] not in COMMANDS]
    assert not unknown, (
        f"SPECS entries for commands that are not in sage_cli.app.COMMANDS: {unknown}"
    )


def test_some_commands_are_registered():
    assert {"map", "filter"} <= set(REGISTERED)


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [pytest.param(p, id=p.replace(" ", "-")) for p in REGISTERED])
def test_help_has_examples(cli, path):
    result = cli(*path.split(), "--help")
    assert result.exit_code == 0, result.stderr
    assert "Examples:" in result.stdout
    assert "Usage:" in result.stdout and result.stderr == ""
    assert "\\[" not in result.stdout, "markup escapes leak into --help (\\[default: ...])"


def test_group_help_has_examples_and_lists_members(cli):
    """`sage index --help` and the like (a loop, not parameters: there may be no group yet)."""
    for group in GROUPS:
        result = cli(group, "--help")
        assert result.exit_code == 0, result.stderr
        assert "Examples:" in result.stdout, f"sage {group} --help has no Examples: block"
        for path in REGISTERED:
            name, _, sub = path.partition(" ")
            if name == group:
                assert sub in result.stdout, f"sage {group} --help does not list {sub}"


def test_root_help_lists_every_command():
    result = run_sage("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    listed = {line.split()[0] for line in out.split("Commands:", 1)[1].splitlines() if line.strip()}
    from sage_cli.app import available_commands

    assert set(available_commands()) <= listed
    for name in available_commands():
        assert any(
            line.split()[0] == name and len(line.split()) > 1
            for line in out.splitlines()
            if line.strip()
        ), f"{name} has no summary"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.replace(" ", "-")) for p in REGISTERED])
def test_unknown_flag_is_a_one_line_usage_error(capsys, path):
    from sage_cli.app import main

    code = main([*path.split(), "--no-such-flag"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert_one_clean_line(captured.err)
    assert captured.err.startswith(f"sage {path}: error: ") and "--no-such-flag" in captured.err


def test_unknown_command_is_a_one_line_usage_error(capsys):
    from sage_cli.app import main

    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert_one_clean_line(err)
    assert err.startswith("sage: error: ") and "sage --help" in err


def test_version():
    result = run_sage("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("sage ")


# -- schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _params(SCHEMA_OPS))
def test_schema_is_json_schema(cli, path, tmp_path):
    result = cli(*argv(path, tmp_path), "--schema", input=b"")
    assert result.exit_code == 0, result.stderr
    schema = orjson.loads(result.stdout)
    defs = schema["$defs"]
    for side in ("input", "output"):
        assert defs[side]["type"] == "object"
        assert isinstance(defs[side].get("properties", {}), dict)
    assert set(defs["input"].get("required", [])) <= set(defs["input"]["properties"])
    assert schema["x-sage-memory"] in ("streaming", "bounded", "whole-input")


# -- records through every stdin operator ------------------------------------------------------


@pytest.mark.parametrize("path", _params(STDIN_OPS))
def test_empty_input_gives_empty_output(cli, path, tmp_path):
    result = cli(*argv(path, tmp_path), input=b"")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path", _params(STDIN_OPS))
def test_malformed_line_3_exits_65_naming_the_line(path, tmp_path):
    good = ndjson(records(path, 2))
    result = run_sage(*argv(path, tmp_path), input=good + b'{"id": "r3", "text": \n', cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 65, stderr
    assert_one_clean_line(stderr)
    assert "stdin:3" in stderr
    assert stderr.startswith(f"sage {path.split()[0]}")
    if SPECS[path].shape == ONE_TO_ONE:
        out = parse_ndjson(result.stdout)
        assert [r["id"] for r in out] == ["r1", "r2"], "lines 1-2 must be written before exit 65"


@pytest.mark.parametrize("path", _params(STDIN_OPS))
def test_unknown_fields_pass_through(cli, path, tmp_path):
    given = records(path, 3)
    result = cli(*argv(path, tmp_path), input=ndjson(given))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert out, "expected output records"
    if SPECS[path].shape == AGGREGATE:
        return
    unknown = [r["zz_unknown"] for r in given]
    for record in out:
        assert "_error" not in record, record
        assert record.get("zz_unknown") in unknown, f"unknown field lost: {record}"
    if SPECS[path].shape == ONE_TO_ONE:
        assert [r["zz_unknown"] for r in out] == [r["zz_unknown"] for r in given]
        assert [r["id"] for r in out] == ["r1", "r2", "r3"]


@pytest.mark.parametrize("path", _params(STDIN_OPS))
def test_error_records_pass_through_untouched(cli, path, tmp_path):
    given = records(path, 2)
    error = {
        "id": "bad",
        "_error": {"stage": "sage earlier", "line": 7, "error": "it broke", "raw": '{"x": '},
        "zz": [1, 2.5, {"k": None}],
    }
    lines = ndjson([given[0], error, given[1]])
    result = cli(*argv(path, tmp_path), input=lines)
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert out.count(error) == 1, f"the _error record must come out exactly as it went in: {out}"
    raw_line = orjson.dumps(error)
    assert raw_line in result.stdout.encode(), "an _error record is written byte for byte"


@pytest.mark.parametrize("path", _params(STDIN_OPS))
def test_on_error_emit_keeps_going_past_a_bad_line(cli, path, tmp_path):
    good = ndjson(records(path, 2))
    result = cli(
        *argv(path, tmp_path),
        "--on-error",
        "emit",
        input=good[: good.index(b"\n") + 1] + b"[1, 2]\n" + good[good.index(b"\n") + 1 :],
    )
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    errors = [r for r in out if "_error" in r]
    assert len(errors) == 1 and errors[0]["_error"]["line"] == 2
    assert "array" in errors[0]["_error"]["error"]
    if SPECS[path].shape == ONE_TO_ONE:
        assert [r.get("id") for r in out] == ["r1", None, "r2"]
