"""The embed operator on the tiny BERT: fields, formats, cache, errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sage_cli.operators.base import OptionError, RecordError, ResourceUnavailable
from sage_cli.operators.embed import Embed


@pytest.fixture
def make(tiny_model_dir, tmp_path):
    ops = []

    def build(**kwargs):
        kwargs.setdefault("model_dirs", [tiny_model_dir])
        kwargs.setdefault("threads", 1)
        kwargs.setdefault("cache_path", tmp_path / "embed.sqlite")
        op = Embed(**kwargs)
        op.setup()
        ops.append(op)
        return op

    yield build
    for op in ops:
        op.close()


def test_adds_embedding_and_model_and_passes_fields_through(make, tiny_bert):
    import hashlib

    op = make()
    out = op.process(
        [
            {"id": "a", "text": "the cat sits", "meta": {"k": [1]}},
            {"id": "b", "content": "a kitten"},
        ]
    )
    assert [r["id"] for r in out] == ["a", "b"]
    assert out[0]["meta"] == {"k": [1]} and out[1]["content"] == "a kitten"
    for r in out:
        vec = np.array(r["embedding"])
        assert vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
        assert r["embedding_model"] == {
            "name": "minilm-l6",
            "sha256": hashlib.sha256(tiny_bert.read_bytes()).hexdigest(),
        }


def test_b64_format_is_the_same_vector(make):
    floats = make(cache_path=None).process([{"text": "the cat sits on the mat"}])[0]
    b64 = make(fmt="b64").process([{"text": "the cat sits on the mat", "embedding": [0.0]}])[0]
    assert "embedding" not in b64  # replaced, never both
    vec = np.frombuffer(base64.b64decode(b64["embedding_b64"]), dtype="<f4")
    assert np.allclose(vec, floats["embedding"], atol=1e-6)


def test_other_field(make):
    op = make(field="title")
    out = op.process([{"title": "python", "text": "ignored"}])
    assert len(out[0]["embedding"]) == 32
    assert op.requires == {"title": {"type": "string", "description": "the text to embed"}}
    with pytest.raises(RecordError, match="'title'"):
        op.process([{"text": "no title here"}])


def test_missing_field_names_the_field(make):
    with pytest.raises(RecordError, match="no 'text' field"):
        make().process([{"id": 1, "body": "x"}])
    with pytest.raises(RecordError, match="must be str"):
        make().process([{"id": 1, "text": 42}])


def test_cache_second_run_embeds_only_what_changed(make):
    texts = [{"id": i, "text": f"the cat number {i}"} for i in range(5)]
    first = make()
    a = first.process(texts)
    assert (first.embedded, first.cache_hits) == (5, 0)
    first.close()
    second = make()
    changed = [*texts[:4], {"id": 4, "text": "a brand new text"}]
    b = second.process(changed)
    assert (second.embedded, second.cache_hits) == (1, 4)
    assert [r["embedding"] for r in b[:4]] == [r["embedding"] for r in a[:4]]
    assert second.summary() == "5 text(s): 1 embedded, 4 from the cache"


def test_no_cache(make):
    op = make(cache_path=None)
    op.process([{"text": "x"}])
    op.process([{"text": "x"}])
    assert (op.embedded, op.cache_hits) == (2, 0)


def test_repeated_texts_in_a_batch_are_embedded_once(make):
    op = make(cache_path=None)
    out = op.process([{"text": "same"}, {"text": "other"}, {"text": "same"}])
    assert op.embedded == 2 and out[0]["embedding"] == out[2]["embedding"]


def test_cache_is_keyed_by_model(make, tiny_model_dir, tmp_path):
    from tests.fixtures.tiny_models import write_tiny_bert

    other = write_tiny_bert(tmp_path / "other.gguf", seed=7)
    make().process([{"text": "the cat"}])
    op = make(model=str(other))
    out = op.process([{"text": "the cat"}])
    assert op.embedded == 1 and op.cache_hits == 0
    assert out[0]["embedding_model"]["name"] == "other.gguf"


def test_unusable_cache_dir_is_ignored(make, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    op = make(cache_path=blocker / "sub" / "embed.sqlite")
    assert len(op.process([{"text": "x"}])[0]["embedding"]) == 32


def test_bad_options_and_missing_model(tmp_path):
    with pytest.raises(OptionError):
        Embed(fmt="xml")
    op = Embed(model=str(tmp_path / "none.gguf"))
    with pytest.raises(ResourceUnavailable, match="not found"):
        op.setup()
    op = Embed(model="minilm-l6", model_dirs=[tmp_path])
    (tmp_path / "all-MiniLM-L6-v2.f16.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ResourceUnavailable, match="not a valid GGUF"):
        op.setup()


@pytest.mark.model
def test_packed_passes_give_llama_embed_vectors():
    """Embedder packs texts sorted by length into ~128-token encoder passes: the vectors are
    those of `Llama.embed` (its own packing), texts longer than a pass and empty ones too."""
    from sage_cli.operators.llm import Embedder
    from sage_cli.operators.models import locate
    from sage_cli.resources import model_dirs

    texts = ["", "a cat", "The cat sits on the mat", "A kitten is on the rug"]
    texts += [" ".join(["word"] * n) for n in (30, 90, 140, 300)]  # 300 words: truncated
    embedder = Embedder(locate("minilm-l6", model_dirs()), n_threads=1)
    mine = embedder.embed(texts)
    ref = np.asarray(
        embedder._llm.embed([t or " " for t in texts], normalize=False, truncate=True),
        dtype=np.float32,
    )
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert (mine * ref).sum(axis=1).min() > 0.99999
    assert 0.55 < float(mine[2] @ mine[3]) < 0.65  # MODELS.md: 0.60
    embedder.close()
