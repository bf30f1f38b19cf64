"""Vector indexes on disk (`sage index build|info`, read by `sage retrieve` and `sage rerank`).

An index is a directory:

    manifest.json    what the index is (below); written last
    index.ann        annoy forest over the vectors (angular metric), memory-mapped on load
    vectors.npy      the vectors, float32 (count, dimension), L2-normalised, row i = record i
    records.ndjson   the records, one per line in row order, without their embedding fields
    bm25.npz         BM25 statistics of the records' text (operators.bm25)
    sentences.npz    optional: the vectors of each record's first sentences
                     (operators.sentence_vectors), when the build could load the model

The manifest (JSON) holds `format` ("sage-index"), `format_version`, `model` ({name, sha256,
file} of the embedding model, or null when unknown), `dimension`, `metric`, `count`, `build`
(trees, seed, BM25 k1/b), `created` (UTC, ISO 8601), `sage_version` and `files` (role -> file
name). File names in a manifest must be plain names inside the directory: anything with a path
separator, `..`, an absolute path or a symlink leading out of the directory is rejected.

Building writes everything into a fresh temporary directory beside the target and renames it
into place (the old index, if any, is moved aside first and deleted after), so a reader sees
the old index or the new one, never half of one; a build that fails leaves the old index as it
was. A non-empty directory that is not a sage index is never replaced. The temporary names carry
the builder's pid (`.DIR.building-PID-*`, `.DIR.old-PID-*`): a build killed with SIGKILL leaves
them behind, and the next build of DIR removes those of dead processes (putting a moved-aside
old index back first if DIR itself is missing).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Literal

import orjson

from .annoy_check import check_annoy
from .base import (
    Operator,
    OptionError,
    OutputFailed,
    Record,
    RecordError,
    ResourceUnavailable,
    record_text,
)
from .ndjson import dump_record, exact_numbers

if TYPE_CHECKING:
    import numpy as np

    from .bm25 import BM25
    from .sentence_vectors import SentenceVectors

FORMAT = "sage-index"
FORMAT_VERSION = 1
METRIC: Literal["angular"] = "angular"
DEFAULT_TREES = 32
DEFAULT_SEED = 42
FILES = {
    "annoy": "index.ann",
    "vectors": "vectors.npy",
    "records": "records.ndjson",
    "bm25": "bm25.npz",
}
#: files an index may lack (an index built before them, or without the model at hand)
OPTIONAL_FILES = {"sentences": "sentences.npz"}
#: sentences embedded at a time when progress is shown (a few seconds' work on 2 cores)
CLOSING_SLICE = 512
#: record fields that hold the vector (never stored in records.ndjson)
EMBEDDING_FIELDS = ("embedding", "embedding_b64", "embedding_model")
REBUILD = "rebuild it with `sage index build DIR`"


def sage_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sage-pipes")
    except PackageNotFoundError:
        return "unknown"


# -- the embedding model of a record or an index --------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Which embedding model made a vector: a registry name (or file name) and its sha256."""

    name: str | None
    sha256: str | None = None
    file: str | None = None

    def same_as(self, other: ModelRef) -> bool:
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256
        return self.name == other.name

    def label(self) -> str:
        sha = f" (sha256 {self.sha256[:12]})" if self.sha256 else ""
        return f"{self.name or 'an unnamed model'}{sha}"

    def to_json(self) -> dict[str, Any] | None:
        if self.name is None and self.sha256 is None:
            return None
        return {"name": self.name, "sha256": self.sha256, "file": self.file}

    @classmethod
    def parse(cls, value: Any) -> ModelRef | None:
        """From a record's `embedding_model` or a manifest's `model`: an object with name and
        sha256, or a string `name`, `name@sha256` or `name:sha256`; None when absent."""
        if value is None:
            return None
        if isinstance(value, dict):
            name = value.get("name")
            sha = value.get("sha256") or value.get("sha")
            file = value.get("file")
            if name is None and sha is None:
                return None
            return cls(
                str(name) if name is not None else None,
                str(sha) if sha else None,
                str(file) if file else None,
            )
        if isinstance(value, str) and value:
            for sep in ("@", ":"):
                name, found, sha = value.rpartition(sep)
                if found and name and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha):
                    return cls(name, sha)
            return cls(value)
        raise RecordError(
            f"field 'embedding_model' must be a string or an object, got {type(value).__name__}"
        )


# -- reading vectors from records --------------------------------------------------------------


def record_vector(record: Record) -> np.ndarray | None:
    """The record's vector as float32, from `embedding` (a list of numbers, or a base64 string
    of little-endian float32) or `embedding_b64`; None when it has neither."""
    import numpy as np

    if "embedding" in record:
        field, value = "embedding", record["embedding"]
    elif "embedding_b64" in record:
        field, value = "embedding_b64", record["embedding_b64"]
    else:
        return None
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(f"field {field!r} is not valid base64") from None
        if len(raw) % 4:
            raise RecordError(f"field {field!r}: {len(raw)} bytes is not a float32 vector")
        vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif isinstance(value, list):
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            raise RecordError(f"field {field!r} must be a list of numbers")
        vec = np.asarray(value, dtype=np.float32)
    else:
        raise RecordError(
            f"field {field!r} must be a list of numbers or a base64 string, got "
            f"{type(value).__name__}"
        )
    if vec.size == 0:
        raise RecordError(f"field {field!r} is empty")
    if not np.isfinite(vec).all():
        raise RecordError(f"field {field!r} has NaN or infinite values")
    return vec


def normalise(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


# -- writing an index ------------------------------------------------------------------------


def _is_index(path: Path) -> bool:
    try:
        manifest = orjson.loads((path / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_target(directory: str | os.PathLike[str]) -> Path:
    """The target of a build, refused when it is a file or a non-empty foreign directory."""
    target = Path(directory)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OptionError(f"{target}: exists and is not a directory; choose another index path")
    if target.is_dir() and any(target.iterdir()) and not _is_index(target):
        raise OptionError(
            f"{target}: directory is not empty and is not a sage index; refusing "
            "to replace it (choose an empty or new directory)"
        )
    return target


def write_index(
    directory: str | os.PathLike[str],
    vectors: np.ndarray,
    records: list[Record],
    model: ModelRef | None,
    *,
    trees: int = DEFAULT_TREES,
    seed: int = DEFAULT_SEED,
    n_jobs: int = 1,
    version: str | None = None,
    sentences: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write an index atomically (temp dir + rename) and return its manifest. `sentences`:
    one array of sentence vectors per record (operators.sentence_vectors), or None.

    An OSError on the way (disk full, quota, I/O error) removes the temporary directory and
    becomes OutputFailed (exit 75 for a full disk, else 1) saying the old index is untouched."""
    if len(records) != vectors.shape[0]:
        raise ValueError("one vector per record")
    if not records:
        raise OptionError("no records to index")
    _recover(Path(directory))
    target = check_target(directory)
    had_index = target.is_dir() and any(target.iterdir())
    try:
        return _write_index(
            target, vectors, records, model, trees, seed, n_jobs, version, sentences
        )
    except OSError as exc:  # disk full, quota, read-only, I/O error: nothing half-written stays
        kept = (
            f"the old index in {target} is untouched"
            if had_index
            else f"no index was written to {target}"
        )
        raise OutputFailed.from_os_error(f"{target}: cannot write the index", exc, kept) from None


def _write_index(
    target: Path,
    vectors: np.ndarray,
    records: list[Record],
    model: ModelRef | None,
    trees: int,
    seed: int,
    n_jobs: int,
    version: str | None,
    sentences: Sequence[np.ndarray] | None,
) -> dict[str, Any]:
    import numpy as np
    from annoy import AnnoyIndex

    from .bm25 import BM25

    target.parent.mkdir(parents=True, exist_ok=True)
    dim = int(vectors.shape[1])
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "building"), dir=target.parent))
    try:
        vectors = normalise(np.ascontiguousarray(vectors, dtype=np.float32))
        with open(tmp / FILES["vectors"], "wb") as fh:
            # through Python's write, not numpy's fwrite: a full disk is then ENOSPC, not a
            # bare "N requested and M written"
            np.save(_PlainWriter(fh), vectors, allow_pickle=False)
        with open(tmp / FILES["records"], "wb") as fh:
            for record in records:
                fh.write(dump_record(record))
        bm25 = BM25.build(record_text(r) for r in records)
        bm25.save(tmp / FILES["bm25"])
        files, leading = dict(FILES), 0
        if sentences is not None:
            from . import sentence_vectors

            files["sentences"] = OPTIONAL_FILES["sentences"]
            sentence_vectors.save(tmp / files["sentences"], sentences, dim)
            leading = sentence_vectors.LEADING
        forest = AnnoyIndex(dim, METRIC)
        forest.set_seed(seed)
        for i, vec in enumerate(vectors):
            forest.add_item(i, vec)
        forest.build(trees, n_jobs=n_jobs)
        with _stderr_silenced():  # annoy prints its own error line; the OSError carries it
            forest.save(str(tmp / FILES["annoy"]))
        forest.unload()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.to_json() if model else None,
            "dimension": dim,
            "metric": METRIC,
            "count": len(records),
            "build": {
                "trees": trees,
                "seed": seed,
                "bm25": {"k1": bm25.k1, "b": bm25.b},
                "normalised": True,
                **({"sentences": {"leading": leading}} if leading else {}),
            },
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sage_version": version or sage_version(),
            "files": files,
        }
        with open(tmp / "manifest.json", "wb") as fh:
            fh.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0o022)  # mkdtemp made it 0700: give it what mkdir would (the umask)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _recover(target: Path) -> None:
    """Clear what builds of `target` killed with SIGKILL left: their temporary directories,
    after putting back an old index that was moved aside when `target` itself is missing."""
    import re

    pattern = re.compile(rf"\.{re.escape(target.name)}\.(building|old)-(\d+)-")
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if not found or not entry.is_dir() or entry.is_symlink() or _alive(int(found[2])):
            continue
        if found[1] == "old" and not os.path.lexists(target) and _is_index(entry):
            with contextlib.suppress(OSError):
                os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


class _PlainWriter:
    """A file object numpy does not recognise as a real file (so it calls `write`)."""

    def __init__(self, fh: Any) -> None:
        self.write = fh.write


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 on /dev/null for the duration (C code that prints its errors)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing index is moved aside first and removed after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    check_target(target)  # still ours: it may have changed while we were building
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"), dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- reading an index ------------------------------------------------------------------------


def _safe_file(directory: Path, role: str, name: Any) -> Path:
    """The path of a file the manifest names, refused unless it is a plain name in `directory`."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise ResourceUnavailable(
            f"{directory}: manifest.json names an unsafe {role} file "
            f"{name!r}; only plain file names inside the index are allowed; "
            f"{REBUILD}"
        )
    path = directory / name
    real_dir = directory.resolve()
    if path.resolve().parent != real_dir:
        raise ResourceUnavailable(
            f"{directory}: the {role} file {name!r} leads outside the index directory; {REBUILD}"
        )
    if not path.is_file():
        raise ResourceUnavailable(f"{directory}: the {role} file {name} is missing; {REBUILD}")
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of the index in `directory`, or ResourceUnavailable saying why."""
    manifest, fh = _open_manifest(directory)
    fh.close()
    return manifest


def _open_manifest(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], BinaryIO]:
    """The validated manifest and the manifest file, still open: while it is open its inode
    cannot be reused, so comparing it with what the path names later tells whether the index
    was replaced in between (see Index)."""
    path = Path(directory)
    if not path.exists():
        raise ResourceUnavailable(
            f"no index at {path}; build one with "
            f"`sage chunk | sage embed | sage index build {path}`"
        )
    if not path.is_dir():
        raise ResourceUnavailable(f"{path} is not an index directory; {REBUILD}")
    try:
        fh: BinaryIO = open(path / "manifest.json", "rb")  # noqa: SIM115 - returned open
        raw = fh.read()
    except FileNotFoundError:
        raise ResourceUnavailable(
            f"{path} is not a sage index (no manifest.json); {REBUILD}"
        ) from None
    except OSError as exc:
        raise ResourceUnavailable(f"{path}/manifest.json: cannot read: {exc.strerror}") from None
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ResourceUnavailable(
            f"{path}/manifest.json is not valid JSON (corrupt index); {REBUILD}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ResourceUnavailable(
            f"{path} is not a sage index (manifest.json has no format {FORMAT!r}); {REBUILD}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ResourceUnavailable(
            f"{path}: index format version {manifest.get('format_version')}"
            f" is not supported (this sage reads {FORMAT_VERSION}); {REBUILD}"
        )
    dim, count = manifest.get("dimension"), manifest.get("count")
    if not isinstance(dim, int) or dim < 1 or not isinstance(count, int) or count < 1:
        raise ResourceUnavailable(f"{path}/manifest.json: bad dimension or count; {REBUILD}")
    if manifest.get("metric") != METRIC:
        raise ResourceUnavailable(f"{path}: metric {manifest.get('metric')!r} is not supported")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(FILES) - set(files):
        raise ResourceUnavailable(f"{path}/manifest.json lists no files {sorted(FILES)}; {REBUILD}")
    for role in FILES:
        _safe_file(path, role, files[role])
    for role in OPTIONAL_FILES:
        if role in files:
            _safe_file(path, role, files[role])
    return manifest, fh


def _same_file(fh: BinaryIO, path: Path) -> bool:
    """Whether the open file `fh` is still the file at `path`."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    was = os.fstat(fh.fileno())
    return (was.st_dev, was.st_ino) == (now.st_dev, now.st_ino)


#: how many times Index opens an index that is replaced while it reads it before giving up
OPEN_ATTEMPTS = 10


class Index:
    """An index opened for search: vectors and annoy memory-mapped, records in memory.

    Every file comes from one generation of the index: the manifest is held open while the
    other files are opened (the BM25 file too, read on first use from the open file), and the
    manifest the path names afterwards must be the same file; if a build replaced the index in
    between, everything is opened again. A long-running reader keeps the generation it opened.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        for _ in range(OPEN_ATTEMPTS):
            manifest, fh = _open_manifest(self.directory)
            try:
                try:
                    self._open(manifest)
                except ResourceUnavailable:
                    if _same_file(fh, self.directory / "manifest.json"):
                        raise  # really damaged, not replaced under our feet
                    continue
                if _same_file(fh, self.directory / "manifest.json"):
                    return
                self._close_files()  # replaced while we read it: open the new one whole
            finally:
                fh.close()
        raise ResourceUnavailable(
            f"{self.directory}: the index was replaced {OPEN_ATTEMPTS} times while it was "
            "being opened; try again when `sage index build` is done"
        )

    def _close_files(self) -> None:
        self.forest.unload()
        self._bm25_file.close()
        if self._sentences_file is not None:
            self._sentences_file.close()

    def close(self) -> None:
        """Let go of the files (the mapped vectors go when the last reference does)."""
        self._close_files()

    def _open(self, manifest: dict[str, Any]) -> None:
        import numpy as np
        from annoy import AnnoyIndex

        self.manifest = manifest
        files = self.manifest["files"]
        self.dimension: int = self.manifest["dimension"]
        self.count: int = self.manifest["count"]
        try:
            self.model = ModelRef.parse(self.manifest.get("model"))
        except RecordError:
            raise ResourceUnavailable(
                f"{self.directory}/manifest.json: model is neither an object nor a name; {REBUILD}"
            ) from None
        build = self.manifest.get("build")
        trees: Any = build.get("trees") if isinstance(build, dict) else None
        # only a hint for search_k: a missing or odd value falls back to the default
        ok = isinstance(trees, int) and not isinstance(trees, bool) and 0 < trees <= 100_000
        self.trees: int = trees if ok else DEFAULT_TREES
        where = self.directory
        try:
            self.vectors = np.load(
                _safe_file(where, "vectors", files["vectors"]), mmap_mode="r", allow_pickle=False
            )
        except Exception as exc:  # noqa: BLE001 - EOFError, SyntaxError from a bad header...
            raise ResourceUnavailable(
                f"{where}: vectors file is corrupt ({exc}); {REBUILD}"
            ) from None
        if not isinstance(self.vectors, np.ndarray):  # a .npz archive under the .npy name
            self.vectors.close()
            raise ResourceUnavailable(f"{where}: vectors file is not a .npy array; {REBUILD}")
        if self.vectors.dtype != np.float32 or self.vectors.shape != (self.count, self.dimension):
            raise ResourceUnavailable(
                f"{where}: vectors are {self.vectors.dtype} "
                f"{self.vectors.shape}, the manifest says float32 "
                f"({self.count}, {self.dimension}); {REBUILD}"
            )
        self.records = self._read_records(_safe_file(where, "records", files["records"]))
        annoy_file = _safe_file(where, "annoy", files["annoy"])
        # annoy trusts its file: a damaged node makes a query crash the process (SIGSEGV)
        check_annoy(annoy_file, self.dimension, self.count, REBUILD)
        self.forest = AnnoyIndex(self.dimension, METRIC)
        try:
            self.forest.load(str(annoy_file))
        except OSError as exc:
            raise ResourceUnavailable(
                f"{where}: annoy file is corrupt ({exc}); {REBUILD}"
            ) from None
        if self.forest.get_n_items() != self.count:
            raise ResourceUnavailable(
                f"{where}: annoy file holds {self.forest.get_n_items()} "
                f"items, the manifest says {self.count}; {REBUILD}"
            )
        self._bm25: BM25 | None = None
        # opened now, read on first use: from this generation whatever happens at the path
        bm25_path = _safe_file(where, "bm25", files["bm25"])
        self._bm25_name = str(bm25_path)
        self._bm25_file: BinaryIO = open(bm25_path, "rb")  # noqa: SIM115 - kept open
        self._sentences: SentenceVectors | None = None
        self._sentences_file: BinaryIO | None = None
        if "sentences" in files:  # the same: read on first use, from this generation
            path = _safe_file(where, "sentences", files["sentences"])
            self._sentences_name = str(path)
            self._sentences_file = open(path, "rb")  # noqa: SIM115 - kept open
        self._rows: dict[str, int] | None = None

    def _read_records(self, path: Path) -> list[Record]:
        records = []
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    record = exact_numbers(line, orjson.loads(line))
                except orjson.JSONDecodeError:
                    raise ResourceUnavailable(
                        f"{path}:{n}: not JSON (corrupt index); {REBUILD}"
                    ) from None
                if not isinstance(record, dict):
                    raise ResourceUnavailable(f"{path}:{n}: not an object; {REBUILD}")
                records.append(record)
        if len(records) != self.count:
            raise ResourceUnavailable(
                f"{path}: {len(records)} records, the manifest says {self.count}; {REBUILD}"
            )
        return records

    @property
    def bm25(self) -> BM25:
        if self._bm25 is None:
            from .bm25 import BM25

            path = self._bm25_name
            try:
                self._bm25_file.seek(0)
                self._bm25 = BM25.load(self._bm25_file)
                self._bm25_file.close()
            except (OSError, ValueError, KeyError) as exc:
                raise ResourceUnavailable(
                    f"{path}: corrupt BM25 statistics ({exc}); {REBUILD}"
                ) from None
            if self._bm25.n_docs != self.count:
                raise ResourceUnavailable(
                    f"{path}: BM25 statistics cover {self._bm25.n_docs} "
                    f"documents, the manifest says {self.count}; {REBUILD}"
                )
        return self._bm25

    @property
    def sentences(self) -> SentenceVectors | None:
        """The sentence vectors of this generation, or None when the index has none."""
        if self._sentences is None and self._sentences_file is not None:
            from .sentence_vectors import SentenceVectors

            self._sentences = SentenceVectors(
                self._sentences_file, self._sentences_name, self.count, self.dimension, REBUILD
            )
            self._sentences_file.close()
            self._sentences_file = None
        return self._sentences

    def row_of(self, doc_id: Any) -> int | None:
        """The row of the record with this id (None when the index has no such record)."""
        if self._rows is None:
            self._rows = {}
            for i, r in enumerate(self.records):
                if "id" in r:
                    self._rows.setdefault(str(r["id"]), i)
        return self._rows.get(str(doc_id))

    # -- search ------------------------------------------------------------------------------

    def default_search_k(self, k: int) -> int:
        """annoy nodes to inspect for k hits: enough for recall@10 >= 0.95 against exact search
        (measured in tests/bench/bench_retrieve.py; annoy's own default, trees * k, gives ~0.9)."""
        return max(search_k_floor(self.count), k * self.trees * 8)

    def dense(
        self, query: np.ndarray, k: int, *, exact: bool = False, search_k: int | None = None
    ) -> list[tuple[int, float]]:
        """(row, cosine similarity) of the k nearest vectors, best first."""
        import numpy as np

        from .bm25 import top_k

        if exact:
            return top_k(self.vectors @ query, k)
        if search_k is None:
            search_k = self.default_search_k(k)
        # annoy takes C ints: a huge -k or --search-k would be an OverflowError
        k, search_k = min(k, self.count), min(search_k, 2**31 - 1)
        rows = self.forest.get_nns_by_vector(query.tolist(), k, search_k=search_k)
        if not rows:
            return []
        # exact cosine from the stored vectors (annoy's distance is sqrt(2 - 2 cos), in float32)
        scores = self.vectors[np.asarray(rows)] @ query
        order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), rows[i]))
        return [(int(rows[i]), float(scores[i])) for i in order]


def document_of(record: Record) -> str:
    """The document a record belongs to, for `index build --update`: its `parent_id` (a chunk
    of it) or its own id."""
    parent = record.get("parent_id")
    return str(parent if parent is not None else record.get("id"))


def search_k_floor(count: int) -> int:
    """The least search_k for an index of `count` vectors (see Index.default_search_k)."""
    return min(max(1000, int(math.sqrt(count) * 16)), max(count, 1) * 4)


def make_embedder(
    path: Path,
    threads: int | None,
    factory: Callable[[Path, int | None], Any] | None = None,
    hash_cache: str | os.PathLike[str] | None = None,
) -> Any:
    """An Embedder for `path` (or what `factory` makes, in tests), its sha256 from the cache."""
    if factory is not None:
        return factory(path, threads)
    from .llm import Embedder
    from .models import sha256_file

    return Embedder(path, threads, model_sha256=sha256_file(path, hash_cache))


# -- the build operator ------------------------------------------------------------------------


class IndexBuilder(Operator):
    """Collect records with embeddings and write them as an index directory (at the end)."""

    name = "index build"
    requires: ClassVar[dict[str, dict[str, Any]]] = {
        "text": {"type": "string", "description": "indexed text (`content` is accepted too)"},
    }
    produces: ClassVar[dict[str, dict[str, Any]]] = {
        "index": {"type": "string", "description": "the index directory (one summary record)"},
        "count": {"type": "integer"},
        "dimension": {"type": "integer"},
        "model": {"type": ["string", "null"]},
        "sentence_vectors": {
            "type": "integer",
            "description": "sentence vectors kept (0: none, e.g. the model was not found)",
        },
    }
    memory = "whole-input"
    stateless = False
    default_batch_size = 64

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        model: str | None = None,
        model_dirs: Sequence[str | os.PathLike[str]] = (),
        threads: int | None = None,
        trees: int = DEFAULT_TREES,
        seed: int = DEFAULT_SEED,
        embedder_factory: Callable[[Path, int | None], Any] | None = None,
        hash_cache: str | os.PathLike[str] | None = None,
        update: bool = False,
        keep_missing: bool = False,
        sentences: bool = True,
    ) -> None:
        if trees < 1:
            raise OptionError(f"--trees must be at least 1, got {trees}")
        self.update = update or keep_missing
        self.keep_missing = keep_missing
        self.old: Index | None = None  # the index being updated
        self.old_rows: dict[str, int] = {}  # its ids -> rows
        self.documents: set[str] = set()  # documents named by the input (see document_of)
        self.deleted_ids: set[str] = set()  # from deletion records
        self.deleted_paths: set[str] = set()
        self.reused = 0  # vectors taken from the old index
        self.embedded = 0  # vectors made here
        self.directory = Path(directory)
        self.model_name = model
        self.model_dirs = list(model_dirs)
        self.threads = threads
        self.trees = trees
        self.seed = seed
        self.embedder_factory = embedder_factory
        self.hash_cache = hash_cache
        self.model: ModelRef | None = None
        self.dimension: int | None = None
        self.vectors: list[np.ndarray] = []
        #: per record, its sentence vectors (operators.sentence_vectors) when taken from the
        #: index being updated, else None (embedded at the end)
        self.with_sentences = sentences
        self.sentence_rows: list[np.ndarray | None] = []
        #: told (what, done, total) as the sentence vectors are embedded, after the last input
        #: record: the progress display (about 140 sentences/s on 2 cores: minutes for a
        #: large corpus, with nothing else to show)
        self.on_closing: Callable[[str, int, int], None] | None = None
        self.records: list[Record] = []
        self.ids: set[str] = set()
        self._embedder: Any = None
        self._embedder_ref: ModelRef | None = None
        self.manifest: dict[str, Any] | None = None

    def setup(self) -> None:
        _recover(Path(self.directory))  # what a build killed with SIGKILL left behind
        check_target(self.directory)  # refuse a foreign directory before reading any input
        if self.update and self.old is None and _is_index(self.directory):
            self.old = Index(self.directory)  # one generation, held until the new one is in
            for i, r in enumerate(self.old.records):
                self.old_rows.setdefault(str(r.get("id")), i)

    # -- embedding the records that come without a vector ----------------------------------

    def _embedder_for(self, model: ModelRef | None) -> tuple[Any, ModelRef]:
        """The embedder for records that come without a vector: --model, else the model the
        other records name, else (--update) the model of the index being updated, else the
        default embedding model."""
        if self._embedder is None:
            from .models import DEFAULT_EMBED, locate, model_label

            old = self.old.model if self.old is not None else None  # --update: its model
            name = (
                self.model_name
                or (model.name if model and model.name else None)
                or (old.name if old and old.name else DEFAULT_EMBED)
            )
            path = locate(name, self.model_dirs)
            self._embedder = make_embedder(
                path, self.threads, self.embedder_factory, self.hash_cache
            )
            self._embedder_ref = ModelRef(model_label(name), self._embedder.model_sha256, path.name)
        assert self._embedder_ref is not None
        return self._embedder, self._embedder_ref

    def _check_model(self, doc_id: str, ref: ModelRef, model: ModelRef | None) -> ModelRef:
        """The index model after a record made with `ref`; RecordError when they differ."""
        if self.model_name and self._embedder_ref is None:
            from .models import model_label

            wanted = ModelRef(model_label(self.model_name))
            if not ref.same_as(wanted) and ref.name != wanted.name:
                raise RecordError(
                    f"record {doc_id!r} was embedded with {ref.label()}, not with "
                    f"--model {self.model_name}; an index cannot mix models"
                )
        if model is None:
            return ref
        if not model.same_as(ref):
            raise RecordError(
                f"record {doc_id!r} was embedded with {ref.label()}, but this "
                f"index holds vectors from {model.label()}; an index cannot mix "
                "embedding models (embed everything with one model)"
            )
        return ref if ref.sha256 and not model.sha256 else model

    # -- the operator ----------------------------------------------------------------------

    def process(self, batch: list[Record]) -> list[Record]:
        import numpy as np

        # check the whole batch before keeping any of it: the driver retries a failed batch
        # record by record, and nothing may be kept twice
        model, dim = self.model, self.dimension
        ids: set[str] = set()
        kept: list[tuple[Record, np.ndarray | None]] = []
        old_rows: dict[int, int] = {}  # kept position -> row of the index being updated
        need_vector: list[int] = []
        reused = 0
        deletions: list[Record] = []
        for record in batch:
            if record.get("deleted") is True:
                deletions.append(record)  # kept out of the index, and its document with it
                continue
            text = record_text(record)
            if "id" in record:
                doc_id = str(record["id"])
            else:
                doc_id = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
            if doc_id in self.ids or doc_id in ids:
                raise RecordError(
                    f"duplicate id {doc_id!r}: ids in an index must be unique "
                    "(`sage dedupe --key id` drops repeats)"
                )
            ids.add(doc_id)
            vec = record_vector(record)
            if vec is None:
                ref: ModelRef | None = self._embedder_for(model)[1]
                assert ref is not None
                row = self._old_row(doc_id, text, ref)
                if row is None:
                    need_vector.append(len(kept))
                else:
                    assert self.old is not None
                    vec = np.array(self.old.vectors[row], dtype=np.float32)
                    old_rows[len(kept)] = row
                    reused += 1
                    dim = int(vec.shape[0]) if dim is None else dim
            else:
                ref = ModelRef.parse(record.get("embedding_model"))
                if dim is None:
                    dim = int(vec.shape[0])
                elif vec.shape[0] != dim:
                    raise RecordError(
                        f"record {doc_id!r} has a {vec.shape[0]}-dimensional "
                        f"embedding, the index is {dim}-dimensional; an index "
                        "cannot mix embedding models"
                    )
            if ref is not None:  # a bare vector with no model named is taken as it is
                model = self._check_model(doc_id, ref, model)
            stored = {k: v for k, v in record.items() if k not in EMBEDDING_FIELDS}
            stored["id"] = record.get("id", doc_id)
            if "text" not in stored:
                stored["text"] = stored.pop("content")
            kept.append((stored, vec))
        if need_vector:
            embedder, _ = self._embedder_for(model)
            rows = embedder.embed([kept[i][0]["text"] for i in need_vector])
            if dim is None:
                dim = int(rows.shape[1])
            elif rows.shape[1] != dim:
                raise RecordError(
                    f"the model makes {rows.shape[1]}-dimensional vectors, the "
                    f"index is {dim}-dimensional; an index cannot mix models"
                )
            for row, i in zip(rows, need_vector, strict=True):
                kept[i] = (kept[i][0], row)
        self.model, self.dimension = model, dim
        for i, (stored, vec) in enumerate(kept):
            assert vec is not None
            self.records.append(stored)
            self.vectors.append(vec)
            self.sentence_rows.append(self._old_sentences(old_rows.get(i)))
            self.documents.add(document_of(stored))
        self.ids |= ids
        self.embedded += len(need_vector)
        self.reused += reused
        for record in deletions:
            self.deleted_ids.add(str(record.get("id")))
            meta = record.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("path"), str):
                self.deleted_paths.add(meta["path"])
        return []

    def _old_row(self, doc_id: str, text: str, ref: ModelRef) -> int | None:
        """The row of the index being updated that holds this very chunk (same id, same text,
        same model), or None when it must be embedded."""
        if self.old is None or self.old.model is None or not self.old.model.same_as(ref):
            return None
        row = self.old_rows.get(doc_id)
        if row is None or self.old.records[row].get("text") != text:
            return None
        return row

    def _old_sentences(self, row: int | None) -> np.ndarray | None:
        """The sentence vectors of a row of the index being updated (None: to be embedded)."""
        import numpy as np

        if row is None or self.old is None or not self.with_sentences:
            return None
        try:
            sentences = self.old.sentences
        except ResourceUnavailable:  # damaged: this build embeds them again, the index heals
            return None
        return None if sentences is None else np.array(sentences.of_row(row), dtype=np.float32)

    def _sentence_vectors(self) -> list[np.ndarray] | None:
        """Every record's sentence vectors: those taken from the index being updated, the
        rest embedded now with the index's model. None (no sentences.npz) when the records
        name no model or it cannot be loaded here: retrieval then ranks by chunk vectors."""
        import numpy as np

        from .sentence_vectors import leading_sentences

        rows = self.sentence_rows
        if not self.with_sentences or self.model is None or not self.model.name:
            return None
        missing = [i for i, v in enumerate(rows) if v is None]
        if missing:
            try:
                embedder, ref = self._embedder_for(self.model)
            except (ResourceUnavailable, OptionError):
                return None
            if not ref.same_as(self.model):
                return None
            per_row = [leading_sentences(self.records[i]["text"]) for i in missing]
            # a chunk of one sentence: its own vector says it all (rescore counts it twice)
            per_row = [
                [] if len(row) == 1 and row[0] == self.records[i]["text"].strip() else row
                for i, row in zip(missing, per_row, strict=True)
            ]
            flat = [s for row in per_row for s in row]
            vectors = self._embed_told(embedder, flat) if flat else None
            if vectors is not None and vectors.shape[1] != self.dimension:
                return None
            start = 0
            for i, row in zip(missing, per_row, strict=True):
                if vectors is None:
                    rows[i] = np.zeros((0, self.dimension or 0), dtype=np.float32)
                else:
                    rows[i] = vectors[start : start + len(row)]
                start += len(row)
        return [v for v in rows if v is not None]

    def _embed_told(self, embedder: Any, texts: list[str]) -> np.ndarray:
        """`embedder.embed(texts)`, in slices when someone is told how far it got."""
        import numpy as np

        if self.on_closing is None:
            return embedder.embed(texts)
        parts = []
        for start in range(0, len(texts), CLOSING_SLICE):
            self.on_closing("sentence vectors", start, len(texts))
            parts.append(embedder.embed(texts[start : start + CLOSING_SLICE]))
        self.on_closing("sentence vectors", len(texts), len(texts))
        return np.vstack(parts)

    def _carry_over(self) -> None:
        """--keep-missing: the old index's documents that the input did not name or delete."""
        import numpy as np

        old = self.old
        if old is None:
            return
        for i, record in enumerate(old.records):
            doc = document_of(record)
            meta = record.get("metadata")
            path = meta.get("path") if isinstance(meta, dict) else None
            if (
                doc in self.documents
                or doc in self.deleted_ids
                or str(record.get("id")) in self.deleted_ids
                or path in self.deleted_paths
                or str(record.get("id")) in self.ids
            ):
                continue
            if self.model is not None and old.model is not None:
                if not self.model.same_as(old.model):
                    raise OptionError(
                        f"{self.directory} holds vectors from {old.model.label()}, the new "
                        f"records from {self.model.label()}; an index cannot mix models "
                        "(rebuild it from the full listing, without --keep-missing)"
                    )
            elif self.dimension is not None and self.dimension != old.dimension:
                raise OptionError(
                    f"{self.directory} holds {old.dimension}-dimensional vectors, the new "
                    f"records {self.dimension}-dimensional ones; rebuild it without --keep-missing"
                )
            self.records.append(record)
            self.vectors.append(np.array(old.vectors[i], dtype=np.float32))
            self.sentence_rows.append(self._old_sentences(i))
            self.ids.add(str(record.get("id")))
            self.reused += 1
        if self.model is None:
            self.model = old.model
        if self.dimension is None:
            self.dimension = old.dimension

    def close(self) -> list[Record]:
        import numpy as np

        if self.keep_missing and (self.records or self.deleted_ids or self.deleted_paths):
            self._carry_over()
        sentences = self._sentence_vectors() if self.records else None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if not self.records:
            old, self.old = self.old, None
            if old is not None:
                old.close()
            if old is not None and not self.keep_missing:
                raise OptionError(
                    f"--update with no records would leave nothing in {self.directory}; "
                    "give it the full listing (or --keep-missing and the changes)"
                )
            return []
        vectors = np.vstack(self.vectors)
        model = self.model
        if model is None and self.model_name:
            from .models import model_label

            model = ModelRef(model_label(self.model_name))
        if model is not None and model.file is None and model.name:
            from .models import MODELS

            spec = MODELS.get(model.name)
            if spec is not None:  # named by the records: record the registry's file name too
                model = ModelRef(model.name, model.sha256, spec.filename)
        self.manifest = write_index(
            self.directory,
            vectors,
            self.records,
            model,
            trees=self.trees,
            seed=self.seed,
            sentences=sentences,
        )
        summary = {
            "index": str(self.directory),
            "count": self.manifest["count"],
            "dimension": self.manifest["dimension"],
            "model": model.name if model else None,
            "model_sha256": model.sha256 if model else None,
            "trees": self.trees,
            "sentence_vectors": sum(len(v) for v in sentences) if sentences is not None else 0,
        }
        if self.update:
            removed = sum(1 for doc_id in self.old_rows if doc_id not in self.ids)
            summary.update(embedded=self.embedded, reused=self.reused, removed=removed)
        if self.old is not None:
            self.old.close()
            self.old = None
        self.vectors, self.records, self.sentence_rows = [], [], []
        return [summary]
