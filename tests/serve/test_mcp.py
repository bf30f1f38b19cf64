"""`sage mcp` with the official MCP Python SDK's client over stdio, on the real models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.conftest import clean_env, sage_argv
from tests.index_fixture import tiny_index

pytestmark = pytest.mark.model


def session_run(tmp_path: Path, body, *args: str):
    """Start `sage mcp --index idx` through the SDK's stdio client and run `body(session)`."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    tiny_index(tmp_path / "idx")
    argv = sage_argv("mcp", "--index", str(tmp_path / "idx"), "--max-tokens", "32", *args)
    params = StdioServerParameters(
        command=argv[0],
        args=argv[1:],
        env=clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache"), SAGE_THREADS="2"),
        cwd=str(tmp_path),
    )

    async def main():
        with open(tmp_path / "stderr.txt", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    return init, await body(session)

    return anyio.run(main)


def test_tools_are_listed_and_retrieve_finds_documents(tmp_path):
    async def body(session):
        tools = await session.list_tools()
        found = await session.call_tool("retrieve", {"query": "capital of France", "k": 2})
        return tools, found

    init, (tools, found) = session_run(tmp_path, body)
    assert init.server_info.name == "sage"
    assert {t.name for t in tools.tools} == {"retrieve", "answer"}
    schema = next(t for t in tools.tools if t.name == "retrieve").input_schema
    assert schema["required"] == ["query"]
    assert not found.is_error
    docs = found.structured_content["documents"]
    assert [d["rank"] for d in docs] == [1, 2] and docs[0]["id"] == "paris"
    assert json.loads(found.content[0].text)[0]["id"] == "paris"


def test_answer_uses_the_model_and_names_its_sources(tmp_path):
    async def body(session):
        return await session.call_tool("answer", {"question": "What is the capital of France?"})

    _, result = session_run(tmp_path, body)
    assert not result.is_error
    assert "Paris" in result.structured_content["answer"]
    assert result.structured_content["sources"][0]["id"] == "paris"
    assert "sources: paris" in result.content[0].text


def test_bad_arguments_are_tool_errors_and_the_server_goes_on(tmp_path):
    async def body(session):
        empty = await session.call_tool("retrieve", {"query": "  "})
        bad_k = await session.call_tool("retrieve", {"query": "cat", "k": 0})
        good = await session.call_tool("retrieve", {"query": "cat", "k": 1})
        return empty, bad_k, good

    _, (empty, bad_k, good) = session_run(tmp_path, body)
    assert empty.is_error and "non-empty" in empty.content[0].text
    assert bad_k.is_error and "'k'" in bad_k.content[0].text
    assert good.structured_content["documents"][0]["id"] == "cat"


def test_raw_protocol_errors_and_clean_stdout(tmp_path):
    """JSON-RPC by hand: parse errors, unknown methods and tools; stdout has only replies."""
    tiny_index(tmp_path / "idx")
    lines = [
        b"not json",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2024-11-05",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
        ).encode(),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode(),
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "server/discover"}).encode(),
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "rm", "arguments": {}},
            }
        ).encode(),
        json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ping"}).encode(),
    ]
    out = subprocess.run(
        sage_argv("mcp", "--index", "idx"),
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        cwd=tmp_path,
        env=clean_env(SAGE_CACHE_DIR=str(tmp_path / "cache")),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r.get("id") for r in replies] == [None, 1, 2, 3, 4]
    assert replies[0]["error"]["code"] == -32700
    assert replies[1]["result"]["protocolVersion"] == "2024-11-05"
    assert replies[2]["error"]["code"] == -32601
    assert replies[3]["error"]["code"] == -32602
    assert replies[4]["result"] == {}
