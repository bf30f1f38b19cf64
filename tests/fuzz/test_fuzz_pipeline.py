"""Fuzzing the pipeline-script parser of `sage run` (sage_cli/run/script.py): any script text
gives a parsed pipeline or a clean one-line ScriptError/UsageError naming the script (and the
line, where the tokenizer stopped), never another exception; and the parser never makes bash
run anything bash itself would not run for that script: text that bash reads as a string,
a comment or an escaped `$(...)` stays inert.

The last property is differential: each generated script runs under plain bash (with `sage`
a no-op function) and through `parse_script`; every `touch CANARY` that ran under sage's
parse must also have run under bash.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sage_cli.errors import SageError, UsageError
from sage_cli.run.script import Pipeline, ScriptError, logical_lines, parse_script, read_segments
from tests.conftest import clean_env, run_sage
from tests.fuzz.conftest import examples

PIPELINE = "sage source f.txt | sage head"
# pieces of bash, good and bad, that the parser has to tell apart
FRAGMENTS = [
    " ",
    " ",
    "\n",
    "\\\n",
    ";",
    "|",
    "||",
    "&&",
    "&",
    "#",
    "'",
    '"',
    "`",
    "\\",
    "\\\\",
    "$",
    "$(",
    ")",
    "(",
    "${",
    "}",
    "{",
    "<",
    ">",
    ">>",
    "2>&1",
    ">&2",
    "<<",
    "<<<",
    "$'",
    "\\'",
    "echo",
    "true",
    "X=1",
    "Y='a b'",
    "export Z=3",
    "set -e",
    "cd .",
    "if",
    "then",
    "fi",
    "for",
    "done",
    "exit 0",
    "a",
    "b.txt",
    "sage",
    "sage source f.txt",
    "sage map 'r'",
    "sage head",
    "f(){ :; }",
    "${X:-d}",
    "$1",
    "~",
    "*.txt",
    "é",
    "\t",
    "\r",
    "\x00",
]
# ways to write `touch CANARY`: run by bash, or inert text that must stay inert
CANARIES = [
    "touch {c}",
    "$(touch {c})",
    "`touch {c}`",
    "'touch {c}'",
    '"$(touch {c})"',
    "'$(touch {c})'",
    "\\$(touch {c})",
    "\\`touch {c}\\`",
    "$'\\' ; touch {c} ; '",
    "$'a\\'b' ; touch {c}",
    "# touch {c}",
    "${{X:-$(touch {c})}}",
    "'a\\' ; touch {c} ; '",
    '"a\\" ; touch {c} ; "',
    "`echo \\` ; touch {c} ; \\``",
    "$(echo ')' ; touch {c})",
    "$(case a in a) touch {c};; esac)",
]

script_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=30).map("".join)


@st.composite
def canary_scripts(draw: st.DrawFn) -> str:
    parts: list[str] = []
    for i in range(draw(st.integers(1, 4))):
        parts += draw(st.lists(st.sampled_from(FRAGMENTS[:40]), max_size=4))
        parts.append(draw(st.sampled_from(CANARIES)).format(c=f"CANARY{i}"))
        parts += draw(st.lists(st.sampled_from(FRAGMENTS[:40]), max_size=4))
        parts.append(draw(st.sampled_from(["\n", "; ", " ", "\nX="])))
    tail = draw(st.sampled_from(["\n" + PIPELINE + "\n", "\n" + PIPELINE + " ", "\n"]))
    return "".join(parts) + tail


def _write(tmp: str, text: str) -> Path:
    path = Path(tmp) / "script.sh"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    (Path(tmp) / "f.txt").write_text("one\n")
    return path


def _assert_clean(exc: SageError, path: Path) -> None:
    message = str(exc)
    assert message.startswith(str(path)), message
    assert "\n" not in message.rstrip("\n"), message
    if isinstance(exc, ScriptError) and message.startswith(f"{path}:"):
        line = message[len(str(path)) + 1 :].split(":", 1)[0]
        assert not line.isdigit() or int(line) >= 1, message


@given(script_text)
def test_any_text_splits_into_lines_or_a_script_error(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-run-") as tmp:
        path = _write(tmp, text)
        try:
            logical_lines(text, str(path))
            read_segments(path)
        except (ScriptError, UsageError) as exc:
            _assert_clean(exc, path)


@given(script_text)
@settings(max_examples=examples(60))
def test_parse_script_is_a_pipeline_or_a_clean_error(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-run-") as tmp:
        path = _write(tmp, text)
        try:
            pipeline = parse_script(path, env=clean_env(), cwd=tmp)
        except SageError as exc:
            _assert_clean(exc, path)
            return
    assert isinstance(pipeline, Pipeline) and pipeline.stages
    assert all(stage.argv for stage in pipeline.stages)


def _canaries(directory: str) -> set[str]:
    return {name for name in os.listdir(directory) if name.startswith("CANARY")}


@given(canary_scripts())
@example("${}<$(touch CANARY0)\n\n")  # a redirect expanded after its command's words failed
@settings(max_examples=examples(60))
def test_the_parser_runs_nothing_bash_would_not(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-bash-") as under_bash:
        path = _write(under_bash, text)
        subprocess.run(
            ["bash", "-c", 'sage() { :; }; source "$0"', str(path)],
            cwd=under_bash,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        ran_by_bash = _canaries(under_bash)
    with tempfile.TemporaryDirectory(prefix="fuzz-sage-") as under_sage:
        path = _write(under_sage, text)
        try:
            parse_script(path, env=clean_env(), cwd=under_sage)
        except SageError as exc:
            _assert_clean(exc, path)
        ran_by_sage = _canaries(under_sage)
    assert ran_by_sage <= ran_by_bash, (text, ran_by_sage, ran_by_bash)


# -- regressions ---------------------------------------------------------------------------


def _check(tmp_path: Path, text: str) -> str:
    path = _write(str(tmp_path), text)
    try:
        parse_script(path, env=clean_env(), cwd=str(tmp_path))
    except ScriptError as exc:
        return str(exc)
    return "ok"


def test_exit_or_unset_before_the_pipeline_is_a_script_error(tmp_path: Path) -> None:
    """Regression (fuzzing): `exit 0` (or `unset -f`) before the pipeline left the word dump
    empty and `sage run` died with `ValueError: invalid literal for int()` (exit 1)."""
    for before in ("exit 0", "unset -f __sage_words", "exec 3>&-; exit"):
        assert "stops before its pipeline" in _check(tmp_path, f"{before}\n{PIPELINE}\n")


def test_an_odd_run_of_backslashes_continues_the_line(tmp_path: Path) -> None:
    """Regression (fuzzing): a line ending in `\\\\\\` (an escaped backslash, then a
    continuation, as bash reads it) was taken as complete; the last stage's lone `\\` then
    joined bash's next line and the word dump came out shifted (ValueError, exit 1)."""
    assert "ends in the middle of a command" in _check(tmp_path, PIPELINE + " \\\\\\\n")
    path = _write(str(tmp_path), "sage source \\\\\\\nf.txt | sage head\n")
    (stage, _) = parse_script(path, env=clean_env(), cwd=str(tmp_path)).stages
    assert stage.argv[1:] == ["source", "\\f.txt"]  # what bash makes of it


def test_an_ambiguous_redirect_is_a_script_error(tmp_path: Path) -> None:
    """Regression (fuzzing): `> $UNSET` expanded to no word and raised StopIteration."""
    assert "ambiguous redirect" in _check(tmp_path, PIPELINE + " > $UNSET_VARIABLE\n")


@given(script_text)
@settings(max_examples=examples(8))
def test_sage_run_check_exits_cleanly(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-run-") as tmp:
        path = _write(tmp, text + "\n" + PIPELINE + "\n")
        proc = run_sage("run", "--check", str(path), cwd=tmp, timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode in (0, 1, 2, 65, 69), (proc.returncode, err)
    assert "Traceback" not in err and "SAGE_DEBUG" not in err, err
    assert sum(1 for line in err.splitlines() if line.startswith("sage run: error:")) <= 1


def test_check_of_a_script_whose_own_command_fails_is_a_usage_error(tmp_path: Path) -> None:
    """Regression (fuzzing: `set -e\r0`): --check exited with the failing command's status
    (127), outside its documented codes; it is a problem of the script: exit 2, one line.
    That input now reads as a program (`0`) before the pipeline, so bash would run the script
    whole and --check reads it without running it (exit 0); a builtin that fails under
    `set -e` still stops the check with exit 2."""
    path = _write(str(tmp_path), "set -e\r0\n" + PIPELINE + "\n")
    proc = run_sage("run", "--check", str(path), cwd=str(tmp_path), timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "bash runs it whole" in err, err
    path = _write(str(tmp_path), "set -e\nfalse\n" + PIPELINE + "\n")
    proc = run_sage("run", "--check", str(path), cwd=str(tmp_path), timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert [ln for ln in err.splitlines() if ln.startswith("sage run: error:")] == [
        ln for ln in err.splitlines() if "a command failed (exit 1)" in ln
    ]


def test_an_empty_command_before_a_separator_refuses_the_script(tmp_path: Path) -> None:
    """Regression (fuzzing, differential with bash): `;touch X` is a syntax error to bash,
    which runs nothing of that line; the parser dropped the empty command and ran `touch X`."""
    for line in (";touch CANARY", "echo a ; ; touch CANARY", "| touch CANARY"):
        assert "syntax error near" in _check(tmp_path, f"{line}\n{PIPELINE}\n")
        assert not (tmp_path / "CANARY").exists()


def test_a_descriptor_copy_glued_to_a_word_is_refused(tmp_path: Path) -> None:
    """Regression (fuzzing, differential with bash): bash reads `2>&1touch X` as a redirection
    to the file `1touch` (an error: nothing runs); the tokenizer split it into `2>&1` and
    `touch X`, and bash then ran `touch X`."""
    for line in ("2>&1touch CANARY", "echo a >&2touch CANARY"):
        assert "descriptor copy" in _check(tmp_path, f"{line}\n{PIPELINE}\n")
        assert not (tmp_path / "CANARY").exists()


def test_a_script_bash_cannot_parse_runs_nothing(tmp_path: Path) -> None:
    """Regression (fuzzing, differential with bash): the tokenizer closed `"...$(touch B"`
    where bash sees an unterminated `$(`; bash refuses the whole line, the parser ran the
    `touch` in it. Now `bash -n` vets the script before anything runs."""
    text = '""a\\" ; touch CANARY ; "\n$(touch CANARY1"\n\n' + PIPELINE + "\n"
    message = _check(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'script.sh'}:2: ") and "matching" in message
    assert not list(tmp_path.glob("CANARY*"))


def test_ansi_c_quotes_are_read_as_bash_reads_them(tmp_path: Path) -> None:
    """Regression (fuzzing, differential with bash): `$'a\\' ; touch X ; '` is one word to
    bash; the tokenizer ended the quote at `\\'` and split `touch X` off as a command."""
    text = "X=$'a\\' ; touch CANARY ; '\n" + PIPELINE + ' "$X"\n'
    path = _write(str(tmp_path), text)
    (_, head) = parse_script(path, env=clean_env(), cwd=str(tmp_path)).stages
    assert head.argv[-1] == "a' ; touch CANARY ; "
    assert not (tmp_path / "CANARY").exists()


def test_the_atheris_harness_takes_its_seeds() -> None:
    """tests/fuzz/harness/fuzz_pipeline.py (run by `make fuzz`) passes its own seed corpus."""
    from tests.fuzz.harness import fuzz_pipeline

    assert fuzz_pipeline.SEEDS
    for seed in fuzz_pipeline.SEEDS:
        fuzz_pipeline.TestOneInput(seed)
