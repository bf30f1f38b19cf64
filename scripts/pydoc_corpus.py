"""Write the demo corpus as NDJSON on stdout: CPython's own help topics (`pydoc_data.topics`),
which every Python installation carries, one record per topic, the topic name as its id."""

import sys

import orjson
from pydoc_data.topics import topics

out = sys.stdout.buffer
for name in sorted(topics):
    text = topics[name]
    title = text.split("\n", 1)[0].strip()
    out.write(orjson.dumps({"id": name, "text": text,
                            "metadata": {"title": title, "source": "pydoc_data.topics"}}) + b"\n")
