from tests.conftest import ndjson, parse_ndjson


def test_eval_scores_and_summary(cli):
    records = [
        {"id": "1", "answer": "The capital is Paris.", "gold": ["Paris"]},
        {
            "id": "2",
            "answer": "Berlin",
            "gold": "Paris",
            "docs": [{"id": "d1"}, {"id": "d2#0"}],
            "gold_ids": ["d2"],
        },
    ]
    result = cli("eval", "-k", "2", input=ndjson(records))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == ["1", "2", "_summary"]
    assert out[0]["eval"]["contains"] == 1.0 and out[0]["eval"]["exact_match"] == 0.0
    assert out[1]["eval"]["mrr"] == 0.5 and out[1]["eval"]["recall@2"] == 1.0
    assert out[2]["eval"]["contains"] == 0.5 and out[2]["count"] == 2
    assert result.stderr == ""  # the table is only for a terminal


def test_eval_no_summary(cli):
    result = cli("eval", "--no-summary", input=ndjson([{"answer": "a", "gold": "a"}]))
    assert result.exit_code == 0
    assert len(parse_ndjson(result.stdout)) == 1


def test_eval_missing_gold_is_a_record_error(cli):
    result = cli("eval", input=ndjson([{"answer": "x"}]))
    assert result.exit_code == 65
    assert "stdin:1" in result.stderr and "'gold'" in result.stderr


def test_eval_emit_keeps_going_and_summary_counts_good_records(cli):
    records = [{"answer": "x"}, {"answer": "a", "gold": "a"}]
    result = cli("eval", "--on-error", "emit", input=ndjson(records))
    assert result.exit_code == 0
    out = parse_ndjson(result.stdout)
    assert "_error" in out[0] and out[1]["eval"]["exact_match"] == 1.0
    assert out[2]["count"] == 1


def test_eval_table_on_a_terminal_stderr():
    import os
    import pty
    import subprocess

    from tests.conftest import clean_env, sage_argv

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            sage_argv("eval"),
            input=ndjson([{"answer": "a", "gold": "a"}]),
            stdout=subprocess.PIPE,
            stderr=follower,
            env=clean_env(),
            timeout=60,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    table = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "exact_match" in table and "1.0000" in table and "(n=1)" in table
    assert parse_ndjson(proc.stdout)[-1]["id"] == "_summary"  # stdout still carries only data


def test_eval_groundedness_of_generated_answers_needs_no_gold(cli):
    docs = [{"id": "pass#0", "text": "The pass statement is a null operation."}]
    records = [
        {
            "id": "1",
            "answer": "pass is a null operation [1].",
            "docs": docs,
            "citations": ["pass#0"],
        },
        {"id": "2", "answer": "It raises a ValueError.", "docs": docs},
    ]
    result = cli("eval", input=ndjson(records))
    assert result.exit_code == 0, result.stderr
    one, two, summary = parse_ndjson(result.stdout)
    assert one["eval"] == {"groundedness": 1.0} and one["citations"] == ["pass#0"]
    assert two["eval"] == {"groundedness": 0.0}  # raises, valueerror: in no doc
    assert summary["eval"] == {"groundedness": 0.5}
