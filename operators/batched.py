"""Continuous batching for a local llama.cpp model: many sequences decoding together.

On a CPU, one `llama_decode` over N sequences' next tokens costs far less than N decodes of one
token each (the weights are read once per step, not once per sequence): SmolLM2-135M went from
about 106 tokens/s for one sequence to 236 for 16 (../shared/MODELS.md). `BatchedDecoder` keeps
up to `n_seq` sequences in flight in one llama.cpp context and schedules them the way llama.cpp's
own server does:

- a new prompt is prefilled alone, in `n_batch` chunks, as one-at-a-time decoding does (so the
  answers are the same; `shared_prefill=True` puts prompt chunks of several sequences into the
  decode steps instead: fewer passes, but 10-20% of answers then differ at temperature 0);
- each decode step builds one `llama_batch` with the next token of every decoding sequence
  (one `seq_id` per sequence, its own positions), sorted by `seq_id`;
- after `llama_decode`, each sequence whose logits were asked for samples its next token with its
  own sampler chain (its own grammar state for a JSON schema, its own seed);
- a sequence that ends (end-of-generation token, a stop string, `max_tokens`, or its request's
  `cancelled()` turning True: a server's client went away) frees its KV cells
  (`llama_memory_seq_rm`) and its slot; the next waiting request takes the slot at once
  (continuous batching: the batch never drains while requests wait).

The KV cache has one stream of `n_ctx_seq` cells per sequence (`kv_unified=false`): a sequence's
cells are laid out as in one-at-a-time decoding, and llama.cpp keeps the streams apart. A
request whose prompt + `max_tokens` exceeds `n_ctx_seq` is that request's error. A slot keeps
its last prompt's cells, and the next prompt in it reuses their common prefix.

Results come back in request order. At temperature 0 the answers were those of one-at-a-time
decoding on every prompt measured (docs/generation.md says why shared prefill broke that).

This module is pure: no environment, no printing. `llama_cpp` is imported when a decoder is made.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import OperatorError, RecordError


@dataclass
class Request:
    """One sequence to generate: its prompt tokens and how to sample it."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    #: stop strings, as bytes (the answer is cut before the first one found, as llama-cpp-python does)
    stop: Sequence[bytes] = ()
    #: a `llama_cpp.LlamaGrammar` (each request gets its own grammar state)
    grammar: Any = None
    #: returns True once the request's reader went away: the sequence stops at the next step
    #: (finish_reason "cancelled") and its slot goes to the next request waiting
    cancelled: Callable[[], bool] | None = None
    #: score the prompt instead of answering it: nothing is sampled, the next-token logits of
    #: the prompt's last token come back in `Generated.logits` (a reranker's yes/no judgement)
    logits: bool = False


@dataclass
class Generated:
    """What one request produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    #: wall time from the request taking a slot to its last token
    seconds: float
    #: with `Request.logits`: the prompt's next-token logits (a numpy float32 array)
    logits: Any = None


@dataclass
class _Sequence:
    index: int
    request: Request
    seq_id: int
    sampler: Any
    started: float
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    #: the token to feed next step (the last sampled), None while prefilling
    next_token: int | None = None
    #: position of this sequence's logits in the current batch, -1 when none
    i_batch: int = -1
    logits: Any = None


def _gone(request: Request) -> bool:
    return request.cancelled is not None and bool(request.cancelled())


class BatchedDecoder:
    """Up to `n_seq` sequences of one model decoding together in a context of its own.

    `llm` is a loaded `llama_cpp.Llama` (its model weights are shared; its own context is left
    alone). Each sequence has `n_ctx_seq` cells of KV cache; `n_batch` tokens at most go into one
    decode step (`n_ubatch` per physical pass). `run(requests)` returns one `Generated`
    or exception per request, in order; `on_done(i, result)` is called as each one finishes.
    """

    def __init__(
        self,
        llm: Any,
        *,
        n_seq: int,
        n_ctx_seq: int = 2048,
        n_batch: int = 512,
        n_ubatch: int = 512,
        threads: int = 1,
        shared_prefill: bool = False,
        reuse_prefix: bool = True,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if n_seq < 1:
            raise ValueError("n_seq must be at least 1")
        self.llm = llm
        self.n_seq = n_seq
        #: context of each sequence: its prompt and answer must fit
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = max(n_batch, n_seq)
        self.shared_prefill = shared_prefill
        #: a new prompt keeps the cells of the prefix it shares with its slot's last prompt
        #: (False: every prompt is prefilled whole, as one-at-a-time decoding does; a prefix
        #: computed in an earlier pass gives slightly different logits, which a reranker's
        #: continuous scores show and greedy sampling mostly does not)
        self.reuse_prefix = reuse_prefix
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(n_ubatch, self.n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = False  # one KV stream per sequence
        params.embeddings = False
        params.n_threads = threads
        params.n_threads_batch = threads
        self._llama_cpp = llama_cpp
        self._internals = _internals
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = _internals.LlamaBatch(
            n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False
        )
        self.vocab = llm._model.vocab
        #: decode steps and tokens decoded, for tests and benchmarks
        self.steps = 0
        #: prompt tokens whose cells were reused from the slot's previous prompt
        self.reused_tokens = 0
        #: the prompt tokens whose cells each slot holds
        self._cached: list[list[int]] = [[] for _ in range(n_seq)]
        self.max_in_flight = 0
        #: requests stopped because their `cancelled()` turned True
        self.cancelled = 0

    # -- sampling ----------------------------------------------------------------------------

    def _sampler(self, request: Request) -> Any:
        """The chain llama-cpp-python's `create_chat_completion` builds, for one sequence."""
        sampler = self._internals.LlamaSampler()
        if request.grammar is not None:
            sampler.add_grammar(self.llm._model, request.grammar)
        if request.temperature == 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(40)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(0.95, 1)
            sampler.add_min_p(0.05, 1)
            sampler.add_temp(request.temperature)
            seed = request.seed if request.seed is not None else random.getrandbits(32)
            sampler.add_dist(seed)
        return sampler

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self,
        requests: Sequence[Request],
        on_done: Callable[[int, Generated | Exception], None] | None = None,
    ) -> list[Generated | Exception]:
        results: list[Generated | Exception | None] = [None] * len(requests)
        waiting = deque(range(len(requests)))
        free = set(range(self.n_seq))
        active: list[_Sequence] = []

        def settle(i: int, result: Generated | Exception) -> None:
            results[i] = result
            if on_done is not None:
                on_done(i, result)

        def finish(seq: _Sequence, reason: str) -> None:
            # keep the prompt's cells: the next prompt in this slot reuses their common prefix
            # (the chat template's system message, a shared instruction)
            end = len(seq.request.prompt)
            self._llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, end, -1)
            self._cached[seq.seq_id] = seq.request.prompt
            free.add(seq.seq_id)
            active.remove(seq)
            seq.sampler.close()
            settle(seq.index, self._generated(seq, reason))

        try:
            while waiting or active:
                # a sequence whose reader went away stops here: its slot is free for the next
                for seq in [s for s in active if _gone(s.request)]:
                    self.cancelled += 1
                    finish(seq, "cancelled")
                # admit waiting requests while a slot is free (continuous batching)
                while waiting and free:
                    request = requests[waiting[0]]
                    index = waiting.popleft()
                    if _gone(request):
                        self.cancelled += 1
                        settle(index, Generated("", len(request.prompt), 0, "cancelled", 0.0))
                        continue
                    need = len(request.prompt) + request.max_tokens
                    if not request.prompt or need > self.n_ctx_seq:
                        settle(
                            index,
                            RecordError(
                                f"prompt of {len(request.prompt)} tokens and max_tokens "
                                f"{request.max_tokens} do not fit in {self.n_ctx_seq} tokens "
                                "of context"
                            ),
                        )
                        continue
                    seq_id, reuse = self._slot_for(request.prompt, free)
                    free.remove(seq_id)
                    self._llama_cpp.llama_memory_seq_rm(self.memory, seq_id, reuse, -1)
                    self._cached[seq_id] = request.prompt[:reuse]
                    self.reused_tokens += reuse
                    active.append(
                        _Sequence(
                            index=index,
                            request=request,
                            seq_id=seq_id,
                            sampler=self._sampler(request),
                            started=time.perf_counter(),
                            prefilled=reuse,
                        )
                    )
                self.max_in_flight = max(self.max_in_flight, len(active))
                if not self.shared_prefill:
                    # each new prompt alone, in n_batch chunks, as one-at-a-time decoding does
                    for seq in [s for s in active if s.next_token is None]:
                        while seq.i_batch < 0:
                            self._fill_batch([seq], prompts=True, decoding=False)
                            self._decode()
                        self._sample(seq, finish)
                self._fill_batch(active, prompts=self.shared_prefill, decoding=True)
                if self.batch.batch.n_tokens:
                    self._decode()
                    for seq in list(active):
                        if seq.i_batch >= 0:
                            self._sample(seq, finish)
        finally:
            # an exception (or Ctrl-C) mid-run: leave the context empty for the next run
            for seq in active:
                seq.sampler.close()
                self._llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                self._cached[seq.seq_id] = []
        return [r if r is not None else OperatorError("not generated") for r in results]

    def _slot_for(self, prompt: list[int], free: set[int]) -> tuple[int, int]:
        """The free slot whose cached prompt shares the longest prefix with `prompt`, and how
        many of its cells to keep (never the whole prompt: its last token is decoded again, for
        the logits)."""
        best, best_n = min(free), -1
        for seq_id in sorted(free):  # the lowest id among the best: slots stay packed
            cached = self._cached[seq_id]
            n = 0
            for a, b in zip(cached, prompt, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = seq_id, n
        return best, min(best_n, len(prompt) - 1) if self.reuse_prefix else 0

    def _sample(self, seq: _Sequence, finish: Callable[[_Sequence, str], None]) -> None:
        if seq.request.logits:
            import numpy as np

            row = self._llama_cpp.llama_get_logits_ith(self.ctx.ctx, seq.i_batch)
            seq.logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy()
            seq.i_batch = -1
            finish(seq, "logits")
            return
        token = seq.sampler.sample(self.ctx, seq.i_batch)
        seq.i_batch = -1
        reason = self._accept(seq, token)
        if reason is not None:
            finish(seq, reason)

    def _fill_batch(self, active: list[_Sequence], *, prompts: bool, decoding: bool) -> None:
        """One step's tokens: every decoding sequence's next token, then prompt chunks."""
        b = self.batch.batch
        n = 0
        # by seq_id: with one KV stream per sequence llama.cpp puts only consecutive increasing
        # seq_ids into one ubatch (split_equal); out of order, every token is a ubatch of its own
        for seq in sorted(active, key=lambda s: s.seq_id):
            if seq.next_token is None or not decoding:
                continue
            pos = len(seq.request.prompt) + len(seq.tokens) - 1
            b.token[n] = seq.next_token
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq.seq_id
            b.logits[n] = True
            seq.i_batch = n
            n += 1
        for seq in active:
            if n >= self.n_batch or not prompts:
                break
            prompt = seq.request.prompt
            if seq.next_token is not None or seq.prefilled >= len(prompt):
                continue
            take = min(len(prompt) - seq.prefilled, self.n_batch - n)
            for k in range(seq.prefilled, seq.prefilled + take):
                b.token[n] = prompt[k]
                b.pos[n] = k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.seq_id
                b.logits[n] = False
                n += 1
            seq.prefilled += take
            if seq.prefilled == len(prompt):
                b.logits[n - 1] = True
                seq.i_batch = n - 1
        b.n_tokens = n

    def _decode(self) -> None:
        rc = self._llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        self.steps += 1
        if rc != 0:
            raise OperatorError(
                f"llama_decode failed (code {rc}) with {self.batch.batch.n_tokens} tokens in "
                "the batch; try a lower --parallel"
            )

    def _accept(self, seq: _Sequence, token: int) -> str | None:
        """Take a sampled token; the finish reason when the sequence is done."""
        if self._llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return "stop"
        seq.tokens.append(token)
        seq.next_token = token
        if seq.request.stop:
            text = self.llm.detokenize(seq.tokens, prev_tokens=seq.request.prompt)
            if any(s in text for s in seq.request.stop):
                return "stop"
        if len(seq.tokens) >= seq.request.max_tokens:
            return "length"
        return None

    def _generated(self, seq: _Sequence, reason: str) -> Generated:
        text = self.llm.detokenize(seq.tokens, prev_tokens=seq.request.prompt)
        found = [s for s in seq.request.stop if s in text]
        if found:
            text = text[: text.index(found[0])]
        return Generated(
            text=text.decode("utf-8", errors="ignore"),
            prompt_tokens=len(seq.request.prompt),
            completion_tokens=len(seq.tokens),
            finish_reason=reason,
            seconds=time.perf_counter() - seq.started,
            logits=seq.logits,
        )

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
