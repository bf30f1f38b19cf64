"""Write the demo corpus as NDJSON on stdout: CPython's own help topics (`pydoc_data.topics`),
which every Python installation carries, one record per topic, the topic name as its id."""

import sys
from pydoc_data.topics import topics

import orjson

lines = []
for name in sorted(topics):
    text = topics[name]
    title = text.split("\n", 1)[0].strip()
    meta = {"title": title, "source": "pydoc_data.topics"}
    lines.append(orjson.dumps({"id": name, "text": text, "metadata": meta}) + b"\n")
try:
    sys.stdout.buffer.write(b"".join(lines))
    sys.stdout.flush()
except BrokenPipeError:  # `| head` is a normal way to look at it
    sys.exit(0)
