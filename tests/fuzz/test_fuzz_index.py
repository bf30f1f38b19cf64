"""Fuzzing index directories as `sage retrieve` and `sage index info` read them: a garbage or
wrongly typed manifest, huge numbers, files swapped for one another, and truncated or mutated
`index.ann`, `vectors.npy`, `records.ndjson`, `bm25.npz` and `sentences.npz` give a ResourceUnavailable (exit
69) with a one-line message, or an index that answers queries: never a traceback, a segfault
or an abort. (Manifest *path confinement* is tested by the security tests.)

annoy memory-maps its file and trusts it: before operators/annoy_check.py, a few flipped bytes
in index.ann made about half of all queries die with SIGSEGV or SIGABRT. Those cases run in a
subprocess here, so a crash is a failed example, not a dead test run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.index import FILES, OPTIONAL_FILES, Index, read_manifest, write_index
from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson, run_sage
from tests.fuzz.conftest import examples

DIM, COUNT = 8, 40


def _build(directory: Path) -> Path:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((COUNT, DIM)).astype(np.float32)
    records = [
        {"id": f"d{i}", "text": f"doc {i} about topic {i % 5} word{i}"} for i in range(COUNT)
    ]
    sentences = [rng.standard_normal((i % 4, DIM)).astype(np.float32) for i in range(COUNT)]
    write_index(directory, vectors, records, None, trees=4, sentences=sentences)
    return directory


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("fuzz-index") / "idx")


def _copy(index_dir: Path, tmp: str) -> Path:
    target = Path(tmp) / "idx"
    shutil.copytree(index_dir, target)
    return target


QUERIES = np.random.default_rng(3).standard_normal((6, DIM)).astype(np.float32)


def _use(directory: Path) -> str:
    """Open the index and query it every way retrieve does; 'ok' or the one-line error."""
    try:
        index = Index(directory)
        for q in QUERIES:
            q = q / np.linalg.norm(q)
            for k in (1, 5, 60):
                for hit, score in index.dense(q, k):
                    assert 0 <= hit < index.count and isinstance(score, float)
            index.dense(q, 3, exact=True)
            sentences = index.sentences
            if sentences is not None:
                for hit, _score in sentences.rescore(index.vectors, q, [0, 5, COUNT - 1], 0.5, 3):
                    assert 0 <= hit < index.count
        for text in ("topic 3", "word7 doc", "nothing"):
            for hit, _score in index.bm25.search(text, 5):
                assert 0 <= hit < index.count
        index.row_of("d3")
    except ResourceUnavailable as exc:
        message = str(exc)  # may quote a manifest value with a newline: `fail` escapes it
        assert message.strip(), message
        return message
    return "ok"


# -- the manifest ------------------------------------------------------------------------------

big_numbers = st.sampled_from([0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1e300, -1e300, 0.5])
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | big_numbers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(sorted(FILES.values()) + ["manifest.json", "angular", "sage-index"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
KEY_PATHS = [
    ("format",),
    ("format_version",),
    ("model",),
    ("model", "name"),
    ("model", "sha256"),
    ("dimension",),
    ("metric",),
    ("count",),
    ("build",),
    ("build", "trees"),
    ("build", "seed"),
    ("build", "bm25"),
    ("build", "bm25", "k1"),
    ("created",),
    ("sage_version",),
    ("files",),
    ("files", "annoy"),
    ("files", "vectors"),
    ("files", "records"),
    ("files", "bm25"),
]
_DELETE = object()


def _set(manifest: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = manifest
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@st.composite
def manifests(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "bytes", "mutated", "top"]))
    text = orjson.dumps(valid, option=orjson.OPT_INDENT_2)
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "top":
        return orjson.dumps(draw(values))
    if kind == "mutated":
        data = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)
    manifest = orjson.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(KEY_PATHS))
        _set(manifest, path, draw(values | st.just(_DELETE)))
    return orjson.dumps(manifest)


def test_manifest_fuzz(index_dir: Path) -> None:
    valid = orjson.loads((index_dir / "manifest.json").read_bytes())

    @given(manifests(valid))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="fuzz-manifest-") as tmp:
            directory = _copy(index_dir, tmp)
            (directory / "manifest.json").write_bytes(data)
            try:
                read_manifest(directory)
            except ResourceUnavailable as exc:
                assert str(exc).strip()
            _use(directory)

    check()


def test_huge_or_odd_build_trees_is_not_a_crash(index_dir: Path, tmp_path: Path) -> None:
    """Regression (fuzzing): `build.trees` came from the manifest unchecked: a list gave
    `AttributeError`, `1e300` an `OverflowError` inside annoy's search (exit 1, not 69)."""
    valid = orjson.loads((index_dir / "manifest.json").read_bytes())
    for i, build in enumerate([[], "x", {"trees": 1e300}, {"trees": "many"}, {"trees": -5}]):
        directory = _copy(index_dir, str(tmp_path / str(i)))
        (directory / "manifest.json").write_bytes(orjson.dumps(valid | {"build": build}))
        assert _use(directory) == "ok"


def test_model_of_the_wrong_type_is_exit_69(index_dir: Path, tmp_path: Path) -> None:
    """Regression (fuzzing): a manifest `model` that is a list or a number raised RecordError
    (exit 65, blaming the input record) instead of calling the index corrupt (exit 69)."""
    valid = orjson.loads((index_dir / "manifest.json").read_bytes())
    for i, model in enumerate([[1], 5, True]):
        directory = _copy(index_dir, str(tmp_path / str(i)))
        (directory / "manifest.json").write_bytes(orjson.dumps(valid | {"model": model}))
        with pytest.raises(ResourceUnavailable, match="model"):
            Index(directory)


# -- the data files ----------------------------------------------------------------------------

WORKER = """
import sys
from pathlib import Path
from tests.fuzz.test_fuzz_index import _use
print(_use(Path(sys.argv[1])))
"""


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, extended, or with a few bytes (or aligned int32 words) overwritten."""
    out = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "bytes", "words", "extend"]))
    if kind == "truncate":
        return bytes(out[: draw(st.integers(0, len(out) - 1))])
    if kind == "extend":
        return bytes(out + draw(st.binary(min_size=1, max_size=64)))
    for _ in range(draw(st.integers(1, 8))):
        if kind == "bytes":
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        else:
            pos = draw(st.integers(0, len(out) // 4 - 1)) * 4
            word = draw(st.sampled_from([-1, 0, 1, 2, 7, COUNT, COUNT + 1, 2**31 - 1, -(2**31)]))
            out[pos : pos + 4] = int(word).to_bytes(4, "little", signed=True)
    return bytes(out)


@pytest.mark.parametrize("role", ["annoy", "vectors", "records", "bm25", "sentences"])
def test_damaged_index_file_is_69_or_answers(index_dir: Path, role: str) -> None:
    name = {**FILES, **OPTIONAL_FILES}[role]
    original = (index_dir / name).read_bytes()

    @given(damaged(original))
    @settings(max_examples=examples(15 if role == "annoy" else 40))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="fuzz-index-") as tmp:
            directory = _copy(index_dir, tmp)
            (directory / name).write_bytes(data)
            if role != "annoy":
                _use(directory)  # pure Python and numpy: safe in this process
                return
            proc = subprocess.run(
                [sys.executable, "-c", WORKER, str(directory)],
                capture_output=True,
                cwd=ROOT,
                env=clean_env(),
                timeout=60,
            )
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 0, f"exit {proc.returncode} (negative: a signal): {err}"

    check()


def test_flipped_annoy_node_is_exit_69_not_a_segfault(index_dir: Path, tmp_path: Path) -> None:
    """Regression (fuzzing): a split node whose child points past the file made the first query
    die with SIGSEGV; a bucket with a negative size died with SIGABRT (std::length_error)."""
    node = 12 + 4 * DIM
    data = bytearray((index_dir / FILES["annoy"]).read_bytes())
    nd = np.frombuffer(bytes(data), dtype="<i4")[:: node // 4]
    split = int(np.flatnonzero(nd > DIM + 2)[0])
    bucket = int(np.flatnonzero((nd > 1) & (nd <= DIM + 2))[0])
    for i, (pos, word) in enumerate([(split * node + 4, 10**6), (bucket * node, -7)]):
        directory = _copy(index_dir, str(tmp_path / str(i)))
        bad = bytearray(data)
        bad[pos : pos + 4] = word.to_bytes(4, "little", signed=True)
        (directory / FILES["annoy"]).write_bytes(bytes(bad))
        with pytest.raises(ResourceUnavailable, match="annoy file is corrupt"):
            Index(directory)


@pytest.mark.parametrize(("count", "dim"), [(COUNT + 7, DIM), (COUNT, DIM * 2), (COUNT // 2, DIM)])
def test_an_annoy_file_from_another_index_is_exit_69(
    index_dir: Path, tmp_path: Path, count: int, dim: int
) -> None:
    """index.ann copied from an index of another size or dimension: refused before annoy maps
    it (annoy itself would read nodes of the wrong width)."""
    rng = np.random.default_rng(count + dim)
    other = tmp_path / "other"
    records = [{"id": f"o{i}", "text": f"other {i}"} for i in range(count)]
    write_index(other, rng.standard_normal((count, dim)).astype(np.float32), records, None)
    directory = _copy(index_dir, str(tmp_path / "mixed"))
    shutil.copy(other / FILES["annoy"], directory / FILES["annoy"])
    with pytest.raises(ResourceUnavailable, match="annoy file"):
        Index(directory)


# -- the real commands -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "damage"),
    [
        ("manifest", b'{"format": "sage-index", "format_version": 1, "dimension": 8, "count": '),
        ("manifest", b'{"format":"sage-index","format_version":1,"dimension":8,"count":1e300}'),
        ("manifest", b'{"format": "sage-index", "format_version": "1\\n2\\rthree"}'),
        ("annoy", "truncate"),
        ("annoy", "flip"),
        ("vectors", "truncate"),
        ("records", "truncate"),
    ],
)
def test_sage_retrieve_and_index_info_exit_69(
    index_dir: Path, tmp_path: Path, role: str, damage: bytes | str
) -> None:
    directory = _copy(index_dir, str(tmp_path))
    if role == "manifest":
        assert isinstance(damage, bytes)
        (directory / "manifest.json").write_bytes(damage)
    else:
        path = directory / FILES[role]
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2 + 3]
        else:  # every int32 of the second half -1: children and bucket sizes out of range
            half = len(data) // 8 * 4
            data[half:] = b"\xff" * (len(data) - half)
        path.write_bytes(bytes(data))
    query = ndjson([{"id": "q", "text": "topic", "embedding": [0.5] * DIM}])
    commands = [
        ["retrieve", "--index", str(directory), "-k", "3"],
        ["index", "info", str(directory)],
    ]
    for args in commands:
        proc = run_sage(*args, input=query, timeout=60)
        err = proc.stderr.decode("utf-8", "replace")
        if args[0] == "index" and role != "manifest":
            assert proc.returncode == 0, err  # info reads the manifest only
            continue
        assert proc.returncode == 69, (args, proc.returncode, err)
        assert err.startswith(f"sage {args[0]}") and err.count("\n") == 1, err
        assert "Traceback" not in err and "SAGE_DEBUG" not in err


def test_sage_retrieve_on_the_undamaged_index_answers(index_dir: Path) -> None:
    query = ndjson([{"id": "q", "text": "topic", "embedding": [0.5] * DIM}])
    proc = run_sage("retrieve", "--index", str(index_dir), "-k", "3", input=query, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (out,) = parse_ndjson(proc.stdout)
    assert [d["rank"] for d in out["docs"]] == [1, 2, 3]


def test_the_atheris_harness_takes_its_seeds() -> None:
    """tests/fuzz/harness/fuzz_manifest.py (run by `make fuzz`) passes its own seed corpus."""
    from tests.fuzz.harness import fuzz_manifest

    assert fuzz_manifest.SEEDS
    for seed in fuzz_manifest.SEEDS:
        fuzz_manifest.TestOneInput(seed)
