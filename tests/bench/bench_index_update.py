"""Incremental index (issue 14): `sage index build IDX --update` after one document of 1,000
changed, against a cold `sage index build` of the same 1,000 documents, in the same run.

The corpus: 1,000 synthetic documents of about 650 characters (one `sage chunk` chunk each),
chunked once before timing; both commands read the same chunk file
except that the update's has one document's text changed. Each command is a whole `sage`
process (start-up, model load, embedding, annoy, BM25 and the atomic swap included), default
threads, a fresh SAGE_CACHE_DIR. Cold: the fastest of `--repeat` builds into a new directory
(at most 2); update: the fastest of `--repeat` updates, each of a fresh copy of the cold index.
Target: update_s / cold_s <= 0.05.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import OUT, Report, sage_command, shell_env

DOCS = 1000
REPRODUCE = "python -m tests.bench --only index_update"
WORDS = (
    "river mountain engine library garden window protocol harvest signal lantern copper "
    "orbit glacier thunder meadow archive compass ember falcon harbor canyon velvet pepper "
    "quartz saddle timber violet walnut yonder zephyr anchor bramble cedar dune fjord grove "
    "hollow island jasmine kettle lichen marble nectar oasis pebble quill reef summit tundra"
).split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        while sum(len(s) for s in sentences) < 600:
            words = rng.choices(WORDS, k=rng.randint(8, 16))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append({"id": f"doc{i:04d}", "text": " ".join(sentences)})
    return docs


def _sage(args: list[str], stdin: Path, env: dict[str, str]) -> bytes:
    with stdin.open("rb") as fh:
        done = subprocess.run(
            [*sage_command(), *args], stdin=fh, capture_output=True, env=env, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"sage {' '.join(args)}: {done.stderr.decode()[-500:]}")
    return done.stdout


def measure(repeat: int = 3, n: int = DOCS) -> dict[str, float]:
    import orjson

    work = OUT / "work" / "index_update"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = shell_env()
    env["SAGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sage-bench-cache-")
    docs = corpus(n)
    (work / "docs.ndjson").write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    changed = [dict(d) for d in docs]
    changed[n // 2]["text"] = "A rewritten document about lanterns and harbors. " * 20
    (work / "docs2.ndjson").write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in changed))
    (work / "chunks.ndjson").write_bytes(_sage(["chunk"], work / "docs.ndjson", env))
    (work / "chunks2.ndjson").write_bytes(_sage(["chunk"], work / "docs2.ndjson", env))
    chunks = (work / "chunks.ndjson").read_bytes().count(b"\n")

    cold_s = float("inf")
    for i in range(min(repeat, 2)):
        target = work / f"cold{i}"
        t0 = time.perf_counter()
        _sage(["index", "build", str(target)], work / "chunks.ndjson", env)
        cold_s = min(cold_s, time.perf_counter() - t0)
    update_s = float("inf")
    summary: dict = {}
    for _ in range(repeat):
        target = work / "updated"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "cold0", target)
        t0 = time.perf_counter()
        out = _sage(["index", "build", str(target), "--update"], work / "chunks2.ndjson", env)
        update_s = min(update_s, time.perf_counter() - t0)
        summary = orjson.loads(out)
    shutil.rmtree(env["SAGE_CACHE_DIR"], ignore_errors=True)
    return {
        "chunks": chunks,
        "cold_s": cold_s,
        "update_s": update_s,
        "ratio": update_s / cold_s,
        "embedded": summary.get("embedded", -1),
        "reused": summary.get("reused", -1),
    }


def run(report: Report) -> dict[str, float]:
    figures = measure(report.repeat)
    note = (
        f"{DOCS} documents, {figures['chunks']:.0f} chunks; the update embedded "
        f"{figures['embedded']:.0f} and reused {figures['reused']:.0f}"
    )
    report("index_update.cold_s", figures["cold_s"], "s", command=REPRODUCE)
    report("index_update.update_s", figures["update_s"], "s", command=REPRODUCE)
    report(
        "index_update.ratio",
        figures["ratio"],
        "",
        target="<= 0.05",
        command=REPRODUCE,
        note=note,
    )
    return figures


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else DOCS
    print(measure(n=n))
