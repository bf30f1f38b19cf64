import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.window import Window, event_time, parse_aggregate


def recs(*values, **extra):
    return [{"v": v, **extra} for v in values]


def test_tumbling_count_window_with_all_aggregates():
    op = Window(size=3, aggs=["count", "sum:v", "mean:v", "min:v", "max:v", "collect:v"])
    out = op.process(recs(4, 1, 7, 2))
    assert out == [
        {
            "id": "window:0",
            "start": 0,
            "end": 3,
            "count": 3,
            "sum_v": 12,
            "mean_v": 4.0,
            "min_v": 1,
            "max_v": 7,
            "collect_v": [4, 1, 7],
        }
    ]
    assert op.close() == [
        {
            "id": "window:3",
            "start": 3,
            "end": 6,
            "count": 1,
            "sum_v": 2,
            "mean_v": 2.0,
            "min_v": 2,
            "max_v": 2,
            "collect_v": [2],
        }
    ]


def test_sliding_count_window_emits_each_full_window_then_partials_at_close():
    op = Window(size=3, slide=1, aggs=["collect:v"])
    out = op.process(recs(1, 2, 3, 4))
    assert [(w["start"], w["collect_v"]) for w in out] == [(0, [1, 2, 3]), (1, [2, 3, 4])]
    assert [(w["start"], w["collect_v"]) for w in op.close()] == [(2, [3, 4]), (3, [4])]


def test_count_windows_do_not_depend_on_batch_size():
    data = [{"k": "ab"[i % 2], "v": i} for i in range(23)]
    whole = Window(size=4, slide=2, key="k", aggs=["sum:v"]).run(list(data))
    op = Window(size=4, slide=2, key="k", aggs=["sum:v"])
    parts = [r for i in range(0, 23, 5) for r in op.process(data[i : i + 5])] + op.close()
    assert sorted(parts, key=str) == sorted(whole, key=str)


def test_count_windows_per_key_and_keyby_key():
    op = Window(size=2, aggs=["collect:v"])
    out = op.run([{"_key": "a", "v": 1}, {"_key": "b", "v": 2}, {"_key": "a", "v": 3}])
    assert out[0] == {"id": "window:a:0", "key": "a", "start": 0, "end": 2, "collect_v": [1, 3]}
    assert out[1]["key"] == "b" and out[1]["collect_v"] == [2]


def test_key_field_wins_over_keyby_and_non_string_keys_in_ids():
    out = Window(size=1, key="k").run([{"k": [1, 2], "_key": "x"}])
    assert out == [{"id": "window:[1,2]:0", "key": [1, 2], "start": 0, "end": 1, "count": 1}]


def test_event_time_tumbling_closes_when_a_later_time_arrives():
    op = Window(seconds=10, time_field="t", aggs=["count"])
    assert op.process([{"t": 1}, {"t": 9.5}]) == []
    assert op.process([{"t": 10}]) == [{"id": "window:0", "start": 0, "end": 10, "count": 2}]
    assert op.close() == [{"id": "window:10", "start": 10, "end": 20, "count": 1}]


def test_event_time_iso_strings_and_sliding():
    op = Window(seconds=60, slide=30, time_field="ts")
    out = op.run([{"ts": "2024-05-01T10:00:10Z"}, {"ts": "2024-05-01T10:00:40+00:00"}])
    starts = [(w["start"] % 3600, w["count"]) for w in out]
    assert starts == [(3600 - 30, 1), (0, 2), (30, 1)]


def test_late_record_is_an_error_unless_lateness_allows_it():
    op = Window(seconds=10, time_field="t")
    op.process([{"t": 25}])
    with pytest.raises(RecordError, match="late record"):
        op.process([{"t": 3}])
    op = Window(seconds=10, time_field="t", lateness=30)
    op.process([{"t": 25}])
    op.process([{"t": 3}])
    assert [(w["start"], w["count"]) for w in op.close()] == [(0, 1), (20, 1)]


def test_arrival_time_windows_close_on_tick():
    now = [100.0]
    op = Window(seconds=5, clock=lambda: now[0])
    assert op.tick_interval is not None and op.tick_interval <= 0.25
    assert op.process([{"a": 1}, {"a": 2}]) == []
    now[0] = 104.9
    assert op.tick(0.0) == []  # the operator's own clock decides, not the driver's `now`
    now[0] = 105.0
    assert op.tick(0.0) == [{"id": "window:100", "start": 100, "end": 105, "count": 2}]
    assert op.close() == []


def test_bad_values_are_record_errors_and_change_no_state():
    op = Window(size=2, aggs=["sum:v"])
    with pytest.raises(RecordError, match="needs a number"):
        op.process([{"v": 1}, {"v": "x"}])
    with pytest.raises(RecordError, match="'v'"):
        op.process([{"w": 1}])
    assert op.process([{"v": 1}, {"v": None}]) == [
        {"id": "window:0", "start": 0, "end": 2, "sum_v": 1}
    ]  # null values are left out


def test_event_time_parsing():
    assert event_time(5, "t") == 5.0
    assert event_time("1700000000.5", "t") == 1700000000.5
    assert event_time("1970-01-01T00:01:00", "t") == 60.0
    for bad in ("yesterday", True, None, [1]):
        with pytest.raises(RecordError):
            event_time(bad, "t")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"size": 2, "seconds": 1},
        {"size": 0},
        {"seconds": -1},
        {"size": 2, "slide": 0.5},
        {"size": 2, "time_field": "t"},
        {"size": 2, "aggs": ["median:v"]},
        {"size": 2, "aggs": ["sum"]},
        {"size": 2, "aggs": ["count:v"]},
    ],
)
def test_option_errors(kwargs):
    with pytest.raises(OptionError):
        Window(**kwargs)


def test_parse_aggregate():
    assert parse_aggregate("count") == ("count", None)
    assert parse_aggregate("mean:metadata.bytes") == ("mean", "metadata.bytes")
