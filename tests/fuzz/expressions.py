"""A grammar of map/filter/flatmap expressions over `r`, shared by the hypothesis properties
(tests/fuzz/test_fuzz_expr.py) and the atheris harness (tests/fuzz/harness/fuzz_expr.py).

`build(choose)` writes one expression; `choose(n)` picks a number in range(n) (hypothesis draws
it, atheris consumes it from the input bytes). Every expression it writes is valid syntax and
safe to run on any record: no `**`, no repetition by a record's value, no loops over anything
but the record's own values, so an expression can fail (that record's error) but never hang,
exhaust memory or touch the system.
"""

from __future__ import annotations

from collections.abc import Callable

Choose = Callable[[int], int]

KEYS = ["a", "b", "text", "id", "docs", "metadata", "_error", "", "k\n\"'{}", "é"]
CONSTANTS = ["0", "1", "-1", "2.5", "''", "'x'", "'{0.__class__}'", "None", "True", "[]", "{}"]
METHODS = [".lower()", ".split()", ".strip()", ".keys()", ".items()", ".get('a')", ".count('a')"]


def _key(choose: Choose) -> str:
    return repr(KEYS[choose(len(KEYS))])


def _leaf(choose: Choose) -> str:
    kind = choose(5)
    if kind == 0:
        return "r"
    if kind == 1:
        return f"r[{_key(choose)}]"
    if kind == 2:
        return f"r.get({_key(choose)})"
    if kind == 3:
        return CONSTANTS[choose(len(CONSTANTS))]
    return f"r.get({_key(choose)}, {CONSTANTS[choose(len(CONSTANTS))]})"


def build(choose: Choose, depth: int = 3) -> str:
    """One expression over `r` (see the module docstring for why it is safe to run)."""
    if depth <= 0:
        return _leaf(choose)
    sub = lambda: build(choose, depth - 1)  # noqa: E731
    kind = choose(30)
    if kind < 4:
        return _leaf(choose)
    forms: list[Callable[[], str]] = [
        lambda: f"len({sub()})",
        lambda: f"str({sub()})",
        lambda: f"int({sub()})",
        lambda: f"float({sub()})",
        lambda: f"({sub()} + {sub()})",
        lambda: f"({sub()} - {sub()})",
        lambda: f"({sub()} * 3)",
        lambda: f"({sub()} / {sub()})",
        lambda: f"({sub()} % {sub()})",
        lambda: f"({sub()} == {sub()})",
        lambda: f"({sub()} < {sub()})",
        lambda: f"({sub()} and {sub()})",
        lambda: f"(not {sub()})",
        lambda: f"({sub()} in {sub()})",
        lambda: f"({sub()})[{_key(choose)}]",
        lambda: f"({sub()})[{choose(5) - 2}]",
        lambda: f"({sub()})[1:]",
        lambda: f"({sub()}){METHODS[choose(len(METHODS))]}",
        lambda: f"{{{_key(choose)}: {sub()}}}",
        lambda: f"{{{sub()}: 1}}",
        lambda: f"[{sub()}, {sub()}]",
        lambda: f"(r | {{{_key(choose)}: {sub()}}})",
        lambda: f"json.dumps({sub()})",
        lambda: f"json.loads({sub()})",
        lambda: f"re.sub('a', 'b', {sub()})",
        lambda: f"sorted({sub()})",
        lambda: f"[x for x in {sub()}]",
        lambda: f"'{{}}'.format({sub()})",
        lambda: f"'%s' % ({sub()},)",
        lambda: f"({sub()} if {sub()} else {sub()})",
        lambda: f"dict({sub()})",
        lambda: f"getattr(r, str({sub()}), None)",
        lambda: f"getattr(r, str({sub()}))",
        lambda: f"math.floor({sub()})",
        lambda: f"max({sub()})",
    ]
    return forms[choose(len(forms))]()
