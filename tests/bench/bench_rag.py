"""The RAG operators against the library they wrap (issue 3), each as a ratio measured in the
same run, the two sides alternating and the fastest run of each counting:

- generate: `sage generate` tokens/s against a bare llama-cpp-python loop
  (`create_chat_completion`, the same model file, n_ctx, threads, max_tokens, temperature 0) on
  the same short prompts; tokens are the answers' `usage.completion_tokens`. Both write one
  JSON line per answer; the rate is the tokens of answers 2..n over the time from the first
  answer line to the last, so the fixed start-up (interpreter, imports, model load, reported
  as first_answer_s) is out of both sides. Target >= 0.95. Beside it, without a target: the
  ratio over the whole process's wall time (start-up included) and over the model calls alone
  (`usage.seconds` against the bare loop's own timing of each call).
- embed: `sage embed` sentences/s against a bare `Llama.embed` loop with the same batch (64),
  context (n_ctx = n_batch = n_ubatch = 256) and threads, over the same short sentences,
  `--no-cache`. Target >= 0.9.
- pipeline: the demo's answering pipeline (scripts/rag.sh) over an index built in the run with
  the demo's own commands, `sage source Q | sage retrieve --index IDX -k 5 --mode hybrid |
  sage prompt --template qa --context-tokens 300 | sage generate --temperature 0
  --max-tokens 48 --no-cache`: the time to its first answer line and its total time, against
  the same work as one Python process that imports the operators (`PYTHON_PIPELINE`). Target:
  overhead = sage_total / python_total - 1 <= 10%.

Every process runs with a fresh SAGE_CACHE_DIR (nothing cached) and OMP_WAIT_POLICY=PASSIVE
(what `sage_cli.resources` sets for sage; the bare loops get it too, so the comparison is fair).
One thread per model stage: on 2 cores, oversubscribed llama.cpp threads collapse decode speed.
The bare loops and the one-process pipeline are written to bench/out/work/rag/ and can be
re-run from there; the area takes about 3-6 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench import ROOT, VENV_BIN, rel, shell_env

REPRODUCE = "python -m tests.bench --only rag"

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "Give a synonym for happy.",
    "What is two plus two?",
    "Describe a cat in one sentence.",
]
MAX_TOKENS = 48
THREADS = 1
#: `sage generate`'s default --n-ctx
GEN_CTX = 2048
EMBED_SENTENCES = 1000
#: operators.llm.EMBED_BATCH and EMBED_CTX, sage embed's defaults
EMBED_BATCH = 64
EMBED_CTX = 256
QUESTIONS = 8

#: a bare llama-cpp-python loop: the Llama arguments operators.llm.load_llama passes
BARE_GENERATE = """\
import json, sys, time
from llama_cpp import LLAMA_DEFAULT_SEED, Llama

model, prompts, threads, max_tokens, n_ctx = sys.argv[1:6]
threads, max_tokens, n_ctx = int(threads), int(max_tokens), int(n_ctx)
llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, seed=LLAMA_DEFAULT_SEED, verbose=False)
for line in open(prompts, encoding="utf-8"):
    record = json.loads(line)
    t0 = time.perf_counter()
    response = llm.create_chat_completion(
        messages=[{"role": "user", "content": record["prompt"]}],
        max_tokens=max_tokens, temperature=0.0, stop=[])
    seconds = time.perf_counter() - t0
    usage = dict(response["usage"], seconds=seconds)
    answer = response["choices"][0]["message"]["content"] or ""
    sys.stdout.write(json.dumps({"answer": answer.strip(), "usage": usage}) + "\\n")
    sys.stdout.flush()
"""

#: a bare Llama.embed loop: the Llama arguments and batching of operators.llm.Embedder
BARE_EMBED = """\
import json, sys
from llama_cpp import Llama

model, path, threads, batch, n_ctx = sys.argv[1:6]
threads, batch, n_ctx = int(threads), int(batch), int(n_ctx)
texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8") if line.strip()]
llm = Llama(model_path=model, embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
done = 0
for start in range(0, len(texts), batch):
    done += len(llm.embed(texts[start:start + batch], normalize=False, truncate=True))
print(json.dumps({"embedded": done}))
"""

#: the answering pipeline as one Python process: the operators built as commands/retrieve.py,
#: prompt.py and generate.py build them, batches as the driver's defaults make them, one JSON
#: line per answer, flushed at once (as `sage generate` does for each record it finishes)
PYTHON_PIPELINE = """\
import sys
import orjson
from sage_cli.resources import default_threads, hash_cache_file, model_dirs
from sage_cli.operators.generate import Generate
from sage_cli.operators.prompt import Prompt
from sage_cli.operators.retrieve import Retriever

index, questions = sys.argv[1:3]
retriever = Retriever(index, k=5, mode="hybrid", exact=False, search_k=None, min_score=None,
                      field=None, model=None, model_dirs=model_dirs(),
                      threads=default_threads(), hash_cache=hash_cache_file())
prompt = Prompt("qa", system=None, n_ctx=2048, reserve=256, context_tokens=300)
generate = Generate(model="smollm2-135m", model_dirs=model_dirs(), backend="llama",
                    base_url=None, api_model=None, api_key=None, timeout=60.0, retries=2,
                    backoff=0.5, max_tokens=48, temperature=0.0, seed=None, stop=[],
                    system=None, n_ctx=2048, threads=default_threads(), json_schema=None,
                    cache_dir=None, hash_cache=hash_cache_file())
with open(questions, "rb") as fh:
    records = [orjson.loads(line) for line in fh if line.strip()]
for op in (retriever, prompt, generate):
    op.setup()
out = sys.stdout.buffer
step = Retriever.default_batch_size
for start in range(0, len(records), step):
    for record in prompt.process(retriever.process(records[start:start + step])):
        for answer in generate.process([record]):
            out.write(orjson.dumps(answer) + b"\\n")
            out.flush()
for op in (retriever, prompt, generate):
    op.close()
"""


@dataclass
class Run:
    """One run of a command: seconds from its start to each stdout line and to its exit."""

    lines: list[float]
    wall: float
    stdout: bytes

    @property
    def first(self) -> float:
        return self.lines[0] if self.lines else self.wall


def timed(command: str, env: dict[str, str], *, timeout: float = 600) -> Run:
    """Run a bash command line (pipefail on), stdout read line by line as it comes, each line
    timed; raises if it fails."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", command],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        lines, chunks = [], []
        for line in proc.stdout:
            lines.append(time.perf_counter() - t0)
            chunks.append(line)
        code = proc.wait(timeout=timeout)
        wall = time.perf_counter() - t0
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-600:]
            raise RuntimeError(f"`{command}` exited {code}: {tail}")
    return Run(lines, wall, b"".join(chunks))


def alternate(
    commands: dict[str, str], env: dict[str, str], repeat: int, warmup: bool
) -> dict[str, list[Run]]:
    """Every run of each command, `repeat` times, interleaved (so load from elsewhere hits all
    alike); `warmup` runs each once first, untimed (page cache, the model hash cache)."""
    if warmup:
        for command in commands.values():
            timed(command, env)
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, command in commands.items():
            runs[name].append(timed(command, env))
    return runs


def fastest(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.wall)


def records(stdout: bytes) -> list[dict]:
    import orjson

    return [orjson.loads(line) for line in stdout.splitlines() if line.strip()]


def model_path(name: str) -> Path:
    """The model file `sage generate`/`sage embed` would load (as commands/*.py locate it)."""
    from sage_cli.operators.models import locate
    from sage_cli.resources import model_dirs

    return locate(name, model_dirs())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sage_bin() -> str:
    return rel(VENV_BIN / "sage")


def python_bin() -> str:
    return rel(Path(sys.executable))


# -- generate ---------------------------------------------------------------------------------


def bench_generate(report, work: Path, env: dict[str, str]) -> None:
    import orjson

    prompts = work / "prompts.ndjson"
    prompts.write_bytes(
        b"".join(orjson.dumps({"id": i, "prompt": p}) + b"\n" for i, p in enumerate(PROMPTS))
    )
    script = write(work / "bare_generate.py", BARE_GENERATE)
    model = model_path("smollm2-135m")
    commands = {
        "sage": f"{sage_bin()} generate --threads {THREADS} --max-tokens {MAX_TOKENS} "
        f"--temperature 0 --no-cache < {rel(prompts)}",
        "bare": f"{python_bin()} {rel(script)} {shlex.quote(str(model))} {rel(prompts)} "
        f"{THREADS} {MAX_TOKENS} {GEN_CTX}",
    }
    repeat = max(report.repeat, 3)
    runs = alternate(commands, env, repeat, warmup=True)
    out = {name: records(fastest(rs).stdout) for name, rs in runs.items()}
    for name, rs in out.items():
        if len(rs) != len(PROMPTS):
            raise RuntimeError(f"{name}: {len(rs)} answers for {len(PROMPTS)} prompts")
    tokens = {name: [r["usage"]["completion_tokens"] for r in rs] for name, rs in out.items()}
    total = {name: sum(t) for name, t in tokens.items()}
    after_first = {name: sum(t[1:]) for name, t in tokens.items()}
    # tokens/s while answering: from the first answer line to the last, so the fixed start-up
    # (interpreter, imports, model load: see first_answer_s) is out of both sides; never less
    # time than the model calls of answers 2..n took (output held back must not look fast)
    streaming = {
        name: max(
            after_first[name]
            / max(
                r.lines[-1] - r.lines[0],
                sum(x["usage"]["seconds"] for x in records(r.stdout)[1:]),
            )
            for r in rs
        )
        for name, rs in runs.items()
    }
    whole = {name: total[name] / fastest(rs).wall for name, rs in runs.items()}
    first = {name: min(r.first for r in rs) for name, rs in runs.items()}
    in_model = {name: sum(r["usage"]["seconds"] for r in rs) for name, rs in out.items()}
    for name, command in commands.items():
        report(
            f"rag.generate.{name}.tokens_per_s",
            streaming[name],
            "tok/s",
            command=command,
            tokens=total[name],
            whole_process_tokens_per_s=whole[name],
            wall_s=fastest(runs[name]).wall,
            model_call_s=in_model[name],
        )
        report(f"rag.generate.{name}.first_answer_s", first[name], "s", command=command)
    same = [a["answer"] for a in out["sage"]] == [b["answer"] for b in out["bare"]]
    report(
        "rag.generate.sage_vs_bare",
        streaming["sage"] / streaming["bare"],
        "x",
        target=">= 0.95",
        command=REPRODUCE,
        note=f"{len(PROMPTS)} prompts, {total['sage']} tokens, --max-tokens {MAX_TOKENS}, "
        f"--threads {THREADS}, n_ctx {GEN_CTX}, temperature 0; tokens/s from the first answer "
        f"line to the last; best of {repeat} alternating runs; answers "
        + ("identical" if same else "DIFFER between sage and the bare loop"),
    )
    report(
        "rag.generate.sage_vs_bare.whole_process",
        whole["sage"] / whole["bare"],
        "x",
        command=REPRODUCE,
        note="all tokens over the whole process's wall time, start-up and model load "
        "included (a fixed cost, large against a few seconds of generation)",
    )
    report(
        "rag.generate.sage_vs_bare.model_calls",
        (total["sage"] / in_model["sage"]) / (total["bare"] / in_model["bare"]),
        "x",
        command=REPRODUCE,
        note="tokens/s over the model calls only (usage.seconds against the bare loop's "
        "timing of create_chat_completion)",
    )


# -- embed ------------------------------------------------------------------------------------


def bench_embed(report, work: Path, env: dict[str, str]) -> None:
    from tests.bench.bench_scale import sentences_file

    data = sentences_file(EMBED_SENTENCES)
    script = write(work / "bare_embed.py", BARE_EMBED)
    model = model_path("minilm-l6")
    commands = {
        "sage": f"{sage_bin()} embed --no-cache --threads {THREADS} < {rel(data)}",
        "bare": f"{python_bin()} {rel(script)} {shlex.quote(str(model))} {rel(data)} "
        f"{THREADS} {EMBED_BATCH} {EMBED_CTX}",
    }
    repeat = max(report.repeat, 3)
    best = {name: fastest(rs) for name, rs in alternate(commands, env, repeat, True).items()}
    n = EMBED_SENTENCES
    got = {"sage": len(records(best["sage"].stdout)), "bare": records(best["bare"].stdout)[0]}
    if got["sage"] != n or got["bare"]["embedded"] != n:
        raise RuntimeError(f"embedded {got}, expected {n} each")
    rate = {name: n / run.wall for name, run in best.items()}
    for name, command in commands.items():
        report(
            f"rag.embed.{name}.sentences_per_s",
            rate[name],
            "sent/s",
            command=command,
            wall_s=best[name].wall,
        )
    report(
        "rag.embed.sage_vs_bare",
        rate["sage"] / rate["bare"],
        "x",
        target=">= 0.9",
        command=REPRODUCE,
        note=f"{n:,} short sentences, batch {EMBED_BATCH}, n_ctx {EMBED_CTX}, --threads "
        f"{THREADS}, --no-cache; whole process, sage writing the vectors as JSON; fastest of "
        f"{repeat} alternating runs",
    )


# -- the demo pipeline ------------------------------------------------------------------------


def build_index(report, work: Path, env: dict[str, str]) -> Path:
    """The demo corpus and index, made with scripts/rag.sh's own commands."""
    corpus, index = work / "corpus.ndjson", work / "index"
    shutil.rmtree(index, ignore_errors=True)
    sage = sage_bin()
    command = (
        f"{python_bin()} scripts/pydoc_corpus.py > {rel(corpus)} && {sage} source {rel(corpus)}"
        f" | {sage} chunk --size 400 --overlap 60 | {sage} embed"
        f" | {sage} index build {rel(index)}"
    )
    run = timed(command, env)
    count = records(run.stdout)[0]["count"]
    report(
        "rag.index.build_s",
        run.wall,
        "s",
        command=command,
        note=f"the demo corpus (pydoc topics): {count:,} chunks embedded and indexed",
        chunks=count,
    )
    return index


def bench_pipeline(report, work: Path, env: dict[str, str]) -> None:
    index = build_index(report, work, env)
    questions = work / "questions.ndjson"
    lines = (ROOT / "scripts" / "rag_questions.ndjson").read_text(encoding="utf-8").splitlines()
    questions.write_text("\n".join(lines[:QUESTIONS]) + "\n", encoding="utf-8")
    script = write(work / "rag_pipeline.py", PYTHON_PIPELINE)
    sage = sage_bin()
    commands = {
        "sage": f"{sage} source {rel(questions)}"
        f" | {sage} retrieve --index {rel(index)} -k 5 --mode hybrid"
        f" | {sage} prompt --template qa --context-tokens 300"
        f" | {sage} generate --temperature 0 --max-tokens 48 --no-cache",
        "python": f"{python_bin()} {rel(script)} {rel(index)} {rel(questions)}",
    }
    repeat = max(report.repeat, 1)
    # no warm-up: the index build just read both model files and computed the hashes
    runs = alternate(commands, env, repeat, warmup=False)
    best = {name: fastest(rs) for name, rs in runs.items()}
    out = {name: records(run.stdout) for name, run in best.items()}
    for name, rs in out.items():
        if len(rs) != QUESTIONS or any("answer" not in r for r in rs):
            raise RuntimeError(f"{name}: {len(rs)} answers for {QUESTIONS} questions")
    for name, command in commands.items():
        first = min(r.first for r in runs[name])
        report(f"rag.pipeline.{name}.first_answer_s", first, "s", command=command)
        report(f"rag.pipeline.{name}.total_s", best[name].wall, "s", command=command)
    same = [r["answer"] for r in out["sage"]] == [r["answer"] for r in out["python"]]
    report(
        "rag.pipeline.overhead",
        best["sage"].wall / best["python"].wall - 1,
        "",
        target="<= 0.1",
        command=REPRODUCE,
        note=f"{QUESTIONS} demo questions, 4 sage processes against one Python process "
        f"running the same operators; fastest of {repeat} alternating runs; answers "
        + ("identical" if same else "DIFFER between the two"),
    )


def run(report) -> None:
    work = report.workdir / "rag"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="sage-bench-rag-cache-"))
    env = shell_env()
    env["SAGE_CACHE_DIR"] = str(cache)
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("SAGE_THREADS", None)
    try:
        for name in ("smollm2-135m", "minilm-l6"):
            model_path(name)
    except Exception as exc:  # noqa: BLE001 - one line, then the other areas go on
        report.not_measured(f"rag: models missing, run `sage models install` ({exc})")
        return
    try:
        bench_generate(report, work, env)
        bench_embed(report, work, env)
        bench_pipeline(report, work, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
