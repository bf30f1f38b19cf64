"""The safe loader and the Embedder, on tiny random-weight models."""

from __future__ import annotations

import numpy as np
import pytest

from sage_cli.operators.base import OptionError, ResourceUnavailable
from sage_cli.operators.llm import Embedder, load_llama


def test_load_llama_generates_with_the_chat_template(tiny_llama):
    llm = load_llama(tiny_llama, n_ctx=128, n_threads=1)
    out = llm.create_chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0
    )
    assert out["usage"]["completion_tokens"] >= 1
    # the ChatML template of the GGUF was applied: more prompt tokens than "hi" alone
    assert out["usage"]["prompt_tokens"] > 10
    llm.close()


def test_load_llama_refuses_bad_options(tiny_llama):
    with pytest.raises(OptionError):
        load_llama(tiny_llama, n_threads=0)
    with pytest.raises(OptionError):
        load_llama(tiny_llama, n_ctx=0)


def test_load_llama_missing_file(tmp_path):
    with pytest.raises(ResourceUnavailable, match="not found"):
        load_llama(tmp_path / "none.gguf")


def test_embedder_shapes_and_norms(tiny_bert):
    emb = Embedder(tiny_bert, n_threads=1, batch_size=2)
    texts = ["the cat sits on the mat", "a kitten is on the rug", "stock market", "", "python"]
    vecs = emb.embed(texts)
    assert vecs.shape == (5, 32) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert emb.dim == 32 and emb.count == 5
    assert emb.embed([]).shape == (0, 32)
    emb.close()


def test_embedder_batches_do_not_change_vectors(tiny_bert):
    texts = [f"the cat sits on mat {i}" for i in range(7)]
    one_by_one = np.vstack([Embedder(tiny_bert, 1, batch_size=1).embed([t]) for t in texts[:2]])
    batched = Embedder(tiny_bert, 1, batch_size=64).embed(texts)
    assert np.allclose(one_by_one, batched[:2], atol=1e-4)


def test_embedder_truncates_long_texts(tiny_bert):
    emb = Embedder(tiny_bert, 1, n_ctx=64)
    long = "the cat sits on the mat " * 500  # thousands of tokens
    vecs = emb.embed([long, "the cat"])
    assert vecs.shape == (2, 32) and np.isfinite(vecs).all()


def test_embedder_sha256_is_the_file_hash(tiny_bert):
    import hashlib

    assert Embedder(tiny_bert).model_sha256 == hashlib.sha256(tiny_bert.read_bytes()).hexdigest()
    assert Embedder(tiny_bert, model_sha256="abc").model_sha256 == "abc"


def test_embedder_refuses_a_model_without_pooling(tiny_llama):
    with pytest.raises(ResourceUnavailable, match="pooling|embedding"):
        Embedder(tiny_llama, 1).embed(["x"])


@pytest.mark.model
def test_real_minilm_similarity(real_model_dirs):
    from sage_cli.operators.models import locate

    emb = Embedder(locate("minilm-l6", real_model_dirs), n_threads=2)
    v = emb.embed(
        ["The cat sits on the mat", "A kitten is on the rug", "The stock market fell sharply today"]
    )
    assert v.shape == (3, 384)
    related, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert 0.5 < related < 0.7, related  # 0.60 with the PyTorch reference
    assert unrelated < 0.2, unrelated
