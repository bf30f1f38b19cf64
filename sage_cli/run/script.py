"""Read a pipeline script (ordinary bash) into the stages `sage run` starts.

The script stays a plain bash script: it runs the same without `sage run`. We support the common
shape: comments, line continuations, variable assignments, simple commands (`set`, `export`,
`cd`, `echo`, ...) and pipelines (`read_segments` splits a script into the commands before each
pipeline and the pipeline; `parse_script` takes a script with one), whose stages may carry
redirections (`< in`, `> out`, `>> out`, `2> err`) and `VAR=value` prefixes. Anything else
(`&&`, `||`, loops, functions, here-documents, background jobs, subshells) is refused with a
line that says what to change.

Word expansion is left to bash itself, so quoting, `$1`, `${X:-default}`, `~` and globs behave
exactly as they do under bash: the commands before a pipeline and the pipeline's raw words are
handed to `bash -c` with the script's arguments, and bash prints the expanded words back,
NUL-separated. Only the script's own text reaches that shell, never a record: the stages are then
started by the supervisor from those argv lists (no shell), and records only flow through the
pipes between them (tests/security/test_no_shell.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_cli.errors import SageError, UsageError

_FD_DUP = re.compile(r"[0-9]?(?:>>?|<)&(?:[0-9]+|-)")
_REDIR_OPS = ("2>>", "&>>", "2>&1", ">>", "2>", "&>", ">", "<")
_UNSUPPORTED_WORDS = {
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "for",
    "while",
    "until",
    "do",
    "done",
    "case",
    "esac",
    "function",
    "select",
    "{",
    "}",
    "[[",
    "]]",
    "((",
    "))",
}


@dataclass
class Redirect:
    """One redirection of a stage: `op` is <, >, >>, 2>, 2>>, &>, &>> or 2>&1."""

    op: str
    target: str = ""  # expanded path ("" for 2>&1)
    raw: str = ""


@dataclass
class Stage:
    """One command of the pipeline, after bash expanded its words."""

    index: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    redirects: list[Redirect] = field(default_factory=list)
    text: str = ""
    group: int = 0  # which pipeline of a script with several (1, 2, ...); 0: the only one

    @property
    def is_sage(self) -> bool:
        return bool(self.argv) and os.path.basename(self.argv[0]) == "sage"

    @property
    def command(self) -> str:
        """`embed` for `sage embed ...`, the program's name otherwise."""
        if self.is_sage:
            return self.argv[1] if len(self.argv) > 1 else "sage"
        return os.path.basename(self.argv[0]) if self.argv else "?"

    @property
    def is_model(self) -> bool:
        from sage_cli.verbs import is_model_stage

        return is_model_stage(self.argv)

    @property
    def name(self) -> str:
        """A short unique name for files and tables: `2-embed`."""
        prefix = f"{self.group}." if self.group else ""
        return f"{prefix}{self.index + 1}-{self.command}"

    @property
    def label(self) -> str:
        return f"sage {self.command}" if self.is_sage else self.command

    def redirect(self, *ops: str) -> Redirect | None:
        found = None
        for r in self.redirects:
            if r.op in ops:
                found = r
        return found


@dataclass
class Pipeline:
    """What a script runs: its stages, and the environment and directory they start in."""

    script: Path
    stages: list[Stage]
    env: dict[str, str]
    cwd: str
    line: int  # line of the script where the pipeline starts

    @property
    def model_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.is_model]


class ScriptError(UsageError):
    """The script has a shape `sage run` does not run."""


class Unsupported(ScriptError):
    """A construct this parser does not take apart (`&&`, loops, functions, here-documents,
    subshells, background jobs, a script without a pipeline): `sage run` hands such a script to
    bash whole (sage_cli.run.session)."""

    #: found after `bash -n` had accepted the script (no need to ask bash again)
    syntax_checked = False

    @classmethod
    def after_syntax_check(cls, why: str) -> Unsupported:
        found = cls(why)
        found.syntax_checked = True
        return found


class _Incomplete(ScriptError):
    """A quote or substitution goes on past the end of the line."""


# -- splitting the script into logical lines and words ---------------------------------------------


@dataclass
class _Line:
    number: int
    text: str
    # each command of a pipeline: a list of raw words; operators between words are kept apart
    commands: list[list[str]]
    separators: list[str]


def _closing(text: str, start: int, quote: str) -> int:
    """Index of the `quote` that closes a quoted word begun before `start` (a backslash escapes
    the next character), or len(text) when it is unterminated."""
    j, n = start, len(text)
    while j < n and text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    return min(j, n)


def _tokenize(text: str, number: int, script: str) -> tuple[list[list[str]], list[str]]:
    """Split one logical line into commands (lists of raw words) and the operators between them.

    Quotes, backslashes, `$(...)`, `${...}` and backquotes are kept inside a word verbatim; bash
    expands them later. An unquoted `#` at the start of a word starts a comment.
    """
    commands: list[list[str]] = [[]]
    separators: list[str] = []
    word: list[str] = []
    i, n = 0, len(text)

    def end_word() -> None:
        if word:
            commands[-1].append("".join(word))
            word.clear()

    def where() -> str:
        return f"{script}:{number}"

    while i < n:
        c = text[i]
        if c in " \t":
            end_word()
            i += 1
        elif c == "#" and not word:
            break
        elif c == "\\":
            word.append(text[i : i + 2])
            i += 2
        elif c == "$" and text.startswith("'", i + 1):
            # ANSI-C quoting: `\'` does not end it (found by fuzzing against bash)
            j = _closing(text, i + 2, "'")
            if j >= n:
                raise _Incomplete(f"{where()}: unterminated $'")
            word.append(text[i : j + 1])
            i = j + 1
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise _Incomplete(f"{where()}: unterminated single quote")
            word.append(text[i : j + 1])
            i = j + 1
        elif c == '"':
            j = _closing(text, i + 1, '"')
            if j >= n:
                raise _Incomplete(f"{where()}: unterminated double quote")
            word.append(text[i : j + 1])
            i = j + 1
        elif c == "`":
            j = _closing(text, i + 1, "`")  # `\`` does not end it (found by fuzzing against bash)
            if j >= n:
                raise _Incomplete(f"{where()}: unterminated backquote")
            word.append(text[i : j + 1])
            i = j + 1
        elif c == "$" and i + 1 < n and text[i + 1] in "({":
            close = ")" if text[i + 1] == "(" else "}"
            opener = text[i + 1]
            depth, j = 0, i + 1
            while j < n:
                if text[j] == opener:
                    depth += 1
                elif text[j] == close:
                    depth -= 1
                    if depth == 0:
                        break
                elif text[j] == "\\":
                    j += 1  # `\)` does not close it
                elif text[j] == "'":
                    k = text.find("'", j + 1)
                    j = k if k > 0 else n
                elif text[j] == '"':
                    j += 1
                    while j < n and text[j] != '"':
                        j += 2 if text[j] == "\\" else 1
                j += 1
            if j >= n:
                raise _Incomplete(f"{where()}: unterminated ${opener}")
            word.append(text[i : j + 1])
            i = j + 1
        elif c in "|&;<>()" or (c.isdigit() and not word and text[i + 1 : i + 2] in (">", "<")):
            dup = _FD_DUP.match(text, i) if (c in "<>" or c.isdigit()) else None
            end = dup.end() if dup is not None else i
            if (
                dup is not None
                and (not word or c in "<>")
                and end < n
                and text[end] not in " \t|&;<>()"
            ):
                # bash reads `2>&1touch` as a redirection to the file `1touch`: refuse it
                raise Unsupported(
                    f"{where()}: `{text[i : end + 1]}...`: put a space after the descriptor copy"
                )
            if dup is not None and (not word or c in "<>"):
                end_word()
                commands[-1].append(dup.group(0))  # `>&2`, `2>&1`: a descriptor copy
                i = dup.end()
                continue
            op = next((o for o in _REDIR_OPS if text.startswith(o, i)), None)
            if op is not None and (word == [] or c in "<>&"):
                end_word()
                commands[-1].append(op)  # redirections stay in the command; marked below
                i += len(op)
                continue
            end_word()
            two = text[i : i + 2]
            if two in ("||", "&&", ";;", "|&"):
                raise Unsupported(f"{where()}: `{two}` between commands")
            if c == "|":
                separators.append("|")
                commands.append([])
                i += 1
            elif c == ";":
                separators.append(";")
                commands.append([])
                i += 1
            elif c == "&":
                raise Unsupported(f"{where()}: a background job (`&`)")
            else:
                raise Unsupported(f"{where()}: `{c}` (a subshell or process substitution)")
        else:
            word.append(c)
            i += 1
    end_word()
    return commands, separators


def logical_lines(source: str, script: str) -> list[_Line]:
    """Join backslash continuations and lines that end with `|`; split into commands."""
    raw = source.splitlines()
    out: list[_Line] = []
    buf = ""
    start = 0
    for number, line in enumerate(raw, start=1):
        if not buf:
            start = number
        if number == 1 and line.startswith("#!"):
            continue
        if (len(line) - len(line.rstrip("\\"))) % 2:  # an odd run of `\`: a continuation
            buf += line[:-1]  # bash drops the backslash and the newline, nothing more
            continue
        buf += line
        try:
            commands, seps = _tokenize(buf, start, script)
        except _Incomplete:
            if number == len(raw):
                raise
            buf += "\n"  # a quoted string that spans lines
            continue
        if seps and seps[-1] == "|" and not commands[-1]:
            buf += " "  # `a |` continued on the next line
            continue
        if "<<" in buf and any(w.startswith("<<") or w == "<" for c in commands for w in c):
            raise Unsupported(f"{script}:{start}: a here-document")
        for cmd, sep in zip(commands, seps, strict=False):
            if not cmd:  # `; a`, `a ; ; b`, `| b`: bash refuses the line and runs none of it
                raise ScriptError(f"{script}:{start}: syntax error near `{sep}`")
        commands = [c for c in commands if c]
        if commands:
            out.append(_Line(start, buf.strip(), commands, seps))
        buf = ""
    if buf.strip():
        raise ScriptError(f"{script}:{start}: the script ends in the middle of a command")
    return out


# -- asking bash to expand the words ---------------------------------------------------------------

_DUMP = '__sage_words() { printf \'%s\\0\' "$#" "$@" >> "$__SAGE_WORDS"; }\n'


def _split_stage(
    words: list[str], where: str
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Raw words of one command -> (assignments, argv words, [(redirect op, raw target)])."""
    assigns: list[str] = []
    argv: list[str] = []
    redirs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if _FD_DUP.fullmatch(w):
            redirs.append((w, ""))
            i += 1
            continue
        if w in _REDIR_OPS:
            if i + 1 >= len(words) or words[i + 1] in _REDIR_OPS:
                raise ScriptError(f"{where}: `{w}` needs a file name")
            redirs.append((w, words[i + 1]))
            i += 2
            continue
        if not argv and _is_assignment(w):
            assigns.append(w)
        else:
            argv.append(w)
        i += 1
    return assigns, argv, redirs


def _is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.replace("_", "a").isalnum() and not name[0].isdigit()


@dataclass
class Segment:
    """Commands bash runs, then (unless it is the script's tail) one pipeline."""

    commands: list[list[str]]
    pipeline: list[list[str]] | None
    line: int


def _bash(bash: str, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """The one place bash runs: on the script's own text (`-n`, or its commands and words in
    `expand_segment`), never on record content. stderr is captured, stdin is /dev/null."""
    return subprocess.run([bash, *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kwargs)


def check_syntax(script: Path, name: str) -> None:
    """Refuse a script bash itself cannot parse (`bash -n`), before any of it runs: bash runs
    nothing of a line with a syntax error, and sage run must not run more than bash would
    (found by fuzzing: `"a\\" ; touch X ; "` then `$(b"` ran `touch X`)."""
    bash = shutil.which("bash") or "/bin/bash"
    try:
        proc = _bash(bash, ["-n", str(script)], stdout=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ScriptError(f"{name}: cannot check the script with bash: {exc}") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        why = lines[0] if lines else f"bash -n exited with status {proc.returncode}"
        match = re.match(r"^.*?: line ([0-9]+): (.*)$", why)
        where = f"{name}:{match.group(1)}" if match else name
        raise ScriptError(f"{where}: {match.group(2) if match else why}")


def read_segments(path: str | Path) -> list[Segment]:
    """Read a script into segments: the commands before each pipeline, and the pipeline."""
    script = Path(path)
    try:
        source = script.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such script; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the script: {exc}") from None
    name = str(path)
    lines = logical_lines(source, name)
    if not lines:
        raise Unsupported(f"{name}: no pipeline (a script of simple commands)")
    check_syntax(script, name)
    # split `a; b` lines into one entry per command, remembering which have pipes
    entries: list[tuple[int, list[list[str]], bool]] = []
    for line in lines:
        group: list[list[str]] = []
        cmd_iter = iter(line.commands)
        group.append(next(cmd_iter))
        for sep, cmd in zip(line.separators, cmd_iter, strict=False):
            if sep == "|":
                group.append(cmd)
            else:
                entries.append((line.number, group, len(group) > 1))
                group = [cmd]
        entries.append((line.number, group, len(group) > 1))
    for number, group, _ in entries:
        for cmd in group:
            if cmd[0] in _UNSUPPORTED_WORDS or cmd[0].endswith("()"):
                raise Unsupported.after_syntax_check(
                    f"{name}:{number}: a `{cmd[0]}` block or function"
                )
    if not any(p for _, _, p in entries):  # no `|` at all: the last command is the pipeline
        entries[-1] = (entries[-1][0], entries[-1][1], True)
    segments: list[Segment] = []
    commands: list[list[str]] = []
    for number, group, piped in entries:
        if piped:
            segments.append(Segment(commands, group, number))
            commands = []
        else:
            commands.append(group[0])
    if commands:
        segments.append(Segment(commands, None, entries[-1][0]))
    return segments


#: commands whose effect lives in the shell process that runs the whole script, which the
#: parsed path splits (the commands before the pipeline run in one bash, the pipeline is
#: forked by `sage run`): limits and the umask a stage would not inherit, traps that would fire
#: at the wrong moment, `exec`/`exit`/`kill $$` that end a different shell, jobs and `wait`
_SHELL_PROCESS_WORDS = frozenset(
    {
        "trap", "exec", "exit", "return", "ulimit", "umask", "kill", "wait", "eval", "source",
        ".", "coproc", "disown", "suspend", "fg", "bg", "jobs", "enable", "builtin", "command",
        "caller", "times", "logout", "alias", "unalias",
    }
)  # fmt: skip
#: builtins that only set the shell's state (what `--check` runs of a script's commands)
STATE_COMMANDS = frozenset(
    {"set", "export", "cd", "shopt", "unset", "declare", "typeset", "readonly"}
)
#: ... and those that print or do nothing besides: what may come, at once, before a pipeline
#: the parsed path takes apart
_STATE_BUILTINS = STATE_COMMANDS | {"echo", "printf", ":", "true", "false"}
#: words that name the script's own shell process or the last pipeline's statuses
_SHELL_PROCESS_VARIABLES = ("$$", "${$}", "$!", "${!}", "BASHPID", "PIPESTATUS", "PPID")


def _traces_commands(args: list[str]) -> bool:
    """`set` arguments that turn on xtrace or verbose (`-x`, `-eux`, `-o xtrace`, `-v`)."""
    return any(a in ("xtrace", "verbose") for a in args) or any(
        a.startswith("-") and not a.startswith("--") and ("x" in a or "v" in a) for a in args
    )


def _substitutes(cmd: list[str]) -> bool:
    """Whether a command's words hold a command substitution (`$(...)` or backquotes): bash
    runs a program to expand them."""
    return any("$(" in w or "`" in w for w in cmd)


def _is_sage(cmd: list[str]) -> bool:
    words = [w for w in cmd if not _is_assignment(w)]
    return bool(words) and (words[0] == "sage" or words[0].endswith("/sage"))


def _redirects_the_split_refuses(segment: Segment, name: str) -> str | None:
    """What the supervisor cannot wire but bash can (`>&2` on a stage, `<` on a stage that
    also reads the pipe, `>` in the middle): bash runs such a script as written."""
    stages = segment.pipeline or []
    where = f"{name}:{segment.line}"
    for index, cmd in enumerate(stages):
        for op, _ in _split_stage(cmd, where)[2]:
            if _FD_DUP.fullmatch(op) and op != "2>&1":
                return f"{where}: `{op}` in the pipeline"
            if op == "<" and index > 0:
                return f"{where}: `<` on stage {index + 1}, which also reads the pipe"
            if op in (">", ">>", "&>", "&>>") and index < len(stages) - 1:
                return f"{where}: `{op}` on stage {index + 1}, before the last"
    return None


def needs_bash(segments: list[Segment], name: str) -> Unsupported | None:
    """Why bash must run this script whole although it reads as simple commands and pipelines
    (None: the parsed path gives what bash gives). The parsed path runs a script of one
    pipeline with a sage stage, last, after shell builtins that set its state (assignments,
    `set`, `export`, `cd`, `echo`...): they run at once in the bash that expands the words. A
    script with several pipelines or commands after its pipeline (`echo "status $?"`, `exit
    ${PIPESTATUS[0]}`), one that runs a program before it (no timer, signal or lifeline
    reaches that bash: `sleep 6` under `--timeout 2` ran 6 s; a `$(...)` in the pipeline's own
    words, for the same reason), and one that uses the shell's own process (`trap`, `ulimit`,
    `exec`, `kill $$`, ...) runs under bash: under the split
    those came out differently from bash (issue 12's "any script bash runs")."""
    why = None
    if len(segments) > 1 or segments[0].pipeline is None:
        lines = [seg.line for seg in segments if seg.pipeline is not None]
        why = (
            f"{name}: pipelines on lines {', '.join(map(str, lines))}"
            if len(lines) > 1
            else f"{name}:{segments[-1].line}: commands after the pipeline"
        )
    elif not any(_is_sage(cmd) for cmd in segments[0].pipeline or []):
        why = f"{name}:{segments[0].line}: no sage stage in the last pipeline"
    elif any(_is_sage(cmd) for cmd in segments[0].commands):
        # a sage command before the pipeline would run in the bash that expands the words,
        # outside the run: bash runs the script, and every sage stage traces itself
        why = f"{name}:{segments[0].line}: sage commands outside the last pipeline"
    else:
        why = _redirects_the_split_refuses(segments[0], name)
    if why is None:
        for cmd in segments[0].commands:
            words = [w for w in cmd if not _is_assignment(w)]
            if (words and words[0] not in _STATE_BUILTINS) or _substitutes(cmd):
                why = f"{name}:{segments[0].line}: a program runs before the pipeline"
                break
            if words and words[0] == "set" and _traces_commands(words[1:]):
                # bash would trace the expanding shell's own machinery (`++ __sage_words ...`)
                why = f"{name}:{segments[0].line}: `set -x` or `-v` traces the script"
                break
    if why is None and any(_substitutes(cmd) for cmd in segments[0].pipeline or []):
        # the bash that expands the pipeline's words would run it, where no timer, signal or
        # lifeline reaches (`$(sleep 60)` outlived `--timeout 1`)
        why = f"{name}:{segments[0].line}: a command substitution in the pipeline's words"
    if why is None:
        for cmd in [*segments[0].commands, *(segments[0].pipeline or [])]:
            words = [w for w in cmd if not _is_assignment(w)] or cmd
            if words[0] in _SHELL_PROCESS_WORDS:
                why = f"{name}:{segments[0].line}: `{words[0]}` acts on the script's own shell"
                break
            if any(v in w for w in cmd for v in _SHELL_PROCESS_VARIABLES):
                why = f"{name}:{segments[0].line}: the script's shell process or statuses"
                break
    return None if why is None else Unsupported.after_syntax_check(why)  # read_segments ran it


def parse_script(
    path: str | Path,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    segments: list[Segment] | None = None,
) -> Pipeline:
    """Read `path` (one pipeline, after simple commands) and return its pipeline with every
    word expanded as bash would. `segments`: what `read_segments(path)` gave, when the caller
    has it already (each read runs `bash -n`)."""
    name = str(path)
    if segments is None:
        segments = read_segments(path)
    piped = [seg for seg in segments if seg.pipeline is not None]
    if len(piped) > 1:
        raise ScriptError(
            f"{name}: sage run runs one pipeline per script, found pipelines on "
            f"lines {', '.join(str(seg.line) for seg in piped)}; split it into scripts"
        )
    if segments[-1].pipeline is None:
        raise ScriptError(
            f"{name}:{segments[-1].line}: the pipeline (line {piped[0].line}) must be the "
            "last command of the script"
        )
    pipeline, _, _ = expand_segment(path, segments[0], args, env, cwd)
    assert pipeline is not None
    return pipeline


_STATE_SKIP = (
    r"BASH[A-Z_]*|_|PPID|UID|EUID|SHELLOPTS|BASHOPTS|PWD|OLDPWD|SHLVL|RANDOM|SRANDOM|SECONDS|"
    r"LINENO|HISTCMD|FUNCNAME|GROUPS|DIRSTACK|PIPESTATUS|EPOCHSECONDS|EPOCHREALTIME|"
    r"__SAGE_[A-Z_]*"
)
_SAVE_STATE = (
    "{ declare -p | grep -Ev '^declare -[a-zA-Z]*r|^declare -[-a-zA-Z]* (" + _STATE_SKIP + ")=';"
    ' declare -f; printf "cd %q\\n" "$PWD"; set +o; } > "$__SAGE_STATE_OUT"\n'
)


def _body_file(script: Path, text: str) -> str:
    """Write the script's commands to a hidden file beside it: bash sources that file, so
    `${BASH_SOURCE[0]}` (`here="$(dirname "${BASH_SOURCE[0]}")"`) names the script's directory
    as it does under bash. Falls back to the temp directory when that one is read-only."""
    import tempfile

    for directory in (str(script.resolve().parent), None):
        try:
            fd, path = tempfile.mkstemp(prefix=f".{script.name}.sage-", suffix=".sh", dir=directory)
        except OSError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        return path
    raise ScriptError(f"{script}: cannot write a temporary file")


def _bash_said(stderr: bytes) -> str:
    """bash's last message on `stderr` without its `NAME: line N: ` prefix ("" for none)."""
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return re.sub(r"^.*?: line [0-9]+: ", "", lines[-1]) if lines else ""


class CommandsFailed(SageError):
    """A command before a pipeline failed under `set -e`, or the shell ended expanding the
    pipeline's words: the script stops with that status, as under bash."""


def expand_segment(
    path: str | Path,
    segment: Segment,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    state_in: str | None = None,
    state_out: str | None = None,
    group: int = 0,
) -> tuple[Pipeline | None, bool, int]:
    """Run a segment's commands in bash (after restoring the state a previous segment saved)
    and expand its pipeline's words. Returns the pipeline, whether `set -e` is on, and the
    status of the last command before the pipeline."""
    script = Path(path)
    name = str(path)
    last_number = segment.line
    where = f"{name}:{last_number}"
    program = [_DUMP]
    if state_in:
        program.append('source "$__SAGE_STATE_IN" 2>/dev/null\n')
    for cmd in segment.commands:
        program.append(" ".join(cmd) + "\n")
    calls = 0

    def marked(words: str) -> str:
        """A call that prints `words` after a marker, so a call bash joined with another
        (a quote or continuation the tokenizer read differently) is noticed, not misread."""
        nonlocal calls
        calls += 1
        return f"__sage_words __sage_{calls - 1} {words}\n"

    program.append(marked('"$-" "$?"'))  # reached: the commands ran; their options
    last_group = segment.pipeline or []
    split = [_split_stage(cmd, where) for cmd in last_group]
    for assigns, argv, redirs in split:
        if not argv:
            raise ScriptError(f"{where}: a stage of the pipeline has no command")
        targets = [t for _, t in redirs if t]
        # one stage's expansions chained with &&: bash expands a command's redirections only
        # once its words expanded without error (found by fuzzing: `${}<$(touch X)` ran touch)
        program.append(
            " && ".join(
                marked(words).rstrip("\n")
                for words in (
                    " ".join(argv),
                    " ".join(a.partition("=")[2] or "''" for a in assigns),
                    " ".join(targets),
                )
            )
            + "\n"
        )
    if state_out:
        program.append(_SAVE_STATE)
    program.append(marked('"$PWD"') + 'unset __SAGE_WORDS\nenv -0 >> "$__SAGE_WORDS_COPY"\n')
    run_env = dict(os.environ if env is None else env)
    bash = shutil.which("bash", path=run_env.get("PATH")) or "/bin/bash"
    import tempfile

    # the words go to a file, so the commands before the pipeline keep stdout and stderr as
    # under bash (`echo starting >&2`, `echo header`)
    with tempfile.NamedTemporaryFile(prefix="sage-words-") as dump:
        extra = {"__SAGE_WORDS": dump.name, "__SAGE_WORDS_COPY": dump.name}
        if state_in:
            extra["__SAGE_STATE_IN"] = state_in
        if state_out:
            extra["__SAGE_STATE_OUT"] = state_out
        body = _body_file(script, "".join(program[1:]))
        extra["__SAGE_BODY"] = body
        try:
            proc = _bash(
                bash,
                ["-c", program[0] + 'source "$__SAGE_BODY"\n', name, *(args or [])],
                stdout=None,
                env=run_env | extra,
                cwd=cwd or None,
            )
        finally:
            os.unlink(body)
        words_out = dump.read()
    fields = words_out.split(b"\0")
    if proc.returncode != 0 and (not segment.commands or len(fields) > 2):
        # the shell ended expanding the pipeline's words (`set -u` and an unset variable,
        # `${X:?}`, a bad substitution): the script ends there under bash too, with bash's
        # message and status
        why = _bash_said(proc.stderr) or f"bash exited with status {proc.returncode}"
        # this bash runs with -c, where such an exit is status 127; a script file's is 1
        status = 1 if proc.returncode == 127 else proc.returncode
        raise CommandsFailed(f"{where}: {why}", status)  # type: ignore[arg-type]
    if proc.stderr:
        sys.stderr.write(proc.stderr.decode("utf-8", "replace"))
        sys.stderr.flush()
    if proc.returncode != 0:  # a command before the pipeline failed and `set -e` stopped it
        raise CommandsFailed(f"{where}: a command failed (exit {proc.returncode})", proc.returncode)  # type: ignore[arg-type]
    pos = 0

    taken = 0

    def take() -> list[str]:
        nonlocal pos, taken
        try:
            count = int(fields[pos])
        except (IndexError, ValueError):
            count = -1
        if pos >= len(fields) - 1 or (taken == 0 and count < 0):  # bash never got here
            raise ScriptError(
                f"{where}: the script stops before its pipeline runs (`exit` or `exec` "
                "in the commands before it?)"
            )
        marker = f"__sage_{taken}".encode()
        if not 1 <= count < len(fields) - pos or fields[pos + 1] != marker:
            said = _bash_said(proc.stderr)
            if said:  # bash gave up on a word (`${}`: bad substitution): its reason, its status
                raise CommandsFailed(f"{where}: {said}", 1)  # type: ignore[arg-type]
            raise ScriptError(
                f"{where}: bash joins lines or quotes of this script differently from "
                "sage run's reading of it (an unusual quote or continuation?); simplify it"
            )
        words = [f.decode("utf-8", "surrogateescape") for f in fields[pos + 2 : pos + 1 + count]]
        pos += 1 + count
        taken += 1
        return words

    flags, last_status = (take() + ["", "0"])[:2]
    errexit = "e" in flags
    stages: list[Stage] = []
    for index, (assigns, _argv, redirs) in enumerate(split):
        argv = take()
        values = take()
        targets = take()
        if not argv:
            raise ScriptError(f"{where}: stage {index + 1} expands to no command")
        stage_env = {a.partition("=")[0]: v for a, v in zip(assigns, values, strict=False)}
        raws = [raw for _, raw in redirs if raw]
        if len(targets) != len(raws):  # `> $UNSET`, `> *.txt` matching two files
            raise ScriptError(
                f"{where}: stage {index + 1}: a redirection target of {' '.join(raws)} "
                f"expands to {len(targets)} words for {len(raws)} files (bash: ambiguous "
                "redirect); quote it"
            )
        it = iter(targets)
        redirects = [Redirect(op, "" if not raw else next(it), raw) for op, raw in redirs]
        text = " ".join(last_group[index])
        stages.append(Stage(index, argv, stage_env, redirects, text, group))
    final_cwd = (take() or [os.getcwd()])[0]
    env_out: dict[str, str] = {}
    for item in fields[pos:]:
        if not item:
            continue
        key, _, value = item.decode("utf-8", "surrogateescape").partition("=")
        env_out[key] = value
    for key in (
        "_",
        "SHLVL",
        "OLDPWD",
        "PWD",
        "__SAGE_WORDS_COPY",
        "__SAGE_STATE_IN",
        "__SAGE_STATE_OUT",
        "__SAGE_BODY",
    ):
        env_out.pop(key, None)
    env_out["PWD"] = final_cwd
    if segment.pipeline is None:
        return None, errexit, int(last_status)
    for stage in stages:
        odd = [r.op for r in stage.redirects if _FD_DUP.fullmatch(r.op) and r.op != "2>&1"]
        if odd:
            raise ScriptError(
                f"{where}: stage {stage.index + 1}: `{odd[0]}` is not supported in the pipeline "
                "(only `2>&1`); write to a file instead"
            )
    for stage in stages[1:]:
        if stage.redirect("<"):
            raise ScriptError(
                f"{where}: stage {stage.index + 1} reads a file with `<` but also "
                "gets the previous stage's output; drop one of the two"
            )
    for stage in stages[:-1]:
        if stage.redirect(">", ">>", "&>", "&>>"):
            raise ScriptError(
                f"{where}: stage {stage.index + 1} writes to a file with `>` in "
                "the middle of the pipeline; only the last stage may"
            )
    return Pipeline(script, stages, env_out, final_cwd, last_number), errexit, int(last_status)


def sage_error_for(exc: BaseException) -> SageError:
    return exc if isinstance(exc, SageError) else SageError(str(exc))


def is_yaml(path: str | None) -> bool:
    """A YAML pipeline file (sage_cli.api.forms), which `sage run` runs as its bash form."""
    return path is not None and path.endswith((".yaml", ".yml"))
