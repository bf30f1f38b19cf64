"""`sage chat` through a real pseudo-terminal: it is the process's controlling terminal, so
Ctrl-C (\\x03) is a real SIGINT from the tty driver and Ctrl-D (\\x04) a real end of input."""

from __future__ import annotations

import os
import pty
import re
import select
import time
from pathlib import Path

import pytest

from tests.conftest import clean_env, sage_argv
from tests.index_fixture import tiny_index

pytestmark = pytest.mark.model


class Terminal:
    """A child process on a pty: `send` keys, `expect` output (a regex), `wait` for the exit."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        self.output = ""
        self.seen = 0  # output before this offset was matched already

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.output, self.seen)
            if found:
                self.seen = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s in:\n{self.output}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child is gone
                    data = b""
                if not data:
                    raise AssertionError(
                        f"the chat ended while waiting for {pattern!r}:\n{self.output}"
                    )
                self.output += data.decode(errors="replace").replace("\r\n", "\n")

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep reading, or a child writing to a full pty would block
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.output += os.read(self.fd, 65536).decode(errors="replace")
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"sage chat did not exit:\n{self.output}")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def chat(tmp_path: Path):
    tiny_index(tmp_path / "idx")
    env = clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache"), SAGE_THREADS="2", TERM="dumb")
    terms: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(sage_argv("chat", "--index", "idx", *args), tmp_path, env)
        terms.append(term)
        term.expect(r"/help for commands")
        term.expect(r"> ")
        return term

    yield start
    for term in terms:
        term.close()


def test_ask_sources_k_and_ctrl_d(chat, tmp_path):
    term = chat("--max-tokens", "24")
    term.send("What is the capital of France?\r")
    term.expect(r"Paris")
    term.expect(r"\n> ")
    term.send("/sources\r")
    sources = term.expect(r"\[1\] paris \(0\.\d+\): Paris is the capital[^\n]*\n(.*\n)*?> ")
    assert sources.group(0).count("\n[") == 3  # 4 documents by default
    term.send("/k 2\r")
    term.expect(r"\(k = 2\)")
    term.send("Where does the cat sit?\r")
    term.expect(r"mat")
    term.expect(r"\n> ")
    term.send("/sources\r")
    listed = term.expect(r"\[1\] cat [^\n]*\n\[2\][^\n]*\n> ")
    assert "[3]" not in listed.group(0)
    term.send("\x04")  # Ctrl-D at an empty prompt
    assert term.wait() == 0
    # the questions were kept for the next session (readline's history file)
    history = (tmp_path / "cache" / "chat-history").read_text()
    assert "What is the capital of France?" in history and "/k 2" in history


def test_up_arrow_recalls_the_last_question_across_sessions(chat):
    term = chat("--max-tokens", "12")
    term.send("Where does the cat sit?\r")
    term.expect(r"\n> ")
    term.send("/quit\r")
    assert term.wait() == 0
    again = chat("--max-tokens", "12")
    again.send("\x1b[A")  # up arrow: the last line of the previous session
    again.expect(r"/quit")
    again.send("\x1b[A\r")  # one further up: the question, asked again
    again.expect(r"Where does the cat sit\?\n")
    again.expect(r"\n> ")
    again.send("/sources\r")
    again.expect(r"\[1\] cat ")


def test_ctrl_c_stops_one_answer_and_the_chat_goes_on(chat):
    term = chat("--max-tokens", "400", "--temperature", "0.8")
    term.send("Tell me a long story about Python lists and files.\r")
    term.expect(r"files\.\n\S")  # the answer has started (not just the question's echo)
    term.send("\x03")  # Ctrl-C
    term.expect(r"\^C \(answer stopped\)\n> ", timeout=60)
    # Ctrl-C at the prompt: a fresh line, still running. CPython's readline loses a SIGINT
    # that lands between the prompt and its select() (it checks signals only on EINTR), so a
    # key pressed at that very instant needs a second press: send it until it shows.
    for _ in range(10):
        term.send("\x03")
        try:
            term.expect(r"\^C\n> ", timeout=3)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"Ctrl-C at the prompt did nothing:\n{term.output}")
    term.send("What is the capital of France?\r")
    term.expect(r"Paris")
    term.expect(r"\n> ")
    term.send("/quit\r")
    assert term.wait() == 0
