"""Progress on stderr: only for work that lasts, never for a quick stage in a pipe."""

from sage_cli import progress as progress_mod
from sage_cli.execution.driver import Stats
from sage_cli.progress import Progress


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
