"""`sage serve` under load (issue 16): chat requests from 20 concurrent clients against the
same requests sent one at a time, to one server, in the same run. Two cases:

- chat (the target): `sage serve --no-cache --max-tokens 48`, 200 distinct questions at
  temperature 0, answered by SmolLM2-135M without retrieval (short prompts: decoding dominates).
  Figures: requests/s of each side, p50/p99 latency, failures (target 0), the mean model batch
  (from the server's own /metrics) and the ratio of concurrent to sequential requests/s
  (target >= 2: the requests that wait together are answered by one batch, which pays when the
  generator decodes a batch together).
- rag (no target): `--index IDX --max-tokens 24` over the tests' 6-document MiniLM index, 60
  questions: each prompt carries 4 retrieved documents (~140 tokens), so prefill, which is not
  shared between sequences, dominates and batching gains less.

Each case starts its own server on a free loopback port with a fresh SAGE_CACHE_DIR and
--no-cache, so every request is generated. The clients are Python threads, each a plain HTTP
client (urllib).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from tests.bench import shell_env

REPRODUCE = "python -m tests.bench --only serve"
CLIENTS = 20
#: name -> (requests, sage serve flags, needs the index, target of the ratio)
CASES = {
    "chat": (200, ["--max-tokens", "48"], False, ">= 2"),
    "rag": (60, ["--index", "idx", "--max-tokens", "24"], True, None),
}
SUBJECTS = [
    "the capital of France",
    "opening a file in Python",
    "the stock market",
    "the weather this weekend",
    "Python lists",
    "the cat",
    "Paris",
    "heavy rain",
    "the open() function",
    "appending to a list",
]
FORMS = [
    "What do you know about {}?",
    "Tell me one fact about {}.",
    "Summarise what the documents say about {}.",
    "Is there anything about {} in the documents?",
    "Explain {} in one sentence.",
    "What is said about {}?",
    "Give a short answer about {}.",
    "Why does {} matter?",
    "Describe {} briefly.",
    "Write a line about {}.",
    "What is the main point about {}?",
    "Answer briefly: what about {}?",
    "In a few words, {}?",
    "Quote the document about {}.",
    "Where is {} mentioned?",
    "Name one detail about {}.",
    "How would you describe {}?",
    "What happened with {}?",
    "What does the text say on {}?",
    "Any news about {}?",
]


def questions(n: int) -> list[str]:
    return [f.format(s) for f in FORMS for s in SUBJECTS][:n]


def start_server(work: Path, env: dict[str, str], flags: list[str]) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "sage_cli", "serve", "--port", "0", "--no-cache", *flags]
    proc = subprocess.Popen(
        argv, cwd=work, env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", seen)
            if found:
                return proc, found.group(1).decode()
    proc.kill()
    raise RuntimeError(f"sage serve did not start: {seen.decode(errors='replace')}")


def ask(url: str, question: str) -> tuple[bool, float]:
    body = orjson.dumps({"messages": [{"role": "user", "content": question}], "temperature": 0})
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            ok = resp.status == 200 and bool(orjson.loads(resp.read())["choices"][0])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        ok = False
    return ok, time.perf_counter() - t0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def metrics_batches(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    count = re.search(r"^sage_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^sage_batch_size_sum (\S+)", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def run(report) -> None:
    from sage_cli.operators.index import IndexBuilder
    from sage_cli.resources import model_dirs
    from tests.index_fixture import DOCS

    work = Path(tempfile.mkdtemp(prefix="sage-bench-serve-"))
    env = shell_env()
    env["SAGE_CACHE_DIR"] = str(work / "cache")
    env.pop("SAGE_THREADS", None)
    try:
        try:
            IndexBuilder(
                work / "idx",
                model_dirs=model_dirs(),
                threads=1,
                hash_cache=work / "cache" / "model-hashes.json",
            ).run([dict(d) for d in DOCS])
        except Exception as exc:  # noqa: BLE001 - a missing model is a note, not a crash
            report.note(f"models not installed (make install): serve not measured ({exc})")
            return
        for case, (n, flags, _, target) in CASES.items():
            measure(report, work, env, case, n, flags, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(
    report, work: Path, env: dict[str, str], case: str, n: int, flags: list[str], target: str | None
) -> None:
    proc, url = start_server(work, env, flags)
    try:
        qs = questions(n)
        ask(url, "warm up: what do you know?")
        b0 = metrics_batches(url)
        t0 = time.perf_counter()
        sequential = [ask(url, q) for q in qs]
        seq_s = time.perf_counter() - t0
        b1 = metrics_batches(url)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            concurrent = list(pool.map(lambda q: ask(url, q), qs))
        con_s = time.perf_counter() - t0
        b2 = metrics_batches(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    command = f"{REPRODUCE}  (sage serve --no-cache {' '.join(flags)})"
    for name, results, seconds, (before, after) in (
        ("sequential", sequential, seq_s, (b0, b1)),
        ("concurrent", concurrent, con_s, (b1, b2)),
    ):
        latencies = [s for ok, s in results if ok]
        failed = sum(1 for ok, _ in results if not ok)
        calls = after[0] - before[0]
        mean_batch = (after[1] - before[1]) / calls if calls else 0.0
        clients = CLIENTS if name == "concurrent" else 1
        key = f"serve.{case}.{name}"
        report(
            f"{key}.requests_per_s",
            len(latencies) / seconds,
            "req/s",
            command=command,
            note=f"{len(qs)} requests from {clients} client(s)",
        )
        report(f"{key}.failed", failed, "requests", target="<= 0", command=command)
        if latencies:
            report(f"{key}.p50_s", percentile(latencies, 50), "s", command=command)
            report(f"{key}.p99_s", percentile(latencies, 99), "s", command=command)
        report(f"{key}.mean_batch", mean_batch, "requests", command=command)
    seq_rate = sum(ok for ok, _ in sequential) / seq_s
    con_rate = sum(ok for ok, _ in concurrent) / con_s
    report(
        f"serve.{case}.concurrent_vs_sequential",
        con_rate / seq_rate if seq_rate else 0.0,
        "x",
        target=target,
        command=command,
        note=f"{CLIENTS} clients vs 1, the same {len(qs)} requests, one server",
    )
