"""Progress on stderr: only for work that lasts, never for a quick stage in a pipe."""

from types import SimpleNamespace

from sage_cli.execution.driver import Stats
from sage_cli.observability import progress as progress_mod
from sage_cli.observability.progress import Progress


def stats(n: int) -> Stats:
    return Stats(records_in=n, records_out=n)


def test_quick_work_shows_no_progress_long_work_does(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    bar = Progress("sage embed")
    clock[0] += 0.5
    bar.update(stats(10))
    assert capsys.readouterr().err == ""  # under DELAY_SECONDS: quiet
    clock[0] += progress_mod.DELAY_SECONDS + progress_mod.LINE_SECONDS
    bar.update(stats(500))
    err = capsys.readouterr().err
    assert "sage embed: 500 in, 500 out, 0 errors" in err


def test_model_stage_shows_tokens_per_second_and_eta(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    op = SimpleNamespace(completed=0, generated_tokens=0)
    bar = Progress("sage generate", total=40, op=op)
    clock[0] += 10.0
    op.completed, op.generated_tokens = 10, 480  # answered within a batch not yet written
    bar.update(stats(0))
    err = capsys.readouterr().err
    assert "sage generate: 10 done, 0 errors, 1.0 rec/s, 48.0 tok/s" in err
    assert "25% of 40, ETA 0:30" in err


def test_count_records_only_for_files(tmp_path):
    path = tmp_path / "in.ndjson"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3}')
    assert progress_mod.count_records([str(path), str(path)]) == 6
    assert progress_mod.count_records([str(tmp_path / "missing")]) is None


def test_generate_progress_moves_within_a_batch(tmp_path):
    """--progress on a pipe: lines as the records of one batch are answered (a slow server)."""
    from tests.conftest import clean_env, ndjson, run_sage
    from tests.openai_stub import StubServer

    data = tmp_path / "in.ndjson"
    data.write_bytes(ndjson([{"prompt": f"p{i}"} for i in range(8)]))
    with StubServer(delay=0.8) as stub:
        result = run_sage(
            "generate", "--backend", "openai", "--base-url", f"{stub.url}/slow/v1",
            "--concurrency", "1", "--batch-size", "8", "--progress", str(data),
            env=clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache")),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.decode().splitlines() if " done," in line]
    assert lines, result.stderr  # at least one line while the one batch of 8 was running
    assert "of 8, ETA" in lines[0] and "tok/s" in lines[0]


def test_work_after_the_input_shows_its_own_progress(capsys, monkeypatch):
    """`step` (an index build's sentence vectors, after the last record): a line at its start
    with --progress, then paced like the rest, with an ETA of its own, and one at its end."""
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    bar = Progress("sage index build")
    bar.step("sentence vectors", 0, 1000)
    assert capsys.readouterr().err == "sage index build: sentence vectors 0 of 1,000, 0:00\n"
    clock[0] += 1.0
    bar.step("sentence vectors", 100, 1000)
    assert capsys.readouterr().err == ""  # paced: one line per LINE_SECONDS
    clock[0] += progress_mod.LINE_SECONDS
    bar.step("sentence vectors", 500, 1000)
    assert capsys.readouterr().err == (
        "sage index build: sentence vectors 500 of 1,000, ETA 0:06, 0:06\n"
    )
    clock[0] += 0.5
    bar.step("sentence vectors", 1000, 1000)
    assert capsys.readouterr().err == "sage index build: sentence vectors 1,000 of 1,000, 0:07\n"


def test_a_quick_step_on_a_terminal_stays_quiet(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True)
    bar = Progress("sage index build")
    clock[0] += 0.2
    bar.step("sentence vectors", 0, 10)
    bar.step("sentence vectors", 10, 10)
    bar.close()
    assert capsys.readouterr().err == ""
