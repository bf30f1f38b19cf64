"""What `sage run` shows while it runs: a live rich table on stderr when stderr is a terminal,
plain periodic lines otherwise (every PLAIN_SECONDS, or PROGRESS_SECONDS with --progress).
When stdout is a terminal too, the run's records are written there by its stages while it runs,
and a live table redraws by moving the cursor over what is on the screen: then nothing is shown
until the run ends, and the table is printed once, after the last record.

The figures come from the stages' own trace files (their `stats` events), read incrementally."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import orjson

from sage_cli.run.directory import RunDirectory

LIVE_SECONDS = 0.5
PLAIN_SECONDS = 10.0
PROGRESS_SECONDS = 2.0


class StageWatch:
    """Follows one stage's trace file and keeps its latest counters."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.stats: dict[str, Any] = {}
        #: counts of earlier attempts
        self.base: dict[str, float] = {"in": 0, "out": 0, "errors": 0, "tok": 0, "busy": 0.0}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        nl = data.rfind(b"\n")
        self.partial = data[nl + 1 :]
        for line in data[:nl].split(b"\n"):
            if line.startswith(b'{"ev":"b"'):
                continue  # the stage's counters come in its stats events
            if not line:
                continue
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            kind = ev.get("ev")
            if kind == "start" and self.stats:
                for k in self.base:
                    self.base[k] += self.stats.get(k, 0)
                self.stats = {}
            elif kind in ("stats", "stop"):
                self.stats = ev

    def figure(self, key: str) -> int:
        return int(self.base[key]) + int(self.stats.get(key, 0))

    def tokens_per_second(self) -> float | None:
        """Tokens over the seconds the operator was busy: what `sage trace` shows as tok/s."""
        tokens = self.figure("tok")
        busy = self.base["busy"] + float(self.stats.get("busy", 0.0))
        return tokens / busy if tokens and busy > 0 else None


class Dashboard:
    def __init__(self, run: RunDirectory, sup: Any, progress: bool) -> None:
        self.run = run
        self.sup = sup
        self.tty = sys.stderr.isatty()
        #: records reach the same screen: show the table only once, at the end
        self.hold = self.tty and sys.stdout.isatty()
        self.every = LIVE_SECONDS if self.tty else (PROGRESS_SECONDS if progress else PLAIN_SECONDS)
        self.watches = {sr.name: StageWatch(str(run.trace_path(sr.name))) for sr in sup.stages}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dashboard", daemon=True)
        self._live: Any = None

    def start(self) -> Dashboard:
        if self.hold:
            return self
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=sys.stderr, no_color="NO_COLOR" in os.environ)
            self._live = Live(
                self._table(),
                console=console,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=True,
            )
            self._live.start()
        self._thread.start()
        return self

    def rows(
        self,
    ) -> list[tuple[str, str, int | None, int | None, int | None, float | None, float | None, str]]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out: list[Any] = []
        for sr in self.sup.stages:
            w = self.watches.get(sr.name)
            if w is None:  # a stage bash started after the table did (sage_cli.run.session)
                w = self.watches[sr.name] = StageWatch(str(self.run.trace_path(sr.name)))
            w.poll()
            n_in: int | None
            n_out: int | None
            errors: int | None
            tok_rate = None
            if sr.stage.is_sage:
                n_in, n_out, errors = w.figure("in"), w.figure("out"), w.figure("errors")
                rate = (n_in or n_out) / elapsed
                tok_rate = w.tokens_per_second()
            else:
                n_in = n_out = errors = None
                rate = None
            if sr.final:
                state = "ok" if sr.status == 0 else f"exit {sr.status}"
            elif sr.attempts > 1:
                state = f"running (attempt {sr.attempts})"
            else:
                state = "running" if sr.pid else "starting"
            out.append((sr.name, sr.stage.label, n_in, n_out, errors, rate, tok_rate, state))
        return out

    def _table(self) -> Any:
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        table = Table(title=f"sage run {self.run.id}  {elapsed:.1f}s", title_justify="left")
        numbers = ("in", "out", "errors", "rec/s", "tok/s")
        for col in ("stage", "command", *numbers, "state"):
            table.add_column(col, justify="right" if col in numbers else "left")
        if not hasattr(self, "watches"):
            return table
        for name, label, n_in, n_out, errors, rate, tok_rate, state in self.rows():
            table.add_row(
                name,
                label,
                _n(n_in),
                _n(n_out),
                _n(errors),
                f"{rate:,.0f}" if rate is not None else "-",
                f"{tok_rate:,.1f}" if tok_rate is not None else "-",
                state,
            )
        return table

    def _plain(self) -> None:
        elapsed = time.monotonic() - self.started
        parts = []
        for name, _label, n_in, n_out, errors, _rate, tok_rate, state in self.rows():
            if n_in is None:
                parts.append(f"{name} {state}")
            else:
                tokens = f"/{tok_rate:,.1f} tok/s" if tok_rate is not None else ""
                parts.append(f"{name} {n_in:,} in/{n_out:,} out/{errors:,} err{tokens} {state}")
        try:
            sys.stderr.write(f"sage run: {elapsed:.0f}s: " + "; ".join(parts) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if self._live is not None:
                    self._live.update(self._table())
                else:
                    self._plain()
            except Exception:  # noqa: BLE001 - the display must never stop the run
                pass

    def stop(self) -> None:
        if self.hold:
            try:
                from rich.console import Console

                Console(file=sys.stderr, no_color="NO_COLOR" in os.environ).print(self._table())
            except Exception:  # noqa: BLE001 - the display must never stop the run
                pass
            return
        self._stop.set()
        self._thread.join(timeout=2)
        if self._live is not None:
            try:
                self._live.update(self._table())
                self._live.stop()
            except Exception:  # noqa: BLE001
                pass


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def start_dashboard(run: RunDirectory, sup: Any, progress: bool = False) -> Dashboard:
    return Dashboard(run, sup, progress).start()
