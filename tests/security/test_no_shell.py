"""`sage run` never passes record content to a shell, and its reports escape what they show.

The script's own text goes through bash once, to expand its words (as bash would run it); the
stages are then exec'd as argv lists, connected by pipes, and records only ever flow through
those pipes. Records full of shell syntax run through a pipeline with sage and non-sage stages,
with --retries (records relayed and re-fed) and with a stage that crashes on them; no marker
appears, the bytes come out unchanged, and the HTML report shows hostile text escaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv

BIN = str(Path(sys.executable).parent)

SHELL_STRINGS = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "| touch PWNED",
    "&& touch PWNED",
    "x\ntouch PWNED\n",
    "x\r\ntouch PWNED #",
    "' ; touch PWNED ; '",
    '" ; touch PWNED ; "',
    "${IFS}touch${IFS}PWNED",
    "$((1+1))$(touch PWNED)",
    "<(touch PWNED)",
    "> PWNED",
    "\\\n touch PWNED",
]
XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def env() -> dict[str, str]:
    e = clean_env()
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


def records() -> list[dict]:
    return [
        {"id": f"r{i}{s}", "text": s, "n": i, s: s, "nested": {"cmd": s, "list": [s]}}
        for i, s in enumerate(SHELL_STRINGS)
    ]


def sage_run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    (cwd / "p.sh").write_text("#!/usr/bin/env bash\n" + script)
    return subprocess.run(
        sage_argv("run", *args, "p.sh"), capture_output=True, env=env(), cwd=cwd, timeout=120
    )


def assert_no_marker(cwd: Path) -> None:
    found = [p for p in cwd.rglob("*") if p.name == "PWNED"]
    assert found == [], found


@pytest.mark.parametrize("retries", [[], ["--retries", "1"]])
def test_records_with_shell_syntax_flow_through_sage_run_untouched(tmp_path, retries):
    (tmp_path / "in.ndjson").write_bytes(ndjson(records()))
    result = sage_run(
        tmp_path,
        "sage source in.ndjson \\\n"
        "  | sage map 'r' \\\n"
        "  | cat \\\n"
        "  | sage filter 'True' \\\n"
        "  | sage keyby text \\\n"
        "  | sage sink --to out.ndjson\n",
        *retries,
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson((tmp_path / "out.ndjson").read_bytes())
    assert [{k: v for k, v in r.items() if k != "_key"} for r in out] == records()
    assert [r["_key"] for r in out] == SHELL_STRINGS
    assert_no_marker(tmp_path)


def test_a_stage_that_crashes_on_hostile_records_is_restarted_without_a_shell(tmp_path):
    """--retries re-feeds records to a restarted stage; the dead letter keeps them as data."""
    (tmp_path / "in.ndjson").write_bytes(ndjson(records()))
    result = sage_run(
        tmp_path,
        "sage source in.ndjson \\\n"
        '  | sage map \'r if r["n"] != 3 else __import__("os")._exit(9)\' \\\n'
        "  | sage sink --to out.ndjson\n",
        "--retries",
        "3",  # a poison record costs 3 restarts (docs/run.md)
    )
    assert_no_marker(tmp_path)
    out = parse_ndjson((tmp_path / "out.ndjson").read_bytes())
    assert {r["n"] for r in out} == set(range(len(SHELL_STRINGS))) - {3}, result.stderr
    dead = list(tmp_path.glob(".sage/runs/*/dead.ndjson"))
    assert dead and SHELL_STRINGS[3].encode() in dead[0].read_bytes().replace(b"\\n", b"\n")


def test_script_arguments_are_words_not_code(tmp_path):
    """$1 is expanded once by bash, as under `bash p.sh ARG`: its text is not run again."""
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "a"}]))
    (tmp_path / "p.sh").write_text(
        '#!/usr/bin/env bash\nsage source in.ndjson | sage map "r" --errors "$1" > "out-$2"\n'
    )
    for arg in ("$(touch PWNED)", "`touch PWNED`", "; touch PWNED"):
        result = subprocess.run(
            sage_argv("run", "p.sh", arg, arg),
            capture_output=True,
            env=env(),
            cwd=tmp_path,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"out-{arg}").exists()  # the argument became a file name, literally
    assert_no_marker(tmp_path)


def test_pipeline_parser_sends_only_script_text_to_bash():
    """The one place bash runs (pipeline.expand_segment) is fed the script's words; the stage
    processes are started by the supervisor with an argv list, never a shell string."""
    from tests.conftest import ROOT

    supervisor = (ROOT / "sage_cli" / "run" / "supervisor.py").read_text()
    assert "shell=True" not in supervisor and "bash" not in supervisor.split("def _spawn")[1][:3000]
    pipeline = (ROOT / "sage_cli" / "run" / "script.py").read_text()
    assert pipeline.count("subprocess.run(") == 1


def test_html_report_and_trace_escape_record_content(tmp_path):
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": XSS, "text": XSS}]))
    result = sage_run(
        tmp_path,
        "sage source in.ndjson | sage map 'r[r[\"text\"]]' | sage map r\n",
        "--run-dir",
        "run",
    )
    assert result.returncode == 65, result.stderr  # the second map fails on the record
    html_file = tmp_path / "report.html"
    report = run_sage("trace", "report", "run", "--html", str(html_file), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = html_file.read_text()
    assert "alert" in page  # the stage's error message, quoting the record, is there...
    assert "<script>alert" not in page and "<img src=x" not in page  # ...escaped
    assert "&lt;script&gt;" in page


def test_sage_trace_shows_hostile_ids_and_stderr_without_terminal_escapes(tmp_path):
    evil = "id\x1b]0;PWNED\x07\x1b[2J"
    (tmp_path / "in.ndjson").write_bytes(
        ndjson([{"id": "q1", "text": "x", "docs": [{"id": evil, "text": "y"}]}])
    )
    result = sage_run(
        tmp_path,
        "sage source in.ndjson | sage map 'r' "
        r"""| bash -c 'printf "\033]0;PWNED\007\033[2J\n" >&2; cat; exit 3' | sage map r"""
        "\n",
        "--run-dir",
        "run",
    )
    assert result.returncode == 3, result.stderr
    summary = run_sage("trace", "run", cwd=tmp_path)
    follow = run_sage("trace", "run", "--record", evil, cwd=tmp_path)
    assert summary.returncode == 0 and follow.returncode == 0, follow.stderr
    shown = summary.stdout + follow.stdout
    assert b"\\x1b]0;PWNED" in follow.stdout  # the hit's id, shown escaped
    assert b"\\x1b]0;PWNED" in summary.stdout  # the bash stage's stderr, shown escaped
    assert b"\x1b" not in shown and b"\x07" not in shown


def test_terminal_escapes_in_records_are_shown_not_obeyed(tmp_path):
    """sink on a terminal and one-line errors print record content for a person: control
    characters come out as \\x1b, so a record cannot retitle the window, clear the screen or
    write to the clipboard (OSC 52)."""
    from sage_cli.operators.sink import Sink

    evil = "a\x1b]52;c;ZXZpbA==\x07b\x1b[2J\x9b31m\rc"
    console = tmp_path / "tty.txt"
    with open(console, "w") as fh:
        sink = Sink(pretty=True, console_file=fh, width=100)
        sink.setup()
        sink.process([{"id": evil, evil: evil}])
        sink.close()
    shown = console.read_text()
    assert "\x1b]52" not in shown and "\x1b[2J" not in shown and "\x9b" not in shown
    assert "\\x1b]52;c;ZXZpbA==\\x07b" in shown
    result = run_sage("map", 'r["missing"] + r["x"]', input=ndjson([{"x": 1, evil: 1}]))
    assert result.returncode == 65
    assert b"\x1b" not in result.stderr and b"\x07" not in result.stderr
