import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.prompt import (
    Prompt,
    build_context,
    builtin_templates,
    estimate_tokens,
    parse_template,
)

QA = {
    "id": "q1",
    "query": "What is the capital of France?",
    "docs": [{"id": "a", "text": "Paris is the capital of France."}, "Berlin is in Germany."],
    "keep": {"x": 1},
}


def test_builtin_templates_ship():
    assert {"qa", "summarize", "extract"} <= set(builtin_templates())


def test_qa_renders_numbered_context_and_messages():
    out = Prompt("qa", system="Be brief.").run([QA])[0]
    assert "[1] Paris is the capital of France.\n\n[2] Berlin is in Germany." in out["prompt"]
    assert "Question: What is the capital of France?" in out["prompt"]
    assert not out["prompt"].endswith("\n")
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": out["prompt"]},
    ]
    assert out["prompt_truncated"] is False and "_warnings" not in out
    assert out["keep"] == {"x": 1} and out["id"] == "q1"


def test_no_system_message_by_default():
    out = Prompt("qa").run([QA])[0]
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_fields_and_items():
    op = Prompt(template_text="{title} / {metadata[author]} / {tags[1]} / {n} / {{literal}}")
    out = op.run([{"title": "T", "metadata": {"author": "Ann"}, "tags": ["a", "b"], "n": 3}])
    assert out[0]["prompt"] == "T / Ann / b / 3 / {literal}"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"query": "q"}, "no 'docs' field"),
        ({"docs": []}, "no 'query' field"),
        ({"query": "  ", "docs": []}, "'query' is empty"),
        ({"query": "q", "docs": [{"id": 1}]}, r"docs\[0\] has no 'text'"),
        ({"query": "q", "docs": "nope"}, "'docs' must be a list"),
    ],
)
def test_missing_fields_are_record_errors_naming_the_field(record, message):
    with pytest.raises(RecordError, match=message):
        Prompt("qa").process([record])


def test_missing_nested_item_names_the_placeholder():
    with pytest.raises(RecordError, match=r"\{metadata\[title\]\}"):
        Prompt(template_text="{metadata[title]}").process([{"metadata": {}}])


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("x {a", "malformed template"),
        ("x } y", "malformed template"),
        ("{}", "empty placeholder"),
        ("{r.__class__}", "not allowed"),
        ("{r.__class__.__init__.__globals__}", "not allowed"),
        ("{a[b].c}", "not allowed"),
        ("{a!r}", "conversions and format specs"),
        ("{a:{b}}", "conversions and format specs"),
    ],
)
def test_bad_templates_are_option_errors(template, message):
    with pytest.raises(OptionError, match=message):
        Prompt(template_text=template)


def test_record_content_is_never_interpreted():
    evil = {"query": "{query.__class__} {0} {{x}}", "docs": ["{__import__('os')}"]}
    out = Prompt("qa").run([evil])[0]
    assert "{query.__class__} {0} {{x}}" in out["prompt"]
    assert "[1] {__import__('os')}" in out["prompt"]


def test_format_string_attack_on_values_is_refused_at_load():
    # in str.format this would walk to a module's globals; here it is a usage error
    with pytest.raises(OptionError):
        parse_template("{docs.__class__.__mro__[1].__subclasses__}")


def test_unknown_template_and_file_template(tmp_path):
    with pytest.raises(OptionError, match="use one of"):
        Prompt("nope")
    path = tmp_path / "t.txt"
    path.write_text("Q: {query}\n")
    assert Prompt(str(path)).run([{"query": "hi"}])[0]["prompt"] == "Q: hi"


def test_context_is_cut_to_the_budget_with_a_warning():
    long = " ".join(f"w{i}" for i in range(400))
    record = {"query": "q", "docs": ["short doc", long, "never reached"]}
    out = Prompt("qa", context_tokens=60).run([record])[0]
    assert out["prompt_truncated"] is True
    assert "[1] short doc" in out["prompt"] and "[2] w0 w1" in out["prompt"]
    assert "[3]" not in out["prompt"] and " ..." in out["prompt"]
    context = out["prompt"].split("Documents:\n", 1)[1].split("\n\nUsing only")[0]
    assert estimate_tokens(context) <= 60
    assert len(out["_warnings"]) == 1 and "2 of 3 documents" in out["_warnings"][0]


def test_n_ctx_and_reserve_bound_the_whole_prompt():
    docs = [" ".join(["lorem ipsum dolor sit amet"] * 40) for _ in range(20)]
    out = Prompt("qa", n_ctx=512, reserve=128).run([{"query": "q", "docs": docs}])[0]
    assert out["prompt_truncated"] is True
    assert estimate_tokens(out["prompt"]) <= 512 - 128
    fits = Prompt("qa", n_ctx=8192, reserve=128).run([{"query": "q", "docs": docs[:2]}])[0]
    assert fits["prompt_truncated"] is False


def test_existing_warnings_are_appended_to():
    record = {"query": "q", "docs": ["a " * 200], "_warnings": ["earlier"]}
    out = Prompt("qa", context_tokens=20).run([record])[0]
    assert out["_warnings"][0] == "earlier" and len(out["_warnings"]) == 2


def test_build_context_drops_tiny_remainders():
    text, kept, truncated = build_context(["a b c", "x " * 100], budget=8)
    assert (text, kept, truncated) == ("[1] a b c", 1, True)
    assert build_context([], 10) == ("", 0, False)


def test_bad_sizes():
    with pytest.raises(OptionError):
        Prompt("qa", n_ctx=100, reserve=100)


def test_schema_requires_template_fields():
    op = Prompt("qa")
    assert set(op.requires) == {"query", "docs"}
