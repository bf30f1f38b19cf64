"""The three spellings of one pipeline: Python (sage_cli.api), a bash script (to_script) and a
YAML file (to_yaml, `sage run pipeline.yaml`) give the same records."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sage_cli.api import LocalEnvironment
from sage_cli.errors import UsageError
from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage

RECORDS = [{"id": f"r{i}", "text": "word " * (i % 7), "user": "abc"[i % 3]} for i in range(300)]


def written(env: LocalEnvironment) -> LocalEnvironment:
    """source -> map -> filter -> keyby -> window -> sink, every stage a verb."""
    (
        env.from_source("in.ndjson")
        .map(expr='r | {"n": len(r["text"].split())}')
        .filter(expr='r["n"] > 1')
        .keyby("user")
        .window(size=10, agg=["count", "sum:n"])
        .sink("out.ndjson")
    )
    return env


def workdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    (path / "in.ndjson").write_bytes(ndjson(RECORDS))
    return path


def env_path() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_python_script_and_yaml_give_the_same_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = written(LocalEnvironment("windows"))
    script, yaml_text = env.to_script(), env.to_yaml()
    assert "sage window --size 10 --agg count --agg sum:n" in script
    assert "- window: {size: 10, agg: [count, 'sum:n']}" in yaml_text

    py = workdir(tmp_path, "python")
    monkeypatch.chdir(py)
    counts = env.submit()
    assert counts[-1].stage == "sink" and counts[-1].records_in > 0

    sh = workdir(tmp_path, "bash")
    (sh / "pipeline.sh").write_text(script)
    result = subprocess.run(
        ["bash", "pipeline.sh"], cwd=sh, env=env_path(), capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()

    ya = workdir(tmp_path, "yaml")
    (ya / "pipeline.yaml").write_text(yaml_text)
    result = run_sage("run", "--quiet", "pipeline.yaml", cwd=ya, env=env_path())
    assert result.returncode == 0, result.stderr.decode()
    (run,) = (ya / ".sage" / "runs").iterdir()  # traced like a script: one trace per stage
    summary = orjson.loads((run / "summary.json").read_bytes())
    assert [s["command"] for s in summary["stages"]] == [
        f"sage {verb}" for verb in ("source", "map", "filter", "keyby", "window", "sink")
    ]
    assert summary["stages"][1]["records_in"] == len(RECORDS)

    out = (py / "out.ndjson").read_bytes()
    assert parse_ndjson(out) and {"key", "count", "sum_n"} <= set(parse_ndjson(out)[0])
    assert (sh / "out.ndjson").read_bytes() == out
    assert (ya / "out.ndjson").read_bytes() == out


def test_yaml_round_trips_and_from_yaml_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = written(LocalEnvironment("windows"))
    again = LocalEnvironment.from_yaml(env.to_yaml())
    assert again.name == "windows"
    assert again.to_script() == env.to_script()
    monkeypatch.chdir(workdir(tmp_path, "w"))
    assert [c.records_out for c in again.submit()][:3] == [
        300,
        300,
        sum(i % 7 > 1 for i in range(300)),
    ]


def test_several_pipelines_have_a_script_and_a_yaml_form() -> None:
    env = LocalEnvironment("two")
    env.from_source("docs.ndjson").map("chunk", size=200).sink("chunks.ndjson")
    env.from_source("chunks.ndjson").map("head", n=2).sink()
    script = env.to_script()
    assert script.count("| sage sink") == 2
    assert "sage head 2" in script
    again = LocalEnvironment.from_yaml(env.to_yaml())
    assert again.to_script() == script


def test_a_stage_with_no_command_line_is_named_in_the_error() -> None:
    env = LocalEnvironment()
    env.from_source("in.ndjson").map(lambda r: r).sink("out.ndjson")
    with pytest.raises(UsageError, match=r"stage 2 \(map\(<lambda>\), a Python callable\)"):
        env.to_script()
    env = LocalEnvironment()
    env.from_batch([{"id": 1}]).sink("out.ndjson")
    with pytest.raises(
        UsageError, match=r"stage 1 \(from_batch \(records held in Python\)\) has no YAML"
    ):
        env.to_yaml()


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with `stages:`"),
        ("stages:\n  - map: {expr: r}\n", "a pipeline starts with source or merge"),
        (
            "stages:\n  - source: {}\n  - retrieve: {topk: 3}\n",
            "stage 2: sage retrieve: no option 'topk'",
        ),
        (
            "stages:\n  - source: {}\n  - nosuchverb: {}\n",
            "stage 2: 'nosuchverb' is not a sage verb",
        ),
        ("stages:\n  - source: {}\n  - window: {size: 3, workers: 2}\n", "needs a stateless"),
        ("name: x\nsteps: []\n", "unknown key 'steps'"),
        # found by tests/fuzz/harness/fuzz_yaml.py: PyYAML's RecursionError escaped
        ("stages: " + "[" * 1000 + "\n", "not valid YAML: nested too deeply"),
        ("stages: [2020-00-01]\n", "not valid YAML: month must be in 1..12"),
        ("stages:\n?\n", "unknown key None"),  # keys None and 'stages' were sorted
        (
            "name: \x04\n",
            "not valid YAML: unacceptable character #x0004: special characters "
            'are not allowed in "<unicode string>", position 6',
        ),  # was 2 lines (fuzz_yaml)
    ],
)
def test_sage_run_refuses_a_bad_pipeline_file_in_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "p.yaml").write_text(text)
    result = run_sage("run", "p.yaml", cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert message in stderr and stderr.startswith("sage run: error: p.yaml")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_sage_run_print_script_and_check_on_a_yaml_pipeline(tmp_path: Path) -> None:
    work = workdir(tmp_path, "w")
    (work / "p.yaml").write_text(written(LocalEnvironment("windows")).to_yaml())
    shown = run_sage("run", "--print-script", "p.yaml", cwd=work)
    assert shown.returncode == 0
    assert shown.stdout.decode() == written(LocalEnvironment("windows")).to_script()
    checked = run_sage("run", "--check", "p.yaml", cwd=work)
    assert checked.returncode == 0, checked.stderr.decode()
    assert b"6 stage(s) OK" in checked.stderr
    # --check runs nothing
    assert not (work / "out.ndjson").exists()
    shutil.rmtree(work / ".sage")
    missing = run_sage("run", "--print-script", "nope.yaml", cwd=work)
    assert missing.returncode == 2 and b"nope.yaml: no such pipeline file" in missing.stderr


def test_a_yaml_file_with_several_pipelines_runs_them_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = LocalEnvironment("two")
    env.from_source("in.ndjson").map(expr='r | {"n": len(r["text"])}').sink("mid.ndjson")
    env.from_source("mid.ndjson").filter(expr='r["n"] > 10').sink("out.ndjson")

    py = workdir(tmp_path, "python")
    monkeypatch.chdir(py)
    env.submit()
    ya = workdir(tmp_path, "yaml")
    (ya / "two.yaml").write_text(env.to_yaml())
    result = run_sage("run", "--quiet", "two.yaml", cwd=ya, env=env_path())
    assert result.returncode == 0, result.stderr.decode()
    out = (py / "out.ndjson").read_bytes()
    assert out and (ya / "out.ndjson").read_bytes() == out
