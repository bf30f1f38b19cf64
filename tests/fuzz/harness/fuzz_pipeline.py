"""The pipeline-script tokenizer of `sage run` (sage_cli/run/script.py `logical_lines`): any
text gives logical lines or a ScriptError naming the script and a line that exists, never
another exception. (Pure Python: the bash expansion step is fuzzed by
tests/fuzz/test_fuzz_pipeline.py, differentially against bash.)
"""

from __future__ import annotations

from sage_cli.run.script import ScriptError, logical_lines


def TestOneInput(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    try:
        lines = logical_lines(text, "s.sh")
    except ScriptError as exc:
        message = str(exc)
        assert message.startswith("s.sh:"), message
        number = message[5:].split(":", 1)[0]
        if number.isdigit():
            assert 1 <= int(number) <= max(1, len(text.splitlines())), message
        return
    for line in lines:
        assert line.commands and all(line.commands), line
        assert len(line.separators) >= len(line.commands) - 1


SEEDS: list[bytes] = [
    b"#!/bin/bash\nset -euo pipefail\nsage source docs/ | sage chunk \\\n  | sage embed > out\n",
    b"X=$(echo 'a)b') sage map 'r' < in.ndjson | sage head 2>&1\n",
    b'echo "multi\nline" ; cd . ; export A=1\nsage source - | sage head >> log 2> err\n',
    b"$'a\\' ; b' | `c \\` d` | ${X:-'}'} 2>&1x\n",
    b"a |\n b |\n c\n",
]
MAX_LEN = 2048
