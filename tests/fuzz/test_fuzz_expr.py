"""Fuzzing the expression compiler of map/filter/flatmap (operators/expr.py).

- any text: `compile_expression` gives a plain lambda of `r` or an OptionError (exit 2, one
  line), and nothing in the text runs while it compiles;
- expressions from a grammar (tests/fuzz/expressions.py) on any JSON record: Map, Filter and
  FlatMap give records or a RecordError, never another exception; through `sage map|filter|
  flatmap` the stage ends 0, or 65 with one `stdin:LINE` line on stderr;
- record content is data, never code: records full of Python, format strings and shell syntax go
  through every expression without any of it running.

Expressions are code the user writes on their own command line (like `python -c` or awk): there
is no sandbox, by design, and none is claimed. What is checked is that nothing else becomes code.
"""

from __future__ import annotations

import json
import os
import types

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.expr import Filter, FlatMap, Map, compile_expression
from sage_cli.operators.ndjson import printable
from tests.conftest import Cli, ndjson
from tests.fuzz.conftest import examples
from tests.fuzz.expressions import build
from tests.fuzz.strategies import json_values

CLI = Cli()
#: Python's "perhaps you missed a comma?" on odd grammar expressions: expected, not news
pytestmark = pytest.mark.filterwarnings("ignore::SyntaxWarning")

strings = st.text(max_size=20) | st.sampled_from(
    ["a", "10", "2.5", "__class__", "{0.__class__}", "[1, 2]", '{"a": 1}']
)
keys = st.sampled_from(["a", "b", "text", "id", "docs", "metadata", "_error", "é"]) | st.text(
    max_size=8
)
records = st.dictionaries(keys, json_values(strings, max_leaves=8), max_size=6)
#: text that is often almost Python: brackets, quotes, operators, keywords, names around `r`
pythonish = st.lists(
    st.sampled_from(
        [
            "r",
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            "'",
            '"',
            ",",
            ":",
            " ",
            "\n",
            "#",
            "\\",
            ".",
            "1",
            "+",
            "*",
            "**",
            "lambda",
            "yield",
            "await",
            "for",
            "in",
            "if",
            "else",
            "__import__",
            "__class__",
            "os",
            "f'",
            "{r}",
            ")(",
            "), (",
            ":=",
            "\x00",
            "\udc80",
            "é",
            "	",
        ]
    ),
    max_size=20,
).map("".join)
any_text = st.text(max_size=200) | pythonish


@st.composite
def expressions(draw: st.DrawFn) -> str:
    return build(lambda n: draw(st.integers(min_value=0, max_value=n - 1)))


# -- compiling any text ------------------------------------------------------------------------


def compiled_or_option_error(text: str) -> types.FunctionType | None:
    try:
        func = compile_expression(text)
    except OptionError as exc:
        message = str(exc)
        assert message and printable(message) == message, repr(message)
        assert len(message) < 400, "the message quotes an excerpt, not the whole expression"
        return None
    assert isinstance(func, types.FunctionType) and func.__name__ == "<lambda>", func
    assert func.__code__.co_varnames[:1] == ("r",) and func.__code__.co_argcount == 1
    return func


@given(any_text)
@example("1), (2")
@example("r)(")
@example("yield r")
@example("(" + "-" * 100_000 + "1)")
@example("(" * 300 + ")" * 300)
@example('"\udc80"')
@example("r\x00")
@example("1" * 5000)
def test_any_text_compiles_to_a_lambda_of_r_or_an_option_error(text):
    compiled_or_option_error(text)


CANARY = "SAGE_FUZZ_CANARY"


@pytest.mark.parametrize(
    "text",
    [
        f"0), __import__('os').environ.__setitem__('{CANARY}', '1'), (0",
        f"0)if __import__('os').environ.__setitem__('{CANARY}', '1') else(0",
        f"r)[0]; __import__('os').environ.__setitem__('{CANARY}', '1'); (r",
    ],
)
def test_regression_text_that_closes_the_lambda_early_is_refused_before_anything_runs(text):
    """Found by the fuzzer: the text was pasted into `lambda r: (TEXT)`, so `1), (2` compiled
    to a tuple (the map then failed on every record with "'tuple' object is not callable") and
    code after the `)` ran once at start-up, outside any record."""
    os.environ.pop(CANARY, None)
    func = compiled_or_option_error(text)
    assert CANARY not in os.environ
    if func is not None:  # the `if` form is one lambda: harmless, runs only per record
        assert func({}) in (0, None)


def test_regression_bad_argv_bytes_and_deep_nesting_are_option_errors():
    """Found by the fuzzer: a lone surrogate (argv bytes that are not UTF-8) raised
    UnicodeEncodeError and deep nesting MemoryError, both exit 1 instead of exit 2."""
    with pytest.raises(OptionError, match="not valid UTF-8"):
        compile_expression('"\udcff"')
    with pytest.raises(OptionError, match="nested too deeply"):
        compile_expression("(" + "-" * 100_000 + "1)")
    with pytest.raises(OptionError, match="unbalanced brackets"):
        compile_expression("1), (2")


# -- running grammar expressions on any record -------------------------------------------------


def run_operator(op, record):
    try:
        out = op.process([dict(record)])
    except RecordError as exc:
        assert str(exc), "a record error says what went wrong"
        return None
    assert isinstance(out, list) and all(type(r) is dict for r in out), out
    return out


@given(expressions(), records)
@example("r['text'].lower()", {"text": 1})
@example("{r.get('a'): 1}", {"a": [1]})
def test_map_filter_flatmap_give_records_or_a_record_error(expr, record):
    assert compiled_or_option_error(expr) is not None  # the grammar writes valid syntax
    out = run_operator(Map(expr), record)
    if out is not None:
        assert len(out) == 1
    kept = run_operator(Filter(expr), record)
    if kept is not None:
        assert kept in ([], [record])
    run_operator(FlatMap(expr), record)


@settings(max_examples=examples(40))
@given(st.sampled_from(["map", "filter", "flatmap"]), expressions(), st.lists(records, max_size=5))
@example("map", "{r.get('a'): 1}", [{"a": 1}, {"a": [1]}])
@example("map", "r.get('a')", [{"a": {}}, {"a": 1}])
def test_command_ends_0_or_65_with_one_line(verb, expr, recs):
    result = CLI(verb, "--", expr, input=ndjson(recs))
    assert "Traceback" not in result.stderr
    # Python's own SyntaxWarnings on the expression ("perhaps you missed a comma?") may come first
    warnings = [ln for ln in result.stderr.splitlines(True) if "SyntaxWarning: " in ln]
    err = result.stderr[sum(map(len, warnings)) :]
    if result.exit_code == 0:
        assert err == ""
        out = [orjson.loads(line) for line in result.stdout_bytes.splitlines()]
        assert all(type(r) is dict for r in out)
        if verb == "filter":
            assert all(r in recs for r in out)
        return
    assert result.exit_code == 65, (result.exit_code, result.stderr)
    assert err.startswith(f"sage {verb}: error: stdin:") and err.endswith("\n"), err
    assert printable(err[:-1]) == err[:-1], f"one line, no control characters: {err!r}"


@pytest.mark.parametrize(
    ("expr", "written"),
    [
        ("{1: r['a'], None: 2}", {"1": 1, "None": 2}),
        (
            "{'big': 2**70, 'nan': float('nan'), 'vast': 10**5000}",
            {"big": 2.0**70, "nan": None, "vast": None},
        ),
        ("{'\\udc80': 'a\\ud800'}", {"\ufffd": "a\ufffd"}),
        ("{(1, 2): r}", {"(1, 2)": {"a": 1}}),
    ],
)
def test_regression_map_results_orjson_refuses_are_written_not_a_crash(expr, written):
    """Found by the fuzzer: a map result with a non-string key, an integer beyond 64 bits or a
    lone surrogate stopped the stage with exit 1 (`TypeError: Dict key must be str`) after the
    record was processed; the writer now makes them writable, as it does for other values."""
    result = CLI("map", expr, input=ndjson([{"a": 1}]))
    assert result.exit_code == 0, result.stderr
    assert orjson.loads(result.stdout_bytes) == written


def test_regression_a_record_that_holds_itself_is_written_cut_short():
    result = CLI("map", "(r.__setitem__('me', r), r)[1]", input=ndjson([{"a": 1}]))
    assert result.exit_code == 0, result.stderr
    out = result.stdout_bytes
    assert out.startswith(b'{"a":1,"me":' * 1100 + b'"..."') and out.endswith(b"}\n")


@pytest.mark.parametrize("depth", [254, 600, 1023])
def test_regression_records_nested_deeper_than_orjson_writes_pass_through(tmp_path, depth):
    """Found by the fuzzer: orjson reads 1024 levels but writes 254, so `sage map r` on a record
    nested 255-1024 deep read it and then stopped with exit 1 (TypeError: Recursion limit
    reached). Such records now go out through the standard library, unchanged."""
    line = b'{"a":' + b"[" * depth + b"]" * depth + b"}\n"
    src = tmp_path / "deep.ndjson"
    src.write_bytes(line + b'{"b":1}\n')
    result = CLI("map", "r", str(src))
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == line + b'{"b":1}\n'


def test_regression_a_record_value_quoted_by_an_exception_stays_on_one_line():
    """Found by the fuzzer: `getattr(r, r["a"])` fails with AttributeError quoting the value,
    newline and ANSI escape included, which split the one-line error and coloured the
    terminal; `fail` now escapes them."""
    result = CLI("map", 'getattr(r, r["a"])', input=ndjson([{"a": "x\ny\x1b[31mRED"}]))
    assert result.exit_code == 65
    assert result.stderr.count("\n") == 1
    assert "'x\\x0ay\\x1b[31mRED'" in result.stderr


# -- record content is never code ---------------------------------------------------------------

PAYLOADS = [
    f"__import__('os').environ.__setitem__('{CANARY}', '1')",
    f"exec(\"__import__('os').environ['{CANARY}'] = '1'\")",
    "{0.__class__.__init__.__globals__}",
    "{r.__class__}",
    "%(text)s %s %n",
    f"$({CANARY}=1) `touch {CANARY}` ; export {CANARY}=1",
    "\x1b]0;title\x07\x1b[2J",
]
payload_records = st.fixed_dictionaries(
    {"text": st.sampled_from(PAYLOADS), "a": st.sampled_from(PAYLOADS)},
    optional={"b": st.lists(st.sampled_from(PAYLOADS), max_size=2)},
)


@given(expressions(), payload_records)
@example("str(r)", {"text": PAYLOADS[0], "a": PAYLOADS[2]})
@example("f'{r[\"text\"]}'", {"text": PAYLOADS[3], "a": PAYLOADS[1]})
def test_record_content_never_runs(expr, record):
    os.environ.pop(CANARY, None)
    for op in (Map(expr), Filter(expr), FlatMap(expr)):
        run_operator(op, record)
    assert CANARY not in os.environ
    assert not os.path.exists(CANARY)


def test_payloads_pass_through_the_command_as_data():
    recs = [{"text": p, "a": p} for p in PAYLOADS]
    result = CLI("map", 'r | {"copy": r["text"]}', input=ndjson(recs))
    assert result.exit_code == 0, result.stderr
    out = [orjson.loads(line) for line in result.stdout_bytes.splitlines()]
    assert out == [r | {"copy": r["text"]} for r in recs]
    assert CANARY not in os.environ


def test_regression_a_deep_record_that_fails_reaches_the_dead_letter_file(tmp_path):
    """The same limit in `--errors FILE`: the dead letter of a record nested 300 deep was lost
    (exit 1, TypeError) instead of written."""
    line = b'{"a":' + b"[" * 300 + b"]" * 300 + b"}"
    src, dead = tmp_path / "deep.ndjson", tmp_path / "dead.ndjson"
    src.write_bytes(line + b"\n")
    result = CLI("map", 'r["zz"]', "--errors", str(dead), str(src))
    assert result.exit_code == 65, result.stderr
    entry = json.loads(dead.read_bytes())  # the stdlib reads any depth orjson writes
    assert entry["line"] == 1 and entry["origin"] == str(src) and "KeyError" in entry["error"]
    assert entry["raw"] == json.loads(line)
