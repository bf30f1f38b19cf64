"""Every example in the README's tour runs as written (in a copy of scripts/examples/)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, clean_env, parse_ndjson

TOUR = re.compile(r"<!-- tour.*?-->(.*?)<!-- /tour -->", re.S)
BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def tour_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = TOUR.search(readme)
    assert match, "README.md lost its <!-- tour --> ... <!-- /tour --> markers"
    return BLOCK.findall(match.group(1))


def test_the_tour_has_examples_for_every_area():
    text = "\n".join(tour_blocks())
    for command in (
        "source",
        "map",
        "window",
        "join",
        "chunk",
        "embed",
        "retrieve",
        "generate",
        "eval",
        "models",
        "run",
        "trace",
        "--workers",
    ):
        assert command in text, f"the README tour has no example of {command}"


def tour_commands() -> list[str]:
    """Each command of the tour, continuation lines joined, spaces normalised."""
    commands = []
    for block in tour_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


@dataclass
class Done:
    """What one README command left: its stdout (records when NDJSON), stderr, directory."""

    out: bytes
    err: str
    work: Path

    @property
    def records(self) -> list[dict[str, Any]]:
        return parse_ndjson(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


def _docs(d: Done) -> list[str]:
    return sorted(f"docs/{p.name}" for p in (d.work / "docs").iterdir())


def _events(d: Done) -> list[dict[str, Any]]:
    return parse_ndjson((d.work / "events.ndjson").read_bytes())


def _questions(d: Done) -> list[str]:
    return (d.work / "questions.txt").read_text().splitlines()


def _check_source_head(d: Done) -> None:
    rs = d.records
    assert len(rs) == 2 and all(r["id"] in _docs(d) and r["text"].strip() for r in rs)
    assert all(r["metadata"]["path"] == r["id"] and r["metadata"]["bytes"] > 0 for r in rs)


def _check_raw_lines(d: Done) -> None:
    texts = _questions(d)
    assert d.records == [{"id": f"questions.txt:{i}", "text": t} for i, t in enumerate(texts, 1)]


def _check_csv(d: Done) -> None:
    header, *rows = d.lines
    assert header == "id,chars"
    assert [row.split(",")[0] for row in rows] == _docs(d)
    assert all(int(row.split(",")[1]) > 0 for row in rows)


def _check_md_file(d: Done) -> None:
    assert d.out == b""  # written to the file, not to stdout
    table = (d.work / "docs-table.md").read_text().splitlines()
    assert table[0].startswith("| id | text |") and set(table[1]) <= set("|- :")
    assert len(table) == 2 + len(_docs(d))


def _check_html_title(d: Done) -> None:
    (r,) = d.records
    assert r["title"] == "Growing Tomatoes at Home"
    assert r["text"].startswith("# Growing Tomatoes") and len(r["text"]) == 60


def _check_filter(d: Done) -> None:
    rs = d.records
    assert rs and all(set(r) == {"id", "chars"} and r["chars"] > 150 for r in rs)
    assert len(rs) < len(_docs(d))  # the filter dropped something


def _check_dedupe(d: Done) -> None:
    words = [r["word"] for r in d.records]
    assert len(words) == 5 == len(set(words)) and all(w == w.lower() for w in words)
    assert words == [w.lower() for w in _questions(d)[0].split()][:5]


def _check_emit(d: Done) -> None:
    first, bad, last = d.records
    assert first == {"a": 1} and last == {"a": 2}
    assert bad["_error"]["line"] == 2 and bad["_error"]["raw"] == "not json"


def _check_skip(d: Done) -> None:
    assert d.records == [{"a": 1}, {"a": 2}]
    assert "skipped 1 bad record" in d.err
    (dead,) = parse_ndjson((d.work / "dead.ndjson").read_bytes())
    assert dead["raw"] == "not json" and dead["line"] == 2


def _check_count_windows(d: Done) -> None:
    rs, events = d.records, _events(d)
    assert all(r["id"].startswith("window:") and r["end"] - r["start"] == 2 for r in rs)
    assert sum(r["count"] for r in rs) == len(events)
    assert sum(r["sum_bytes"] for r in rs) == sum(e["bytes"] for e in events)
    assert {r["key"] for r in rs} == {e["user"] for e in events}


def _check_time_windows(d: Done) -> None:
    rs, events = d.records, _events(d)
    assert all(r["end"] - r["start"] == 10 and r["start"] % 10 == 0 for r in rs)
    assert sum(r["count"] for r in rs) == len(events)
    assert max(r["max_bytes"] for r in rs) == max(e["bytes"] for e in events)


def _check_join(d: Done) -> None:
    names = {"ann": "Ann Lee", "bob": "Bob Roy"}
    assert d.records == [{"id": e["id"], "name": names[e["user"]]} for e in _events(d)]


def _check_sample(d: Done) -> None:
    rs = d.records
    assert len(rs) == 2 and len({r["id"] for r in rs}) == 2
    assert all(r in _events(d) for r in rs)


def _check_merge(d: Done) -> None:
    rs = d.records
    assert len(rs) == 3 and all(r["_source"] in ("events.ndjson", "users.ndjson") for r in rs)


def _check_build(d: Done) -> None:
    (r,) = d.records
    assert r["index"] == "idx" and r["dimension"] == 384 and r["model"] == "minilm-l6"
    assert r["count"] >= len(_docs(d))  # one record per chunk, at least one per document


def _check_update(d: Done) -> None:
    (r,) = d.records
    assert r["embedded"] == 0 and r["removed"] == 0 and r["reused"] == r["count"] > 0


def _check_info(d: Done) -> None:
    (r,) = d.records
    assert r["format"] == "sage-index" and r["dimension"] == 384 and r["count"] > 0
    assert set(r["files"]) == {"annoy", "vectors", "records", "bm25", "sentences"}


def _check_rag(d: Done) -> None:
    rs = d.records
    assert [r["question"] for r in rs] == _questions(d)
    assert all(set(r) == {"question", "answer"} and r["answer"].strip() for r in rs)
    assert "Paris" in rs[0]["answer"]  # grounded in docs/paris.txt


def _check_eval(d: Done) -> None:
    (r,) = d.records
    assert r["_summary"] is True and r["count"] == 3
    assert r["eval"] == {"recall@3": 1.0, "mrr": 1.0, "ndcg@3": 1.0}


def _check_rerank(d: Done) -> None:
    (r,) = d.records
    assert r["query"] == "Who completed the Eiffel Tower?"
    assert len(r["docs"]) == 2 == len(set(r["docs"])) and r["docs"][0] == "docs/paris.txt#0"


def _check_models_list(d: Done) -> None:
    rows = {r["name"]: r for r in d.records}
    assert set(rows) == {"smollm2-135m", "minilm-l6"}
    assert all(
        r["ok"] and Path(r["path"]).is_file() and len(r["sha256"]) == 64 for r in rows.values()
    )


def _check_models_path(d: Done) -> None:
    (line,) = d.lines
    assert line.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(line).is_file()


def _check_doctor(d: Done) -> None:
    header, *rows = d.lines
    assert header.split() == ["check", "status", "detail"]
    status = {row[:20].strip(): row[20:].split()[0] for row in rows}
    assert status["python"] == status["model smollm2-135m"] == status["model minilm-l6"] == "ok"


def _check_run_check(d: Done) -> None:
    assert d.out == b"" and "ingest.sh: 1 pipeline(s), 4 stage(s) OK" in d.err
    assert "3-embed: needs text" in d.err


def _check_run(d: Done) -> None:
    (r,) = d.records
    assert r["index"] == "idx" and r["count"] > 0
    assert re.search(r"sage run: 4 stage\(s\), [0-9.]+s, exit 0; trace: ", d.err), d.err


def _check_trace(d: Done) -> None:
    text = d.out.decode()
    assert re.search(r"^run \S+ +ingest.sh docs/ idx/$", text, re.M), text
    assert "exit 0" in text
    stages = [line.split()[0] for line in d.lines if re.match(r"\d\.\d-\w+", line)]
    assert stages == ["1.1-source", "1.2-chunk", "1.3-embed", "1.4-index-build"], text


def _check_workers(d: Done) -> None:
    ids = [r["id"] for r in d.records]
    assert all(set(r) == {"id"} for r in d.records)
    assert len(ids) == len(set(ids)) >= len(_docs(d))
    assert sorted({i.split("#")[0] for i in ids}) == _docs(d)  # every document, in chunks
    assert ids == sorted(ids, key=lambda i: (i.split("#")[0], int(i.split("#")[1])))  # in order


def _check_cited_eval(d: Done) -> None:
    *answers, summary = d.records  # the summary: the mean of each score over the answers
    assert len(answers) == len(_questions(d))
    assert all(set(r) == {"answer", "cites", "eval"} and r["answer"].strip() for r in answers)
    assert all(isinstance(r["cites"], list) for r in answers)  # ids of cited docs, maybe none
    assert all(0.0 <= r["eval"]["groundedness"] <= 1.0 for r in answers)
    assert summary["answer"] is None and summary["cites"] is None
    mean = sum(r["eval"]["groundedness"] for r in answers) / len(answers)
    assert abs(summary["eval"]["groundedness"] - mean) < 1e-9


def _check_quickstart(d: Done) -> None:
    n = len(_questions(d))
    answers, counts = d.lines[:n], d.lines[n:]
    assert "Paris" in answers[0]
    assert all(line.startswith("{'question': ") and "'answer': " in line for line in answers)
    stages = [line.split(":")[0] for line in counts]  # one line per stage, sink last
    assert stages[:4] == ["source", "retrieve", "prompt", "generate"], counts
    assert all(line.endswith(f": {n} in, {n} out") for line in counts[:4]), counts
    assert len(counts) == 5 and counts[4].endswith(f"{n} in, 0 out"), counts


def _check_print_script(d: Done) -> None:
    script = d.out.decode()
    assert script.startswith("#!/usr/bin/env bash") or "set -euo pipefail" in script, script
    for verb in ("sage source", "sage retrieve", "sage prompt", "sage generate", "sage sink"):
        assert verb in script, script
    assert "answers.ndjson" in script


def _check_yaml_run(d: Done) -> None:
    rs = d.records
    assert len(rs) == len(_questions(d)) and all(set(r) == {"answer"} for r in rs)
    assert all(r["answer"].strip() for r in rs) and (d.work / "answers.ndjson").is_file()


def _check_chat(d: Done) -> None:
    text = d.out.decode()
    assert text.strip() and "Traceback" not in d.err
    assert "Eiffel" in text or "1889" in text or "Gustave" in text, text


#: every README tour command (as `tour_commands` spells it) and what its output must show
def _check_per_doc(d: Done) -> None:
    """A loop under `sage run`: one record per document, each sage stage of each turn traced."""
    assert sorted(r["id"] for r in d.records) == sorted(_docs(d))
    assert all(r["words"] > 0 for r in d.records)
    assert f"{2 * len(_docs(d))} stage(s)" in d.err


CHECKS: dict[str, Callable[[Done], None]] = {
    "sage source docs/ | sage head 2": _check_source_head,
    "sage run per_doc.sh": _check_per_doc,
    "sage source questions.txt -R": _check_raw_lines,
    'sage source docs/ | sage map \'{"id": r["id"], "chars": len(r["text"])}\' '
    "| sage sink --format csv": _check_csv,
    "sage source docs/ | sage sink --format md --to docs-table.md": _check_md_file,
    'sage source web/ | sage map \'{"title": r["metadata"]["title"], '
    '"text": r["text"][:60]}\'': _check_html_title,
    'sage source docs/ | sage map \'r | {"chars": len(r["text"])}\' '
    '| sage filter \'r["chars"] > 150\' | sage map \'{"id": r["id"], '
    '"chars": r["chars"]}\'': _check_filter,
    'sage source questions.txt -R | sage flatmap \'[{"word": w.lower()} for w in '
    'r["text"].split()]\' | sage dedupe --key word | sage head 5': _check_dedupe,
    "printf '{\"a\":1}\\nnot json\\n{\"a\":2}\\n' | sage map 'r' --on-error emit": _check_emit,
    "printf '{\"a\":1}\\nnot json\\n{\"a\":2}\\n' | sage map 'r' --on-error skip "
    "--errors dead.ndjson": _check_skip,
    "sage keyby user < events.ndjson | sage window --size 2 --agg count --agg sum:bytes": (
        _check_count_windows
    ),
    "sage window --seconds 10 --time-field ts --key user --agg count --agg max:bytes "
    "< events.ndjson": _check_time_windows,
    'sage join users.ndjson --on user < events.ndjson | sage map \'{"id": r["id"], '
    '"name": r["name"]}\'': _check_join,
    "sage sample --n 2 --seed 1 < events.ndjson": _check_sample,
    "sage merge events.ndjson users.ndjson | sage head 3": _check_merge,
    "sage source docs/ | sage chunk --size 400 | sage embed | sage index build idx/": (
        _check_build
    ),
    "sage source docs/ | sage chunk --size 400 | sage index build idx/ --update": _check_update,
    "sage index info idx/": _check_info,
    "sage source questions.txt -R | sage retrieve --index idx/ -k 2 | sage prompt --template qa "
    '| sage generate --max-tokens 32 | sage map \'{"question": r["query"], '
    '"answer": r["answer"]}\'': _check_rag,
    "sage source gold.ndjson | sage retrieve --index idx/ -k 3 | sage eval -k 3 "
    "| tail -1": _check_eval,
    'echo \'{"query": "Who completed the Eiffel Tower?"}\' | sage retrieve --index idx/ -k 20 '
    '| sage rerank --index idx/ -k 2 | sage map \'{"query": r["query"], '
    '"docs": [d["id"] for d in r["docs"]]}\'': _check_rerank,
    "sage source questions.txt -R | sage retrieve --index idx/ -k 2 | sage prompt --template qa "
    '| sage generate --max-tokens 32 | sage eval | sage map \'{"answer": r.get("answer"), '
    '"cites": r.get("citations"), "eval": r["eval"]}\'': _check_cited_eval,
    "python quickstart.py": _check_quickstart,
    "sage run --print-script rag.yaml": _check_print_script,
    'sage run --quiet rag.yaml && sage map \'{"answer": r["answer"]}\' answers.ndjson': (
        _check_yaml_run
    ),
    "echo 'Who completed the Eiffel Tower?' | sage chat --index idx/ --max-tokens 32": _check_chat,
    "sage models list": _check_models_list,
    "sage models path smollm2-135m": _check_models_path,
    "sage doctor": _check_doctor,
    "sage run --check ingest.sh docs/ idx/": _check_run_check,
    "sage run --retries 2 ingest.sh docs/ idx/": _check_run,
    "sage trace": _check_trace,
    "sage source docs/ | sage chunk --size 200 | sage embed --workers 2 "
    '| sage map \'{"id": r["id"]}\'': _check_workers,
}


def test_every_tour_command_has_an_output_check():
    """A new README example needs its row in CHECKS; a row for a removed one is stale."""
    commands = tour_commands()
    assert len(commands) == len(set(commands))
    assert [c for c in commands if c not in CHECKS] == [], "add these to CHECKS"
    assert [c for c in CHECKS if c not in commands] == [], "no longer in the README"


@pytest.mark.model
@pytest.mark.slow
def test_every_tour_example_runs(tmp_path: Path) -> None:
    """Each command in turn (later ones use what earlier ones built), in a copy of
    scripts/examples/, with its output checked as CHECKS says."""
    work = tmp_path / "examples"
    shutil.copytree(ROOT / "scripts" / "examples", work)
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        SAGE_CACHE_DIR=str(tmp_path / "cache"),
    )
    for command in tour_commands():
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            timeout=600,
        )
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 0, f"README example failed:\n{command}\n--- stderr:\n{stderr}"
        assert "Traceback" not in stderr, command
        try:
            CHECKS[command](Done(result.stdout, stderr, work))
        except (AssertionError, KeyError, ValueError) as exc:
            out = result.stdout.decode(errors="replace")[-3000:]
            raise AssertionError(
                f"README example printed the wrong thing:\n{command}\n--- stdout:\n{out}"
                f"\n--- stderr:\n{stderr[-2000:]}"
            ) from exc


def test_python_examples_run_and_print_what_the_readme_says(capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README lost its Python example"
    for block in blocks:
        code = [line for line in block.splitlines() if not line.startswith("# ")]
        expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
        *body, last = [line for line in code if line.strip()]
        namespace: dict = {}
        exec("\n".join(body), namespace)  # noqa: S102 - our own README
        assert [repr(eval(last, namespace))] == expected  # noqa: S307
