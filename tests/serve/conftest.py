"""Fixtures for the serving tests: an index and one `sage serve --index` shared by a module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.index_fixture import tiny_index
from tests.serve.server import Server, serve_env


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    tiny_index(d / "idx")
    return d


@pytest.fixture(scope="module")
def server(served_dir: Path) -> Iterator[Server]:
    """`sage serve --index idx/` on a free port, for the whole module."""
    srv = Server(["--index", "idx", "--max-tokens", "48"], served_dir, serve_env(served_dir))
    yield srv
    srv.stop()
