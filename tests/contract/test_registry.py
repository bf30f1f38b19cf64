"""The verb registry (sage_cli/verbs.py): its facts match the operators, the CLI lists exactly
its verbs, `parse_stage` parses a command line without running it, and `build_operator` builds
an operator from keyword options named after the long flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_cli.errors import UsageError
from sage_cli.verbs import VERBS, build_operator, operator_verbs, parse_stage
from tests.contract.test_contract import REGISTERED, argv


@pytest.mark.parametrize("verb", [v.name for v in operator_verbs()])
def test_registry_facts_match_the_operator(verb: str, tmp_path: Path) -> None:
    entry = VERBS[verb]
    call = parse_stage(["sage", *argv(verb, tmp_path)])
    assert call.verb is entry
    op = call.factory()
    assert op.memory == entry.memory
    assert op.stateless == entry.replicable
    assert ("workers" in entry.opts_out) == (not entry.replicable)
    assert call.reads_stdin == (entry.reads == "records")


def test_every_cli_command_is_a_registry_verb() -> None:
    from sage_cli.app import COMMANDS

    assert list(COMMANDS) == [v.name for v in VERBS.values() if " " not in v.name]
    operators = {v.name for v in operator_verbs()}
    assert operators <= set(REGISTERED)


def test_parse_stage_parses_flags_without_running_anything(tmp_path: Path) -> None:
    errors = tmp_path / "dead.ndjson"
    call = parse_stage(["sage", "map", "r", "--on-error", "emit", "--errors", str(errors), "-"])
    assert call.factory.command == "map"
    assert call.factory.kwargs == {"expr": "r", "fn": None}
    assert call.opts.on_error == "emit"
    assert call.opts.errors == str(errors)
    assert call.opts.files == ["-"]
    assert not errors.exists()  # nothing ran


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["run", "x.sh"], "sage run is not an operator"),
        (["index", "info", "idx"], "sage index info is not an operator"),
        (["nope"], "`nope` is not a sage command"),
        (["head", "--bogus"], "No such option .--bogus"),
        (["retrieve"], "Missing option '--index'"),
        (["head", "-1"], "sage head"),
    ],
)
def test_parse_stage_refuses(words: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("'", ".")):
        parse_stage(["sage", *words])


def test_build_operator_takes_long_flag_names(tmp_path: Path) -> None:
    from tests.index_fixture import tiny_index

    tiny_index(tmp_path / "idx")
    op = build_operator("retrieve", index=str(tmp_path / "idx"), top_k=3, mode="bm25")
    assert type(op).__name__ == "Retriever"
    assert op.k == 3
    mapped = build_operator("map", expr='r | {"n": 1}')
    assert mapped.run([{"id": 1}]) == [{"id": 1, "n": 1}]
    head = build_operator("head", n=2)
    assert head.run([{"i": i} for i in range(5)]) == [{"i": 0}, {"i": 1}]


def test_build_operator_gives_left_out_flags_the_cli_defaults(tmp_path: Path) -> None:
    from tests.index_fixture import tiny_index

    tiny_index(tmp_path / "idx")
    op = build_operator("retrieve", index=str(tmp_path / "idx"))
    assert (op.k, op.mode, op.fusion, op.alpha) == (5, "hybrid", "adaptive", 0.5)
    rerank = build_operator("rerank", top_k=2)
    assert (rerank.method, rerank.lam, rerank.k) == ("sentence", 0.5, 2)


@pytest.mark.parametrize(
    ("verb", "options", "message"),
    [
        ("retrieve", {"index": "x", "top_k": 0}, "top_k"),
        ("retrieve", {}, "index"),
        ("map", {"expresion": "r"}, "no option 'expresion'"),
        ("trace", {}, "not an operator"),
        ("nope", {}, "not a sage verb"),
    ],
)
def test_build_operator_refuses(verb: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_operator(verb, **options)
