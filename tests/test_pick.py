"""The pick table on hand-built prediction files: levels and their weights, the recommended checkpoint's
tie-break, the range, and groups too small to compare."""

import numpy as np
import pandas as pd
import pytest

from ckpt_stability.pick import levels, pick_tables, recommended
from ckpt_stability.plan import Plan
from ckpt_stability.predictions import Predictions, excluded_predictions, write_predictions
from ckpt_stability.stability import gather_scores, overall_score

TASKS = {"a": {"category": "X", "mode": "choice"}, "b": {"category": "Y", "mode": "choice"},
         "c": {"category": "Y", "mode": "generate"}}


def provenance(task: str) -> dict:
    return {"task": {"name": task, "metric": "exact_match" if TASKS[task]["mode"] == "choice" else "char_f1"}}


def predictions(scores: np.ndarray, task: str) -> Predictions:
    return Predictions(example_id=np.arange(len(scores)), prediction=[f"{s:.2f}" for s in scores],
                       gold=["1.00"] * len(scores), score=np.asarray(scores, float), choice_logprobs=None,
                       provenance=provenance(task))


@pytest.fixture
def plan(tmp_path) -> Plan:
    """Run r: raw steps 10..50 whose accuracy rises to step 40 and falls at 50; avg windows of 3 (steps 30, 40
    and 50; those at 40 and 50 excluded)."""
    plan = Plan(runs={"r": [10, 20, 30, 40, 50]}, windows=[1, 3], methods=["avg"], tasks=TASKS,
                final_fraction=0.4, predictions=str(tmp_path / "predictions"))
    rng = np.random.default_rng(0)
    for method, window, steps, tasks in plan.series("r"):
        for position, step in enumerate(steps):
            for task in tasks:
                path = plan.path("r", method, window, step, task)
                if method == "avg" and step >= 40:
                    write_predictions(path, excluded_predictions("not built: a member diverged", provenance(task)))
                    continue
                accuracy = [0.3, 0.5, 0.6, 0.9, 0.4][plan.runs["r"].index(step)]
                scores = rng.random(200) < accuracy if task != "c" else rng.random(200) * accuracy
                write_predictions(path, predictions(scores.astype(float), task))
    return plan


def test_levels_weigh_tasks_as_the_overall_score_does(plan):
    overall = levels(plan, list(TASKS))[-1]
    assert overall.level == "overall" and overall.weights == {"a": 0.5, "b": 0.25, "c": 0.25}
    scores = pd.DataFrame({"a": [0.2], "b": [0.4], "c": [0.8]})
    assert sum(scores[t][0] * w for t, w in overall.weights.items()) == pytest.approx(
        overall_score(scores, {t: spec["category"] for t, spec in TASKS.items()})[0])
    assert [(level.level, level.name) for level in levels(plan, list(TASKS))] == [
        ("task", "a"), ("task", "b"), ("task", "c"), ("category", "X"), ("category", "Y"), ("overall", "overall")]


def test_ties_go_to_the_better_neighbourhood_then_the_later_step():
    steps = [10, 20, 30, 40, 50, 60, 70]
    assert recommended(np.array([0.9, 0.1, 0.1, 0.9, 0.8, 0.1, 0.1]), steps) == 3  # neighbours 0.9 .. 0.1
    assert recommended(np.array([0.9, 0.5, 0.5, 0.1, 0.5, 0.5, 0.9]), steps) == 6  # equal neighbourhoods


def test_the_pick_agrees_with_the_scores_table(plan):
    scores = gather_scores(plan)
    table, checkpoints = pick_tables(plan, scores)
    raw = table[(table.method == "raw") & (table.level == "task") & (table.name == "a")].iloc[0]
    assert raw.recommended_step == 40 and raw.interval == "wilson" and raw.range_size == 5
    assert raw.score == scores[(scores.method == "raw") & (scores.task == "a") & (scores.step == 40)].score.item()
    c = table[(table.method == "raw") & (table.name == "c")].iloc[0]
    assert c.interval == "bootstrap"
    mine = checkpoints[(checkpoints.method == "raw") & (checkpoints.name == "a")]
    tested = mine[~mine.recommended]
    assert tested.mcnemar_p.notna().all() and mine[mine.recommended].mcnemar_p.isna().all()
    assert (tested.mcnemar_p_holm >= tested.mcnemar_p).all()
    assert mine[mine.recommended].difference.item() == 0


def test_a_group_of_one_usable_checkpoint_has_a_reason_not_an_error(plan):
    table, checkpoints = pick_tables(plan, gather_scores(plan))
    windows = table[table.method == "avg"]
    assert len(windows) == 6 and (windows.set_size == 0).all() and (windows.set_steps == "").all()
    assert set(windows.reason) == {"1 usable checkpoint(s) in the range: nothing to compare"}
    assert set(windows.excluded_steps) == {"40 50"}
    assert checkpoints[checkpoints.method == "avg"].empty


def test_the_final_range_is_the_final_segment(plan):
    table, _ = pick_tables(plan, gather_scores(plan), "final")
    raw = table[table.method == "raw"]
    assert set(raw.range_start) == {30} and set(raw.range_size) == {3}
    assert set(raw[raw.level == "overall"].recommended_step) == {40}
