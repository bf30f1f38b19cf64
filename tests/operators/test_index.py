"""Index storage, BM25 and search with synthetic vectors (no model needed)."""

import os
import zlib

import numpy as np
import orjson
import pytest

import sage_cli.operators.index as index_mod
from sage_cli.operators.base import OptionError, RecordError, ResourceUnavailable
from sage_cli.operators.bm25 import BM25, top_k
from sage_cli.operators.index import Index, IndexBuilder, ModelRef, read_manifest, write_index
from sage_cli.operators.retrieve import Retriever, rrf

DIM = 16


class FakeEmbedder:
    """Bag of hashed words -> unit vector; stands in for the real model in plumbing tests."""

    def __init__(self, path=None, threads=None, sha="f" * 64, dim=DIM):
        self.model_sha256 = sha
        self.dim = dim
        self.calls = []

    def embed(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        out[:, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def close(self):
        pass


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(tmp_path, n=300, dim=DIM, seed=0, name="idx", texts=None, model=ModelRef("synthetic")):
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n, dim)
    records = [
        {"id": f"d{i}", "text": texts[i] if texts else f"document number {i}", "metadata": {"n": i}}
        for i in range(n)
    ]
    path = tmp_path / name
    write_index(path, vectors, records, model, trees=10)
    return path, vectors


def test_write_and_read_back(tmp_path):
    path, vectors = build(tmp_path)
    manifest = read_manifest(path)
    assert manifest["count"] == 300 and manifest["dimension"] == DIM
    assert manifest["metric"] == "angular" and manifest["model"]["name"] == "synthetic"
    assert set(os.listdir(path)) == {"manifest.json", *manifest["files"].values()}
    loaded = np.load(path / "vectors.npy", allow_pickle=False)
    assert loaded.dtype == np.float32 and np.allclose(loaded, vectors, atol=1e-6)
    lines = (path / "records.ndjson").read_bytes().splitlines()
    assert orjson.loads(lines[7]) == {"id": "d7", "text": "document number 7", "metadata": {"n": 7}}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


def test_known_nearest_neighbour_found_by_annoy_and_exact(tmp_path):
    path, vectors = build(tmp_path)
    index = Index(path)
    rng = np.random.default_rng(5)
    target = 123
    query = vectors[target] + 0.05 * unit(rng, 1)[0]
    query /= np.linalg.norm(query)
    for exact in (False, True):
        hits = index.dense(query, 5, exact=exact)
        assert hits[0][0] == target
        assert hits[0][1] == pytest.approx(float(vectors[target] @ query), abs=1e-5)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_annoy_recall_against_exact_at_default_search_k(tmp_path):
    from tests.bench.bench_retrieve import clustered_vectors

    data = clustered_vectors(3050, dim=64)
    write_index(
        tmp_path / "ix", data[:3000], [{"id": str(i), "text": "t"} for i in range(3000)], None
    )
    index = Index(tmp_path / "ix")
    recall = np.mean(
        [
            len({r for r, _ in index.dense(q, 10)} & {r for r, _ in index.dense(q, 10, exact=True)})
            / 10
            for q in data[3000:]
        ]
    )
    assert recall >= 0.95
    # annoy's own default (trees * k) is measurably worse on the same data
    low = np.mean(
        [
            len(
                {r for r, _ in index.dense(q, 10, search_k=index.trees * 10)}
                & {r for r, _ in index.dense(q, 10, exact=True)}
            )
            / 10
            for q in data[3000:]
        ]
    )
    assert low < recall


def test_bm25_hand_checked():
    docs = ["the cat sat", "the dog sat on the dog", "a bird"]
    bm = BM25.build(docs)
    # N=3, avglen=(3+6+2)/3; "dog": df=1, tf=2 in doc 1 (len 6)
    idf = np.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    avg = 11 / 3
    expected = idf * 2 * 2.2 / (2 + 1.2 * (1 - 0.75 + 0.75 * 6 / avg))
    scores = bm.scores("Dog!")
    assert scores[1] == pytest.approx(expected, rel=1e-5)
    assert scores[0] == 0 and scores[2] == 0
    # "sat": df=2 -> lower idf than a rare term; the repeated query term counts once
    assert bm.search("sat sat", 5) == bm.search("sat", 5)
    assert [r for r, _ in bm.search("sat", 5)] == [0, 1]  # the shorter document wins
    assert bm.search("zebra", 5) == []


def test_bm25_saved_and_loaded_without_pickle(tmp_path):
    bm = BM25.build(["alpha beta", "beta gamma gamma", "über straße"])
    bm.save(tmp_path / "b.npz")
    again = BM25.load(tmp_path / "b.npz")
    assert np.allclose(again.scores("gamma beta"), bm.scores("gamma beta"))
    assert again.search("straße", 1)[0][0] == 2


def test_top_k_and_rrf():
    assert top_k(np.array([0.1, 0.9, 0.5, 0.9]), 3) == [
        (1, pytest.approx(0.9)),
        (3, pytest.approx(0.9)),
        (2, pytest.approx(0.5)),
    ]
    fused = rrf([[1, 2, 3], [3, 1]], 2)
    assert [r for r, _ in fused] == [1, 3]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_failed_build_leaves_old_index(tmp_path, monkeypatch):
    path, _ = build(tmp_path, n=50)
    before = {p: (path / p).read_bytes() for p in os.listdir(path)}

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom()

    monkeypatch.setattr(index_mod, "_swap_into_place", fail)
    with pytest.raises(Boom):
        build(tmp_path, n=80, seed=1)
    assert {p: (path / p).read_bytes() for p in os.listdir(path)} == before
    assert Index(path).count == 50
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # the half-built temp dir is gone


def test_rebuild_replaces_old_index(tmp_path):
    path, _ = build(tmp_path, n=50)
    build(tmp_path, n=70, seed=3)
    assert Index(path).count == 70
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_foreign_directory_is_never_replaced(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(OptionError, match="not a sage index"):
        build(tmp_path, name="mine")
    assert (foreign / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", "..", "sub/vectors.npy"])
def test_manifest_path_traversal_rejected(tmp_path, name):
    path, _ = build(tmp_path, n=20)
    manifest = orjson.loads((path / "manifest.json").read_bytes())
    manifest["files"]["vectors"] = name
    (path / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(ResourceUnavailable, match="unsafe|outside"):
        Index(path)


def test_symlink_out_of_the_index_rejected(tmp_path):
    path, _ = build(tmp_path, n=20)
    outside = tmp_path / "elsewhere.npy"
    os.replace(path / "vectors.npy", outside)
    os.symlink(outside, path / "vectors.npy")
    with pytest.raises(ResourceUnavailable, match="outside"):
        Index(path)


@pytest.mark.parametrize("damage", ["missing", "garbage", "foreign", "truncated-records"])
def test_missing_or_corrupt_index_is_unavailable(tmp_path, damage):
    path, _ = build(tmp_path, n=20)
    if damage == "missing":
        path = tmp_path / "nope"
    elif damage == "garbage":
        (path / "manifest.json").write_text("{not json")
    elif damage == "foreign":
        (path / "manifest.json").write_text('{"hello": 1}')
    else:
        lines = (path / "records.ndjson").read_bytes().splitlines(keepends=True)
        (path / "records.ndjson").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(ResourceUnavailable, match="index"):
        Index(path)


# -- the build operator -----------------------------------------------------------------------


def rec(i, vec, model="m1", **extra):
    return {
        "id": f"r{i}",
        "text": f"text {i}",
        "embedding": [float(x) for x in vec],
        "embedding_model": model,
        **extra,
    }


def test_builder_writes_index_and_summary(tmp_path):
    vecs = unit(np.random.default_rng(1), 5)
    op = IndexBuilder(tmp_path / "ix", trees=5)
    out = op.run([rec(i, v, keep="me") for i, v in enumerate(vecs)])
    assert out == [
        {
            "index": str(tmp_path / "ix"),
            "count": 5,
            "dimension": DIM,
            "model": "m1",
            "model_sha256": None,
            "trees": 5,
            "sentence_vectors": 0,  # m1 is no model found here: none
        }
    ]
    index = Index(tmp_path / "ix")
    assert index.records[2] == {"id": "r2", "text": "text 2", "keep": "me"}  # no embedding kept
    assert index.model == ModelRef("m1")


def test_builder_accepts_base64_float32(tmp_path):
    import base64

    vec = unit(np.random.default_rng(2), 1)[0]
    b64 = base64.b64encode(vec.astype("<f4").tobytes()).decode()
    IndexBuilder(tmp_path / "ix").run([{"id": "a", "text": "x", "embedding_b64": b64}])
    assert np.allclose(Index(tmp_path / "ix").vectors[0], vec, atol=1e-6)


def test_builder_refuses_mixed_models_naming_the_record(tmp_path):
    vecs = unit(np.random.default_rng(1), 3)
    op = IndexBuilder(tmp_path / "ix")
    op.setup()
    op.process([rec(0, vecs[0]), rec(1, vecs[1])])
    with pytest.raises(RecordError, match=r"'r2'.*m2.*cannot mix"):
        op.process([rec(2, vecs[2], model="m2")])
    with pytest.raises(RecordError, match=r"'r3'.*8-dimensional"):
        op.process([rec(3, vecs[2][:8])])
    # the failed batches kept nothing: only r0 and r1 are built
    assert op.close()[0]["count"] == 2


def test_builder_failed_batch_keeps_nothing_and_duplicate_ids_refused(tmp_path):
    vecs = unit(np.random.default_rng(1), 3)
    op = IndexBuilder(tmp_path / "ix")
    op.setup()
    with pytest.raises(RecordError, match="duplicate id 'r0'"):
        op.process([rec(0, vecs[0]), rec(0, vecs[1])])
    assert op.records == []
    op.process([rec(0, vecs[0])])
    assert op.close()[0]["count"] == 1


def test_builder_embeds_records_without_vectors(tmp_path):
    fake = FakeEmbedder()
    op = IndexBuilder(
        tmp_path / "ix",
        model="minilm-l6",
        embedder_factory=lambda p, t: fake,
        model_dirs=[str(tmp_path)],
    )
    (tmp_path / "all-MiniLM-L6-v2.f16.gguf").write_bytes(b"GGUF")  # located, never loaded
    out = op.run([{"id": "a", "content": "red apples"}, {"id": "b", "text": "blue sky"}])
    assert fake.calls == [["red apples", "blue sky"]]
    assert out[0]["model"] == "minilm-l6" and out[0]["model_sha256"] == "f" * 64
    index = Index(tmp_path / "ix")
    assert index.records[0]["text"] == "red apples" and "content" not in index.records[0]
    assert index.model.sha256 == "f" * 64


def test_builder_with_no_records_writes_nothing(tmp_path):
    assert IndexBuilder(tmp_path / "ix").run([]) == []
    assert not (tmp_path / "ix").exists()


def test_builder_bad_embedding_is_record_error(tmp_path):
    op = IndexBuilder(tmp_path / "ix")
    with pytest.raises(RecordError, match="list of numbers"):
        op.run([{"id": "a", "text": "x", "embedding": ["a", "b"]}])
    with pytest.raises(RecordError, match="NaN"):
        IndexBuilder(tmp_path / "ix").run([{"id": "a", "text": "x", "embedding": [float("nan")]}])


# -- retrieve over a synthetic index ----------------------------------------------------------

TEXTS = [
    "the cat sits on the mat",
    "dogs chase cats in the park",
    "stock markets fell today",
    "a recipe for apple pie",
    "python is a programming language",
    "the mat is red",
]


def text_index(tmp_path, embedder):
    vectors = embedder.embed(TEXTS)
    records = [{"id": f"t{i}", "text": t, "parent_id": f"p{i}"} for i, t in enumerate(TEXTS)]
    write_index(tmp_path / "tx", vectors, records, ModelRef("fake", "f" * 64), trees=4)
    return tmp_path / "tx"


def test_retriever_modes(tmp_path):
    fake = FakeEmbedder()
    path = text_index(tmp_path, fake)
    for mode in ("dense", "bm25", "hybrid"):
        op = Retriever(
            path, k=3, mode=mode, model_dirs=[], embedder_factory=lambda p, t: fake, model=__file__
        )
        [out] = op.run([{"id": "q1", "query": "python programming language", "x": 1}])
        assert out["x"] == 1
        docs = out["docs"]
        assert docs[0]["id"] == "t4", mode
        assert docs[0]["rank"] == 1 and docs[0]["query_id"] == "q1"
        assert docs[0]["parent_id"] == "p4" and docs[0]["metadata"] == {}
        assert [d["score"] for d in docs] == sorted((d["score"] for d in docs), reverse=True)


def test_retriever_uses_query_embedding_without_loading_a_model(tmp_path):
    fake = FakeEmbedder()
    path = text_index(tmp_path, fake)
    vec = fake.embed(["apple pie recipe"])[0].tolist()

    def no_model(p, t):
        raise AssertionError("model must not load")

    op = Retriever(path, k=1, embedder_factory=no_model, exact=True)
    [out] = op.run([{"query": "apple pie recipe", "embedding": vec}])
    assert out["docs"][0]["id"] == "t3" and "query_id" not in out["docs"][0]


def test_retriever_text_fallback_min_score_and_empty_query(tmp_path):
    path = text_index(tmp_path, FakeEmbedder())
    op = Retriever(path, k=5, mode="bm25", min_score=0.5)
    [out] = op.run([{"text": "red mat"}])
    assert [d["id"] for d in out["docs"]][:1] == ["t5"]
    assert all(d["score"] >= 0.5 for d in out["docs"])
    with pytest.raises(RecordError, match="empty query"):
        Retriever(path, mode="bm25").run([{"query": "  "}])
    with pytest.raises(RecordError, match="'query'"):
        Retriever(path, mode="bm25", field="query").run([{"text": "x"}])


def test_retriever_refuses_a_different_model(tmp_path):
    path = text_index(tmp_path, FakeEmbedder())
    other = FakeEmbedder(sha="0" * 64)
    op = Retriever(path, model=__file__, embedder_factory=lambda p, t: other)
    with pytest.raises(ResourceUnavailable, match="different model"):
        op.run([{"query": "cat"}])


def test_retriever_missing_index_is_unavailable(tmp_path):
    with pytest.raises(ResourceUnavailable, match="no index at"):
        Retriever(tmp_path / "nothing").run([{"query": "x"}])


def test_index_replaced_while_it_is_opened_is_opened_again_whole(tmp_path, monkeypatch):
    """A build that swaps the index in between the reader's opening of the manifest and of
    the other files: the reader notices (the manifest at the path is another file) and opens
    the new generation whole, BM25 included."""
    rng = np.random.default_rng(0)
    target = tmp_path / "idx"
    old = [{"id": f"apple{i}", "text": f"apple number{i}"} for i in range(3)]
    new = [{"id": f"banana{i}", "text": f"banana number{i}"} for i in range(8)]
    write_index(target, rng.standard_normal((3, DIM)).astype("f4"), old, None)
    opened = []
    real_open = Index._open

    def open_then_rebuild(self, manifest):
        real_open(self, manifest)
        opened.append(manifest["count"])
        if len(opened) == 1:  # a build lands right after the first generation was opened
            write_index(target, rng.standard_normal((8, DIM)).astype("f4"), new, None)

    monkeypatch.setattr(Index, "_open", open_then_rebuild)
    index = Index(target)
    assert opened == [3, 8]
    assert [r["id"] for r in index.records] == [r["id"] for r in new]
    # once open, a later build changes nothing for this reader (BM25, read on first use, too)
    write_index(target, rng.standard_normal((3, DIM)).astype("f4"), old, None)
    assert index.count == 8 and index.bm25.n_docs == 8
