"""Rendering prompts from templates and records (`sage prompt`).

A template is plain text with `{placeholders}`, in the syntax of Python's `str.format` but
rendered by a restricted formatter: a placeholder names a record field (`{query}`, `{text}`)
or an item inside one (`{metadata[title]}`, `{docs[0][text]}`), nothing else. Attribute access
(`{r.__class__}`), positional fields (`{}`), conversions (`!r`) and format specs (`:>10`) are
refused when the template is loaded, and values are looked up with plain dict/list indexing,
so nothing in a record (or a template) can run code. `{{` and `}}` are literal braces.

`{context}` is special (unless the record has a `context` field of its own): the record's `docs`, numbered (`[1] text`, a blank line between), cut
to a token budget so the whole prompt fits the model's context. The budget is
`n_ctx - reserve - (the rest of the prompt)`, and at most `context_tokens` when given. Tokens
are estimated without a model (`estimate_tokens`): the larger of the word-and-punctuation count
of `operators.tokenize.count_tokens` and UTF-8 bytes / 4, which errs on the long side for
SmolLM2's tokenizer on English; `sage generate` re-checks with the real tokenizer. Documents are
kept whole in order while they fit; the first that does not is cut at a word boundary (marked
`...`) and the rest are dropped. A record whose context was cut gets `prompt_truncated: true`
and a message in `_warnings` (a list of strings, appended to).

A record gets `prompt` (the rendered text) and `messages` (chat messages: an optional
`system` message, then the `user` message holding the prompt).
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any

from .base import Operator, OptionError, Record, RecordError, add_warning
from .tokenize import count_tokens

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
#: tokens the chat template itself adds around the messages (role markers, a default system
#: prompt when none is given)
CHAT_OVERHEAD = 32
#: a document is cut short rather than dropped when at least this many tokens are left for it
MIN_PARTIAL_TOKENS = 16
TRUNCATION_MARK = " ..."

_FIELD = re.compile(r"^([^.\[\]]+)((?:\[[^\[\]]*\])*)$")
_INDEX = re.compile(r"\[([^\[\]]*)\]")
_LIST_INDEX = re.compile(r"-?[0-9]+")


def builtin_templates() -> list[str]:
    """Names of the templates that ship with sage (`operators/templates/*.txt`)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def estimate_tokens(text: str) -> int:
    """Tokens `text` is likely to take in a subword model, estimated without one."""
    if not text:
        return 0
    return max(count_tokens(text), math.ceil(len(text.encode("utf-8")) / 4))


# -- templates --------------------------------------------------------------------------------


FieldPath = tuple[str, tuple[str, ...]]
Part = tuple[str, FieldPath | None]


def parse_field(field: str, where: str) -> FieldPath:
    """`metadata[title]` -> ("metadata", ("title",)); anything else is an OptionError."""
    if field == "":
        raise OptionError(f"{where}: empty placeholder {{}}; name a record field, e.g. {{query}}")
    match = _FIELD.match(field)
    if match is None or "." in field.split("[", 1)[0]:
        raise OptionError(
            f"{where}: placeholder {{{field}}} is not allowed: use a field name and [key] "
            "items only, e.g. {query} or {metadata[title]} (no attribute access)"
        )
    return match.group(1), tuple(_INDEX.findall(match.group(2)))


def parse_template(text: str, where: str = "template") -> list[Part]:
    """Split a template into (literal text, field or None) parts, checking every placeholder."""
    try:
        raw = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise OptionError(
            f"{where}: malformed template: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    parts: list[Part] = []
    for literal, field, spec, conversion in raw:
        if field is None:
            parts.append((literal, None))
            continue
        if conversion or spec:
            raise OptionError(
                f"{where}: placeholder {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}: conversions and format specs are not supported"
            )
        parts.append((literal, parse_field(field, where)))
    return parts


def load_template(name_or_file: str) -> tuple[str, str]:
    """The text of a built-in template (`qa`) or of a template file, and a label for it."""
    builtin = TEMPLATE_DIR / f"{name_or_file}.txt"
    if "/" not in name_or_file and builtin.is_file():
        return builtin.read_text(encoding="utf-8"), f"template {name_or_file}"
    path = Path(name_or_file).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), f"template {path}"
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionError(f"cannot read template {path}: {exc}") from None
    names = ", ".join(builtin_templates())
    raise OptionError(f"no template {name_or_file!r}: use one of {names} or a template file")


def _display(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def lookup(record: Record, path: FieldPath) -> Any:
    """The value a placeholder names, by dict/list indexing only; RecordError when absent."""
    name, keys = path
    shown = name
    if name not in record:
        have = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
        raise RecordError(
            f"template field {{{name}}}: record has no {name!r} field (fields: {have})"
        )
    value = record[name]
    for key in keys:
        shown += f"[{key}]"
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif (
            isinstance(value, list)
            and _LIST_INDEX.fullmatch(key)  # not str.isdigit: `--5`, `²` (found by fuzzing)
            and -len(value) <= int(key) < len(value)
        ):
            value = value[int(key)]
        else:
            raise RecordError(f"template field {{{shown}}}: not found in the record")
    return value


# -- context ----------------------------------------------------------------------------------


def doc_text(doc: Any, i: int) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict):
        for key in ("text", "content"):
            if isinstance(doc.get(key), str):
                return doc[key]
    raise RecordError(f"docs[{i}] has no 'text' (a hit must be a string or carry 'text')")


def _cut(text: str, budget: int) -> str:
    """The longest prefix of `text`, ending at a word boundary, that fits in `budget` tokens."""
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens(" ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]).rstrip()


def build_context(docs: list[Any], budget: int) -> tuple[str, int, bool]:
    """Numbered documents within `budget` tokens: (text, documents used, truncated?)."""
    entries: list[str] = []
    used = 0
    for i, doc in enumerate(docs):
        text = " ".join(doc_text(doc, i).split())
        entry = f"[{i + 1}] {text}"
        cost = estimate_tokens(entry) + 1
        if used + cost <= budget:
            entries.append(entry)
            used += cost
            continue
        left = budget - used - estimate_tokens(f"[{i + 1}]" + TRUNCATION_MARK) - 1
        if left >= MIN_PARTIAL_TOKENS:
            partial = _cut(text, left)
            if partial:
                entries.append(f"[{i + 1}] {partial}{TRUNCATION_MARK}")
        return "\n\n".join(entries), len(entries), True
    return "\n\n".join(entries), len(entries), False


# -- the operator -----------------------------------------------------------------------------


class Prompt(Operator):
    """Render `prompt` and chat `messages` from a template and each record."""

    name = "prompt"
    produces = {
        "prompt": {"type": "string"},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
        },
        "prompt_truncated": {"type": "boolean", "description": "the context was cut to fit"},
        "_warnings": {"type": "array", "items": {"type": "string"}},
    }
    default_batch_size = 256

    def __init__(
        self,
        template: str = "qa",
        *,
        template_text: str | None = None,
        system: str | None = None,
        n_ctx: int = 2048,
        reserve: int = 256,
        context_tokens: int | None = None,
    ) -> None:
        if template_text is None:
            template_text, self.label = load_template(template)
        else:
            self.label = "template"
        if template_text.endswith("\n"):  # the file's final newline is not part of the prompt
            template_text = template_text[:-1]
        self.parts = parse_template(template_text, self.label)
        if n_ctx < 16:
            raise OptionError(f"--n-ctx must be at least 16, got {n_ctx}")
        if reserve < 0 or reserve >= n_ctx:
            raise OptionError(f"--reserve must be between 0 and --n-ctx ({n_ctx}), got {reserve}")
        if context_tokens is not None and context_tokens < 0:
            raise OptionError(f"--context-tokens must be positive, got {context_tokens}")
        self.system = system
        self.n_ctx = n_ctx
        self.reserve = reserve
        self.context_tokens = context_tokens
        fields = {p[0] for _, p in self.parts if p is not None}
        requires: dict[str, dict[str, Any]] = {n: {} for n in sorted(fields - {"context"})}
        if "context" in fields:
            requires["docs"] = {"type": "array"}
        if "query" in fields:
            requires["query"] = {"type": "string", "minLength": 1}
        setattr(self, "requires", requires)  # noqa: B010 - what this template needs (--schema)

    def render(self, record: Record) -> Record:
        values: list[str | None] = []  # None marks where the context goes
        docs: list[Any] | None = None
        for _, path in self.parts:
            if path is None:
                continue
            if path == ("context", ()) and "context" not in record:
                docs = lookup(record, ("docs", ()))  # raises, naming `docs`, when absent
                if not isinstance(docs, list):
                    raise RecordError(f"field 'docs' must be a list, got {type(docs).__name__}")
                values.append(None)
                continue
            value = lookup(record, path)
            if path == ("query", ()) and (not isinstance(value, str) or not value.strip()):
                raise RecordError(
                    "field 'query' is empty"
                    if isinstance(value, str)
                    else f"field 'query' must be str, got {type(value).__name__}"
                )
            try:
                values.append(_display(value))
            except (RecursionError, TypeError, ValueError) as exc:  # found by fuzzing
                raise RecordError(
                    f"template field {{{path[0]}{''.join(f'[{k}]' for k in path[1])}}}: "
                    f"cannot be shown as text ({type(exc).__name__}: {exc})"
                ) from None
        out = dict(record)
        context = ""
        truncated = False
        if docs is not None:
            skeleton = self._join(values, "")
            fixed = estimate_tokens(skeleton) + CHAT_OVERHEAD + estimate_tokens(self.system or "")
            budget = self.n_ctx - self.reserve - fixed
            if self.context_tokens is not None:
                budget = min(budget, self.context_tokens)
            context, kept, truncated = build_context(docs, max(budget, 0))
            if truncated:
                add_warning(
                    out,
                    f"prompt: context cut to {max(budget, 0)} tokens, {kept} of {len(docs)} "
                    f"documents kept (n_ctx {self.n_ctx}, {self.reserve} reserved for the "
                    "answer)",
                )
        text = self._join(values, context)
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": text})
        out["prompt"] = text
        out["messages"] = messages
        out["prompt_truncated"] = truncated or bool(record.get("prompt_truncated"))
        return out

    def _join(self, values: list[str | None], context: str) -> str:
        pieces: list[str] = []
        it = iter(values)
        for literal, path in self.parts:
            pieces.append(literal)
            if path is not None:
                value = next(it)
                pieces.append(context if value is None else value)
        return "".join(pieces)

    def process(self, batch: list[Record]) -> list[Record]:
        return [self.render(record) for record in batch]
