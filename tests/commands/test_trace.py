"""sage trace: the summary table, following a record, the HTML report (opened in headless
Chromium and screenshotted) and OpenTelemetry export."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.conftest import clean_env, ndjson, sage_argv

BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run: source-like map, a flatmap making chunks `ID#n`, and `cat`."""
    work = tmp_path_factory.mktemp("trace")
    docs = [{"id": f"doc{i}", "text": "w " * (i % 5), "n": i} for i in range(500)]
    (work / "in.ndjson").write_bytes(ndjson(docs))
    (work / "p.sh").write_text(
        "sage map 'r | {\"seen\": True}' in.ndjson \\\n"
        '  | sage flatmap \'[r | {"id": r["id"] + "#" + str(k), "parent_id": r["id"]} '
        "for k in range(3)]' \\\n  | cat > out.ndjson\n"
    )
    env = clean_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    result = subprocess.run(
        sage_argv("run", "--run-dir", "run1", "p.sh"),
        cwd=work,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return work


def trace(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sage_argv("trace", "--runs", str(work), *args),
        cwd=work,
        env=clean_env(),
        capture_output=True,
        timeout=60,
    )


def test_summary_table_shows_every_stage(run_dir: Path) -> None:
    result = trace(run_dir, "run1")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    lines = text.splitlines()
    assert lines[0].startswith("run run1") and "exit 0" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("1-", "2-", "3-")}
    assert rows["1-map"][3:6] == ["0", "1", "500"]  # status, tries, records in
    assert rows["2-flatmap"][6] == "1,500"  # records out
    assert rows["3-cat"][2] == "0" and rows["3-cat"][5] == "-"  # opaque: status, no counts


def test_summary_json_matches_counts(run_dir: Path) -> None:
    result = trace(run_dir, "run1", "--json")
    summary = orjson.loads(result.stdout)
    got = [(s["name"], s["records_in"], s["records_out"]) for s in summary["stages"]]
    assert got == [("1-map", 500, 500), ("2-flatmap", 500, 1500), ("3-cat", None, None)]


def test_follow_a_record_and_its_chunks(run_dir: Path) -> None:
    result = trace(run_dir, "run1", "--record", "doc7")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "1-map" in text and "batch of" in text
    assert "output: 3 record(s)" in text
    assert '"id":"doc7#2"' in text and "doc70" not in text


def test_follow_a_record_when_the_output_is_not_all_json(tmp_path: Path) -> None:
    """A script ending in a non-sage stage (`| cut`) leaves lines that are not JSON in the
    run's output: following a record reads past them (it was exit 1, JSONDecodeError)."""
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": f"doc{i}", "n": i} for i in range(20)]))
    (tmp_path / "p.sh").write_text("sage map 'r' in.ndjson | cut -c1-12\n")
    env = clean_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    run = subprocess.run(
        sage_argv("run", "--run-dir", "run2", "p.sh"), cwd=tmp_path, env=env, capture_output=True
    )
    assert run.returncode == 0, run.stderr
    assert b'{"id":"doc1"' in run.stdout  # cut left half-records: not JSON
    result = trace(tmp_path, "run2", "--record", "doc1")
    assert result.returncode == 0, result.stderr
    assert "1-map" in result.stdout.decode() and b"Traceback" not in result.stderr


def test_unknown_run_is_a_usage_error(run_dir: Path) -> None:
    result = trace(run_dir, "nope")
    assert result.returncode == 2
    assert b"nope: no such run" in result.stderr


def test_otlp_export_is_valid_spans(run_dir: Path) -> None:
    out = run_dir / "spans.json"
    result = trace(run_dir, "export", "run1", "--otlp", str(out))
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(out.read_bytes())
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    root = spans[0]
    assert "parentSpanId" not in root and len(root["traceId"]) == 32
    stage_spans = [s for s in spans if s.get("parentSpanId") == root["spanId"]]
    assert [s["name"] for s in stage_spans] == [
        "1-map (sage map)",
        "2-flatmap (sage flatmap)",
        "3-cat (cat)",
    ]
    records = [s for s in spans if s["name"] == "record"]
    assert len(records) == 1000  # one span per record per traced stage
    assert all(int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]) for s in spans)
    assert len({s["spanId"] for s in spans}) == len(spans)


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into an array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        start = y * (stride + 1)
        f, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if f == 1:
            for x in range(channels, stride):
                line[x] = (line[x] + line[x - channels]) & 255
        elif f == 2:
            line = bytearray(
                (
                    (
                        np.frombuffer(line, np.uint8).astype(np.uint16)
                        + np.frombuffer(prev, np.uint8)
                    )
                    & 255
                )
                .astype(np.uint8)
                .tobytes()
            )
        elif f == 3:
            for x in range(stride):
                a = line[x - channels] if x >= channels else 0
                line[x] = (line[x] + ((a + prev[x]) >> 1)) & 255
        elif f == 4:
            for x in range(stride):
                a = line[x - channels] if x >= channels else 0
                b = prev[x]
                c = prev[x - channels] if x >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    out = np.frombuffer(b"".join(rows), np.uint8).astype(np.int32)
    return out.reshape(height, width, channels)[:, :, :3]


def test_html_report_renders_in_headless_chromium(run_dir: Path) -> None:
    report = run_dir / "report.html"
    result = trace(run_dir, "report", "run1", "--html", str(report))
    assert result.returncode == 0, result.stderr
    page = report.read_text()
    assert "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: run `make browser` (apt-get install chromium)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={run_dir / 'chromium-profile'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout.decode()
    for name in ("1-map", "2-flatmap", "3-cat", "Timeline of the stages", "Throughput over time"):
        assert name in text
    shot = run_dir / "shot.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1000,700", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = read_png(shot)
    assert pixels.shape[0] == 700 and pixels.shape[1] == 1000
    # the stage bars of the timeline are drawn in the palette's first three colours
    for rgb in ((0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B), (0x59, 0xA1, 0x4F)):
        close = np.abs(pixels - np.array(rgb)).sum(axis=2) < 40
        assert close.sum() > 2000, f"no bar in colour {rgb}"


def test_follow_a_document_into_retrieval_hits(tmp_path: Path) -> None:
    """`--record DOC` lists the queries whose hits include DOC's chunks (from the output)."""
    from sage_cli.observability.views import follow_record
    from sage_cli.run.directory import RunDirectory

    run = RunDirectory.create(str(tmp_path / "r"))
    run.write_json("run.json", {"script": "ask.sh", "stages": [], "output": str(run.output_path)})
    hit = {"id": "doc7#2", "parent_id": "doc7", "text": "t", "score": 0.5, "rank": 2}
    run.output_path.write_bytes(
        ndjson([{"id": "q1", "query": "?", "docs": [hit]}, {"id": "q2", "query": "?", "docs": []}])
    )
    text = follow_record(run, "doc7")
    assert "hit: doc7#2 for query q1 (rank 2, score 0.5)" in text
    assert "q2" not in text


# -- run housekeeping: list, latest, id prefixes, prune ---------------------------------------


@pytest.fixture
def three_runs(tmp_path: Path) -> tuple[Path, list[str]]:
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": "a"}]))
    (tmp_path / "p.sh").write_text("sage map r in.ndjson\n")
    env = clean_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    for _ in range(3):
        done = subprocess.run(
            sage_argv("run", "--quiet", "p.sh"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    runs = tmp_path / ".sage" / "runs"
    ids = [r["id"] for r in map(orjson.loads, local_trace(tmp_path, "list").stdout.splitlines())]
    assert sorted(ids) == sorted(p.name for p in runs.iterdir())
    return tmp_path, ids


def local_trace(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sage_argv("trace", *args), cwd=work, env=clean_env(), capture_output=True, timeout=60
    )


def test_list_shows_every_run_oldest_first_with_its_status(three_runs) -> None:
    work, ids = three_runs
    rows = [orjson.loads(x) for x in local_trace(work, "list").stdout.splitlines()]
    assert [r["id"] for r in rows] == ids and len(ids) == 3
    assert all(r["status"] == 0 and r["state"] == "finished" for r in rows)
    assert [r["started"] for r in rows] == sorted(r["started"] for r in rows)


def test_latest_and_unique_prefixes_name_a_run(three_runs) -> None:
    work, ids = three_runs
    latest = local_trace(work, "latest", "--json")
    assert orjson.loads(latest.stdout)["run_id"] == ids[-1]
    unique = ids[0][
        : next(n for n in range(1, 30) if sum(i.startswith(ids[0][:n]) for i in ids) == 1)
    ]
    by_prefix = local_trace(work, unique, "--json")
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert orjson.loads(by_prefix.stdout)["run_id"] == ids[0]
    ambiguous = local_trace(work, ids[0][:4])
    assert ambiguous.returncode == 2 and b"ambiguous run id prefix" in ambiguous.stderr


def test_an_unknown_record_is_an_error(three_runs) -> None:
    work, ids = three_runs
    found = local_trace(work, "--record", "a")
    assert found.returncode == 0 and b"output: 1 record(s)" in found.stdout
    missing = local_trace(work, "--record", "no-such-id")
    assert missing.returncode == 2
    assert b"'no-such-id' is in no stage of run " + ids[-1].encode() in missing.stderr


def test_prune_keeps_the_newest_and_sage_run_caps_old_runs(three_runs) -> None:
    work, ids = three_runs
    assert local_trace(work, "prune").returncode == 2  # --keep is required
    pruned = local_trace(work, "prune", "--keep", "2")
    assert pruned.returncode == 0 and b"removed 1 run(s)" in pruned.stderr
    left = sorted(p.name for p in (work / ".sage" / "runs").iterdir())
    assert left == sorted(ids[1:])
    env = clean_env(SAGE_RUN_KEEP="1")
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    again = subprocess.run(
        sage_argv("run", "--quiet", "p.sh"), cwd=work, env=env, capture_output=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    left = sorted(p.name for p in (work / ".sage" / "runs").iterdir())
    assert len(left) == 2 and ids[-1] in left and ids[1] not in left  # 1 earlier + the new one


CHAIN = (
    "sage map r in.ndjson | sage filter 'r[\"n\"] % 2 == 0' "
    "| sage map \"{'id': 'x-' + r['id'], 'n': r['n']}\" | sage map r | jq -c . "
    "| sage map r > out.ndjson"
)


@pytest.mark.parametrize(
    ("script", "flags"),
    [(CHAIN, []), (f"for k in 1; do\n  {CHAIN}\ndone\n", []), (CHAIN, ["--retries", "1"])],
)
def test_ids_are_written_where_they_change_and_followed_through_every_stage(
    tmp_path: Path, script: str, flags: list[str]
) -> None:
    """A stage fed straight by a sage stage names no input ids (its input line N is that
    stage's output N); a batch that drops records or changes ids names its outputs; a stage
    after `jq` names its inputs. `sage trace --record` and the OTLP export see every stage."""
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": f"r{i}", "n": i} for i in range(3000)]))
    (tmp_path / "p.sh").write_text(script)
    env = clean_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    run = subprocess.run(
        sage_argv("run", *flags, "--run-dir", "run", "p.sh"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    assert run.returncode == 0, run.stderr
    stages = sorted((tmp_path / "run" / "stages").glob("*.trace.ndjson"))
    assert len(stages) == 5
    batches = [
        [e for e in map(orjson.loads, p.read_bytes().splitlines()) if e["ev"] == "b"]
        for p in stages
    ]
    named = [all("ids" in e for e in bs) for bs in batches]
    assert named[0] and named[4]  # the first stage, and the one after jq
    if "for" in script or flags:  # under bash a stage whose feeder was starting names its inputs
        assert not all(named[1:4])
    else:
        assert named == [True, False, False, False, True]
        assert all("oids" in e for e in batches[1] + batches[2])  # drops some; changes ids
        assert not any("oids" in e for e in batches[3])
    follow = trace(tmp_path, "run", "--record", "r10").stdout.decode().splitlines()
    seen = [line.split()[0] for line in follow if re.search(r"batch of \d+ +r10$", line)]
    assert [s.split("-")[1] for s in seen] == ["map", "filter", "map"]
    follow = trace(tmp_path, "run", "--record", "x-r10").stdout.decode().splitlines()
    seen = [line.split()[0] for line in follow if re.search(r"batch of \d+ +x-r10$", line)]
    assert [s.split("-")[1] for s in seen] == ["map", "map"]
    spans = tmp_path / "spans.json"
    assert trace(tmp_path, "export", "run", "--otlp", str(spans)).returncode == 0
    ids = [
        a["value"]["stringValue"]
        for s in orjson.loads(spans.read_bytes())["resourceSpans"][0]["scopeSpans"][0]["spans"]
        for a in s["attributes"]
        if a["key"] == "sage.record_id"
    ]
    assert ids.count("r10") == 3 and ids.count("x-r10") == 2 and ids.count("r11") == 2
    assert len(ids) == 3000 + 3000 + 1500 + 1500 + 1500
