"""The studio in headless Chromium: a live `sage run` fed through a FIFO changes while the page
is open (records in and out per stage, the run's status), one record's content before and after
each stage, and a screenshot kept as the test's artifact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import clean_env
from tests.serve.browser import Browser
from tests.serve.server import Server, http

LIVE = """set -euo pipefail
sage map 'r | {"seen": True}' | sage filter 'r["n"] % 2 == 0'
"""


def _in(stage: str) -> str:
    """JS: the number shown as a stage's records in (-1 while absent)."""
    return (
        f"(() => {{ const e = document.querySelector('.stage[data-stage=\"{stage}\"] dd.in');"
        " return e ? Number(e.textContent.replace(/,/g, '')) : -1; })()"
    )


@pytest.fixture
def studio(tmp_path: Path):
    env = clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    srv = Server(["--runs", "runs"], tmp_path, env, command="studio")
    yield srv, env
    srv.stop()


def test_live_run_changes_while_the_page_is_open(studio, tmp_path: Path):
    srv, env = studio
    (tmp_path / "live.sh").write_text(LIVE)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    run = subprocess.Popen(
        ["bash", "-c", "exec sage run --run-dir runs/live-1 live.sh < in.fifo > out.ndjson"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
    )
    feed = open(fifo, "wb")  # noqa: SIM115 - held open: the run stays live until it closes
    browser = Browser(srv.url + "/studio", tmp_path / "profile")
    try:
        for i in range(1, 6):
            feed.write(orjson.dumps({"id": f"r{i}", "n": i, "text": f"record number {i}"}) + b"\n")
        feed.flush()
        # the page shows the run as running, with its two stages and the first records
        browser.wait_for("document.querySelector('li.run[data-run=\"live-1\"] .status.running')")
        browser.wait_for(f"{_in('1-map')} >= 5")
        browser.wait_for(f"{_in('2-filter')} >= 5")
        first_out = browser.evaluate(
            "document.querySelector('.stage[data-stage=\"2-filter\"] dd.out').textContent"
        )
        assert first_out == "2"  # r2 and r4 passed the filter
        # more records while the page stays open: the same page shows them
        for i in range(6, 11):
            feed.write(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n")
        feed.flush()
        browser.wait_for(f"{_in('1-map')} >= 10")
        browser.wait_for(
            "document.querySelector('.stage[data-stage=\"2-filter\"] dd.out').textContent === '5'"
        )
        assert browser.evaluate("document.querySelectorAll('#timeline rect').length") == 2
        feed.close()
        feed = None
        assert run.wait(60) == 0, run.stderr.read() if run.stderr else ""
        browser.wait_for("document.querySelector('li.run[data-run=\"live-1\"] .status.ok')")
        browser.wait_for("document.querySelector('#run-meta').textContent.includes('exit 0')")
        # one record's path: content before and after each stage
        browser.wait_for("document.querySelector('#samples button[data-id=\"r3\"]')")
        browser.evaluate("document.querySelector('#samples button[data-id=\"r3\"]').click()")
        browser.wait_for("document.querySelectorAll('#path .hop').length === 2")
        hops = browser.evaluate(
            "[...document.querySelectorAll('#path .hop')].map(h => ({stage: h.dataset.stage,"
            " before: [...h.querySelectorAll('pre.before')].map(p => p.textContent),"
            " after: [...h.querySelectorAll('pre.after')].map(p => p.textContent)}))"
        )
        assert [h["stage"] for h in hops] == ["1-map", "2-filter"]
        map_before = orjson.loads(hops[0]["before"][0])
        map_after = orjson.loads(hops[0]["after"][0])
        assert map_before == {"id": "r3", "n": 3, "text": "record number 3"}
        assert map_after == {**map_before, "seen": True}
        assert hops[1]["after"] == ["(nothing came out)"]  # r3 is odd: filtered out
        shot = browser.screenshot(tmp_path / "studio.png")
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        if feed is not None:
            feed.close()
        browser.close()
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_studio_api_refuses_paths_outside_the_runs_dir(studio):
    srv, _ = studio
    status, body = srv.get("/studio/api/runs")
    assert status == 200 and orjson.loads(body)["runs"] == []
    for bad in ("..", "%2e%2e", "..%2f..%2fetc", "nope"):
        status, body = http(srv.url + f"/studio/api/runs/{bad}")
        assert status == 404, (bad, body)
        assert orjson.loads(body)["error"]["code"] == "not_found"
    status, body = srv.get("/studio")
    assert status == 200 and b"sage studio" in body
