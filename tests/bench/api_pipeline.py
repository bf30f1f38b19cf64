"""One from_batch -> map -> filter -> sink pipeline of plain Python functions, written with
sage's Python API (`sage_cli.api`) or SAGE's own (`isage`: `sage.runtime`), run by
bench_api.py. Both build the same records in memory, run the same three functions, and write
what reached the sink to OUT afterwards (so the two outputs can be compared).

Usage: python tests/bench/api_pipeline.py sage|isage N OUT
Prints {"seconds": <env creation to submit's return>, "written": <records>} as JSON.

       python tests/bench/api_pipeline.py verbs IN OUT
The same work as `sage source IN | sage map MAP | sage filter FILTER | sage sink --to OUT`
(bench_pipeline.py), as one Python pipeline of the same verbs: no JSON between the stages.
"""

import json
import sys
import time


def make(i: int) -> dict:
    return {"id": i, "text": f"record {i}", "n": i, "ok": i % 3 == 0}


def double(r: dict) -> dict:
    return {**r, "m": r["n"] * 2}


def even(r: dict) -> bool:
    return r["n"] % 2 == 0


MAP = 'r | {"m": r["n"] * 2}'
FILTER = 'r["n"] % 2 == 0'


def verbs(src: str, dst: str) -> None:
    from sage_cli.api import LocalEnvironment

    env = LocalEnvironment("bench-verbs")
    env.from_source(src).map(expr=MAP).filter(expr=FILTER).sink(dst)
    env.submit()


def main(engine: str, n: int, out_path: str) -> None:
    if engine == "sage":
        from sage_cli.api import LocalEnvironment
    else:
        from sage.runtime import LocalEnvironment  # SAGE, in .venv-bench
    records = [make(i) for i in range(n)]
    out: list = []
    t0 = time.perf_counter()
    env = LocalEnvironment("bench")
    env.from_batch(records).map(double).filter(even).sink(out.append)
    if engine == "sage":
        env.submit()
    else:
        env.submit(autostop=True)
    seconds = time.perf_counter() - t0
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in out)
    print(json.dumps({"seconds": seconds, "written": len(out)}))


if __name__ == "__main__":
    if sys.argv[1] == "verbs":
        verbs(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
