"""Scorers and the eval set: hand-made right, wrong, leaked and empty answers."""

import json
import math
from pathlib import Path

import pytest

from slmkit import PROJECT_ROOT
from slmkit.errors import UserError
from slmkit.evaluation.report import comparison_table
from slmkit.evaluation.scoring import (
    RowResult,
    answer_agreement,
    answer_correct,
    common_prefix_ratio,
    parity,
    summarize,
    token_f1,
    well_formed,
    with_timings,
)
from slmkit.sources.eval_set import load_eval_set


def test_answer_correct_normalises_case_and_punctuation():
    assert answer_correct("The capital is PARIS.", ["Paris"])
    assert answer_correct("It has 8 legs", ["8", "eight"])
    assert not answer_correct("Lyon", ["Paris"])
    assert not answer_correct("Parisian food", ["Paris"])  # whole words only
    assert not answer_correct("", ["Paris"])


def test_token_f1_takes_the_best_reference():
    assert token_f1("William Shakespeare", ["Shakespeare", "William Shakespeare"]) == 1.0
    assert token_f1("it was Shakespeare", ["Shakespeare"]) == pytest.approx(0.5)
    assert token_f1("Marlowe", ["Shakespeare"]) == 0.0


def test_well_formed_refuses_empty_leaked_template_and_unknown_finish():
    assert well_formed("Paris", "stop")
    assert not well_formed("   ", "stop")
    assert not well_formed("Paris<|end|>", "stop")
    assert not well_formed("Paris</s>", "length")
    assert not well_formed("Paris", "error")


def test_common_prefix_ratio():
    assert common_prefix_ratio("a b c d", "a b c d") == 1.0
    assert common_prefix_ratio("a b x y", "a b c d") == 0.5
    assert common_prefix_ratio("", "") == 1.0


def _result(answer: str, latency: float, tokens: int) -> RowResult:
    return RowResult("r", answer, "length", True, 1.0, True, latency, 0.1, 5, tokens)


def test_summary_and_parity_of_results():
    a = [_result("x y", 1.1, 11), _result("z", 2.1, 21)]
    b = [_result("x y", 1.1, 11), _result("q", 2.1, 21)]
    metrics = summarize(a)
    assert metrics["answer_correct_rate"] == 1.0
    assert metrics["decode_tokens_per_s_median"] == pytest.approx(10.0)
    assert metrics["latency_p95_s"] == 2.1
    assert parity(a, b) == {"exact_match_rate": 0.5, "common_prefix_ratio_mean": 0.5}


def test_speeds_too_fast_to_time_are_nan_not_zero():
    # The one-token request took longer than the whole answer: timing noise on a ~4 ms model.
    noisy = [RowResult("r", "x y", "stop", True, 1.0, True, 0.0041, 0.0047, 5, 3)]
    metrics = summarize(noisy)
    assert math.isnan(metrics["decode_tokens_per_s_median"])
    assert metrics["prompt_tokens_per_s_median"] == pytest.approx(5 / 0.0047)
    assert "| decode tokens/s | - |" in comparison_table(
        {f"pipeline/{k}": v for k, v in metrics.items()}, ("pipeline",)
    )


def test_batch_engine_answers_count_for_quality_and_only_timed_rows_for_speed():
    from dataclasses import replace

    timed = [replace(_result("x y", 1.1, 11), row_id="a")]
    answered = [replace(_result("x y", math.nan, 11), row_id="a"),
                replace(_result("z", math.nan, 3), row_id="b", correct=False, ttft_s=math.nan)]  # fmt: skip
    merged = with_timings(answered, timed)
    assert merged[0].latency_s == 1.1
    assert math.isnan(merged[1].latency_s)
    metrics = summarize(merged)
    assert metrics["answer_correct_rate"] == 0.5  # both rows
    assert metrics["latency_mean_s"] == 1.1  # the timed row only
    assert metrics["completion_tokens_mean"] == 7.0
    assert answer_agreement(timed, answered) == 1.0


def test_shipped_eval_set_has_at_least_20_answered_questions():
    rows = load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl")
    assert len(rows) >= 20
    assert all(row.answers and row.messages[-1]["role"] == "user" for row in rows)
    assert len(load_eval_set(PROJECT_ROOT / "data" / "eval_set.jsonl", max_rows=3)) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "has no rows"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', "needs valid messages and answers"),
        ('{"messages": [{"role": "user", "content": "q"}], "answers": []}\n', "answers must be a non-empty list"),
        ("not json\n", ":1: each line"),
    ],
)
def test_malformed_eval_sets_are_refused(tmp_path: Path, content: str, message: str):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_eval_set(path)


def test_missing_eval_set_and_negative_max_rows_are_refused(tmp_path: Path):
    with pytest.raises(UserError, match="no such file"):
        load_eval_set(tmp_path / "nope.jsonl")
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "answers": ["a"]}))
    with pytest.raises(UserError, match="max_rows=-1"):
        load_eval_set(path, max_rows=-1)
