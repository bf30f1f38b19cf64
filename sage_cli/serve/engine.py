"""The chat engine: sage's operators built once and answering requests in batches.

`ChatEngine` holds one Retriever (with an index), one Prompt, one Generate and one Embed, each
built and set up once. `answer(requests)` runs a batch of chat requests through them: the last
user message of each is retrieved against the index, rendered by the template (`qa`) into the
last user message (earlier turns are kept as they are), and answered by one
`Generate.process(batch)` call per set of generation parameters, so when Generate decodes a
batch together every request in it shares the work. `stream(request, ...)` answers one request
and hands its text over as it is generated. Each operator runs under the one Driver (its
per-record retry and error policy), so a request that fails fails alone.

Everything here runs on the model thread (`batching.ModelWorker`): the operators are not
thread-safe and are never called from two threads at once. This module imports no web stack.
The Python API's in-process pipeline (`sage_cli.api`) is where a YAML or Python pipeline would
replace the fixed retrieve-prompt-generate chain.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sage_cli.execution.driver import Driver, ErrorMode, ErrorPolicy
from sage_cli.operators.base import Operator, Record, RecordError
from sage_cli.serve.errors import ContextLengthExceeded

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to answer (already validated)."""

    messages: tuple[tuple[str, str], ...]  # (role, content): hashable, so requests can group
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: documents to retrieve (None: the engine's default); only with an index
    k: int | None = None
    #: set when the client went away: the answer stops at the next token, its slot freed
    cancel: threading.Event | None = field(default=None, compare=False)

    @classmethod
    def of(cls, messages: Sequence[dict[str, str]], **kwargs: Any) -> ChatRequest:
        return cls(tuple((m["role"], m["content"]) for m in messages), **kwargs)

    def message_list(self) -> Messages:
        return [{"role": r, "content": c} for r, c in self.messages]

    def question(self) -> str:
        """The last user message: what is retrieved against the index."""
        for role, content in reversed(self.messages):
            if role == "user":
                return content
        raise RecordError("the messages have no user message to answer")


@dataclass
class ChatAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    #: stop, length (hit max_tokens) or cancelled (the reader stopped a stream)
    finish_reason: str
    sources: list[Record] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


class _Collect:
    """What the Driver writes to: the records, in order."""

    #: a downstream stage that wants no more input (never here)
    done = False

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, records: list[Record]) -> None:
        self.records.extend(records)

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


class _KeepFailures(ErrorPolicy):
    """`--on-error emit`, remembering each failed record's exception by its position."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage, ErrorMode.emit)
        self.failures: dict[int, BaseException] = {}

    def bad_record(
        self, record: Record, origin: str, line: int, exc: BaseException
    ) -> list[Record]:
        self.failures[line] = exc
        return super().bad_record(record, origin, line, exc)


def run_batch(op: Operator, records: list[Record]) -> list[Record | BaseException]:
    """`op.process(records)` under the Driver (a failed batch is retried record by record): one
    output record or exception per input record, in order. For one-to-one operators."""
    if not records:
        return []
    writer = _Collect()
    policy = _KeepFailures(op.name)
    driver = Driver(op, writer, policy, batch_size=len(records))  # type: ignore[arg-type]
    driver.feed_block("request", 1, records, None, True)
    driver.drain()  # the operator is already set up: the executor runs it in this thread
    out: list[Record | BaseException] = []
    for record in writer.records:
        error = record.get("_error")
        if isinstance(error, dict) and error.get("line") in policy.failures:
            out.append(policy.failures[error["line"]])
        else:
            out.append(record)
    if len(out) != len(records):
        raise RuntimeError(f"{op.name} returned {len(out)} records for {len(records)}")
    return out


class ChatEngine:
    """Retrieve (with an index), prompt and generate; and embed. Built once per server."""

    def __init__(
        self,
        *,
        index: str | os.PathLike[str] | None = None,
        model: str = "smollm2-135m",
        embed_model: str | None = None,
        k: int = 4,
        mode: str = "dense",
        template: str = "qa",
        system: str | None = None,
        n_ctx: int = 2048,
        max_tokens: int = 256,
        threads: int | None = None,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        cache_dir: str | os.PathLike[str] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
        embeddings: bool = True,
    ) -> None:
        from sage_cli.operators.generate import Generate
        from sage_cli.operators.models import DEFAULT_EMBED, model_label
        from sage_cli.operators.prompt import Prompt

        self.index = Path(index) if index is not None else None
        self.k = k
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.model_name = model_label(model)
        self.generate = Generate(
            model=model,
            model_dirs=model_dirs,
            max_tokens=max_tokens,
            system=system,
            n_ctx=n_ctx,
            threads=threads,
            cache_dir=cache_dir,
            hash_cache=hash_cache,
        )
        self.retriever: Any = None
        self.prompt: Any = None
        if self.index is not None:
            from sage_cli.operators.retrieve import Retriever

            self.retriever = Retriever(
                self.index,
                k=k,
                mode=mode,
                model_dirs=model_dirs,
                threads=threads,
                hash_cache=hash_cache,
            )
            self.prompt = Prompt(template, n_ctx=n_ctx, reserve=max_tokens)
        self.embed_name = model_label(embed_model or DEFAULT_EMBED)
        self.embedder: Any = None
        if embeddings:
            from sage_cli.operators.embed import Embed

            self.embedder = Embed(
                embed_model or DEFAULT_EMBED,
                model_dirs=model_dirs,
                threads=threads,
                cache_path=None if cache_dir is None else Path(cache_dir) / "embed.sqlite",
                hash_cache=hash_cache,
            )

    # -- life cycle ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Load every model and the index now, so the first request pays nothing."""
        self.generate.setup()
        if self.retriever is not None:
            self.retriever.setup()
            if self.retriever.mode != "bm25":
                self.retriever.embedder.get()
        if self.embedder is not None:
            self.embedder.setup()

    def close(self) -> None:
        for op in (self.retriever, self.embedder, self.generate):
            if op is not None:
                try:
                    op.close()
                except Exception:  # noqa: BLE001 - closing must not hide why we stopped
                    pass

    @property
    def models(self) -> list[str]:
        names = [self.model_name]
        if self.embedder is not None and self.embed_name not in names:
            names.append(self.embed_name)
        return names

    @property
    def embedding_dim(self) -> int | None:
        emb = getattr(self.embedder, "embedder", None)
        return None if emb is None else int(emb.dim)

    # -- chat ---------------------------------------------------------------------------------

    def answer(self, requests: list[ChatRequest]) -> list[ChatAnswer | BaseException]:
        """Answer a batch of requests: one result or exception each, in order."""
        results: list[ChatAnswer | BaseException | None] = [None] * len(requests)
        records: list[Record | None] = []
        sources: list[list[Record]] = []
        for i, req in enumerate(requests):
            try:
                self._check_length(req)
                records.append({"id": i})
            except Exception as exc:  # noqa: BLE001 - this request's error, the rest go on
                results[i] = exc
                records.append(None)
            sources.append([])
        live = [i for i, r in enumerate(records) if r is not None]
        if self.retriever is not None:
            self._with_context(requests, records, sources, results, live)
        else:
            for i in live:
                records[i] = {"id": i, "messages": requests[i].message_list()}
        # one Generate.process per set of generation parameters
        groups: dict[Any, list[int]] = {}
        for i in live:
            if results[i] is None:
                groups.setdefault(self._params(requests[i]), []).append(i)
        for params, idx in groups.items():
            self.generate.params = params
            batch: list[Record] = [records[i] for i in idx]  # type: ignore[misc]
            self.generate.cancel_checks = {
                id(record): event.is_set
                for record, event in zip(batch, (requests[i].cancel for i in idx), strict=True)
                if event is not None
            }
            t0 = time.perf_counter()
            try:
                outs = run_batch(self.generate, batch)
            finally:
                self.generate.cancel_checks = {}
            seconds = time.perf_counter() - t0
            for i, out in zip(idx, outs, strict=True):
                results[i] = (
                    out
                    if isinstance(out, BaseException)
                    else _to_answer(out, requests[i], sources[i], seconds)
                )
        return [r if r is not None else RuntimeError("no answer") for r in results]

    def stream(
        self,
        request: ChatRequest,
        on_text: Callable[[str], object],
        on_sources: Callable[[list[Record]], None] | None = None,
    ) -> ChatAnswer:
        """Answer one request, handing its text to `on_text` as it is generated (returning
        False stops it: finish_reason "cancelled"). `on_sources` gets the retrieved documents
        before the answer starts."""
        self._check_length(request)
        records: list[Record | None] = [{"id": 0}]
        sources: list[list[Record]] = [[]]
        results: list[Any] = [None]
        if self.retriever is not None:
            self._with_context([request], records, sources, results, [0])
            if isinstance(results[0], BaseException):
                raise results[0]
        else:
            records[0] = {"id": 0, "messages": request.message_list()}
        if on_sources is not None:
            on_sources(sources[0])
        cancelled = False

        def relay(piece: str) -> object:
            nonlocal cancelled
            if on_text(piece) is False:
                cancelled = True
                return False
            return True

        self.generate.params = self._params(request)
        t0 = time.perf_counter()
        out = self.generate.answer(records[0], relay)  # type: ignore[arg-type]
        answer = _to_answer(out, request, sources[0], time.perf_counter() - t0)
        if cancelled:
            answer.finish_reason = "cancelled"
        return answer

    def _params(self, req: ChatRequest) -> Any:
        return replace(
            self.generate.params,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            seed=req.seed,
            stop=req.stop,
        )

    def _check_length(self, req: ChatRequest) -> None:
        """A request whose own messages leave no room for its answer is the client's error
        (400 context_length_exceeded), not something to cut silently."""
        from sage_cli.operators.generate import SAFETY_TOKENS, LlamaBackend

        backend = self.generate.backend
        if not isinstance(backend, LlamaBackend):
            return
        limit = self.n_ctx - req.max_tokens - SAFETY_TOKENS
        # a cheap bound first: a token is at least one byte of UTF-8 for this tokenizer's
        # byte fallback, and rarely less than a character; no need to tokenize megabytes
        chars = sum(len(c) for _, c in req.messages)
        if chars > 16 * self.n_ctx:
            raise ContextLengthExceeded(
                f"the messages are {chars} characters, far more than the model's context of "
                f"{self.n_ctx} tokens: shorten them"
            )
        n = backend.count(req.message_list())
        if n > limit:
            raise ContextLengthExceeded(
                f"the messages are {n} tokens; with max_tokens {req.max_tokens} they do not fit "
                f"the model's context of {self.n_ctx} tokens: shorten them or lower max_tokens"
            )

    def _with_context(
        self,
        requests: Sequence[ChatRequest],
        records: list[Record | None],
        sources: list[list[Record]],
        results: list[Any],
        live: list[int],
    ) -> None:
        """Retrieve each live request's question and render its last user message with the
        template and the documents; `records[i]` gets the messages to answer."""
        by_k: dict[int, list[int]] = {}
        for i in live:
            by_k.setdefault(requests[i].k or self.k, []).append(i)
        retrieved: dict[int, Record] = {}
        for k, idx in by_k.items():
            self.retriever.k = k
            batch = []
            for i in idx:
                try:
                    batch.append((i, {"id": i, "query": requests[i].question()}))
                except RecordError as exc:
                    results[i] = exc
            outs = run_batch(self.retriever, [r for _, r in batch])
            for (i, _), out in zip(batch, outs, strict=True):
                if isinstance(out, BaseException):
                    results[i] = out
                else:
                    retrieved[i] = out
        self.retriever.k = self.k
        order = [i for i in live if i in retrieved]
        rendered = run_batch(self.prompt, [retrieved[i] for i in order])
        for i, out in zip(order, rendered, strict=True):
            if isinstance(out, BaseException):
                results[i] = out
                continue
            docs = out.get("docs") or []
            sources[i] = [_source(d) for d in docs]
            messages = requests[i].message_list()
            last = max(j for j, m in enumerate(messages) if m["role"] == "user")
            prompt_messages = out["messages"]
            messages[last : last + 1] = [m for m in prompt_messages if m["role"] != "system"]
            system = [m for m in prompt_messages if m["role"] == "system"]
            if system and not any(m["role"] == "system" for m in messages):
                messages.insert(0, system[0])
            record: Record = {"id": i, "messages": messages}
            if out.get("_warnings"):
                record["_warnings"] = list(out["_warnings"])
            records[i] = record

    # -- retrieval and embeddings (MCP tools, /v1/embeddings) ---------------------------------

    def retrieve(self, queries: list[tuple[str, int | None]]) -> list[list[Record] | BaseException]:
        """The documents for each (query, k), best first."""
        if self.retriever is None:
            err = RecordError("this server has no index (start it with --index DIR)")
            return [err for _ in queries]
        out: list[list[Record] | BaseException] = [[] for _ in queries]
        by_k: dict[int, list[int]] = {}
        for i, (_, k) in enumerate(queries):
            by_k.setdefault(k or self.k, []).append(i)
        for k, idx in by_k.items():
            self.retriever.k = k
            results = run_batch(self.retriever, [{"id": i, "query": queries[i][0]} for i in idx])
            for i, res in zip(idx, results, strict=True):
                out[i] = (
                    res if isinstance(res, BaseException) else [_source(d) for d in res["docs"]]
                )
        self.retriever.k = self.k
        return out

    def embed(self, batches: list[list[str]]) -> list[tuple[Any, int] | BaseException]:
        """Vectors (float32 array, one row per text) and token counts, per request; all the
        texts of all the requests go to the model in one call."""
        if self.embedder is None:
            err = RecordError("this server serves no embedding model")
            return [err for _ in batches]
        texts = [t for batch in batches for t in batch]
        vectors = self.embedder.vectors(texts)
        out: list[tuple[Any, int] | BaseException] = []
        start = 0
        for batch in batches:
            rows = vectors[start : start + len(batch)]
            tokens = self.embedder.embedder.count_tokens(batch)
            out.append((rows, tokens))
            start += len(batch)
        return out


def _source(doc: Record) -> Record:
    """A retrieved document as the API shows it."""
    keep = ("id", "text", "score", "rank", "metadata", "parent_id")
    return {k: doc[k] for k in keep if k in doc}


def _to_answer(out: Record, req: ChatRequest, sources: list[Record], seconds: float) -> ChatAnswer:
    usage = out.get("usage") or {}
    completion = int(usage.get("completion_tokens") or 0)
    if completion >= req.max_tokens:
        finish = "length"
    elif usage.get("cancelled"):
        finish = "cancelled"
    else:
        finish = "stop"
    return ChatAnswer(
        text=out.get("answer", ""),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=completion,
        finish_reason=finish,
        sources=sources,
        warnings=[w for w in out.get("_warnings") or [] if isinstance(w, str)],
        seconds=float(usage.get("seconds") or seconds),
        cached=bool(usage.get("cached")),
    )
