"""Write a second question-answering corpus as NDJSON on stdout: the docstrings of public
functions and classes of a fixed list of standard-library modules (every Python installation
carries them), one record per object, `module.name` as its id and title. It is a different
kind of text from the demo's (short API reference entries, not the language reference) and is
used, with `scripts/stdlib_questions.ndjson`, as the held-out set of the retrieval bench."""

import importlib
import inspect
import sys

import orjson

MODULES = (
    "argparse base64 bisect bz2 calendar codecs collections colorsys contextlib copy csv "
    "dataclasses datetime decimal difflib email.utils enum filecmp fnmatch fractions functools "
    "gc gettext glob gzip hashlib heapq hmac html http.client inspect ipaddress itertools json "
    "locale logging lzma math mimetypes operator os.path pathlib platform pprint queue random "
    "re sched secrets select selectors shutil signal smtplib socket sqlite3 statistics string "
    "struct subprocess sys tarfile tempfile textwrap threading time traceback types typing "
    "unicodedata urllib.parse uuid warnings wave weakref xml.etree.ElementTree zipfile zlib"
).split()
#: shorter docstrings are mostly "Same as X" stubs
MIN_CHARS = 40


def entries():
    seen: set[int] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or id(obj) in seen:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module_name, module.__name__):
                if not inspect.isbuiltin(obj):
                    continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < MIN_CHARS:
                continue
            seen.add(id(obj))
            title = f"{module_name}.{name}"
            meta = {"title": title, "module": module_name, "source": "stdlib docstrings"}
            yield {"id": title, "text": doc, "metadata": meta}


try:
    out = b"".join(orjson.dumps(e) + b"\n" for e in entries())
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
except BrokenPipeError:  # `| head` is a normal way to look at it
    sys.exit(0)
