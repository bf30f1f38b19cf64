"""The model file removed mid-run (issue 6, faults).

"Removed" is what happens to an installed model in real life: `rm` (pip uninstall, a cleanup
job) or `mv` / rename over it (`sage models install`, pip reinstall). A model loads once per
process (llama.cpp maps or reads it at setup); on Linux the loaded model stays valid after the
path goes, so a running stage finishes its input with the model it started with: exit 0,
every record out, the same output as an undisturbed run. Nothing may look at the path again
mid-run (the cache key's sha256 is taken at setup, before the load). A model that is missing
when a stage starts is exit 69 with one line. Writing a model in place (`cp new old`,
truncation) is not covered: it changes mapped pages under the process (SIGBUS, 135), see
docs/models.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv
from tests.faults.conftest import one_line

N = 12


def _records(n: int = N) -> list[dict]:
    return [{"id": f"q{i}", "text": f"hello number {i}", "prompt": f"Say {i}."} for i in range(n)]


def _argv(command: str, model: Path) -> list[str]:
    if command == "generate":
        return ["generate", "--model", str(model), "--max-tokens", "4", "--n-ctx", "256"]
    return ["embed", "--model", str(model), "--batch-size", "1"]


def _strip_timing(records: list[dict]) -> list[dict]:
    for record in records:
        usage = record.get("usage")
        if isinstance(usage, dict):
            usage.pop("seconds", None)
            usage.pop("cached", None)
    return records


def _copy(source: Path, tmp_path: Path) -> Path:
    model = tmp_path / "models" / source.name
    model.parent.mkdir()
    shutil.copy(source, model)
    return model


@pytest.mark.parametrize("how", ["rm", "mv"])
@pytest.mark.parametrize("command", ["embed", "generate"])
def test_model_removed_after_the_first_record_the_run_finishes(
    tmp_path, tiny_bert, tiny_llama, command, how
):
    model = _copy(tiny_llama if command == "generate" else tiny_bert, tmp_path)
    env = clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache"))
    control = run_sage(*_argv(command, model), input=ndjson(_records()), env=env)
    assert control.returncode == 0, control.stderr
    expected = _strip_timing(parse_ndjson(control.stdout))
    assert len(expected) == N
    env = clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache2"))  # nothing served from a cache

    proc = subprocess.Popen(
        sage_argv(*_argv(command, model), "--line-buffered"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    records = ndjson(_records()).splitlines(keepends=True)
    proc.stdin.write(records[0])
    proc.stdin.flush()
    first = proc.stdout.readline()  # the model is loaded and has worked once
    assert first, proc.stderr.read()
    if how == "rm":
        model.unlink()
    else:
        model.rename(model.with_suffix(".old"))
    assert not model.exists()
    proc.stdin.write(b"".join(records[1:]))
    proc.stdin.close()
    rest = proc.stdout.read()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr
    assert _strip_timing(parse_ndjson(first + rest)) == expected  # nothing lost, nothing changed


@pytest.mark.parametrize("command", ["embed", "generate"])
def test_model_removed_after_setup_before_any_record(tmp_path, tiny_bert, tiny_llama, command):
    """A long-running stage (`tail -f | sage generate`) loads its model, then waits: a model
    removed before the first record arrives must not matter (the sha256 used in cache keys was
    taken lazily at the first record before: exit 1 blaming stdin:1)."""
    from sage_cli.operators.embed import Embed
    from sage_cli.operators.generate import Generate

    model = _copy(tiny_llama if command == "generate" else tiny_bert, tmp_path)
    if command == "generate":
        op = Generate(model=str(model), max_tokens=3, n_ctx=256, cache_dir=tmp_path / "c")
    else:
        op = Embed(model=str(model), cache_path=tmp_path / "c.sqlite")
    op.setup()
    model.unlink()
    out = op.process([dict(r) for r in _records(3)])
    assert [r["id"] for r in out] == ["q0", "q1", "q2"]
    assert all(("answer" in r) if command == "generate" else ("embedding" in r) for r in out)


def test_model_hash_of_a_vanished_file_is_exit_69_not_a_crash(tmp_path):
    """Removed between being located and being hashed (the setup race): ResourceUnavailable."""
    from sage_cli.operators.base import ResourceUnavailable
    from sage_cli.operators.models import sha256_file

    with pytest.raises(ResourceUnavailable, match="cannot read model file"):
        sha256_file(tmp_path / "gone.gguf", tmp_path / "hashes.json")


@pytest.mark.parametrize(
    "args",
    [
        ["embed", "--model", "{missing}"],
        ["generate", "--model", "{missing}"],
        ["index", "build", "{tmp}/idx", "--model", "{missing}"],
    ],
    ids=["embed", "generate", "index-build"],
)
def test_model_missing_at_start_is_69(tmp_path, args):
    missing = tmp_path / "models" / "gone.gguf"
    argv = [a.replace("{missing}", str(missing)).replace("{tmp}", str(tmp_path)) for a in args]
    done = run_sage(*argv, input=ndjson(_records(2)))
    assert done.returncode == 69, done.stderr
    line = one_line(done.stderr)
    assert str(missing) in line or "gone.gguf" in line
    assert done.stdout == b""
    assert not (tmp_path / "idx").exists()


def test_index_model_missing_at_start_of_retrieve_is_69(tmp_path, tiny_bert):
    """retrieve embeds queries with the model the index names; gone: 69, never a crash."""
    model = _copy(tiny_bert, tmp_path)
    docs = [{"id": f"d{i}", "text": f"document {i}"} for i in range(5)]
    built = run_sage(
        "index", "build", str(tmp_path / "idx"), "--model", str(model), input=ndjson(docs)
    )
    assert built.returncode == 0, built.stderr
    argv = ["retrieve", "--index", str(tmp_path / "idx"), "--model", str(model)]
    ok = run_sage(*argv, input=b'{"query": "document"}\n')
    assert ok.returncode == 0, ok.stderr
    os.unlink(model)
    gone = run_sage(*argv, input=b'{"query": "document"}\n')
    assert gone.returncode == 69, gone.stderr
    one_line(gone.stderr)


def test_model_truncated_in_place_under_sage_run_retries_loses_nothing(tmp_path, tiny_llama):
    """Writing a model in place (truncation, `cp` over it) pulls mapped pages from under the
    stage: it dies with SIGBUS. `sage run` counts 135 and, with --retries, restarts it on the
    file now there (replaced by a rename here); every record comes out exactly once."""
    model = _copy(tiny_llama, tmp_path)
    spare = tmp_path / "spare.gguf"
    shutil.copy(model, spare)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    script = tmp_path / "pipeline.sh"
    script.write_text(
        f"cat {fifo} | sage generate --model {model} --max-tokens 4 --n-ctx 256 | sage map r\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        sage_argv(
            "run",
            "--quiet",
            "--retries",
            "1",
            "--backoff",
            "0.5",
            "--run-dir",
            str(run_dir),
            str(script),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache")),  # every answer from the model
    )
    records = [{"id": f"q{i}", "prompt": f"Say {i}."} for i in range(30)]
    with open(fifo, "wb", buffering=0) as feed:
        feed.write(ndjson(records[:10]))
        # the model is loaded and in use once output comes: read the fd itself, not a line
        # (generate batches records: several answers may come at once, and lines readline()
        # buffered would be lost to communicate(), which reads the raw fd)
        first = b""
        while not first.endswith(b"\n"):
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.stderr.read()
            first += chunk
        os.truncate(model, 0)
        feed.write(ndjson(records[10:20]))
        # the stage's keeper says its worker died, and restarts it after the backoff
        said = b""
        deadline = time.monotonic() + 30
        while b"worker died" not in said and time.monotonic() < deadline:
            said = (run_dir / "stderr").read_bytes() if (run_dir / "stderr").exists() else b""
            time.sleep(0.01)
        os.replace(spare, model)  # the new model arrives by rename, before the restart
        feed.write(ndjson(records[20:]))
    rest, err = proc.communicate(timeout=120)
    trace = run_dir / "stages" / "1.2-generate.trace.ndjson"
    starts = [e for e in parse_ndjson(trace.read_bytes()) if e.get("ev") == "start"]
    crashed = starts[1]["keeper"]["after"] if len(starts) > 1 else None
    assert crashed == 135, f"the stage did not die of SIGBUS: {crashed} {err!r}"
    assert proc.returncode == 0, err
    ids = [r["id"] for r in parse_ndjson(first + rest)]
    assert sorted(ids) == sorted(r["id"] for r in records)  # each exactly once
