"""Nothing sage reads from disk is unpickled or executed (issue 6, security review).

Two halves: a scan of the source tree (sage_cli/, operators/, commands/) for the calls that load
code or pickles, with an explicit allow-list saying why each remaining use is safe; and crafted
files (an object array in an index's vectors.npy, a raw pickle, an object array in bm25.npz, a
pickle in the answer cache) that would create a marker file if anything unpickled them.
"""

from __future__ import annotations

import ast
import shutil
import sqlite3
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson, run_sage
from tests.security.conftest import object_array, object_npy, object_npz, pickle_payload

SOURCE_DIRS = ("sage_cli", "operators", "commands")

#: file -> why it may import pickle. Anything else importing it fails the scan.
PICKLE_ALLOWED = {
    # --workers: the parent and the workers it spawned exchange batches over anonymous pipes
    # (multiprocessing); nothing read from a file or a socket is unpickled
    "sage_cli/execution/pool.py",
    # portable_error: pickles an exception raised in this process and loads it back at once,
    # to know whether it can be sent to the Driver as itself
    "sage_cli/execution/runtime.py",
}
#: file -> the only places `eval`/`exec` may be called as builtins
EVAL_ALLOWED = {"operators/expr.py"}  # compiles the expression given on the command line
#: modules whose loaders run code or unpickle
FORBIDDEN_MODULES = {"marshal", "shelve", "dill", "cloudpickle", "joblib", "jsonpickle", "pickle"}
FORBIDDEN_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("torch", "load"),
    ("pd", "read_pickle"),
}


def python_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40, "the scan found too few files: wrong root?"
    return files


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _name(node: ast.AST) -> str:
    """`np.load` -> "np.load", `eval` -> "eval", anything else -> ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def scan(path: Path) -> list[str]:
    """Every dangerous use in one file, as `file:line: what`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = rel(path)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in FORBIDDEN_MODULES and not (top == "pickle" and where in PICKLE_ALLOWED):
                    found.append(f"{where}:{node.lineno}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        called = _name(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if called in ("eval", "exec", "compile", "__import__") and where not in EVAL_ALLOWED:
            found.append(f"{where}:{node.lineno}: calls {called}()")
        if called in ("np.load", "numpy.load"):
            flag = keywords.get("allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{where}:{node.lineno}: np.load without allow_pickle=False")
        if tuple(called.split(".")) in FORBIDDEN_CALLS:
            found.append(f"{where}:{node.lineno}: calls {called}()")
        if called.startswith("subprocess.") or called in ("Popen", "run", "check_output"):
            shell = keywords.get("shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and not shell.value):
                found.append(f"{where}:{node.lineno}: {called}(shell=...)")
    return found


def test_source_tree_loads_no_code_and_no_pickles():
    problems = [p for path in python_files() for p in scan(path)]
    assert problems == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    """The scanner itself can fail: a file with every forbidden pattern gives one hit each."""
    bad = ROOT / "operators" / "_security_scan_probe.py"
    bad.write_text(
        "import pickle, marshal\nimport numpy as np\nimport os, subprocess, yaml\n"
        "np.load('x')\nnp.load('x', allow_pickle=True)\neval('1')\nexec('1')\n"
        "os.system('x')\nsubprocess.run('x', shell=True)\nyaml.load('x')\n"
    )
    try:
        problems = scan(bad)
    finally:
        bad.unlink()
    assert len(problems) == 9, problems


def test_pickle_is_only_used_between_sage_and_its_own_workers():
    """execution/pool.py: batches go through multiprocessing pipes to processes it spawned; no
    path, socket or record ever reaches pickle.loads."""
    text = (ROOT / "sage_cli" / "execution" / "pool.py").read_text()
    assert "ctx.Pipe(" in text and 'get_context("spawn")' in text
    assert "open(" not in text.replace("os.open(", "")  # nothing read from a file there
    assert "socket" not in text and "Listener" not in text


# -- crafted files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_index(tmp_path_factory):
    from tests.index_fixture import tiny_index

    return tiny_index(tmp_path_factory.mktemp("idx") / "index")


def copy_index(built_index: Path, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(built_index, target)
    return target


def retrieve(index: Path, *more: str, cwd: Path) -> object:
    return run_sage(
        "retrieve",
        "--index",
        str(index),
        *more,
        input=ndjson([{"id": "q", "query": "where is the cat?"}]),
        cwd=cwd,
    )


def assert_clean_69(result, marker: Path) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 69, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert not marker.exists(), "the payload was unpickled"


@pytest.mark.parametrize("payload", ["object-npy", "raw-pickle", "npz-in-npy"])
def test_crafted_vectors_file_is_exit_69_and_never_unpickled(
    built_index, tmp_path, marker, payload
):
    index = copy_index(built_index, tmp_path)
    data = {
        "object-npy": object_npy,
        "raw-pickle": pickle_payload,
        "npz-in-npy": object_npz,
    }[payload](marker)
    (index / "vectors.npy").write_bytes(data)
    result = retrieve(index, cwd=tmp_path)
    assert_clean_69(result, marker)
    assert b"vectors" in result.stderr


def test_object_array_in_bm25_statistics_is_exit_69_and_never_unpickled(
    built_index, tmp_path, marker
):
    import numpy as np

    index = copy_index(built_index, tmp_path)
    with np.load(index / "bm25.npz", allow_pickle=False) as real:
        arrays = {k: real[k] for k in real.files}
    assert arrays
    for name in arrays:  # every array the loader reads becomes the payload
        arrays[name] = object_array(marker)
    with open(index / "bm25.npz", "wb") as fh:
        np.savez(fh, **arrays)
    result = retrieve(index, "--mode", "bm25", cwd=tmp_path)
    assert_clean_69(result, marker)


def test_pickled_value_in_the_answer_cache_is_a_miss_not_unpickled(tmp_path, marker):
    """Poison every cached answer with a pickle: the next run asks the server again."""
    from tests.openai_stub import StubServer

    cache = tmp_path / "cache"
    env = clean_env(SAGE_CACHE_DIR=str(cache))
    records = ndjson([{"id": "1", "prompt": "hello"}])
    with StubServer() as stub:
        args = ("generate", "--backend", "openai", "--base-url", f"{stub.url}/ok/v1")
        first = run_sage(*args, input=records, env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        db = sqlite3.connect(cache / "generate.sqlite")
        assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1
        db.execute("UPDATE generations SET value = ?", (pickle_payload(marker),))
        db.commit()
        db.close()
        second = run_sage(*args, input=records, env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert len(stub.requests) == 2  # the poisoned entry was a miss
    (out,) = parse_ndjson(second.stdout)
    assert out["answer"] == "echo: hello" and "cached" not in out["usage"]
    assert not marker.exists()


def test_pickled_vector_in_the_embedding_cache_is_a_miss(tmp_path, marker, tiny_model_dir):
    cache = tmp_path / "cache"
    env = clean_env(SAGE_CACHE_DIR=str(cache), SAGE_MODEL_DIR=str(tiny_model_dir))
    records = ndjson([{"id": "1", "text": "the cat sits on the mat"}])
    first = run_sage("embed", input=records, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    db = sqlite3.connect(cache / "embed.sqlite")
    (table,) = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchone()
    db.execute(f"UPDATE {table} SET value = ?", (pickle_payload(marker),))
    db.commit()
    db.close()
    second = run_sage("embed", input=records, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert parse_ndjson(second.stdout)[0]["embedding"] == parse_ndjson(first.stdout)[0]["embedding"]
    assert not marker.exists()


def test_manifests_are_json_not_pickles(built_index):
    """Every file sage writes in an index is JSON, NDJSON, .npy/.npz of plain arrays or annoy."""
    manifest = orjson.loads((built_index / "manifest.json").read_bytes())
    assert manifest["format"] == "sage-index"
    import numpy as np

    vectors = np.load(built_index / manifest["files"]["vectors"], allow_pickle=False)
    assert vectors.dtype == np.float32
    with np.load(built_index / manifest["files"]["bm25"], allow_pickle=False) as bm25:
        assert all(bm25[k].dtype != object for k in bm25.files)
