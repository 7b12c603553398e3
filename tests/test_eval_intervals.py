"""`ask eval`'s 95% intervals and paired differences against LC, on rows with known per-question scores."""

from __future__ import annotations

import math

import pytest

from app.eval.intervals import (
    COLUMNS,
    bootstrap_mean,
    format_interval_table,
    interval_summary,
    mcnemar_exact,
    paired_difference,
    resample_indices,
    wilson,
)
from app.eval.reporting import format_table


def _row(method: str, qid: str, right: bool, f1: float | None = None) -> dict:
    return {"method": method, "id": qid, "exact_match": right, "contains": right, "lead": right,
            "f1": float(right) if f1 is None else f1, "answer": "x", "answers": ["x" if right else "y"]}


def _rows(method: str, pattern: str) -> list[dict]:
    """One row per question q0, q1, ...: '1' right, '0' wrong."""
    return [_row(method, f"q{i}", mark == "1") for i, mark in enumerate(pattern)]


def test_wilson_matches_the_textbook_values() -> None:
    # Wilson (1927) / Newcombe (1998), example 81 of 263: 0.2553 to 0.3662.
    interval = wilson(81, 263)
    assert interval.low == pytest.approx(0.2553, abs=1e-4) and interval.high == pytest.approx(0.3662, abs=1e-4)
    none, every = wilson(0, 20), wilson(20, 20)
    assert none.low == 0.0 and 0.0 < none.high < 0.2  # sound at the edges, unlike the normal interval
    assert every.high == 1.0 and 0.8 < every.low < 1.0
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 2**6)  # 0.03125: six wins, no losses
    assert mcnemar_exact(0, 6) == mcnemar_exact(6, 0)
    assert mcnemar_exact(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 2**10)


def test_bootstrap_is_reproducible_and_brackets_the_mean() -> None:
    values = [1.0, 0.0, 0.5, 1.0, 0.25, 0.75, 0.0, 1.0]
    first = bootstrap_mean(values, resample_indices(len(values)))
    second = bootstrap_mean(values, resample_indices(len(values)))
    assert first == second  # fixed seed: the same table from the same rows
    assert first.low < sum(values) / len(values) < first.high
    assert bootstrap_mean([0.4] * 5, resample_indices(5)) == (bootstrap_mean([0.4] * 5, resample_indices(5)))
    constant = bootstrap_mean([0.4] * 5, resample_indices(5))
    assert constant.low == pytest.approx(0.4) and constant.high == pytest.approx(0.4)


def test_identical_methods_differ_by_exactly_zero() -> None:
    rows = _rows("lc", "1101001110") + _rows("rapid", "1101001110")
    paired = paired_difference(rows, "rapid")
    assert paired is not None and paired["n"] == 10
    for column in COLUMNS:
        entry = paired["columns"][column]
        assert entry["mean"] == 0.0
        assert (entry["interval"].low, entry["interval"].high) == (0.0, 0.0)
    assert paired["columns"]["contains"]["mcnemar_p"] == 1.0


def test_a_method_better_on_every_question_has_an_interval_above_zero() -> None:
    rows = _rows("lc", "0000000000") + _rows("better", "1111111111")
    paired = paired_difference(rows, "better")
    assert paired is not None
    for column in COLUMNS:
        assert paired["columns"][column]["interval"].above_zero()
    assert paired["columns"]["contains"]["wins"] == 10 and paired["columns"]["contains"]["losses"] == 0
    assert paired["columns"]["contains"]["mcnemar_p"] == pytest.approx(2 / 2**10)


def test_a_method_better_on_one_question_in_thirty_six_is_not_shown_better() -> None:
    # The situation of issue 33: one question's difference. The paired interval must include 0.
    rows = _rows("lc", "1" * 30 + "0" * 6) + _rows("quality", "1" * 31 + "0" * 5)
    entry = paired_difference(rows, "quality")["columns"]["contains"]
    assert entry["mean"] == pytest.approx(1 / 36)
    assert entry["interval"].low <= 0.0 < entry["interval"].high
    assert entry["mcnemar_p"] == 1.0


def test_pairs_are_matched_by_question_not_by_row_order() -> None:
    lc = _rows("lc", "1010")
    method = list(reversed(_rows("rapid", "1010")))  # same answers, rows in another order
    paired = paired_difference(lc + method, "rapid")
    assert paired["columns"]["contains"]["interval"].low == 0.0 == paired["columns"]["contains"]["interval"].high


def test_questions_the_method_did_not_answer_are_left_out_of_the_pairs() -> None:
    rows = _rows("lc", "0000") + _rows("rapid", "111")  # an interrupted run: q3 has no rapid row
    assert paired_difference(rows, "rapid")["n"] == 3


def test_interval_table_marks_only_intervals_that_exclude_zero() -> None:
    rows = _rows("lc", "0000000000") + _rows("better", "1111111111") + _rows("same", "0000000000")
    records = interval_summary(rows, ["lc", "better", "same"])
    assert [r["method"] for r in records] == ["lc", "better", "same"]
    assert records[0]["vs_lc"] is None
    assert records[2]["vs_lc"]["columns"]["contains"]["interval"] == [0.0, 0.0]
    table = format_interval_table(records)
    better = next(line for line in table.splitlines() if line.startswith("better"))
    same = next(line for line in table.splitlines() if line.startswith("same "))
    assert "+1.00 [+1.00,+1.00]+" in better
    assert "+0.00 [+0.00,+0.00] " in same and "]+" not in same
    assert "Wilson" in table and "bootstrap" in table and "above 0" in table


def test_eval_table_includes_the_intervals_when_it_has_the_rows() -> None:
    rows = [r | {"position": "beginning", "generated": 3, "decode_tokens_per_s": 1.0, "speedup_vs_lc": 1.0,
                 "prefill_s": 0.1, "decode_s": 0.1,
                 "stats": {"drafted": 0, "accepted": 0, "target_passes": 3, "accepted_lengths": [1, 1, 1]}}
            for r in _rows("lc", "1100") + _rows("rag", "1110")]
    from app.eval.scoring import summarize

    results = {
        "machine": {"processor": "Test CPU", "cores": 2, "torch_threads": 2, "device": "cpu", "dtype": "bfloat16"},
        "models": {"target": "t", "drafter": "d"}, "documents": ["doc.pdf"],
        "context": {"long_tokens": 1000, "draft_tokens": 500}, "n_questions": 4,
        "decoding": {"max_new_tokens": 16}, "methods": ["lc", "rag"], "rows": rows,
        "summary": summarize(rows, ["lc", "rag"]),
    }
    table = format_table(results)
    assert "EM 95%" in table and "dcontains vs LC" in table and "McNemar p" in table
    assert "+0.25 [" in table  # rag right on one more question of four
