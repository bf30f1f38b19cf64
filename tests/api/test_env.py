"""sage_cli.api: LocalEnvironment and DataStream over real operators, in this process."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest

from sage_cli.api import LocalEnvironment, PipelineError
from sage_cli.errors import UsageError
from sage_cli.operators.head import Head
from tests.conftest import ndjson, parse_ndjson


def double(r: dict) -> dict:
    """Module level, so a worker process can import it (workers=2)."""
    return {**r, "m": r["n"] * 2}


def test_callables_map_filter_sink_and_counts() -> None:
    env = LocalEnvironment("demo")
    out: list[dict] = []
    (
        env.from_batch({"id": i, "n": i} for i in range(1000))
        .map(double)
        .filter(lambda r: r["n"] % 2 == 0)
        .sink(out.append)
    )
    counts = env.submit()
    assert out == [{"id": i, "n": i, "m": 2 * i} for i in range(0, 1000, 2)]
    assert [(c.stage, c.records_in, c.records_out) for c in counts] == [
        ("from_batch", 1000, 1000),
        ("map(double)", 1000, 1000),
        ("filter(<lambda>)", 1000, 500),
        ("sink(list.append)", 500, 0),
    ]
    assert env.counts == counts


def test_verbs_take_options_named_after_their_long_flags(tmp_path: Path) -> None:
    table = tmp_path / "users.ndjson"
    table.write_bytes(ndjson([{"user": "a", "name": "Ann"}, {"user": "b", "name": "Bob"}]))
    events = [{"id": i, "user": "ab"[i % 2], "n": i} for i in range(10)]
    env = LocalEnvironment()
    out: list[dict] = []
    (
        env.from_batch(events)
        .map(expr='r | {"n2": r["n"] * 10}')
        .join(table, on="user")
        .keyby("user")
        .window(size=5, agg=["count", "sum:n2"])
        .sink(out.append)
    )
    env.submit()
    by_key = {(w["key"], w["count"]): w["sum_n2"] for w in out}
    assert by_key == {("a", 5): 200, ("b", 5): 250}


def test_keyby_with_a_function_and_join_with_rows_from_python() -> None:
    env = LocalEnvironment()
    out: list[dict] = []
    rows = [{"k": 1, "label": "odd"}, {"k": 0, "label": "even"}]
    (
        env.from_batch({"id": i, "k": i % 2} for i in range(4))
        .join(rows, on="k")
        .keyby(lambda r: r["label"].upper())
        .sink(out.append)
    )
    env.submit()
    assert [(r["id"], r["label"], r["_key"]) for r in out] == [
        (0, "even", "EVEN"),
        (1, "odd", "ODD"),
        (2, "even", "EVEN"),
        (3, "odd", "ODD"),
    ]


def test_an_operator_instance_is_a_stage_and_head_stops_an_unbounded_source() -> None:
    env = LocalEnvironment()
    out: list[dict] = []
    pulled = itertools.count()
    env.from_batch({"id": next(pulled)} for _ in itertools.count()).filter(Head(3)).sink(out.append)
    counts = env.submit()
    assert out == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert next(pulled) <= 1024  # the source stopped after a batch or so, not never
    assert counts[1].stage == "filter(Head)"


def test_from_batch_takes_strings_as_text_records_and_refuses_other_items() -> None:
    env = LocalEnvironment(on_error="emit")
    out: list[dict] = []
    env.from_batch(["hello", {"id": 1}, 5]).sink(out.append)
    counts = env.submit()
    assert out[:2] == [{"text": "hello"}, {"id": 1}]
    assert out[2]["_error"]["line"] == 3 and "int" in out[2]["_error"]["error"]
    assert counts[0].errors == 1


def failing(r: dict) -> dict:
    return {**r, "inv": 1 / r["n"]}


def test_on_error_fail_names_the_stage_and_the_records_position() -> None:
    env = LocalEnvironment()
    env.from_batch({"n": n} for n in [3, 2, 1, 0, 5]).map(failing).sink(lambda r: None)
    with pytest.raises(PipelineError) as caught:
        env.submit()
    err = caught.value
    assert err.stage == "map(failing)" and int(err.code) == 65
    assert str(err).startswith("map(failing): input:4: ")
    assert "ZeroDivisionError" in str(err) and 'on_error="skip"' in str(err)
    # the user's own exception is the cause (its traceback is shown)
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert env.counts[1].records_in >= 4


def test_on_error_skip_and_emit_and_a_dead_letter_file(tmp_path: Path) -> None:
    dead = tmp_path / "dead.ndjson"
    env = LocalEnvironment()
    kept: list[dict] = []
    env.from_batch({"n": n} for n in [3, 0, 1]).map(
        failing, on_error="skip", errors=str(dead)
    ).sink(kept.append)
    counts = env.submit()
    assert [r["n"] for r in kept] == [3, 1]
    assert (counts[1].errors, counts[1].skipped) == (1, 1)
    assert parse_ndjson(dead.read_bytes())[0]["raw"] == {"n": 0}

    env = LocalEnvironment(on_error="emit")
    seen: list[dict] = []
    env.from_batch({"n": n} for n in [3, 0, 1]).map(failing).map(double).sink(seen.append)
    env.submit()
    assert [("_error" in r, r["n"]) for r in seen] == [(False, 3), (True, 0), (False, 1)]
    error = seen[1]["_error"]
    assert error["stage"] == "map(failing)" and error["line"] == 2
    assert "m" not in seen[1]  # an `_error` record passes every later stage untouched


def test_a_callable_sink_that_fails_gets_no_record_twice() -> None:
    got: list[int] = []

    def sink(r: dict) -> None:
        if r["n"] == 5:
            raise ValueError("no fives")
        got.append(r["n"])

    env = LocalEnvironment(on_error="skip")
    env.from_batch({"n": n} for n in range(10)).sink(sink)
    env.submit()
    assert got == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_options_are_checked_when_the_stage_is_written() -> None:
    env = LocalEnvironment()
    stream = env.from_batch([])
    with pytest.raises(UsageError, match=r"no option 'topk' \(options: .*top_k"):
        stream.map("retrieve", index="idx/", topk=5)
    with pytest.raises(UsageError, match="--top-k': 0 is not in the range"):
        stream.map("retrieve", index="idx/", top_k=0)
    with pytest.raises(UsageError, match="not a sage verb"):
        stream.map("retreive", index="idx/")
    with pytest.raises(UsageError, match="must be importable"):
        stream.map(lambda r: r, workers=2)
    with pytest.raises(UsageError, match="needs a stateless operator; sage window keeps state"):
        stream.window(size=3, workers=2)
    with pytest.raises(UsageError, match="on_error='maybe'"):
        stream.map(double, on_error="maybe")
    stream.map(double)
    with pytest.raises(UsageError, match="feeds one next stage"):
        stream.map(double)


def test_a_missing_index_is_a_pipeline_error_with_exit_code_69(tmp_path: Path) -> None:
    env = LocalEnvironment()
    env.from_batch([{"query": "q"}]).map("retrieve", index=str(tmp_path / "nope")).sink(print)
    with pytest.raises(PipelineError) as caught:
        env.submit()
    assert int(caught.value.code) == 69 and caught.value.stage == "retrieve"


def test_workers_run_a_verb_and_a_module_function_in_worker_processes() -> None:
    env = LocalEnvironment()
    out: list[dict] = []
    (
        env.from_batch({"id": i, "n": i} for i in range(3000))
        .map(double, workers=2, batch_size=100)
        .map(expr='r | {"k": r["m"] + 1}', workers=2, batch_size=100)
        .sink(out.append)
    )
    env.submit()
    assert out == [{"id": i, "n": i, "m": 2 * i, "k": 2 * i + 1} for i in range(3000)]


def test_sink_to_a_path_writes_ndjson_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out.ndjson"
    env = LocalEnvironment()
    env.from_batch({"id": i} for i in range(5)).sink(target)
    env.submit()
    assert parse_ndjson(target.read_bytes()) == [{"id": i} for i in range(5)]
    assert orjson.loads(target.read_bytes().splitlines()[0]) == {"id": 0}


def test_several_pipelines_run_in_order(tmp_path: Path) -> None:
    first = tmp_path / "first.ndjson"
    env = LocalEnvironment()
    env.from_batch({"id": i} for i in range(3)).sink(first)
    seen: list[dict] = []
    env.from_source(first).sink(seen.append)
    counts = env.submit()
    assert [r["id"] for r in seen] == [0, 1, 2]
    assert [c.pipeline for c in counts] == [1, 1, 2, 2]


@pytest.mark.slow
def test_engine_ray_runs_stages_on_ray_actors_in_input_order() -> None:
    import ray

    assert not ray.is_initialized()
    env = LocalEnvironment("on-ray", engine="ray")
    out: list[dict] = []
    (
        env.from_batch({"id": i, "n": i} for i in range(2000))
        .map(double, batch_size=100)
        .filter(lambda r: r["n"] % 3 == 0, workers=3, batch_size=50)  # cloudpickle ships it
        .map(expr='r | {"k": r["m"] + 1}', engine="local")
        .sink(out.append)
    )
    counts = env.submit()
    assert out == [{"id": i, "n": i, "m": 2 * i, "k": 2 * i + 1} for i in range(0, 2000, 3)]
    assert [c.records_out for c in counts] == [2000, 2000, 667, 667, 0]
    assert not ray.is_initialized()  # the private Ray started for the run is stopped


def test_a_sink_without_a_file_writes_ndjson_to_a_python_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    shown = io.StringIO()  # what a notebook's sys.stdout is: no file descriptor
    monkeypatch.setattr("sys.stdout", shown)
    env = LocalEnvironment()
    env.from_batch([{"id": 1}, {"id": 2}]).sink()
    env.submit()
    assert parse_ndjson(shown.getvalue()) == [{"id": 1}, {"id": 2}]
