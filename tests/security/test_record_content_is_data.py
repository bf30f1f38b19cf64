"""Record content is data: nothing in sage evaluates, formats, templates or shells it.

`map`/`filter`/`flatmap` expressions are Python and run only from the command line (or a --fn
module named there). A record whose values (or keys) are Python, shell, str.format or template
code goes through every command that takes records, as a real subprocess in a scratch
directory, and nothing runs: no marker file appears, and the values come out as they went in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage
from tests.contract.test_contract import AGGREGATE, SPECS, STDIN_OPS, argv
from tests.security.conftest import CODE_STRINGS

#: a key that is itself code, carried by every record
CODE_KEY = "__import__('os').system('touch PWNED')"


def payload_records(base: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, code in enumerate(CODE_STRINGS):
        record = {
            **base,
            "id": f"r{i}:{code}",
            "text": f"{code} and some words after it",
            "query": code,
            "prompt": code,
            "answer": code,
            "gold": code,
            "metadata": {"title": code, "path": code},
            CODE_KEY: code,
        }
        if "docs" in base:
            record["docs"] = [{"id": code, "text": code, "score": 0.5, "rank": 1}]
        out.append(record)
    return out


def assert_nothing_ran(cwd: Path) -> None:
    leftovers = sorted(p.name for p in cwd.iterdir())
    assert not any("PWNED" in name for name in leftovers), leftovers


def command_argv(path: str, tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    """The contract test's argv, with the tiny models where a command loads one."""
    if path == "retrieve":
        index = tmp_path / "index"
        built = run_sage(
            "index",
            "build",
            str(index),
            input=ndjson([{"id": "a", "text": "the cat sits on the mat"}]),
            env=env(tmp_path, tiny_model_dir),
        )
        assert built.returncode == 0, built.stderr
        return ["retrieve", "--index", str(index)]
    if path == "generate":
        return ["generate", "--model", str(tiny_model_dir / "tiny-llama.gguf"), "--max-tokens", "4"]
    return argv(path, tmp_path)


def env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    return clean_env(SAGE_MODEL_DIR=str(tiny_model_dir), SAGE_CACHE_DIR=str(tmp_path / "cache"))


@pytest.mark.parametrize("path", STDIN_OPS, ids=[p.replace(" ", "-") for p in STDIN_OPS])
def test_code_in_records_is_never_run(path, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    work.mkdir()
    args = command_argv(path, tmp_path, tiny_model_dir)
    records = payload_records(SPECS[path].record)
    result = run_sage(
        *args, input=ndjson(records), env=env(tmp_path, tiny_model_dir), cwd=work, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert_nothing_ran(work)
    if SPECS[path].shape == AGGREGATE:
        return
    out = parse_ndjson(result.stdout)
    assert out, "no output"
    by_id = {r["id"]: r for r in records}
    for r in out:
        source = by_id.get(r.get("id")) or by_id.get(r.get("parent_id"))
        assert source is not None, r
        assert r[CODE_KEY] == source[CODE_KEY]  # passed through, byte for byte
        assert source["metadata"].items() <= r["metadata"].items()


@pytest.mark.parametrize(
    "args",
    [
        ["map", 'r | {"copy": r["query"], "n": len(r["text"])}'],
        ["filter", 'isinstance(r["query"], str)'],
        ["flatmap", '[r["query"], {"q": r["query"]}]'],
    ],
)
def test_expressions_read_record_values_without_evaluating_them(args, tmp_path):
    records = payload_records({})
    result = run_sage(*args, input=ndjson(records), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_nothing_ran(tmp_path)
    out = parse_ndjson(result.stdout)
    values = [r.get("copy") or r.get("q") or r.get("text") or r.get("query") for r in out]
    assert set(CODE_STRINGS) <= set(values) | {r.get("query") for r in out}


def test_source_reads_code_as_text(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("\n".join(CODE_STRINGS))
    (data / "b.ndjson").write_bytes(ndjson(payload_records({})))
    (data / "c.csv").write_text('text\n"$(touch PWNED)"\n"=cmd|\' /C calc\'!A0"\n')
    work = tmp_path / "work"
    work.mkdir()
    for args in (["source", str(data)], ["source", "-R", str(data / "a.txt")]):
        result = run_sage(*args, cwd=work)
        assert result.returncode == 0, result.stderr
        texts = "\n".join(r.get("text", "") for r in parse_ndjson(result.stdout))
        assert "$(touch PWNED)" in texts and "{{7*7}}" in texts and "49" not in texts
    assert_nothing_ran(work)


@pytest.mark.parametrize("code", CODE_STRINGS)
def test_prompt_inserts_values_literally_once(code, tmp_path):
    """The template is parsed once from the command line; a value that looks like a
    placeholder is text in the prompt, never a second template."""
    template = tmp_path / "t.txt"
    template.write_text("Q: {query}\nT: {metadata[title]}\n")
    record = {"query": code, "metadata": {"title": "{query}"}}
    result = run_sage("prompt", "--template", str(template), input=ndjson([record]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (out,) = parse_ndjson(result.stdout)
    assert out["prompt"] == f"Q: {code}\nT: {{query}}"
    assert "<class" not in out["prompt"] and "49" not in out["prompt"]
    assert_nothing_ran(tmp_path)


@pytest.mark.parametrize(
    "placeholder", ["{query.__class__}", "{query!r}", "{}", "{query:>{__import__}}"]
)
def test_templates_cannot_reach_attributes(placeholder, tmp_path):
    template = tmp_path / "t.txt"
    template.write_text(f"x {placeholder}")
    result = run_sage("prompt", "--template", str(template), input=ndjson([{"query": "q"}]))
    assert result.returncode == 2
    assert result.stderr.count(b"\n") == 1


def test_expression_sandbox_is_plain_python_on_purpose(tmp_path):
    """The expression IS code (from the command line): it can import and touch files. This
    test pins that down, so the docs' claim ('not a sandbox') stays true."""
    result = run_sage(
        "map",
        "__import__('pathlib').Path('MADE-BY-EXPRESSION').touch() or r",
        input=ndjson([{"x": 1}]),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "MADE-BY-EXPRESSION").exists()


def test_fn_module_is_imported_only_when_named(tmp_path):
    """A module file beside the data is never imported unless --fn names it."""
    (tmp_path / "evil.py").write_text("open('PWNED', 'w').close()\ndef f(r):\n    return r\n")
    records = ndjson([{"fn": "evil:f", "text": "evil:f"}])
    for args in (["map", "r"], ["filter", "True"], ["flatmap", "[r]"]):
        result = run_sage(*args, input=records, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert_nothing_ran(tmp_path)
    result = run_sage("map", "--fn", "evil:f", input=records, cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "PWNED").exists()  # named: it runs
    os.unlink(tmp_path / "PWNED")
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
