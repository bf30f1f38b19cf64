"""The baseline for `sage map r`: a bare Python loop, orjson loads + dumps over every line,
read and written in 64 KiB blocks. No error handling, no batching, no driver: the floor.

Usage: python tests/bench/bare_loop.py FILE > OUT
"""

import os
import sys

import orjson

BLOCK = 64 * 1024


def main(path: str) -> None:
    loads, dumps, nl_opt = orjson.loads, orjson.dumps, orjson.OPT_APPEND_NEWLINE
    fd = os.open(path, os.O_RDONLY)
    pending = b""
    parts: list[bytes] = []
    size = 0
    while chunk := os.read(fd, BLOCK):
        data = pending + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            pending = data
            continue
        pending = data[cut + 1 :]
        for line in data[:cut].split(b"\n"):
            out = dumps(loads(line), option=nl_opt)
            parts.append(out)
            size += len(out)
            if size >= BLOCK:
                os.write(1, b"".join(parts))
                parts, size = [], 0
    if pending.strip():
        parts.append(dumps(loads(pending), option=nl_opt))
    if parts:
        os.write(1, b"".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])
