"""Index and model files are found where they belong, never through a crafted manifest.

An index directory may come from elsewhere (copied, unpacked, shared): the file names in its
manifest.json must be plain names inside the directory. A manifest naming `../../etc/passwd`,
an absolute path, or a symlink in the directory that leads out is exit 69 in one line, for
every file an index has and for every command that opens one. Model names come from sage's own
registry (fixed file names), so nothing a file says picks a model path; a path given on the
command line is used as given, and whatever it is must pass the GGUF check (exit 69 if not).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson
import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage

ROLES = ("vectors", "records", "annoy", "bm25")


@pytest.fixture(scope="module")
def built_index(tmp_path_factory):
    from tests.index_fixture import tiny_index

    return tiny_index(tmp_path_factory.mktemp("idx") / "index")


@pytest.fixture
def index(built_index, tmp_path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(built_index, target)
    return target


def set_file(index: Path, role: str, name: str) -> None:
    manifest = orjson.loads((index / "manifest.json").read_bytes())
    manifest["files"][role] = name
    (index / "manifest.json").write_bytes(orjson.dumps(manifest))


def open_index(index: Path, command: str):
    if command == "info":
        return run_sage("index", "info", str(index))
    return run_sage(
        "retrieve",
        "--index",
        str(index),
        "--mode",
        "hybrid",
        input=ndjson([{"id": "q", "query": "cat"}]),
    )


def assert_refused(result) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 69, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert result.stdout == b""
    return stderr


UNSAFE_NAMES = ["../../../../../../etc/passwd", "/etc/passwd", "..", "sub/x", "..\\x", "a\x00b"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_manifest_cannot_name_a_file_outside_the_index(cli, index, role, name):
    set_file(index, role, name)
    result = cli("index", "info", str(index))  # in-process: 24 cases; retrieve runs below
    assert result.exit_code == 69, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    # the message names the index, the role and the bad name as the manifest spells it
    assert f"{index}: manifest.json names an unsafe {role} file {name!r}" in result.stderr
    assert "root:x" not in result.stderr  # nothing of the outside file shows


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", UNSAFE_NAMES[:2])
def test_retrieve_refuses_the_same_manifests(index, role, name):
    set_file(index, role, name)
    stderr = assert_refused(open_index(index, "retrieve"))
    assert f"names an unsafe {role} file {name!r}" in stderr and "root:x" not in stderr


@pytest.mark.parametrize("role", ROLES)
def test_symlink_leading_out_of_the_index_is_refused(index, tmp_path, role):
    manifest = orjson.loads((index / "manifest.json").read_bytes())
    name = manifest["files"][role]
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(index / name, outside)  # a real, valid file: only its place is wrong
    os.symlink(outside, index / name)
    stderr = assert_refused(open_index(index, "retrieve"))
    assert f"the {role} file {name!r} leads outside the index directory" in stderr
    # a valid file: had it been opened, retrieve would have answered (exit 0, hits on stdout)


def test_symlink_to_etc_passwd_is_refused_before_it_is_read(index):
    (index / "records.ndjson").unlink()
    os.symlink("/etc/passwd", index / "records.ndjson")
    stderr = assert_refused(open_index(index, "retrieve"))
    assert "the records file 'records.ndjson' leads outside the index" in stderr
    assert "root:x" not in stderr


def test_symlink_inside_the_index_is_followed(index):
    """A link to another file of the same directory is not an escape."""
    (index / "vectors.npy").rename(index / "vectors-real.npy")
    os.symlink("vectors-real.npy", index / "vectors.npy")
    result = open_index(index, "retrieve")
    assert result.returncode == 0, result.stderr


def test_index_build_does_not_write_through_a_symlinked_target(tmp_path, tiny_model_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    link = tmp_path / "idx"
    os.symlink(elsewhere, link)
    result = run_sage(
        "index",
        "build",
        str(link),
        input=ndjson([{"id": "a", "text": "some text"}]),
        env=clean_env(SAGE_MODEL_DIR=str(tiny_model_dir), SAGE_CACHE_DIR=str(tmp_path / "c")),
    )
    assert result.returncode == 2, result.stderr
    assert f"{link}: exists and is not a directory" in result.stderr.decode()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]  # nothing written there
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere",
        "idx",
    ]


# -- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../../../../etc/passwd", "/etc/passwd", "/etc"])
def test_model_given_as_a_path_must_be_a_valid_gguf(name, tmp_path):
    result = run_sage("models", "path", name, env=clean_env(SAGE_MODEL_DIR=str(tmp_path)))
    stderr = result.stderr.decode()
    assert result.returncode == 69, stderr
    assert stderr.count("\n") == 1 and result.stdout == b""
    why = "model file not found" if name == "/etc" else "not a GGUF file (starts with b'root'"
    assert f"model {name} file is not a valid GGUF: {name}: " in stderr or name == "/etc", stderr
    assert f": {name}" in stderr and why in stderr, stderr  # names the path it refused
    assert "root:x" not in stderr  # at most the 4 magic bytes are quoted, never the content


@pytest.mark.parametrize("name", ["minilm-l6/../x", "x/y", "smollm2-135m/..", ".."])
def test_model_name_with_path_parts_is_not_looked_up_in_model_dirs(name, tmp_path, tiny_bert):
    """Only registry names pick a file in a model dir (by the registry's fixed file name);
    anything with a path part is a path relative to the current directory."""
    # valid models where a lookup inside a model dir would land: finding one is the bug
    a, b = tmp_path / "models-a", tmp_path / "models-b"
    (a / "minilm-l6").mkdir(parents=True)
    (b / "x").mkdir(parents=True)
    shutil.copy(tiny_bert, a / "x")  # minilm-l6/../x
    shutil.copy(tiny_bert, b / "x" / "y")  # x/y
    result = run_sage(
        "models", "path", name, env=clean_env(SAGE_MODEL_DIR=f"{a}{os.pathsep}{b}"), cwd=tmp_path
    )
    stderr = result.stderr.decode()
    assert result.returncode == 69, stderr
    assert result.stdout == b""
    assert stderr == f"sage models path: error: model file not found: {name}\n"


def test_model_dir_symlink_to_a_non_model_is_exit_69(tmp_path):
    """A file in a model dir that links to anything (here /etc/passwd) is still checked as a
    GGUF before llama.cpp sees it."""
    from sage_cli.operators.models import MODELS

    models = tmp_path / "models"
    models.mkdir()
    os.symlink("/etc/passwd", models / MODELS["minilm-l6"].filename)
    env = clean_env(SAGE_MODEL_DIR=str(models), SAGE_CACHE_DIR=str(tmp_path / "c"))
    result = run_sage("embed", input=ndjson([{"text": "x"}]), env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 69, stderr
    assert stderr.count("\n") == 1 and "not a GGUF" in stderr and "root:x" not in stderr


def test_model_dir_symlink_to_a_real_model_elsewhere_is_followed(tmp_path, tiny_model_dir):
    """Linking a large model from a shared disk into a model dir is a supported setup (the
    model dir is the user's own configuration, not data); the target is validated as usual."""
    from sage_cli.operators.models import MODELS

    models = tmp_path / "models"
    models.mkdir()
    os.symlink(tiny_model_dir / "tiny-bert.gguf", models / MODELS["minilm-l6"].filename)
    env = clean_env(SAGE_MODEL_DIR=str(models), SAGE_CACHE_DIR=str(tmp_path / "c"))
    result = run_sage("embed", input=ndjson([{"text": "x"}]), env=env)
    assert result.returncode == 0, result.stderr


# -- source --------------------------------------------------------------------------------


def test_source_does_not_follow_links_planted_in_a_tree(tmp_path):
    """A symlink loop used to end the whole read (ELOOP, nothing out); a link named like a
    document could pull in any file the user can read."""
    tree = tmp_path / "docs"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("public")
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    os.symlink("..", tree / "sub" / "loop")
    os.symlink(secret, tree / "notes.txt")
    os.symlink(secret.parent, tree / "more")
    result = run_sage("source", str(tree))
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in parse_ndjson(result.stdout)] == ["public"]
    named = run_sage("source", str(tree / "notes.txt"))  # named on the command line: read
    assert named.returncode == 0 and b"PRIVATE KEY" in named.stdout
