"""The 4-stage pipeline written with SAGE's own Python API (`pip install isage`), run by
bench_pipeline.py in its own venv (.venv-bench): source -> map -> filter -> sink, the same work
as `sage source F | sage map ... | sage filter ... | sage sink --to OUT`.

Usage: .venv-bench/bin/python tests/bench/isage_pipeline.py IN.ndjson OUT.ndjson
Prints the number of records written.
"""

import json
import sys

from sage.runtime import LocalEnvironment


def main(src: str, dst: str) -> None:
    written = 0
    with open(src, encoding="utf-8") as fh, open(dst, "w", encoding="utf-8") as out:

        def sink(record: dict) -> None:
            nonlocal written
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            written += 1

        env = LocalEnvironment("sage-bench")
        (
            env.from_batch(json.loads(line) for line in fh if line.strip())
            .map(lambda r: {**r, "m": r["n"] * 2})
            .filter(lambda r: r["n"] % 2 == 0)
            .sink(sink)
        )
        env.submit(autostop=True)
    print(written)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
