"""Generating answers with a local llama.cpp model or an OpenAI-compatible server
(`sage generate`).

Input, in order of preference: `messages` (chat messages, as `sage prompt` writes them),
`prompt` (sent as one user message) or `query`. Output: `answer` (the text, stripped),
`usage` {prompt_tokens, completion_tokens, seconds}, `citations` (the ids of the `docs` the
answer cites as `[n]`: operators.citations; only for records with `docs`) and, with a JSON
schema, `answer_json` (the answer parsed). `seconds` is the wall time of the model call (0-ish for a cache hit, which
also sets `usage.cached: true`).

Backends:

- `LlamaBackend`: the model loads once, in `setup()`, through `operators.llm.load_llama`, and
  every record goes through `create_chat_completion` with the chat template in the GGUF file
  (ChatML for SmolLM2). A JSON schema is compiled once into a llama.cpp grammar. Prompts are
  measured with the model's own tokenizer; one that leaves less than `max_tokens` free in the
  context is cut in the middle of its last user message, keeping the start (the instructions)
  and the end (the last documents and the question), and the record gets
  `prompt_truncated: true` and a message in `_warnings`.
- `OpenAIBackend`: POST `{base_url}/chat/completions` with the standard library (urllib). The
  API key goes only into the Authorization header: never into records, errors or traces.
  Connection failures, timeouts, HTTP 408/429/5xx and unreadable answers are retried with
  exponential backoff; when every attempt fails the record fails with a `TransientError`
  (exit 75 under `--on-error fail`).

Temperature 0 is greedy decoding: the same prompt gives the same answer. A seed makes sampling
at temperature > 0 repeatable too (each record is sampled from the same seed). In those two
cases answers are cached (`operators.cache.ResultCache`, sqlite) under a key made of the model's sha256
(or the server URL and model name), every generation parameter and the final messages.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .base import (
    Operator,
    OperatorError,
    OptionError,
    OutputFailed,
    Record,
    RecordError,
    ResourceUnavailable,
    TransientError,
    add_warning,
)
from .cache import ResultCache, content_key
from .citations import add_citations

#: tokens left unused at the end of the context, for tokenizer drift when a cut text is re-read
SAFETY_TOKENS = 4
#: at most this many characters of the start of a cut message are kept (its instructions)
HEAD_CHARS = 256
CUT_MARK = "\n...\n"
#: characters of a server's error body quoted in a message
QUOTE = 200
#: the longest wait a server's Retry-After may impose between two attempts
MAX_RETRY_AFTER = 30.0
#: sequences the local model decodes together (--parallel) unless told: on a 2-core CPU,
#: SmolLM2-135M decodes 16 sequences at about 2.2x the tokens/s of one (../shared/MODELS.md);
#: the KV cache costs up to --parallel x --n-ctx cells (SmolLM2: 23 KB a cell, 0.75 GB at
#: 16 x 2048; sized to the prompts, so 94 MB for short ones)
DEFAULT_PARALLEL = 16
#: requests in flight to an OpenAI-compatible server (--concurrency) unless told
DEFAULT_CONCURRENCY = 4
#: the batched decoder's context per sequence grows in steps of this many tokens
CTX_STEP = 256
#: records per batch the driver hands generate, per sequence in flight: enough for a slot that
#: frees to find the next prompt waiting (continuous batching within a batch)
BATCH_PER_SLOT = 4


@dataclass(frozen=True)
class GenerationParams:
    """What decides an answer besides the messages (all of it goes into the cache key)."""

    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None = None
    #: notes for `_warnings` (a cut prompt)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False


Messages = list[dict[str, str]]
#: receives each piece of an answer as it is generated; returning False stops the answer
OnText = Callable[[str], object]


# -- the local backend ------------------------------------------------------------------------


class LlamaBackend:
    """A local GGUF chat model through llama-cpp-python."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        threads: int | None = None,
        seed: int | None = None,
        parallel: int = 1,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.threads = threads
        self.seed = seed
        self.parallel = parallel
        self.llm: Any = None
        self.formatter: Any = None
        self.grammar: Any = None
        #: the continuous-batching decoder (`operators.batched`), with --parallel above 1
        self.decoder: Any = None
        self._sha256: str | None = None

    def load(self, json_schema: dict[str, Any] | None) -> None:
        from .llm import load_llama

        if self.llm is not None:
            return
        if json_schema is not None:
            self.grammar = compile_grammar(json_schema)  # a bad schema fails before the load
        import llama_cpp

        seed = self.seed if self.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        self.llm = load_llama(self.model_path, n_ctx=self.n_ctx, n_threads=self.threads, seed=seed)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            import jinja2
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self.llm._model
            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            try:
                self.formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=model.token_get_text(eos) if eos != -1 else "",
                    bos_token=model.token_get_text(bos) if bos != -1 else "",
                )
                self.formatter(messages=[{"role": "user", "content": "hi"}])
            except jinja2.TemplateError as exc:
                # a damaged chat template is the model file's fault (found by fuzzing: it was
                # exit 1 with a TemplateSyntaxError on every record)
                from .gguf_check import FIX

                raise ResourceUnavailable(
                    f"{self.model_path}: the chat template in the model file does not work "
                    f"({type(exc).__name__}: {exc}); {FIX}"
                ) from None

    @property
    def batched(self) -> bool:
        return self.parallel > 1 and self.formatter is not None

    def _decoder_for(self, longest: int) -> Any:
        """The batched decoder, with room for `longest` tokens (prompt + answer) a sequence.

        Its KV cache is --parallel streams of n_ctx_seq cells, all allocated (and cleared) up
        front: sized to what the prompts need (rounded up, doubled when a longer one comes,
        never past --n-ctx), not to --n-ctx, short prompts cost a fraction of the memory
        (SmolLM2 at 16 x 2048 cells: 0.75 GB; at 16 x 256: 94 MB)."""
        from .batched import BatchedDecoder

        if self.decoder is not None and self.decoder.n_ctx_seq >= longest:
            return self.decoder
        size = max(
            CTX_STEP * -(-longest // CTX_STEP), 2 * self.decoder.n_ctx_seq if self.decoder else 0
        )
        size = min(size, self.n_ctx)
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        try:
            self.decoder = BatchedDecoder(
                self.llm, n_seq=self.parallel, n_ctx_seq=size, threads=self.threads or 1
            )
        except ValueError as exc:  # llama.cpp could not make the context (memory)
            raise ResourceUnavailable(
                f"llama.cpp could not make a context for --parallel {self.parallel} x "
                f"{size} tokens: {exc}; lower --parallel or --n-ctx"
            ) from None
        return self.decoder

    def identity(self, hash_cache: Path | None) -> str:
        if self._sha256 is None:
            from .models import sha256_file

            self._sha256 = sha256_file(self.model_path, cache_file=hash_cache)
        return f"llama:{self._sha256}:n_ctx={self.n_ctx}"

    def _tokens(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def count(self, messages: Messages) -> int:
        """Prompt tokens of `messages` as the chat template lays them out."""
        if self.formatter is not None:
            prompt = self.formatter(messages=messages).prompt
            return len(self._tokens(prompt, special=True))
        return sum(len(self._tokens(m["content"], special=False)) + 4 for m in messages) + 4

    def fit(self, messages: Messages, max_tokens: int) -> tuple[Messages, str | None]:
        """`messages`, with the last user message cut in the middle when the prompt leaves
        less than `max_tokens` free in the context; and a warning when it was cut.

        The cut is made on characters (never inside a UTF-8 sequence or a token's bytes) and
        measured with the real tokenizer until it fits: the first quarter of what is kept
        (at most HEAD_CHARS) comes from the start, the rest from the end."""
        limit = self.n_ctx - max_tokens - SAFETY_TOKENS
        total = self.count(messages)
        if total <= limit:
            return messages, None
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        last = users[-1] if users else len(messages) - 1
        content = messages[last]["content"]
        n_tokens = max(len(self._tokens(content, special=False)), 1)
        chars_per_token = len(content) / n_tokens
        keep = int((n_tokens - (total - limit)) * chars_per_token)
        for _ in range(8):
            if keep < 8:
                break
            cut = [
                *messages[:last],
                {**messages[last], "content": cut_middle(content, keep)},
                *messages[last + 1 :],
            ]
            now = self.count(cut)
            if now <= limit:
                warning = (
                    f"generate: prompt cut from {total} to {now} tokens to leave "
                    f"{max_tokens} for the answer in n_ctx {self.n_ctx}"
                )
                return cut, warning
            keep -= int((now - limit) * chars_per_token) + 1
        raise RecordError(
            f"prompt of {total} tokens cannot fit in n_ctx {self.n_ctx} with max_tokens "
            f"{max_tokens}: the other messages alone are too long (raise --n-ctx or lower "
            "--max-tokens)"
        )

    def complete(
        self, messages: Messages, params: GenerationParams, on_text: OnText | None = None
    ) -> Completion:
        fitted, warning = self.fit(messages, params.max_tokens)
        kwargs: dict[str, Any] = {
            "messages": fitted,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stop": list(params.stop),
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if self.grammar is not None:
            kwargs["grammar"] = self.grammar
        try:
            if on_text is not None:
                return self._stream(fitted, kwargs, on_text, warning)
            response = self.llm.create_chat_completion(**kwargs)
        except ValueError as exc:  # llama-cpp-python's "Requested tokens exceed context"
            raise RecordError(f"llama.cpp refused the prompt: {exc}") from None
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            finish_reason=choice.get("finish_reason"),
            warnings=[warning] if warning else [],
            truncated=warning is not None,
        )

    def complete_many(
        self,
        conversations: list[Messages],
        params: GenerationParams,
        on_done: Callable[[int], None] | None = None,
        cancelled: Sequence[Callable[[], bool] | None] = (),
    ) -> list[tuple[Completion | Exception, float]]:
        """Answer every conversation with the batched decoder: one (completion or the
        exception of that conversation, seconds) per conversation, in order.
        `on_done(completion_tokens)` is called as each one ends; `cancelled[i]()` turning True
        stops conversation i at the next decode step (finish_reason "cancelled")."""
        from .batched import Request

        assert self.batched, "complete_many needs --parallel above 1 and a chat template"
        results: list[tuple[Completion | Exception, float] | None] = [None] * len(conversations)
        requests: list[Request] = []
        placed: list[tuple[int, str | None]] = []
        for i, messages in enumerate(conversations):
            try:
                fitted, warning = self.fit(messages, params.max_tokens)
                formatted = self.formatter(messages=fitted)
                tokens = self.llm.tokenize(
                    formatted.prompt.encode("utf-8"),
                    add_bos=not formatted.added_special,
                    special=True,
                )
            except Exception as exc:  # noqa: BLE001 - this conversation's failure, not the batch's
                results[i] = (exc, 0.0)
                if on_done is not None:
                    on_done(0)
                continue
            extra = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
            stop = [*params.stop, *(s for s in extra if s)]
            requests.append(
                Request(
                    prompt=tokens,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    seed=params.seed,
                    stop=[s.encode("utf-8") for s in stop],
                    grammar=self.grammar,
                    cancelled=cancelled[i] if i < len(cancelled) else None,
                )
            )
            placed.append((i, warning))

        def finished(_: int, done: Any) -> None:
            if on_done is not None:
                on_done(0 if isinstance(done, Exception) else done.completion_tokens)

        generated: list[Any] = []
        if requests:
            decoder = self._decoder_for(max(len(r.prompt) + r.max_tokens for r in requests))
            generated = decoder.run(requests, on_done=finished)
        for (i, warning), done in zip(placed, generated, strict=True):
            if isinstance(done, Exception):
                results[i] = (done, 0.0)
                continue
            completion = Completion(
                text=done.text,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                finish_reason=done.finish_reason,
                warnings=[warning] if warning else [],
                truncated=warning is not None,
            )
            results[i] = (completion, done.seconds)
        return [r if r is not None else (OperatorError("not answered"), 0.0) for r in results]

    def _stream(
        self, fitted: Messages, kwargs: dict[str, Any], on_text: OnText, warning: str | None
    ) -> Completion:
        """Generate with `stream=True`, handing each piece of text to `on_text` as it is
        decoded; `on_text` returning False stops the answer (finish_reason "cancelled").
        llama-cpp-python's stream carries no usage: the tokens are counted here."""
        pieces: list[str] = []
        finish: str | None = None
        stream = self.llm.create_chat_completion(**kwargs, stream=True)
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content")
                if piece:
                    pieces.append(piece)
                    if on_text(piece) is False:
                        finish = "cancelled"
                        break
                finish = choice.get("finish_reason") or finish
        finally:
            stream.close()
        text = "".join(pieces)
        return Completion(
            text=text,
            prompt_tokens=self.count(fitted),
            completion_tokens=len(self._tokens(text, special=False)) if text else 0,
            finish_reason=finish,
            warnings=[warning] if warning else [],
            truncated=warning is not None,
        )

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self.llm is not None:
            try:
                self.llm.close()
            except Exception:  # noqa: BLE001 - releasing native memory must not fail a run
                pass
            self.llm = None


def _until(gone: Callable[[], bool]) -> OnText:
    """An `on_text` that stops the answer once `gone()` is True."""

    def on_text(piece: str) -> bool:
        return not gone()

    return on_text


def cut_middle(text: str, keep: int) -> str:
    """`text` cut to about `keep` characters: its start (a quarter, at most HEAD_CHARS) and
    its end, joined by CUT_MARK, each side snapped to a word boundary when one is near."""
    if keep >= len(text):
        return text
    head_n = min(HEAD_CHARS, keep // 4)
    tail_n = max(keep - head_n - len(CUT_MARK), 0)
    head = text[:head_n]
    space = head.rfind(" ", max(head_n - 16, 0))
    if space > 0:
        head = head[:space]
    tail = text[len(text) - tail_n :] if tail_n else ""
    space = tail.find(" ", 0, 16)
    if space >= 0:
        tail = tail[space + 1 :]
    return head + CUT_MARK + tail


def compile_grammar(schema: dict[str, Any]) -> Any:
    """A llama.cpp grammar that only admits JSON matching `schema`."""
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        raise OptionError(f"--json-schema: cannot turn the schema into a grammar: {exc}") from None


# -- the OpenAI-compatible backend ------------------------------------------------------------


def chat_completions_url(base_url: str) -> str:
    """`http://host:8080/v1` -> `http://host:8080/v1/chat/completions` (kept when given).

    A URL carrying credentials (`https://user:key@host`) is refused: urllib would not send
    them as credentials but look the whole `user:key@host` up as a host name (the key in a DNS
    query), and a command line shows in `ps`, shell history and traces. The key belongs in
    OPENAI_API_KEY."""
    try:
        parsed = urllib.parse.urlsplit(base_url)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise OptionError(
            f"--base-url must be an http(s) URL, e.g. http://127.0.0.1:8080/v1, "
            f"got {safe_url(base_url)!r}"
        )
    if "@" in parsed.netloc:
        raise OptionError(
            f"--base-url {safe_url(base_url)}: credentials in the URL are not sent and would "
            "show in ps and traces; put the key in OPENAI_API_KEY"
        )
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit(parsed._replace(path=path, fragment=""))


def safe_url(url: str) -> str:
    """`url` without any user:password part or query, for messages."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return "<not a URL>"
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc, query="", fragment=""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib forwards the Authorization header to wherever a redirect points (another host,
    plain http): a redirect is an error instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Retry(Exception):
    """One attempt failed in a way another attempt may not."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class OpenAIBackend:
    """Any server that speaks the OpenAI chat completions API (llama.cpp server, vLLM, Ollama)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise OptionError(f"--concurrency must be at least 1, got {concurrency}")
        if timeout <= 0:
            raise OptionError(f"--timeout must be positive, got {timeout}")
        if retries < 0:
            raise OptionError(f"--retries must be 0 or more, got {retries}")
        self.url = chat_completions_url(base_url)
        self.shown_url = safe_url(self.url)
        self.api_model = api_model or "default"
        self.__key = api_key or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = max(backoff, 0.0)
        self.concurrency = concurrency
        #: seconds slept between attempts (for tests and traces)
        self.slept = 0.0
        #: no attempt starts before this time.monotonic(): a 429's Retry-After holds back
        #: every request in flight, not only the one that got it
        self._not_before = 0.0
        self._lock = threading.Lock()
        self._pool: Any = None

    @property
    def batched(self) -> bool:
        return self.concurrency > 1

    def complete_many(
        self,
        conversations: list[Messages],
        params: GenerationParams,
        on_done: Callable[[int], None] | None = None,
        cancelled: Sequence[Callable[[], bool] | None] = (),
    ) -> list[tuple[Completion | Exception, float]]:
        """Up to `concurrency` requests in flight; results in order, each with its own
        retries (one request's failure is that conversation's, not the batch's).
        `on_done(completion_tokens)` is called in this thread as each one ends. `cancelled` is
        accepted for the local backend's sake: a request sent upstream runs to its end."""
        from concurrent.futures import as_completed

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="sage-openai")

        def one(messages: Messages) -> tuple[Completion | Exception, float]:
            t0 = time.perf_counter()
            try:
                result: Completion | Exception = self.complete(messages, params)
            except Exception as exc:  # noqa: BLE001 - handed back with the others
                result = exc
            return result, time.perf_counter() - t0

        futures = [self._pool.submit(one, messages) for messages in conversations]
        if on_done is not None:
            for future in as_completed(futures):
                result = future.result()[0]
                on_done(result.completion_tokens or 0 if isinstance(result, Completion) else 0)
        return [future.result() for future in futures]

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend({self.shown_url!r}, api_model={self.api_model!r})"

    def load(self, json_schema: dict[str, Any] | None) -> None:
        pass

    def identity(self, hash_cache: Path | None) -> str:
        return f"openai:{self.url}:{self.api_model}"

    def body(self, messages: Messages, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.api_model,
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": params.json_schema},
            }
        return body

    def complete(
        self, messages: Messages, params: GenerationParams, on_text: OnText | None = None
    ) -> Completion:
        completion = self._complete(messages, params)
        if on_text is not None and completion.text:
            on_text(completion.text)  # the server's answer, whole (no streaming upstream yet)
        return completion

    def _complete(self, messages: Messages, params: GenerationParams) -> Completion:
        data = json.dumps(self.body(messages, params)).encode("utf-8")
        attempts = self.retries + 1
        reason = ""
        for attempt in range(attempts):
            try:
                return self._attempt(data)
            except _Retry as exc:
                reason = str(exc)
                if attempt + 1 < attempts:
                    wait = self.backoff * (2**attempt)
                    if exc.wait is not None:
                        wait = max(wait, min(exc.wait, MAX_RETRY_AFTER))
                        with self._lock:  # the server is busy for every request
                            self._not_before = max(self._not_before, time.monotonic() + wait)
                    self._sleep(wait)
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise TransientError(f"{self.shown_url}: {reason} (gave up after {tries}; --retries)")

    def _sleep(self, wait: float) -> None:
        time.sleep(wait)
        with self._lock:
            self.slept += wait

    def _attempt(self, data: bytes) -> Completion:
        hold = self._not_before - time.monotonic()
        if hold > 0:
            self._sleep(hold)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except urllib.error.URLError as exc:
            why = exc.reason
            if isinstance(why, TimeoutError | socket.timeout):
                raise _Retry(f"no answer within {self.timeout:g} s (--timeout)") from None
            text = why.strerror if isinstance(why, OSError) and why.strerror else str(why)
            raise _Retry(f"cannot connect: {text}") from None
        except TimeoutError:
            raise _Retry(f"no answer within {self.timeout:g} s (--timeout)") from None
        except (ConnectionError, OSError) as exc:
            raise _Retry(f"connection failed: {exc.strerror or type(exc).__name__}") from None
        except Exception as exc:  # noqa: BLE001 - http.client's protocol errors
            raise _Retry(f"bad HTTP response: {type(exc).__name__}") from None
        return parse_chat_completion(raw)

    def _http_error(self, exc: urllib.error.HTTPError) -> Exception:
        try:
            detail = exc.read()[:QUOTE].decode("utf-8", errors="replace").strip()
        except Exception:  # noqa: BLE001 - a body that cannot be read is no detail
            detail = ""
        if self.__key and self.__key in detail:  # servers that echo the key they refused
            detail = detail.replace(self.__key, "***")
        status = exc.code
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 400:
            return OperatorError(
                f"{self.shown_url}: the server redirects (HTTP {status}); sage does not follow "
                "redirects (the API key would go along): give the final URL as --base-url"
            )
        if status in (408, 409, 425, 429) or status >= 500:
            wait = None
            after = exc.headers.get("Retry-After") if exc.headers else None
            if after and after.strip().isdigit():
                wait = float(after)
            return _Retry(f"server answered {said}", wait)
        if status in (401, 403):
            return ResourceUnavailable(
                f"{self.shown_url}: server refused the request ({said}); check the API key "
                "in OPENAI_API_KEY"
            )
        if status == 404:
            return OperatorError(
                f"{self.shown_url}: {said}; check --base-url (usually ending "
                "in /v1) and --api-model"
            )
        return RecordError(f"{self.shown_url}: server rejected the request: {said}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def parse_chat_completion(raw: bytes) -> Completion:
    """The answer in a chat completion response; `_Retry` when it is not one."""
    try:
        response = json.loads(raw)
        choice = response["choices"][0]
        text = choice["message"]["content"]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        excerpt = raw[:80].decode("utf-8", errors="replace")
        raise _Retry(f"not a chat completion (check --base-url): {excerpt!r}") from None
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    return Completion(
        text=text,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
    )


# -- the cache ---------------------------------------------------------------------------------


def cache_key(identity: str, params: GenerationParams, messages: Messages) -> str:
    return content_key({"model": identity, "params": asdict(params), "messages": messages})


# -- the operator -----------------------------------------------------------------------------


def load_json_schema(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    try:
        schema = json.loads(Path(source).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"--json-schema {source}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise OptionError(f"--json-schema {source}: not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise OptionError(f"--json-schema {source}: a JSON Schema must be an object")
    return schema


def record_messages(record: Record, system: str | None) -> Messages:
    """The chat messages to answer for a record: `messages`, else `prompt`, else `query`."""
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RecordError(
                "field 'messages' must be a non-empty list of "
                '{"role": ..., "content": ...} objects with string content'
            )
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        for name in ("prompt", "query"):
            if name in record:
                text = record[name]
                if not isinstance(text, str):
                    raise RecordError(f"field {name!r} must be str, got {type(text).__name__}")
                if not text.strip():
                    raise RecordError(f"field {name!r} is empty")
                out = [{"role": "user", "content": text}]
                break
        else:
            have = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
            raise RecordError(
                f"record has no 'messages' or 'prompt' field (run sage prompt "
                f"first) (fields: {have})"
            )
    if system is not None:
        out = [m for m in out if m["role"] != "system"]
        out.insert(0, {"role": "system", "content": system})
    return out


class Generate(Operator):
    """Add an `answer` (and `usage`) to each record with a local model or an OpenAI API."""

    name = "generate"
    requires = {}
    produces = {
        "answer": {"type": "string"},
        "answer_json": {"description": "the answer parsed as JSON (with --json-schema)"},
        "citations": {
            "type": "array",
            "description": "ids of the docs the answer cites as [n] (records with docs only)",
        },
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": ["integer", "null"]},
                "completion_tokens": {"type": ["integer", "null"]},
                "seconds": {"type": "number"},
                "cached": {"type": "boolean"},
            },
        },
        "prompt_truncated": {"type": "boolean"},
        "_warnings": {"type": "array", "items": {"type": "string"}},
    }
    memory = "streaming"
    stateless = True
    default_batch_size = 1

    def __init__(
        self,
        *,
        model: str = "smollm2-135m",
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        backend: str = "llama",
        base_url: str | None = None,
        api_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        system: str | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
        json_schema: str | os.PathLike[str] | dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
        parallel: int | None = None,
        concurrency: int | None = None,
    ) -> None:
        if parallel is not None and parallel < 1:
            raise OptionError(f"--parallel must be at least 1, got {parallel}")
        if concurrency is not None and concurrency < 1:
            raise OptionError(f"--concurrency must be at least 1, got {concurrency}")
        if max_tokens < 1:
            raise OptionError(f"--max-tokens must be at least 1, got {max_tokens}")
        if temperature < 0:
            raise OptionError(f"--temperature must be 0 or more, got {temperature}")
        schema = load_json_schema(json_schema) if json_schema is not None else None
        self.params = GenerationParams(
            max_tokens=max_tokens,
            temperature=float(temperature),
            seed=seed,
            stop=tuple(stop),
            json_schema=schema,
        )
        self.system = system
        self.model = model
        self.model_dirs = list(model_dirs)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.hash_cache = Path(hash_cache) if hash_cache is not None else None
        self.backend: LlamaBackend | OpenAIBackend | None = None
        if backend == "openai":
            if not base_url:
                raise OptionError(
                    "--backend openai needs --base-url, e.g. http://127.0.0.1:8080/v1"
                )
            if parallel is not None:
                raise OptionError(
                    "--parallel is for the local model; use --concurrency with --backend openai"
                )
            self.slots = concurrency or DEFAULT_CONCURRENCY
            self.backend = OpenAIBackend(
                base_url,
                api_model=api_model,
                api_key=api_key,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
                concurrency=self.slots,
            )
        elif backend == "llama":
            if base_url:
                raise OptionError("--base-url needs --backend openai")
            if concurrency is not None:
                raise OptionError(
                    "--concurrency is for --backend openai; the local model takes --parallel"
                )
            self.slots = parallel or DEFAULT_PARALLEL
            if max_tokens >= n_ctx:
                raise OptionError(
                    f"--max-tokens ({max_tokens}) must be less than --n-ctx ({n_ctx})"
                )
            self.n_ctx = n_ctx
            self.threads = threads
        else:
            raise OptionError(f"unknown backend {backend!r}: use llama or openai")
        #: records per batch: enough to keep every slot busy (an instance attribute, read by
        #: the driver in place of the class's)
        self.default_batch_size = self.slots * BATCH_PER_SLOT if self.slots > 1 else 1
        self.cache: ResultCache | None = None
        #: what each record of the last failed batch came to, by id(record)
        self._settled: dict[int, tuple[Record, Record | Exception]] = {}
        #: id(record) -> True once that record's reader went away (a server's client closed its
        #: connection): its answer stops early, finish_reason "cancelled", and is not cached
        self.cancel_checks: dict[int, Callable[[], bool]] = {}
        #: called (from the thread that calls process) as each record of a batch is answered,
        #: so a terminal's progress line moves during a long batch (sage_cli.observability.progress)
        self.on_progress: Callable[[], None] | None = None
        #: records answered (or failed) so far, within the current batch too
        self.completed = 0
        #: counters for traces and benchmarks
        self.generated_tokens = 0
        self.answers = 0
        self.generate_seconds = 0.0

    def setup(self) -> None:
        if self.backend is None:
            from .models import locate

            path = locate(self.model, self.model_dirs)
            self.backend = LlamaBackend(
                path,
                n_ctx=self.n_ctx,
                threads=self.threads,
                seed=self.params.seed,
                parallel=self.slots,
            )
        if self.cache_dir is not None and self.params.deterministic:
            # the model's identity (its sha256) now, from the file about to be loaded: a model
            # file removed or replaced later in a long run changes nothing (docs/generation.md)
            self.backend.identity(self.hash_cache)
        self.backend.load(self.params.json_schema)
        if self.cache_dir is not None and self.params.deterministic:
            self.cache = ResultCache(self.cache_dir / "generate.sqlite", table="generations")

    def _lookup(self, record: Record) -> tuple[Messages, str | None, Completion | None]:
        """The messages to answer for `record`, its cache key and the cached completion."""
        assert self.backend is not None, "setup() was not called"
        messages = record_messages(record, self.system)
        if self.cache is None:
            return messages, None, None
        key = cache_key(self.backend.identity(self.hash_cache), self.params, messages)
        cached = self.cache.get_json(key)
        return messages, key, Completion(**cached) if cached is not None else None

    def _answered(
        self,
        record: Record,
        completion: Completion,
        seconds: float,
        key: str | None,
        cached: bool,
    ) -> Record:
        """`record` with its answer, usage and warnings; the completion goes into the cache."""
        self.answers += 1
        out = dict(record)
        out["answer"] = completion.text.strip()
        add_citations(out)
        if self.params.json_schema is not None:
            try:
                out["answer_json"] = json.loads(completion.text)
            except ValueError:
                why = " (it hit --max-tokens)" if completion.finish_reason == "length" else ""
                raise RecordError(
                    f"the answer is not valid JSON{why}: {completion.text[:80]!r}"
                ) from None
        usage: dict[str, Any] = {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "seconds": round(seconds, 4),
        }
        if cached:
            usage["cached"] = True
        out["usage"] = usage
        for warning in completion.warnings:
            add_warning(out, warning)
        if completion.truncated or "prompt_truncated" in record:
            out["prompt_truncated"] = completion.truncated or bool(record.get("prompt_truncated"))
        cut = completion.finish_reason == "cancelled"  # stopped by on_text: not the answer
        if cut:
            usage["cancelled"] = True
        if self.cache is not None and key is not None and not cached and not cut:
            self.cache.put_json(key, asdict(completion))
        return out

    def answer(self, record: Record, on_text: OnText | None = None) -> Record:
        """One record answered on its own (one model call, or the cache). With `on_text`, the
        answer's text is handed to it piece by piece as it is generated (whole, for a cache
        hit); on_text returning False stops the answer there, and such a cut answer is not
        cached."""
        assert self.backend is not None, "setup() was not called"
        messages, key, cached = self._lookup(record)
        gone = self.cancel_checks.get(id(record))
        if on_text is None and gone is not None:
            on_text = _until(gone)  # streamed, so that it can stop when its reader goes away
        if cached is not None:
            if on_text is not None and cached.text:
                on_text(cached.text)
            self._done(0)
            return self._answered(record, cached, 0.0, key, True)
        t0 = time.perf_counter()
        completion = self.backend.complete(messages, self.params, on_text)
        seconds = time.perf_counter() - t0
        self.generate_seconds += seconds
        self._done(completion.completion_tokens or 0)
        return self._answered(record, completion, seconds, key, False)

    def _done(self, tokens: int) -> None:
        self.completed += 1
        self.generated_tokens += tokens
        if self.on_progress is not None:
            self.on_progress()

    def answer_many(self, batch: list[Record]) -> list[Record | Exception]:
        """Every record of `batch` answered together (the local model's batched decoder, or
        --concurrency requests in flight): one output record or exception per record."""
        assert self.backend is not None, "setup() was not called"
        out: list[Record | Exception | None] = [None] * len(batch)
        todo: list[tuple[int, Messages, str | None]] = []
        for i, record in enumerate(batch):
            try:
                messages, key, cached = self._lookup(record)
                if cached is not None:
                    out[i] = self._answered(record, cached, 0.0, key, True)
                    self._done(0)
                else:
                    todo.append((i, messages, key))
            except Exception as exc:  # noqa: BLE001 - that record's error, judged by the driver
                out[i] = exc
                self._done(0)
        if todo:
            t0 = time.perf_counter()
            done = self.backend.complete_many(
                [m for _, m, _ in todo],
                self.params,
                on_done=self._done,
                cancelled=[self.cancel_checks.get(id(batch[i])) for i, _, _ in todo],
            )
            self.generate_seconds += time.perf_counter() - t0
            for (i, _, key), (result, seconds) in zip(todo, done, strict=True):
                if isinstance(result, Exception):
                    out[i] = result
                    continue
                try:
                    out[i] = self._answered(batch[i], result, seconds, key, False)
                except Exception as exc:  # noqa: BLE001 - e.g. an answer that is not JSON
                    out[i] = exc
        return [r if r is not None else OperatorError("not answered") for r in out]

    def process(self, batch: list[Record]) -> list[Record]:
        # The driver retries a failed batch record by record: what each record of the failed
        # batch came to is kept, so the retry hands it back at once (a record that failed after
        # its own retries and timeouts fails again at once, not twice as slow, and the others
        # are not generated twice).
        settled = self._settled
        if len(batch) == 1 and id(batch[0]) in settled:
            record, result = settled.pop(id(batch[0]))
            if record is batch[0]:
                if isinstance(result, Exception):
                    raise result
                return [result]
        self._settled = {}
        if len(batch) > 1 and self.backend is not None and self.backend.batched:
            results = self.answer_many(batch)
        else:
            results = []
            for record in batch:
                try:
                    results.append(self.answer(record))
                except (ResourceUnavailable, OutputFailed):
                    raise  # the stage stops: no point asking for the other records
                except Exception as exc:  # noqa: BLE001 - kept for the driver's retry
                    results.append(exc)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        fatal = next(
            (r for r in results if isinstance(r, ResourceUnavailable | OutputFailed)), None
        )
        if fatal is not None:
            raise fatal
        if failed is None:
            return results  # type: ignore[return-value]
        self._settled = {id(r): (r, res) for r, res in zip(batch, results, strict=True)}
        raise failed

    def summary(self) -> str:
        """One line for a terminal's stderr at the end: answers, tokens/s, cache hits."""
        if not self.answers:
            return ""
        rate = self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0
        cached = self.cache.hits if self.cache is not None else 0
        return (
            f"{self.answers} answer(s), {self.generated_tokens} tokens generated in "
            f"{self.generate_seconds:.1f} s ({rate:.1f} generated tokens/s while decoding), {cached} from the cache"
        )

    def close(self) -> list[Record]:
        if self.cache is not None:
            self.cache.close()
        if self.backend is not None:
            self.backend.close()
        return []
