"""The one way sage loads a llama.cpp model, and the sentence embedder built on it.

Every model operator (embed, retrieve, rerank, generate, eval) loads models through
`load_llama`, which validates the GGUF file first (`operators.gguf_check`): a missing, truncated
or corrupt file is a `ResourceUnavailable` (exit 69) with the fix, never a llama.cpp abort.
`llama_cpp` is imported inside the functions, so importing this module stays cheap.

Usage::

    from .llm import load_llama, Embedder

    llm = load_llama(path, n_ctx=4096, n_threads=2)               # generation
    emb = Embedder(path, n_threads=2)                             # sentence embeddings
    vectors = emb.embed(["a sentence", "another"])                # float32 (n, dim), unit norm
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import OptionError, ResourceUnavailable
from .gguf_check import FIX, GGUFInfo, check_gguf

if TYPE_CHECKING:
    import numpy as np

#: embedding context in tokens: MiniLM's max_seq_length (longer texts are truncated to it);
#: llama.cpp packs several short texts into one decode. 128 is ~15% faster on short sentences
EMBED_CTX = 256
#: texts per `Llama.embed` call in `Embedder.embed`
EMBED_BATCH = 64
#: tokens per encoder pass in `Embedder.embed` (a longer text goes alone, up to the context):
#: the encoder's attention spans the whole pass, so packing two 100-token chunks into one
#: 256-token pass costs more than two passes; measured on the demo's chunks, 2 threads, per
#: CPU-second: 21.7 chunks/s packed to 256 tokens (what `Llama.embed` does), 25 with 128
EMBED_PASS_TOKENS = 128

_lock = threading.Lock()


def load_llama(
    path: str | os.PathLike[str],
    *,
    embedding: bool = False,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    n_batch: int = 512,
    n_ubatch: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    """Validate the GGUF file at `path`, then return a quiet `llama_cpp.Llama` for it.

    Signature (keyword-only after `path`):

        load_llama(path, *, embedding=False, n_ctx=2048, n_threads=None, n_batch=512,
                   n_ubatch=None, seed=0, **kwargs) -> llama_cpp.Llama

    - `path`: a GGUF file (resolve names such as "smollm2-135m" with `operators.models.locate`).
    - `embedding`: build an embedding context (`Llama.embed`); a generation model otherwise.
    - `n_ctx`: context length in tokens (prompt + completion for generation).
    - `n_threads`: CPU threads for decode and batch; None = 1 (callers pass the fair share the
      command computed, e.g. `sage_cli.resources.default_threads()`: never let two model stages
      each take every core).
    - `n_batch`, `n_ubatch`: llama.cpp logical/physical batch; `n_ubatch` None = `n_batch`.
    - `seed`: the sampling seed (temperature 0 is deterministic whatever it is).
    - `**kwargs`: passed to `llama_cpp.Llama` as is (e.g. `chat_format`, `logits_all`).

    Raises `ResourceUnavailable` (exit 69) for a missing or corrupt file or one llama.cpp
    refuses, `OptionError` (exit 2) for impossible sizes. `verbose=False` always.
    """
    if n_ctx < 8 or n_batch < 1 or (n_ubatch is not None and n_ubatch < 1):
        raise OptionError(f"bad context sizes: n_ctx={n_ctx}, n_batch={n_batch}")
    if n_threads is not None and n_threads < 1:
        raise OptionError(f"--threads must be at least 1, got {n_threads}")
    info = check_gguf(path)
    trained = info.context_length
    if info.absolute_positions and trained and n_ctx > trained:
        # positions past the trained context index outside the position embeddings: llama.cpp
        # aborts (GGML_ASSERT in get_rows), so never ask for more
        n_ctx = trained
        n_batch = min(n_batch, trained)
        n_ubatch = min(n_ubatch or n_batch, trained)
    threads = n_threads or 1
    import jinja2
    from llama_cpp import Llama

    try:
        with _lock:
            return Llama(
                model_path=str(path),
                embedding=embedding,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_ubatch or n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                seed=seed,
                verbose=False,
                **kwargs,
            )
    except (ValueError, RuntimeError) as exc:
        # llama-cpp-python raises ValueError("Failed to load model from file") and friends
        raise ResourceUnavailable(f"llama.cpp could not load {path}: {exc}; {FIX}") from None
    except jinja2.TemplateError as exc:
        # Llama() compiles the file's chat template: a damaged one is the file's fault
        raise ResourceUnavailable(
            f"{path}: the chat template in the model file does not compile "
            f"({type(exc).__name__}: {exc}); {FIX}"
        ) from None


class Embedder:
    """Sentence embeddings from a BERT-family GGUF (mean pooling), L2-normalised float32.

    `Embedder(model_path, n_threads, batch_size=EMBED_BATCH, n_ctx=EMBED_CTX)`; the model loads
    on first use (or `load()`). `embed(texts)` returns a float32 array of shape (len(texts), dim)
    and makes one `Llama.embed(list)` call per `batch_size` texts. A text longer than the
    context is truncated to its first `n_ctx` tokens, never an error. `dim` and `model_sha256`
    (computed lazily, or passed in when the caller already knows it) describe the model.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        n_threads: int | None = None,
        batch_size: int = EMBED_BATCH,
        *,
        n_ctx: int = EMBED_CTX,
        model_sha256: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise OptionError(f"batch size must be at least 1, got {batch_size}")
        self.model_path = Path(model_path)
        self.n_threads = n_threads
        self.batch_size = batch_size
        self.n_ctx = n_ctx
        self._sha256 = model_sha256
        self._llm: Any = None
        self.info: GGUFInfo | None = None
        #: texts embedded by the model (not from any cache) since construction
        self.count = 0

    def load(self) -> None:
        if self._llm is not None:
            return
        self.info = check_gguf(self.model_path)
        trained = self.info.context_length
        if self.info.absolute_positions and trained and trained < self.n_ctx:
            self.n_ctx = trained  # never past the position embeddings (llama.cpp aborts)
        self._llm = load_llama(
            self.model_path,
            embedding=True,
            n_ctx=self.n_ctx,
            n_batch=self.n_ctx,
            n_ubatch=self.n_ctx,
            n_threads=self.n_threads,
        )
        if self._llm.pooling_type() <= 0:  # NONE (or unspecified): per-token vectors only
            self.close()
            raise ResourceUnavailable(
                f"{self.model_path} has no pooling ({self.info.architecture}): not a "
                "sentence-embedding model; use an embedding model such as minilm-l6"
            )

    @property
    def dim(self) -> int:
        self.load()
        return int(self._llm.n_embd())

    @property
    def model_sha256(self) -> str:
        if self._sha256 is None:
            from .digest import sha256_file

            self._sha256 = sha256_file(self.model_path)
        return self._sha256

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts`: float32 array (len(texts), dim), each row of unit length."""
        import numpy as np

        self.load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = [t if t else " " for t in texts[start : start + self.batch_size]]
            with _lock:
                out[start : start + len(chunk)] = self._embed_packed(chunk)
        self.count += len(texts)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _embed_packed(self, texts: list[str]) -> np.ndarray:
        """Pooled vectors of `texts` (not normalised), what `Llama.embed(texts,
        truncate=True)` returns, computed in passes of about EMBED_PASS_TOKENS tokens: texts
        sorted by length are packed greedily (one sequence id each), a text longer than the
        budget goes alone (truncated to the context)."""
        import llama_cpp
        import numpy as np

        llm = self._llm
        n_embd = int(llm.n_embd())
        limit = int(llm.n_batch)
        n_seq_max = int(llm.context_params.n_seq_max)
        tokens = [llm.tokenize(t.encode("utf-8"))[:limit] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
        out = np.empty((len(texts), n_embd), dtype=np.float32)
        batch = llm._batch
        ctx = llm._ctx
        group: list[int] = []
        used = 0

        def run(group: list[int]) -> None:
            ctx.kv_cache_clear()
            ctx.decode(batch)
            batch.reset()
            for seq, i in enumerate(group):
                ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                out[i] = np.ctypeslib.as_array(ptr, shape=(n_embd,))

        batch.reset()
        for i in order:
            n = len(tokens[i])
            budget = min(max(EMBED_PASS_TOKENS, n), limit)  # never past the batch's room
            if group and (used + n > budget or len(group) >= n_seq_max):
                run(group)
                group, used = [], 0
            batch.add_sequence(tokens[i], len(group), True)  # every token is an output (pooling)
            group.append(i)
            used += n
        if group:
            run(group)
        ctx.kv_cache_clear()
        return out

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts` (each cut at the context, as `embed` does)."""
        self.load()
        with _lock:
            return sum(
                min(len(self._llm.tokenize(t.encode("utf-8"), add_bos=True)), self.n_ctx)
                for t in texts
            )

    def close(self) -> None:
        if self._llm is not None:
            try:
                self._llm.close()
            except Exception:  # noqa: BLE001 - releasing native memory must not fail a run
                pass
            self._llm = None
