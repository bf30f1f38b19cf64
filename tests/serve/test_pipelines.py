"""POST /v1/pipelines/NAME: NDJSON in, the pipeline script's NDJSON out as it comes, each
request a supervised `sage run` whose run directory the studio can show."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import ndjson, parse_ndjson
from tests.serve.server import Server, serve_env

TAG = """set -euo pipefail
sage map 'r | {"tagged": True}' | sage filter 'r.get("drop") is None'
"""
YAML = """name: tag
stages:
  - source: {}
  - map: {expr: 'r | {"from_yaml": True}'}
"""
FAILS = """set -euo pipefail
sage map 'r["missing"]'
"""


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    d = tmp_path_factory.mktemp("pipelines")
    (d / "tag.sh").write_text(TAG)
    (d / "fails.sh").write_text(FAILS)
    (d / "tag.yaml").write_text(YAML)
    srv = Server(["tag.sh", "broken=fails.sh", "yaml=tag.yaml", "--runs", "runs"], d, serve_env(d))
    yield srv, d
    srv.stop()


def test_records_go_through_the_pipeline_with_curl(pipeline_server):
    srv, d = pipeline_server
    records = [{"id": 1}, {"id": 2, "drop": True}, {"id": 3, "text": "é"}]
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            str(d / "headers"),
            "--data-binary",
            "@-",
            "-H",
            "Content-Type: application/x-ndjson",
            srv.url + "/v1/pipelines/tag",
        ],
        input=ndjson(records),
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert parse_ndjson(out.stdout) == [
        {"id": 1, "tagged": True},
        {"id": 3, "text": "é", "tagged": True},
    ]
    headers = (d / "headers").read_text().lower()
    assert "content-type: application/x-ndjson" in headers
    run_id = headers.split("x-sage-run: ")[1].split()[0]
    run = d / "runs" / run_id
    assert (run / "run.json").exists() and (run / "summary.json").exists()


def test_output_streams_before_the_input_ends(pipeline_server):
    """A chunked request: the first record's result comes back while the request is open."""
    srv, _ = pipeline_server
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/pipelines/tag HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

        def chunk(data: bytes) -> None:
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        chunk(b'{"id": "first"}\n')
        got = b""
        while b'"first"' not in got:
            part = sock.recv(65536)
            assert part, f"connection closed before the first result: {got!r}"
            got += part
        assert b"200 OK" in got.split(b"\r\n")[0]
        chunk(b'{"id": "second"}\n')
        sock.sendall(b"0\r\n\r\n")
        while not got.endswith(b"0\r\n\r\n"):
            part = sock.recv(65536)
            if not part:
                break
            got += part
    assert b'"second"' in got and b'"tagged":true' in got


def test_bad_ndjson_is_400_naming_the_line(pipeline_server):
    srv, _ = pipeline_server
    status, body = srv.post("/v1/pipelines/tag", b'{"id": 1}\nnot json\n')
    err = orjson.loads(body)["error"]
    assert status == 400 and err["message"].startswith("line 2: not JSON")
    status, body = srv.post("/v1/pipelines/tag", b"[1]\n")
    assert status == 400 and "line 1: not a JSON object" in orjson.loads(body)["error"]["message"]


def test_a_failing_pipeline_ends_with_an_error_record(pipeline_server):
    srv, _ = pipeline_server
    status, body = srv.post("/v1/pipelines/broken", b'{"id": 1}\n')
    assert status == 200
    last = parse_ndjson(body)[-1]
    assert last["_error"]["exit"] == 65
    assert "missing" in last["_error"]["error"]


def test_unknown_pipeline_is_404_listing_the_known_ones(pipeline_server):
    srv, _ = pipeline_server
    status, body = srv.post("/v1/pipelines/nope", b"{}\n")
    err = orjson.loads(body)["error"]
    assert status == 404 and "broken, tag, yaml" in err["message"]
    status, body = srv.get("/v1/pipelines")
    assert [p["name"] for p in orjson.loads(body)["data"]] == ["broken", "tag", "yaml"]


def test_a_yaml_pipeline_is_served_too(pipeline_server):
    srv, _ = pipeline_server
    status, body = srv.post("/v1/pipelines/yaml", b'{"id": 1}\n{"id": 2}\n')
    assert status == 200
    assert parse_ndjson(body) == [{"id": 1, "from_yaml": True}, {"id": 2, "from_yaml": True}]


def test_line_numbers_carry_across_streamed_chunks():
    from sage_cli.serve.errors import APIError
    from sage_cli.serve.pipelines import check_ndjson

    assert check_ndjson(b'{"a": 1}\n{"a": 2}\n') == 3
    assert check_ndjson(b'{"a": 3}\n', 3) == 4
    with pytest.raises(APIError, match="^line 5: not JSON"):
        check_ndjson(b'{"a": 4}\n\x00\n', 4)
