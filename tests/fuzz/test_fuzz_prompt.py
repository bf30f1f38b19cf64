"""Fuzzing prompt templates (operators/prompt.py, operators/templates/).

- any template text: a template (its parts) or an OptionError (exit 2, one line);
- any template and any record: a prompt or a RecordError, nothing else;
- record content is never template syntax: a template built from literal text and placeholders
  renders to exactly the literals and the values, whatever the values hold (`{0.__class__}`,
  `{query}`, `{{`, `%s`, ...), and the documents of `{context}` are inserted as they are;
- `{context}` fits: the prompt's estimated tokens plus the chat overhead stay within
  `n_ctx - reserve` whenever the rest of the prompt leaves room, and within `--context-tokens`.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.prompt import (
    CHAT_OVERHEAD,
    Prompt,
    builtin_templates,
    estimate_tokens,
    load_template,
    parse_template,
)
from tests.conftest import Cli, ndjson
from tests.fuzz.conftest import examples
from tests.fuzz.strategies import json_values

CLI = Cli()

#: values that would do something if a record's content were read as a template
NASTY = [
    "{0.__class__}",
    "{r.__class__.__init__.__globals__}",
    "{query}",
    "{context}",
    "{{",
    "}}",
    "{",
    "}",
    "%s %(text)s",
    "${HOME}",
    "{docs[0][text]}",
    "{text!r:>10}",
]
text_values = st.text(max_size=30) | st.sampled_from(NASTY)
any_json = json_values(text_values, max_leaves=8)
docs = st.lists(
    st.one_of(
        text_values,
        st.fixed_dictionaries({"text": text_values}),
        st.fixed_dictionaries({"content": text_values, "id": st.integers(-(2**63), 2**63 - 1)}),
        any_json,
    ),
    max_size=6,
)
FIELDS = ["query", "text", "a", "b", "context", "metadata"]
records = st.fixed_dictionaries(
    {},
    optional={
        "query": text_values | any_json,
        "text": text_values,
        "a": any_json,
        "b": text_values,
        "docs": docs | any_json,
        "metadata": st.dictionaries(st.sampled_from(["title", "0", "x"]), any_json),
    },
)
#: text that is often almost a template: braces, brackets, conversions, names
templatish = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "{{",
            "}}",
            "[",
            "]",
            "!",
            ":",
            ".",
            "0",
            "query",
            "text",
            "a",
            "context",
            "metadata",
            "title",
            "__class__",
            " ",
            "\n",
            "r",
            "s",
            ">10",
            "{}",
            "é",
            "-",
            "²",
            "docs",
        ]
    ),
    max_size=25,
).map("".join)
any_template = st.text(max_size=120) | templatish


def literal(text: str) -> str:
    """`text` written into a template so that it renders as itself."""
    return text.replace("{", "{{").replace("}", "}}")


def shown(value) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value, ensure_ascii=False)


# -- any template text --------------------------------------------------------------------------


@given(any_template)
@example("{0.__class__}")
@example("{a.b}")
@example("{a!r}")
@example("{a:{b}}")
@example("{}")
@example("{a[}")
@example("{a[0]]}")
@example("}{")
def test_any_template_text_parses_or_is_an_option_error(text):
    try:
        parts = parse_template(text)
    except OptionError as exc:
        assert str(exc).startswith("template: ")
        return
    for lit, path in parts:
        assert isinstance(lit, str)
        if path is not None:
            name, keys = path
            assert name and "." not in name and "[" not in name and "]" not in name
            assert all("[" not in k and "]" not in k for k in keys)


@given(any_template, records)
def test_any_template_on_any_record_is_a_prompt_or_a_record_error(text, record):
    try:
        op = Prompt(template_text=text)
    except OptionError:
        return
    try:
        out = op.process([record])
    except RecordError as exc:
        assert str(exc)
        return
    assert len(out) == 1 and isinstance(out[0]["prompt"], str)
    assert out[0]["messages"][-1] == {"role": "user", "content": out[0]["prompt"]}
    orjson.dumps(out[0])


# -- record content is never template syntax ----------------------------------------------------


@st.composite
def template_and_record(draw: st.DrawFn):
    """A template of literal text and plain placeholders, a record with a value for each, and
    the prompt that must come out: the literals and the values, verbatim."""
    pieces = draw(
        st.lists(
            st.one_of(
                text_values.map(lambda t: ("lit", t)),
                st.sampled_from(FIELDS[1:4]).map(lambda f: ("field", f)),
            ),
            max_size=8,
        )
    )
    record = draw(st.fixed_dictionaries({"text": text_values, "a": any_json, "b": text_values}))
    template = "".join(literal(v) if kind == "lit" else "{" + v + "}" for kind, v in pieces)
    expected = "".join(v if kind == "lit" else shown(record[v]) for kind, v in pieces)
    return template, record, expected


@given(template_and_record())
@example(
    ("Q: {text} {{x}}", {"text": "{0.__class__}", "a": 1, "b": "{text}"}, "Q: {0.__class__} {x}")
)
def test_record_values_are_inserted_verbatim(case):
    template, record, expected = case
    assume(not template.endswith("\n"))  # a template file's final newline is dropped
    (out,) = Prompt(template_text=template).process([record])
    assert out["prompt"] == expected
    for key, value in record.items():
        assert out[key] == value  # passed through untouched


@given(st.lists(text_values, min_size=1, max_size=5), text_values)
def test_documents_are_inserted_verbatim_in_the_context(texts, query):
    assume(query.strip())
    record = {"query": query, "docs": [{"text": t} for t in texts]}
    (out,) = Prompt(template_text="{query}|{context}", n_ctx=100_000).process([record])
    context = "\n\n".join(f"[{i}] {' '.join(t.split())}" for i, t in enumerate(texts, 1))
    assert out["prompt"] == f"{query}|{context}"
    assert out["prompt_truncated"] is False


@given(st.sampled_from(builtin_templates()), records)
def test_builtin_templates_on_any_record(name, record):
    op = Prompt(name)
    try:
        (out,) = op.process([record])
    except RecordError:
        return
    for _, path in parse_template(load_template(name)[0]):
        if path is not None and path != ("context", ()) and isinstance(record[path[0]], str):
            assert record[path[0]] in out["prompt"]  # a value shows up as itself


# -- the context fits ---------------------------------------------------------------------------


@given(
    docs=st.lists(
        st.text(max_size=300) | st.sampled_from(["word " * 80, "長" * 200, "x" * 500]), max_size=8
    ),
    n_ctx=st.integers(min_value=16, max_value=1200),
    reserve=st.integers(min_value=0, max_value=300),
    context_tokens=st.none() | st.integers(min_value=0, max_value=400),
    head=text_values,
    system=st.none() | st.text(max_size=40),
)
def test_context_is_cut_to_fit(docs, n_ctx, reserve, context_tokens, head, system):
    assume(reserve < n_ctx)
    op = Prompt(
        template_text=literal(head) + "{context}",
        n_ctx=n_ctx,
        reserve=reserve,
        context_tokens=context_tokens,
        system=system,
    )
    (out,) = op.process([{"docs": docs}])
    fixed = estimate_tokens(head) + CHAT_OVERHEAD + estimate_tokens(system or "")
    budget = max(n_ctx - reserve - fixed, 0)
    if context_tokens is not None:
        budget = min(budget, context_tokens)
    context = out["prompt"][len(head) :]
    assert out["prompt"].startswith(head)
    assert estimate_tokens(context) <= budget, (context, budget)
    if not out["prompt_truncated"]:
        assert context.count("\n\n") == max(len(docs) - 1, 0)


# -- the command ----------------------------------------------------------------------------------


@settings(max_examples=examples(30))
@given(st.lists(records, max_size=4), st.sampled_from(builtin_templates()))
def test_command_ends_0_or_65_with_one_line(recs, name):
    result = CLI("prompt", "--template", name, input=ndjson(recs))
    assert "Traceback" not in result.stderr
    if result.exit_code == 0:
        assert result.stderr == ""
        assert len(result.stdout_bytes.splitlines()) == len(recs)
        return
    assert result.exit_code == 65, (result.exit_code, result.stderr)
    assert result.stderr.startswith("sage prompt: error: stdin:")
    assert result.stderr.count("\n") == 1


def test_regression_a_deeply_nested_value_is_a_record_error(tmp_path):
    """Found by the fuzzer: a placeholder naming a value nested 1000+ deep (orjson reads up to
    1024) made json.dumps raise RecursionError: exit 1 instead of that record's error (65)."""
    deep = orjson.loads(b"[" * 1020 + b"]" * 1020)
    try:
        Prompt(template_text="x {a}").process([{"a": deep}])
    except RecordError as exc:
        assert "template field {a}: cannot be shown as text (RecursionError" in str(exc)
    else:
        raise AssertionError("a value nested 1020 deep was shown")
    template = tmp_path / "t.txt"
    template.write_text("x {a}\n")
    line = b'{"a":' + b"[" * 1020 + b"]" * 1020 + b"}\n"
    result = CLI("prompt", "--template", str(template), input=line)
    assert result.exit_code == 65, result.stderr
    assert result.stderr.startswith("sage prompt: error: stdin:1: template field {a}")


@pytest.mark.parametrize("key", ["--5", "²", "-", "+1", " 1", "1_0", "٣"])
def test_regression_a_list_index_that_is_not_an_integer_is_a_record_error(key):
    """Found by atheris (`{docs[--5]}`): a list index was checked with `key.lstrip("-").isdigit()`,
    true for `--5` and `²`, then `int(key)` raised ValueError: exit 1 instead of the record's
    error."""
    op = Prompt(template_text=f"{{docs[{key}]}}")
    with pytest.raises(RecordError, match="not found in the record"):
        op.process([{"docs": [1, 2, 3, 4, 5, 6]}])
    assert Prompt(template_text="{docs[-2]}").process([{"docs": [1, 2, 3]}])[0]["prompt"] == "2"
