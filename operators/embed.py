"""The `embed` operator: add a sentence embedding to each record.

Output fields: `embedding` (a list of floats, unit length) or, with `fmt="b64"`,
`embedding_b64` (base64 of the little-endian float32 bytes, 4 x dim bytes: about a third of the
size of the float list in JSON); and `embedding_model` (`{"name", "sha256"}`) so an index can
refuse vectors from a different model.

Embeddings are cached by content (`operators.cache.ResultCache`, one sqlite file): the key is
the model file's sha256, the context length (it decides truncation) and the text, so a re-run
embeds only the texts it has not seen. Within a batch, equal texts are embedded once.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Operator, OptionError, Record, record_text
from .cache import ResultCache, content_key
from .llm import EMBED_BATCH, EMBED_CTX, Embedder
from .models import DEFAULT_EMBED, model_label

FORMATS = ("floats", "b64")
#: decimals kept in `embedding` floats: float32 precision for unit vectors, short JSON
#: (`--format b64` is exact)
FLOAT_DECIMALS = 7


class Embed(Operator):
    """Add an `embedding` of each record's text (a local GGUF sentence-embedding model)."""

    name = "embed"
    requires = {"text": {"type": "string", "description": "the text to embed (`content` too)"}}
    produces = {
        "embedding": {
            "type": "array",
            "items": {"type": "number"},
            "description": "unit-length vector (absent with --format b64)",
        },
        "embedding_b64": {
            "type": "string",
            "description": "base64 little-endian float32 (--format b64 only)",
        },
        "embedding_model": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}},
        },
    }
    memory = "streaming"
    stateless = True
    default_batch_size = EMBED_BATCH

    def __init__(
        self,
        model: str = DEFAULT_EMBED,
        *,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        field: str = "text",
        fmt: str = "floats",
        threads: int | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
        model_sha256: str | None = None,
        n_ctx: int = EMBED_CTX,
        batch_size: int = EMBED_BATCH,
    ) -> None:
        if fmt not in FORMATS:
            raise OptionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not field:
            raise OptionError("--field must name a field")
        self.model = model
        self.model_dirs = list(model_dirs)
        self.model_path: Path | None = None
        self.model_name = model_label(model)
        self.field = field
        self.fmt = fmt
        self.threads = threads
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.hash_cache = hash_cache
        self.model_sha256 = model_sha256
        self.n_ctx = n_ctx
        self.batch_size = batch_size
        self.embedder: Embedder | None = None
        self.cache: ResultCache | None = None
        self._model_ref: dict[str, str] = {}
        if field != "text":
            self.requires = {field: {"type": "string", "description": "the text to embed"}}  # type: ignore[misc]
        #: texts the model embedded / texts answered from the cache
        self.embedded = 0
        self.cache_hits = 0
        #: texts seen (a text repeated within a batch is embedded once)
        self.texts = 0

    def setup(self) -> None:
        from .gguf_check import check_gguf
        from .models import locate, sha256_file

        self.model_path = locate(self.model, self.model_dirs)
        check_gguf(self.model_path, what=f"embedding model {self.model_name}")
        if self.model_sha256 is None:
            self.model_sha256 = sha256_file(self.model_path, self.hash_cache)
        self.embedder = Embedder(
            self.model_path,
            self.threads,
            self.batch_size,
            n_ctx=self.n_ctx,
            model_sha256=self.model_sha256,
        )
        self.embedder.load()
        self._model_ref = {"name": self.model_name, "sha256": self.model_sha256}
        if self.cache_path is not None:
            self.cache = ResultCache(self.cache_path, table="embeddings")

    def _key(self, text: str) -> str:
        return content_key("embed", self.model_sha256, self.n_ctx, text)

    def vectors(self, texts: list[str]) -> Any:
        """Embeddings of `texts` (float32, one row each): from the cache where possible."""
        import numpy as np

        assert self.embedder is not None, "setup() first"
        dim = self.embedder.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        keys: dict[str, str] = {}
        for i, text in enumerate(texts):
            if self.cache is not None:
                key = keys.setdefault(text, self._key(text))
                raw = self.cache.get(key) if text not in missing else None
                if raw is not None and len(raw) == 4 * dim:
                    out[i] = np.frombuffer(raw, dtype="<f4")
                    self.cache_hits += 1
                    continue
            missing.setdefault(text, []).append(i)
        if missing:
            unique = list(missing)
            vecs = self.embedder.embed(unique)
            self.embedded += len(unique)
            for text, vec in zip(unique, vecs, strict=True):
                out[missing[text]] = vec
            if self.cache is not None:
                self.cache.put_many(
                    [(keys[t], vecs[j].astype("<f4").tobytes()) for j, t in enumerate(unique)]
                )
        return out

    def process(self, batch: list[Record]) -> list[Record]:
        # a deletion record (source --watch) has nothing to embed: it passes through as it is
        todo = [r for r in batch if not (r.get("deleted") is True and "text" not in r)]
        texts = [record_text(r, self.field) for r in todo]
        self.texts += len(texts)
        vecs = iter(self.vectors(texts))
        out: list[Record] = []
        for record in batch:
            if record.get("deleted") is True and "text" not in record:
                out.append(record)
                continue
            vec = next(vecs)
            rec = dict(record)
            if self.fmt == "b64":
                rec.pop("embedding", None)
                rec["embedding_b64"] = base64.b64encode(vec.astype("<f4").tobytes()).decode()
            else:
                rec.pop("embedding_b64", None)
                rec["embedding"] = vec.astype("f8").round(FLOAT_DECIMALS).tolist()
            rec["embedding_model"] = self._model_ref
            out.append(rec)
        return out

    def summary(self) -> str | None:
        """One line for stderr at the end of a run (the command shows it on a terminal)."""
        if not self.texts:
            return None
        return f"{self.texts} text(s): {self.embedded} embedded, {self.cache_hits} from the cache"

    def close(self) -> list[Record]:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        return []
