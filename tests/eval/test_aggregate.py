"""T0-Eval aggregation on a hand-built case: median over prompts, mean over tasks."""

from __future__ import annotations

import pytest

from megarch.eval.aggregate import aggregate, format_table


def test_median_over_prompts_then_mean_over_tasks():
    results = aggregate({"rte": [0.5, 0.9, 0.6], "cb": [0.2, 0.4, 0.8, 1.0], "copa": [0.7]},
                        n_examples={"rte": 10, "cb": 5, "copa": 3})
    tasks = results["tasks"]
    assert tasks["rte"]["median"] == pytest.approx(0.6)
    assert tasks["cb"]["median"] == pytest.approx(0.6)  # even count: mean of 0.4 and 0.8
    assert tasks["copa"]["median"] == pytest.approx(0.7)
    assert results["average"] == pytest.approx((0.6 + 0.6 + 0.7) / 3)
    assert results["n_tasks"] == 3
    assert tasks["cb"]["min"] == 0.2 and tasks["cb"]["max"] == 1.0
    assert tasks["cb"]["n_prompts"] == 4 and tasks["cb"]["n_examples"] == 5
    # The mean over prompts would give another answer: the protocol matters.
    assert results["average"] != pytest.approx((2.0 / 3 + 0.6 + 0.7) / 3)


def test_table_lists_tasks_and_average():
    table = format_table(aggregate({"rte": [0.5, 0.9, 0.6], "wic": [0.25]}))
    lines = table.splitlines()
    assert lines[0].split() == ["task", "prompts", "examples", "median", "%", "min", "%", "max",
                                "%"]
    assert lines[2].split() == ["rte", "3", "60.0", "50.0", "90.0"]
    assert lines[3].split() == ["wic", "1", "25.0", "25.0", "25.0"]
    assert lines[-1].split()[-1] == "42.5"


def test_empty_prompt_list_is_refused():
    with pytest.raises(ValueError, match="no prompt accuracies"):
        aggregate({"rte": []})
