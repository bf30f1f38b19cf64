"""Model throughput (issue 15), each a ratio measured in the same run, the two sides
alternating and the fastest run of each counting:

- batched: `sage generate` (default --parallel, continuous batching) over 32 short prompts,
  48 tokens each, `--threads 2`, against a sequential llama-cpp-python loop
  (`create_chat_completion` per prompt, the same model file, n_ctx, threads; bench_rag's
  BARE_GENERATE). Tokens/s over the whole process's wall time (start-up and model load on both
  sides). Target >= 2.0. Reported beside it: how many answers equal the loop's (temperature 0).
- rag: the same over the demo's RAG prompts (the questions of scripts/rag_questions.ndjson
  through the demo's retrieve and prompt stages over an index built here with its commands):
  long prompts, where prefill dominates. No target: its own ratio.
- openai: `sage generate --backend openai --concurrency 8` against `--concurrency 1`, records/s
  over the whole process, against tests/openai_stub.py answering after a fixed delay.
  Target >= 6.0.

Every process runs with a fresh SAGE_CACHE_DIR (the index build embeds the whole corpus) and
generate with `--no-cache`.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import orjson

from tests.bench import ROOT, rel, shell_env
from tests.bench.bench_rag import (
    BARE_GENERATE,
    alternate,
    build_index,
    fastest,
    model_path,
    python_bin,
    records,
    sage_bin,
    timed,
    write,
)

REPRODUCE = "python -m tests.bench --only generate"
THREADS = 2
MAX_TOKENS = 48
GEN_CTX = 2048
TOPICS = [
    "Paris", "the moon", "cats", "rain", "bread", "music", "trees", "the sea", "winter",
    "coffee", "bicycles", "libraries", "volcanoes", "honey", "trains", "chess",
]  # fmt: skip
PROMPTS = [f"Write one sentence about {t}." for t in TOPICS] + [
    f"Give one fact about {t}." for t in TOPICS
]
RAG_QUESTIONS = 8
STUB_DELAY = 0.2
STUB_RECORDS = 240
CONCURRENCY = 8


def compare(report, name: str, work: Path, prompts: Path, n: int, env, target) -> None:
    """sage generate (batched) against the sequential loop over the records in `prompts`."""
    script = write(work / "bare_generate.py", BARE_GENERATE)
    model = model_path("smollm2-135m")
    commands = {
        "sage": f"{sage_bin()} generate --threads {THREADS} --max-tokens {MAX_TOKENS} "
        f"--temperature 0 --no-cache < {rel(prompts)}",
        "bare": f"{python_bin()} {rel(script)} {shlex.quote(str(model))} {rel(prompts)} "
        f"{THREADS} {MAX_TOKENS} {GEN_CTX}",
    }
    repeat = max(report.repeat - 1, 1)
    runs = alternate(commands, env, repeat, warmup=False)
    best = {k: fastest(rs) for k, rs in runs.items()}
    out = {k: records(run.stdout) for k, run in best.items()}
    for k, rs in out.items():
        if len(rs) != n:
            raise RuntimeError(f"{k}: {len(rs)} answers for {n} prompts")
    tokens = {k: sum(r["usage"]["completion_tokens"] for r in rs) for k, rs in out.items()}
    rate = {k: tokens[k] / best[k].wall for k in commands}
    same = sum(a["answer"] == b["answer"] for a, b in zip(out["sage"], out["bare"], strict=True))
    for k, command in commands.items():
        report(
            f"generate.{name}.{k}.tokens_per_s",
            rate[k],
            "tok/s",
            command=command,
            tokens=tokens[k],
            wall_s=best[k].wall,
        )
    report(
        f"generate.{name}.sage_vs_sequential",
        rate["sage"] / rate["bare"],
        "x",
        target=target,
        command=REPRODUCE,
        note=f"{n} prompts, --max-tokens {MAX_TOKENS}, --threads {THREADS}, temperature 0, "
        f"sage's default --parallel; tokens/s over the whole process (start-up included); "
        f"fastest of {repeat} alternating runs; {same}/{n} answers equal to the loop's",
        answers_equal=same,
    )


def bench_batched(report, work: Path, env) -> None:
    prompts = work / "prompts.ndjson"
    prompts.write_bytes(
        b"".join(orjson.dumps({"id": i, "prompt": p}) + b"\n" for i, p in enumerate(PROMPTS))
    )
    compare(report, "batched", work, prompts, len(PROMPTS), env, ">= 2.0")


def bench_rag_prompts(report, work: Path, env) -> None:
    index = build_index(report, work, env)
    questions = work / "questions.ndjson"
    lines = (ROOT / "scripts" / "rag_questions.ndjson").read_text(encoding="utf-8").splitlines()
    questions.write_text("\n".join(lines[:RAG_QUESTIONS]) + "\n", encoding="utf-8")
    prompts = work / "rag_prompts.ndjson"
    sage = sage_bin()
    run = timed(
        f"{sage} source {rel(questions)} | {sage} retrieve --index {rel(index)} -k 5 "
        f"--mode hybrid | {sage} prompt --template qa --context-tokens 300",
        env,
    )
    prompts.write_bytes(run.stdout)
    compare(report, "rag", work, prompts, RAG_QUESTIONS, env, None)


def bench_openai(report, work: Path, env) -> None:
    from tests.openai_stub import StubServer

    data = work / "stub_prompts.ndjson"
    data.write_bytes(
        b"".join(orjson.dumps({"id": i, "prompt": f"p{i}"}) + b"\n" for i in range(STUB_RECORDS))
    )
    with StubServer(delay=STUB_DELAY) as stub:
        base = f"{sage_bin()} generate --backend openai --base-url {stub.url}/slow/v1 --no-cache"
        commands = {
            "concurrent": f"{base} --concurrency {CONCURRENCY} < {rel(data)}",
            "sequential": f"{base} --concurrency 1 < {rel(data)}",
        }
        runs = alternate(commands, env, 1, warmup=False)
    best = {k: fastest(rs) for k, rs in runs.items()}
    for k, run in best.items():
        if len(records(run.stdout)) != STUB_RECORDS:
            raise RuntimeError(f"{k}: {len(records(run.stdout))} answers")
    rate = {k: STUB_RECORDS / run.wall for k, run in best.items()}
    for k, command in commands.items():
        report(f"generate.openai.{k}.records_per_s", rate[k], "rec/s", command=command)
    report(
        "generate.openai.concurrency_vs_sequential",
        rate["concurrent"] / rate["sequential"],
        "x",
        target=">= 6.0",
        command=REPRODUCE,
        note=f"{STUB_RECORDS} records, a stub answering after {STUB_DELAY:g} s, --concurrency "
        f"{CONCURRENCY} against 1; records/s over the whole process (start-up included)",
        max_in_flight=stub.max_in_flight,
    )


def run(report) -> None:
    work = report.workdir / "generate"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="sage-bench-generate-cache-"))
    env = shell_env() | {"SAGE_CACHE_DIR": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("SAGE_THREADS", None)
    bench_openai(report, work, env)
    bench_batched(report, work, env)
    bench_rag_prompts(report, work, env)
