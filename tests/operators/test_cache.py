from sage_cli.operators.cache import ResultCache, content_key


def test_round_trip_and_counters(tmp_path):
    cache = ResultCache(tmp_path / "c" / "x.sqlite")
    key = content_key("model", {"b": 1, "a": 2}, ["text"])
    assert cache.get(key) is None
    cache.put(key, b"\x00\x01")
    cache.put_json("k2", {"answer": "é"})
    assert cache.get(key) == b"\x00\x01" and cache.get_json("k2") == {"answer": "é"}
    assert (cache.hits, cache.misses) == (2, 1)
    cache.close()
    again = ResultCache(tmp_path / "c" / "x.sqlite")  # persisted, readable by a new process
    assert again.get_json("k2") == {"answer": "é"}


def test_key_is_canonical():
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_unusable_path_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = ResultCache(blocker / "sub" / "c.sqlite")
    cache.put("k", b"v")
    assert cache.get("k") is None and cache.broken


def test_corrupt_file_is_skipped(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = ResultCache(path)
    cache.put("k", b"v")
    assert cache.get("k") is None
