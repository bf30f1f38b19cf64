"""POST /v1/pipelines/NAME: the request's NDJSON through a pipeline script, its output streamed
back as it comes.

Each request starts `sage run --quiet --run-dir RUNS/<id> SCRIPT` as a subprocess (its own
session: a client that goes away stops the whole run with SIGTERM, which `sage run` forwards to
every stage), writes the request body to its stdin and streams its stdout back as
`application/x-ndjson`. The run is supervised and traced like any other (`X-Sage-Run` names it;
the studio shows it while it runs). A body of known length up to MAX_BODY is checked before the
run starts (a line that is not a JSON object is a 400 naming the line); a longer or chunked body
is streamed through and a bad line ends the output with an `_error` record. A run that exits
non-zero ends the output with an `_error` record carrying its exit status and last stderr line.

A YAML pipeline (`sage_cli.api`, first stage `- source: {}`) runs the same way, since `sage run`
runs it. Where the Python API plugs in next: a Python or YAML pipeline could run in-process here,
its operators built once per server like the chat engine's, instead of a `sage run` subprocess
per request; `run_pipeline` is the one place to branch on the file type.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request

from sage_cli.run.directory import new_run_id
from sage_cli.serve.errors import APIError

MAX_BODY = 8 * 1024 * 1024
#: bytes of a run's stderr kept for the error record
STDERR_TAIL = 4096


def check_ndjson(data: bytes, first_line: int = 1) -> int:
    """Raise a 400 APIError at the first line that is not a JSON object; return the number of
    the line after the last one checked."""
    line_no = first_line
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line starts no new one
    for line in lines:
        if line.strip():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise APIError(400, f"line {line_no}: not JSON: {exc}", param="body") from None
            if not isinstance(value, dict):
                raise APIError(400, f"line {line_no}: not a JSON object", param="body")
        line_no += 1
    return line_no


def _env() -> dict[str, str]:
    """The run's environment: this sage first on PATH, so the script's `sage` is this one."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.pop("SAGE_API_KEY", None)  # the server's key is not the pipeline's business
    return env


async def run_pipeline(name: str, script: Path, request: Request, runs_dir: Path) -> Any:
    """The response to POST /v1/pipelines/NAME (an ASGI app: it reads the rest of the request
    body itself while it streams the output)."""
    length = request.headers.get("content-length")
    body: bytes | None = None
    if length is not None and length.isdigit() and int(length) <= MAX_BODY:
        body = await request.body()
        check_ndjson(body)
    return PipelineRun(name, script, Path(runs_dir) / new_run_id(), body)


class PipelineRun:
    """One request's run: stdin fed from the request body, stdout streamed as the response.

    Starlette's StreamingResponse (ASGI spec 2.3, as uvicorn speaks it) reads `receive` itself
    to notice a disconnect, which would swallow a request body still arriving; this response
    owns `receive`: body chunks go to the pipeline, a disconnect stops the run."""

    def __init__(self, name: str, script: Path, run_dir: Path, body: bytes | None) -> None:
        self.name = name
        self.script = script
        self.run_dir = run_dir
        self.body = body
        self.bad_input: list[str] = []
        self.stderr_tail = bytearray()
        self.disconnected = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sage_cli",
            "run",
            "--quiet",
            "--run-dir",
            str(self.run_dir),
            str(self.script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=_env(),
        )
        feeder = asyncio.create_task(self._feed(proc, receive))
        errors = asyncio.create_task(self._drain_stderr(proc))
        finished = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/x-ndjson"),
                        (b"cache-control", b"no-cache"),
                        (b"x-sage-run", self.run_dir.name.encode()),
                    ],
                }
            )
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await errors
            code = await proc.wait()
            finished = True
            tail = b""
            if self.bad_input:
                tail = _error_record(self.name, f"request {self.bad_input[0]}", code)
            elif code != 0:
                text = bytes(self.stderr_tail).decode("utf-8", "replace").strip().splitlines()
                last = text[-1] if text else ""
                tail = _error_record(
                    self.name, f"exit {code}" + (f": {last}" if last else ""), code
                )
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            if not finished:
                _stop(proc)
            feeder.cancel()
            errors.cancel()

    async def _feed(self, proc: Any, receive: Any) -> None:
        """The request body into the pipeline's stdin (checked line by line when it was not
        checked whole), then wait for a disconnect, which stops the run."""
        stdin = proc.stdin
        try:
            if self.body is not None:
                stdin.write(self.body)
                await stdin.drain()
            else:
                line_no, rest = 1, b""
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        _stop(proc)
                        return
                    more = message.get("more_body", False)
                    data = rest + message.get("body", b"")
                    cut = len(data) if not more else data.rfind(b"\n") + 1
                    whole, rest = data[:cut], data[cut:]
                    try:
                        line_no = check_ndjson(whole, line_no)
                    except APIError as err:
                        self.bad_input.append(err.message)
                        break
                    if whole and not whole.endswith(b"\n"):
                        whole += b"\n"
                    stdin.write(whole)
                    await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the pipeline stopped reading (a `sage head`): its output still comes
        finally:
            try:
                stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                _stop(proc)
                return

    async def _drain_stderr(self, proc: Any) -> None:
        while chunk := await proc.stderr.read(65536):
            self.stderr_tail.extend(chunk)
            del self.stderr_tail[:-STDERR_TAIL]


def _error_record(name: str, error: str, code: int) -> bytes:
    entry: dict[str, Any] = {"stage": f"pipeline {name}", "error": error, "exit": code}
    return orjson.dumps({"_error": entry}) + b"\n"


def _stop(proc: Any) -> None:
    """SIGTERM to the run's session (`sage run` forwards it to its stages)."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
