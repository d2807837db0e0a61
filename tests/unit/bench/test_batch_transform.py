"""The Batch Transform benchmark's requests, output checks and figures (no Docker, no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import batch_transform
from bench.batch_transform import BenchError, check_output, request_lines, stage_seconds, summarize_run
from local_test.sagemaker_local import SentRequest


def answer(user_id: str, total: float, n: int = 10) -> dict[str, Any]:
    timings = {"history": total / 4, "retrieval": total / 4, "features": total / 4, "ranking": total / 4,
               "total": total}  # fmt: skip
    return {"user_id": user_id, "recommendations": [{"item_id": str(i)} for i in range(n)], "timings_ms": timings}


def output_of(answers: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(a) + "\n" for a in answers)


def test_request_lines_ask_top_10_cycling_through_the_users() -> None:
    lines = [json.loads(line) for line in request_lines(["a", "b"], 3, as_of=1700000000)]
    assert lines == [{"user_id": u, "top_k": 10, "as_of": 1700000000} for u in ("a", "b", "a")]
    assert json.loads(request_lines(["a"], 1)[0]) == {"user_id": "a", "top_k": 10}
    with pytest.raises(BenchError, match="no users"):
        request_lines([], 1)


def test_check_output_accepts_one_answer_per_line_in_order() -> None:
    requests = request_lines(["a", "b"], 2)
    assert [a["user_id"] for a in check_output(requests, output_of([answer("a", 1.0), answer("b", 1.0)]))] == ["a", "b"]


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        (output_of([answer("a", 1.0)]), "1 output lines for 2 input lines"),
        (output_of([answer("b", 1.0), answer("a", 1.0)]), "line 1: the answer is for user 'b', not 'a'"),
        (output_of([answer("a", 1.0), {"error": "bad_request", "message": "no", "line": 2}]),
         "line 2: bad_request: no"),
        (output_of([answer("a", 1.0), answer("b", 1.0, n=11)]), "line 2: 11 recommendations for top_k 10"),
        (output_of([answer("a", 1.0)]) + "\n" + output_of([answer("b", 1.0)]), "not one answer per line"),
        (output_of([answer("a", 1.0), answer("b", 1.0)]).rstrip("\n"), "not one answer per line"),
    ],
    ids=["count", "order", "error-line", "too-many", "blank-line", "no-final-newline"],
)
def test_check_output_names_the_first_wrong_line(output: str, problem: str) -> None:
    with pytest.raises(BenchError, match=problem):
        check_output(request_lines(["a", "b"], 2), output)


def test_stage_seconds_count_a_recommender_batch_once() -> None:
    # Three answers of one batch (same timings), then two batches of one answer each.
    answers = [answer("a", 100.0), answer("b", 100.0), answer("c", 100.0), answer("d", 40.0), answer("e", 20.0)]
    stages = stage_seconds(answers)
    assert stages["recommender_batches"] == 3
    assert stages["total"] == pytest.approx(0.16) and stages["ranking"] == pytest.approx(0.04)


def test_summarize_run_divides_users_by_the_inference_phase() -> None:
    sent = [SentRequest(3, 300, "application/jsonlines", "application/jsonlines", 200, 10.0, 1.0),
            SentRequest(2, 200, "application/jsonlines", "application/jsonlines", 200, 11.5, 0.5)]  # fmt: skip
    answers = [answer(u, 500.0) for u in "abc"] + [answer(u, 250.0) for u in "de"]
    summary = summarize_run(5, 5.0, 10.0, sent, answers)
    assert summary["inference_s"] == 2.0 and summary["users_per_s"] == 2.5  # 10.0 s to 12.0 s
    assert summary["users_per_s_wall"] == 0.5
    assert (summary["before_first_request_s"], summary["after_last_answer_s"]) == (5.0, 3.0)  # 5 to 15 s
    assert [b["lines"] for b in summary["mini_batches"]] == [3, 2]
    assert summary["requests_s"] == 1.5 and summary["outside_recommender_s"] == 0.75
    assert "users/s: 2 over the inference phase" in batch_transform.report(summary)


def test_main_refuses_a_missing_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_transform.main(["--model-tar", str(tmp_path / "none.tar.gz")]) == 2
    assert capsys.readouterr().err == f"error: --model-tar {tmp_path / 'none.tar.gz'}: no such file\n"


def test_report_names_no_remainder_when_threaded_batches_overlap() -> None:
    # Two 1-second batches on two threads inside a 1-second mini-batch: the stage sum is 2 s.
    sent = [SentRequest(2, 200, "application/jsonlines", "application/jsonlines", 200, 10.0, 1.0)]
    answers = [answer("a", 1000.0), answer("b", 999.0)]
    summary = summarize_run(2, 5.0, 10.0, sent, answers)
    text = batch_transform.report(summary)
    assert summary["outside_recommender_s"] < 0
    assert "side by side on threads" in text and "model server -" not in text
