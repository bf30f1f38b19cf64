"""Secrets out of what sage writes down: command lines and script text in run directories.

`sage run` records each stage's argv and text (run.json, events.ndjson, the stages' own trace
files, summary.json) so `sage trace` can show what ran. A command line can carry a secret: a URL
with `user:password@`, a `?api_key=` query parameter, a `TOKEN=...` prefix, a `--api-key VALUE`
option of a non-sage stage, an `Authorization: Bearer ...` header. These functions replace the
secret part with `***` and keep the rest readable. They are applied where argv or script text is
written (sage_cli/run/runner.py, supervisor.py, trace.py); keys read from the environment
(OPENAI_API_KEY) are never written at all.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"


class _Lazy:
    """A regular expression compiled on first use: every traced stage imports this module for
    its argv, and compiling all of them up front cost ~3 ms of each stage's start-up."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._args = (pattern, flags)
        self._re: re.Pattern[str] | None = None

    def __getattr__(self, name: str) -> Any:  # sub, match, fullmatch
        if self._re is None:
            self._re = re.compile(*self._args)
        return getattr(self._re, name)


#: characters a secret-bearing word needs (`=` of an assignment or query, `:` of a header, a URL
#: or `user:password`, `@` of a URL); a word with none of them, no space and no leading `-` is
#: left as it is without running the expressions below
_NEEDED = frozenset("=:@")


def _plain(word: str) -> bool:
    return word[:1] != "-" and _NEEDED.isdisjoint(word) and word.split() == [word]


#: a name that holds a secret, judged by its last part: OPENAI_API_KEY, api-key, MYKEY,
#: secretKey, x-auth-token, DB_PASSWORD, DB_PASS, GITHUB_PAT, client_secret; not `--key`
#: (dedupe's field, a bare "key"), `--max-tokens`, `--pdeathsig` or `bypass`
_SECRET_NAME = (
    r"(?:[A-Za-z0-9]+[_.-])*"
    r"(?:[A-Za-z0-9]*[A-Za-z0-9][_.-]?key|token|secret|passw(?:or)?d|pass(?:phrase)?|pwd|pat"
    r"|credentials?|auth|authorization|signature|sig)"
)
#: a query parameter that holds a secret: the names above, and `key` alone (`?key=...`)
_PARAM_NAME = r"(?:" + _SECRET_NAME + r"|key)"

_USERINFO = _Lazy(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#'\"]+@")
_QUERY = _Lazy(r"([?&;]" + _PARAM_NAME + r"=)[^&;#\s'\"]*", re.IGNORECASE)
_VALUE = r"""(?:'[^']*'|"[^"]*"|[^\s&;'"]+)"""
_ASSIGN = _Lazy(r"(?<![A-Za-z0-9_.-])(-{0,2}" + _SECRET_NAME + r"=)" + _VALUE, re.IGNORECASE)
_HEADER = _Lazy(
    r"(?<![A-Za-z0-9_.-])(" + _SECRET_NAME + r")(\s*:\s*)(?!(?:Bearer|Basic|Token)\s)[^\s'\"]+",
    re.IGNORECASE,
)
_BEARER = _Lazy(r"\b(Bearer|Basic|Token)(\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_OPTION = _Lazy(r"^-{1,2}" + _SECRET_NAME + r"$", re.IGNORECASE)
#: options whose value is `user:password` (curl -u, wget/curl --user, --proxy-user)
_USER_OPTION = _Lazy(r"^(?:-u|-U|--user|--proxy-user)$")
_USER_PASSWORD = _Lazy(r"^([^:\s]*):.+$", re.DOTALL)
_USER_ASSIGN = _Lazy(r"(?<![A-Za-z0-9_.-])(--(?:proxy-)?user=|-u)([^:\s'\"]*):[^\s'\"]+")


def redact_text(text: str) -> str:
    """`text` (a word or a line of a script) with every secret it visibly carries masked."""
    if not text:
        return text
    text = _USERINFO.sub(r"\1" + MASK + "@", text)
    text = _QUERY.sub(r"\1" + MASK, text)
    text = _BEARER.sub(r"\1\2" + MASK, text)
    text = _HEADER.sub(r"\1\2" + MASK, text)
    text = _USER_ASSIGN.sub(r"\1\2:" + MASK, text)
    return _ASSIGN.sub(r"\1" + MASK, text)


def redact_argv(argv: list[str]) -> list[str]:
    """A copy of `argv` with secrets masked, including the value after `--api-key`-like
    options (`--api-key VALUE`, `-H "Authorization: Bearer X"`)."""
    out: list[str] = []
    hide_next = hide_password = False
    for word in argv:
        if not (hide_next or hide_password) and _plain(word):
            out.append(word)  # no pattern can match it, and it is no option
            continue
        if hide_next:
            out.append(MASK)
        elif hide_password:
            out.append(_USER_PASSWORD.sub(r"\1:" + MASK, word))
        else:
            out.append(redact_text(word))
        hide_next = not hide_next and bool(_OPTION.match(word))
        hide_password = not hide_password and bool(_USER_OPTION.match(word))
    return out


def redact_words(text: str) -> str:
    """A line of script text: masks like `redact_text`, plus the word after a secret option."""
    text = redact_text(text)
    text = _USER_WORDS.sub(_mask_user_password, text)
    return re.sub(
        r"(?<!\S)(-{1,2}" + _SECRET_NAME + r")(\s+)(?!-)(\"[^\"]*\"|'[^']*'|\S+)",
        r"\1\2" + MASK,
        text,
        flags=re.IGNORECASE,
    )


#: `-u user:pw`, `-u 'user:pw w'`, `--user "user:pw"` in script text
_USER_WORDS = _Lazy(
    r"(?<!\S)(-u|-U|--user|--proxy-user)(\s+)"
    r"""(?:'([^':]*):[^']*'|"([^":]*):[^"]*"|([^\s:'"]*):[^\s'"]+)"""
)


def _mask_user_password(m: re.Match[str]) -> str:
    option, space, single, double, bare = m.groups()
    if single is not None:
        return f"{option}{space}'{single}:{MASK}'"
    if double is not None:
        return f'{option}{space}"{double}:{MASK}"'
    return f"{option}{space}{bare}:{MASK}"
