"""`sage chat`: an interactive REPL over the chat engine (with an index: retrieval-augmented).

Each question is answered as it is generated, on the model thread (`batching.ModelWorker`), while
the main thread waits: Ctrl-C stops that one answer (the model stops at the next token) and the
prompt comes back; Ctrl-C at the prompt clears the line; Ctrl-D (end of input) leaves. The
conversation is kept (the last `MAX_TURNS` questions and answers go with each new question;
retrieval uses the new question only) and input lines are kept by readline (up arrow, and a
history file between sessions).

Commands: /sources (the documents behind the last answer), /k N (documents to retrieve),
/reset (forget the conversation), /help, /quit.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from sage_cli.cli.guard import signal_handled
from sage_cli.operators.base import terminal_safe
from sage_cli.serve.batching import ModelWorker
from sage_cli.serve.engine import ChatAnswer, ChatEngine, ChatRequest

#: earlier turns (question + answer pairs) sent with each question
MAX_TURNS = 3
HISTORY_LINES = 1000
HELP = """commands:
  /sources   the documents behind the last answer
  /k N       retrieve N documents per question (now {k})
  /reset     forget the conversation so far
  /help      this list
  /quit      leave (or Ctrl-D); Ctrl-C stops an answer"""


class ChatSession:
    """The REPL's state and loop; `run()` returns the exit code."""

    def __init__(
        self,
        engine: ChatEngine,
        *,
        history_file: Path | None = None,
        out: TextIO | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
    ) -> None:
        self.engine = engine
        self.history_file = history_file
        self.out = out or sys.stdout
        self.k = engine.k
        self.max_tokens = max_tokens or engine.max_tokens
        self.temperature = temperature
        self.turns: list[tuple[str, str]] = []
        self.last: ChatAnswer | None = None
        self.worker = ModelWorker({"stream": self._stream}, window=0.0, max_batch={"stream": 1})

    def _stream(self, payloads: list[Any]) -> list[Any]:
        request, on_text = payloads[0]
        try:
            return [self.engine.stream(request, on_text)]
        except Exception as exc:  # noqa: BLE001 - shown as this answer's error
            return [exc]

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._load_history()
        self.worker.start()
        interactive = sys.stdin.isatty()
        if interactive:
            what = f"index {self.engine.index}" if self.engine.index else "no index"
            self.say(f"sage chat ({self.engine.model_name}, {what}); /help for commands")
        try:
            while True:
                try:
                    line = input("> " if interactive else "")
                except KeyboardInterrupt:
                    signal_handled()
                    self.say("^C")
                    continue
                except EOFError:
                    if interactive:
                        self.say()
                    return 0
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.ask(line)
        finally:
            self._save_history()
            self.worker.stop(timeout=30)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP.format(k=self.k))
        elif name == "/reset":
            self.turns.clear()
            self.last = None
            self.say("(conversation forgotten)")
        elif name == "/k":
            if self.engine.retriever is None:
                self.say("/k needs an index: start sage chat with --index DIR")
            elif arg.isdigit() and 1 <= int(arg) <= 100:
                self.k = int(arg)
                self.say(f"(k = {self.k})")
            else:
                self.say(f"/k takes a number from 1 to 100 (now {self.k})")
        elif name == "/sources":
            self.show_sources()
        else:
            self.say(f"unknown command {terminal_safe(name)}; /help lists them")
        return True

    def show_sources(self) -> None:
        if self.last is None:
            self.say("(no answer yet)")
            return
        if not self.last.sources:
            self.say("(no sources: no index)" if self.engine.index is None else "(no sources)")
            return
        for doc in self.last.sources:
            text = " ".join(str(doc.get("text", "")).split())
            if len(text) > 100:
                text = text[:97] + "..."
            self.say(
                f"[{doc.get('rank')}] {terminal_safe(str(doc.get('id')))} "
                f"({float(doc.get('score', 0.0)):.3f}): {terminal_safe(text)}"
            )

    def ask(self, question: str) -> None:
        messages: list[dict[str, str]] = []
        for q, a in self.turns[-MAX_TURNS:]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        request = ChatRequest.of(
            messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            k=self.k if self.engine.retriever is not None else None,
        )
        pieces: queue.Queue[str | None] = queue.Queue()
        stop = threading.Event()

        def on_text(piece: str) -> bool:
            if stop.is_set():
                return False
            pieces.put(piece)
            return True

        future = self.worker.submit("stream", (request, on_text))
        future.add_done_callback(lambda _: pieces.put(None))
        started = False
        try:
            while True:
                try:
                    piece = pieces.get(timeout=0.1)
                except queue.Empty:
                    continue
                if piece is None:
                    break
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                self.say(terminal_safe(piece), end="")
        except KeyboardInterrupt:
            signal_handled()
            stop.set()
            future.cancel()
            try:
                future.result(timeout=60)
            except BaseException:  # noqa: BLE001 - it was cancelled: any end will do
                pass
            self.say(" ^C (answer stopped)")
            return
        try:
            answer: ChatAnswer = future.result()
        except Exception as exc:  # noqa: BLE001 - one line, and the REPL goes on
            self.say(f"error: {terminal_safe(str(exc))}")
            return
        self.say()
        self.last = answer
        self.turns.append((question, answer.text))

    # -- readline history -------------------------------------------------------------------

    def _load_history(self) -> None:
        try:
            import readline
        except ImportError:  # no readline (some builds): plain input() still works
            return
        readline.set_history_length(HISTORY_LINES)
        if self.history_file is not None and self.history_file.exists():
            try:
                readline.read_history_file(str(self.history_file))
            except OSError:
                pass

    def _save_history(self) -> None:
        if self.history_file is None:
            return
        try:
            import readline

            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(self.history_file))
        except (ImportError, OSError):
            pass
