"""`sage serve`: the HTTP server (starlette on uvicorn), imported only by `sage serve`.

Routes:
  POST /v1/chat/completions   OpenAI chat completions; with an index, retrieval-augmented and
                              with `sources`; `stream: true` gives server-sent events
  POST /v1/embeddings         OpenAI embeddings with the embedding model
  GET  /v1/models             the models served
  POST /v1/pipelines/NAME     NDJSON in, the pipeline's NDJSON out as it comes (pipelines.py)
  GET  /v1/pipelines          the pipelines served
  GET  /health, GET /metrics  liveness and Prometheus counters
  GET  /studio ...            the studio (studio.py), with --studio

Every request passes through `Gate` first: the API key (when one is set, on every request),
counters and latency. Errors are OpenAI-shaped JSON (`errors.APIError`). Model calls run on the
model thread (`batching.ModelWorker`), never on the event loop: chat requests waiting together
are answered by one batch. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests
in flight finish (up to `drain_timeout` seconds) and exits 143 (130).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from h11 import LocalProtocolError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sage_cli.errors import SageError, TempFailError, UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.serve import protocol
from sage_cli.serve.batching import ModelWorker
from sage_cli.serve.engine import ChatAnswer, ChatEngine
from sage_cli.serve.errors import APIError, from_exception
from sage_cli.serve.metrics import Metrics

#: the largest chat or embeddings request body (pipelines stream theirs, without a limit)
MAX_BODY = 8 * 1024 * 1024


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    drain_timeout: float = 30.0
    #: seconds the model thread waits for more requests to join a batch
    batch_window: float = 0.002
    max_batch: int = 32
    #: name -> pipeline script (POST /v1/pipelines/NAME)
    pipelines: dict[str, Path] = field(default_factory=dict)
    studio: bool = False
    runs_dir: Path = Path(".sage/runs")
    #: the command, for its lines on stderr
    prog: str = "sage serve"


class ServerState:
    """What every handler shares: the engine, the model thread, the counters."""

    def __init__(self, engine: ChatEngine | None, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.draining = False
        self.worker: ModelWorker | None = None
        if engine is not None:
            self.worker = ModelWorker(
                {"chat": engine.answer, "stream": self._stream, "embed": engine.embed},
                window=config.batch_window,
                max_batch={"chat": config.max_batch, "stream": 1, "embed": config.max_batch},
                on_batch=self._on_batch,
            )

    def _on_batch(self, kind: str, size: int, seconds: float) -> None:
        if kind == "chat":
            self.metrics.batch(size)

    def _stream(self, payloads: list[Any]) -> list[Any]:
        assert self.engine is not None
        request, on_text, on_sources = payloads[0]
        try:
            return [self.engine.stream(request, on_text, on_sources)]
        except Exception as exc:  # noqa: BLE001 - the request's error
            return [exc]


# -- the gate: key, counters ------------------------------------------------------------------

ROUTES = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/pipelines",
    "/health",
    "/metrics",
)


def route_of(path: str) -> str:
    """The route template of a path, for metric labels (never the raw path)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/pipelines/"):
        return "/v1/pipelines/{name}"
    if path == "/studio" or path.startswith("/studio/"):
        return "/studio"
    return "other"


def _bearer(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def send_error(
    send: Callable[..., Any], err: APIError, headers: list[Any] | None = None
) -> None:
    body = orjson.dumps(err.body())
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: the API key on every request, then counters and latency."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        route = route_of(scope["path"])
        status = [500]
        t0 = time.perf_counter()
        metrics.started()

        gone = [False]  # the client disconnected (uvicorn may have answered it already)

        async def watched() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect":
                gone[0] = True
            return message

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            if gone[0]:
                # nobody to answer; and after uvicorn's own 400 for a request cut short, h11
                # refuses a second response with a LocalProtocolError (a traceback in the log)
                return
            try:
                await send(message)
            except LocalProtocolError:
                # uvicorn answered 400 itself for HTTP it could not parse that came after a good
                # head (a malformed chunk), before it tells us the connection is gone
                gone[0] = True

        try:
            if self.key is not None:
                given = _bearer(scope)
                if given is None or not hmac.compare_digest(given.encode(), self.key):
                    err = APIError(
                        401,
                        "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                    )
                    await send_error(counted, err, [(b"www-authenticate", b"Bearer")])
                    return
            await self.app(scope, watched, counted)
        finally:
            metrics.finished(route, scope.get("method", ""), status[0], time.perf_counter() - t0)


# -- handlers ---------------------------------------------------------------------------------


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def _error(err: APIError) -> Response:
    return _json(err.body(), err.status)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    parts = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
    except ClientDisconnect:  # it went away before its Content-Length came: an answer, not
        # a crash (a crash logged a traceback); 499 as for a chat whose client went away
        gone = "the client closed the connection before the whole body came"
        raise APIError(499, gone) from None
    return b"".join(parts)


def _engine(state: ServerState) -> tuple[ChatEngine, ModelWorker]:
    if state.engine is None or state.worker is None:
        raise APIError(404, "this server serves no model", code="not_found")
    return state.engine, state.worker


async def _await(future: Any) -> Any:
    """Wait for a model thread job; a client that goes away cancels it if it has not run."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


def _count_cancelled(state: ServerState, future: Any) -> None:
    """When a chat job ends: an answer its client stopped goes into /metrics."""
    if future.cancelled() or future.exception() is not None:
        return
    answer = future.result()
    if isinstance(answer, ChatAnswer) and answer.finish_reason == "cancelled":
        state.metrics.cancel(answer.completion_tokens)


async def _disconnected(receive: Any) -> None:
    """Return when the client closes its connection (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _answer_or_disconnect(
    state: ServerState, worker: ModelWorker, chat: Any, request: Request
) -> ChatAnswer | None:
    """The answer, or None when the client went away first: then its generation stops at the
    next token (the batched decoder frees its slot) and nothing is sent."""
    cancel = threading.Event()
    future = worker.submit("chat", replace(chat, cancel=cancel))
    future.add_done_callback(lambda f: _count_cancelled(state, f))
    answer = asyncio.ensure_future(asyncio.wrap_future(future))
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        cancel.set()
        future.cancel()
        raise
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    cancel.set()
    future.cancel()  # not started yet: dropped; running: stops at the next token
    answer.cancel()
    return None


def make_app(state: ServerState) -> Any:
    config = state.config

    async def chat_completions(request: Request) -> Response:
        engine, worker = _engine(state)
        body = protocol.parse_json(await read_body(request))
        model = protocol.check_model(body, [engine.model_name])
        chat, stream, include_usage = protocol.parse_chat(
            body,
            default_max_tokens=engine.max_tokens,
            n_ctx=engine.n_ctx,
            with_index=engine.retriever is not None,
        )
        with_sources = engine.retriever is not None
        if stream:
            return await _stream_chat(state, worker, chat, model, with_sources, include_usage)
        try:
            answer = await _answer_or_disconnect(state, worker, chat, request)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - this request's error, in OpenAI's shape
            raise from_exception(exc) from None
        if answer is None:  # the client went away: 499, as nginx logs it; nobody reads it
            return Response(status_code=499)
        state.metrics.add_tokens(answer.prompt_tokens, answer.completion_tokens)
        return _json(protocol.chat_response(answer, model, with_sources))

    async def embeddings(request: Request) -> Response:
        engine, worker = _engine(state)
        body = protocol.parse_json(await read_body(request))
        if engine.embedder is None:
            raise APIError(404, "this server serves no embedding model", code="not_found")
        model = protocol.check_model(body, [engine.embed_name])
        texts, fmt = protocol.parse_embeddings(body, engine.embedding_dim)
        try:
            vectors, tokens = await _await(worker.submit("embed", texts))
        except Exception as exc:  # noqa: BLE001
            raise from_exception(exc) from None
        state.metrics.add_tokens(tokens, 0)
        return _json(protocol.embeddings_response(vectors, tokens, model, fmt))

    async def models(request: Request) -> Response:
        names = state.engine.models if state.engine is not None else []
        return _json(protocol.models_response(names))

    async def health(request: Request) -> Response:
        engine = state.engine
        body = {
            "status": "draining" if state.draining else "ok",
            "models": engine.models if engine is not None else [],
            "index": str(engine.index) if engine is not None and engine.index else None,
            "pipelines": sorted(config.pipelines),
            "queued": state.worker.pending() if state.worker is not None else 0,
        }
        return _json(body, 503 if state.draining else 200)

    async def metrics(request: Request) -> Response:
        text = state.metrics.render()
        if state.worker is not None:
            text += (
                "# HELP sage_model_jobs_running Requests the model thread is answering now.\n"
                "# TYPE sage_model_jobs_running gauge\n"
                f"sage_model_jobs_running {state.worker.running}\n"
            )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def pipelines_list(request: Request) -> Response:
        data = [{"name": n, "path": str(p)} for n, p in sorted(config.pipelines.items())]
        return _json({"object": "list", "data": data})

    async def pipeline(request: Request) -> Any:
        from sage_cli.serve.pipelines import run_pipeline

        name = request.path_params["name"]
        script = config.pipelines.get(name)
        if script is None:
            known = ", ".join(sorted(config.pipelines)) or "none"
            raise APIError(
                404, f"no pipeline named {name!r} (this server has: {known})", code="not_found"
            )
        return await run_pipeline(name, script, request, config.runs_dir)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/pipelines", pipelines_list, methods=["GET"]),
        Route("/v1/pipelines/{name}", pipeline, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if config.studio:
        from sage_cli.serve.studio import studio_routes

        routes += studio_routes(config.runs_dir)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return _error(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err = APIError(404, f"no such route: {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        response = _error(err)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_crash(request: Request, exc: Exception) -> Response:
        if os.environ.get("SAGE_DEBUG") == "1":
            import traceback

            traceback.print_exception(exc)
        else:
            sys.stderr.write(
                f"sage serve: error: {request.url.path}: {type(exc).__name__}: {exc} "
                "(set SAGE_DEBUG=1 for a traceback)\n"
            )
        return _error(from_exception(exc))

    app = Starlette(
        routes=routes,
        exception_handlers={
            APIError: on_api_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    return Gate(app, state)


async def _stream_chat(
    state: ServerState,
    worker: ModelWorker,
    chat: Any,
    model: str,
    with_sources: bool,
    include_usage: bool,
) -> Response:
    """Server-sent events: a first chunk (role, and `sources`), one chunk per piece of text,
    a last chunk with finish_reason (and a usage chunk when asked), then `data: [DONE]`.
    An error before the first piece is an ordinary JSON error response."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    def on_text(piece: str) -> bool:
        if stop.is_set():
            return False  # the client went away: stop generating
        put("text", piece)
        return True

    chat = replace(chat, cancel=stop)
    future = worker.submit("stream", (chat, on_text, lambda docs: put("sources", docs)))
    future.add_done_callback(lambda f: put("done", None))
    future.add_done_callback(lambda f: _count_cancelled(state, f))
    try:
        kind, value = await events.get()
    except asyncio.CancelledError:
        stop.set()
        future.cancel()
        raise
    if kind == "done":
        exc = future.exception() if not future.cancelled() else None
        raise from_exception(exc or RuntimeError("the answer was cancelled"))
    sources = value
    cid, created = protocol.completion_id(), int(time.time())

    async def body() -> AsyncIterator[bytes]:
        try:
            extra = {"sources": sources} if with_sources else {}
            first = protocol.chunk(
                cid, created, model, {"role": "assistant", "content": ""}, **extra
            )
            yield protocol.sse(first)
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield protocol.sse(protocol.chunk(cid, created, model, {"content": value}))
                elif kind == "done":
                    break
            exc = future.exception()
            if exc is not None:
                err = from_exception(exc)
                yield protocol.sse(err.body())
            else:
                answer: ChatAnswer = future.result()
                state.metrics.add_tokens(answer.prompt_tokens, answer.completion_tokens)
                yield protocol.sse(protocol.chunk(cid, created, model, {}, answer.finish_reason))
                if include_usage:
                    last = protocol.chunk(cid, created, model, {}, usage=protocol.usage(answer))
                    last["choices"] = []
                    yield protocol.sse(last)
            yield protocol.SSE_DONE
        finally:
            stop.set()
            future.cancel()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- running the server ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_binding(host: str, api_key: str | None) -> None:
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave it out on loopback")
    if not is_loopback(host) and not api_key:
        raise UsageError(
            f"--host {host} is reachable from other machines: set an API key with --api-key or "
            "SAGE_API_KEY (clients send it as 'Authorization: Bearer KEY'), or bind 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        import errno

        if exc.errno == errno.EADDRINUSE:
            raise TempFailError(
                f"{host}:{port} is already in use: stop what listens there or pick another --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise UsageError(
                f"{host}:{port}: permission denied (ports below 1024 need root)"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, with signals handled the sage way: the first SIGTERM/SIGINT drains
    (no new connections, requests in flight finish), the exit status says which signal came,
    and the signal is not raised again afterwards (uvicorn would)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, announce: str) -> None:
        super().__init__(config)
        self.state = state
        self.announce = announce
        self.signal: int | None = None

    def capture_signals(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def installed() -> Any:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        return installed()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            self.state.draining = True
            sys.stderr.write(
                f"{self.state.config.prog}: {signal.Signals(signum).name}: draining "
                f"{self.state.metrics.in_flight} request(s) in flight\n"
            )
            sys.stderr.flush()
        elif signum == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            sys.stderr.write(self.announce + "\n")
            sys.stderr.flush()


def serve(engine: ChatEngine | None, config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit code."""
    check_binding(config.host, config.api_key)
    sock = bind(config.host, config.port)
    state = ServerState(engine, config)
    try:
        if engine is not None:
            engine.setup()
        assert state.worker is not None or engine is None
        if state.worker is not None:
            state.worker.start()
        port = sock.getsockname()[1]
        shown = f"[{config.host}]" if ":" in config.host else config.host
        what = []
        if engine is not None:
            what.append("models: " + ", ".join(engine.models))
            if engine.index is not None:
                what.append(f"index: {engine.index}")
        if config.pipelines:
            what.append("pipelines: " + ", ".join(sorted(config.pipelines)))
        if config.studio:
            what.append(f"studio: http://{shown}:{port}/studio")
        announce = f"{config.prog}: listening on http://{shown}:{port} ({'; '.join(what)})"
        uv_config = uvicorn.Config(
            make_app(state),
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=max(1, round(config.drain_timeout)),
            timeout_keep_alive=5,
            server_header=False,
        )
        server = _Server(uv_config, state, announce)
        server.run(sockets=[sock])
    except OSError as exc:
        raise SageError(f"the server failed: {exc}") from None
    finally:
        sock.close()
        if state.worker is not None:
            state.worker.stop(timeout=config.drain_timeout)
        if engine is not None:
            engine.close()
    if server.signal == signal.SIGTERM:
        return int(ExitCode.TERMINATED)
    if server.signal == signal.SIGINT:
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.OK)


def parse_pipelines(specs: list[str]) -> dict[str, Path]:
    """`NAME=FILE` or `FILE` (named after the file's stem) -> {name: path}."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).stem
        file = Path(path)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise UsageError(f"pipeline name {name!r}: use letters, digits, '-', '_' or '.'")
        if not file.is_file():
            raise UsageError(f"pipeline {path}: no such file")
        if name in out:
            raise UsageError(f"two pipelines are named {name!r}: name them with NAME=FILE")
        out[name] = file.resolve()
    return out
