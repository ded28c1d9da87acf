"""Stability metrics, final segment, ensembles and aggregation, on hand-made data with hand-computed values."""

import dataclasses

import numpy as np
import pytest

from ckpt_stability.ensemble import combine, ensemble_window, prob, vote
from ckpt_stability.errors import InputError
from ckpt_stability.plan import Plan, final_segment
from ckpt_stability.predictions import Predictions, write_predictions
from ckpt_stability.stability import (example_metrics, gather_scores, improvement_table, series_metrics,
                                      stability_table)

# ---------------------------------------------------------------- series metrics


def test_series_metrics_hand_computed():
    metrics = series_metrics([0.5, 0.7, 0.6, 0.8])
    assert metrics["mean_score"] == pytest.approx(0.65)
    assert metrics["final_score"] == pytest.approx(0.8)
    assert metrics["std"] == pytest.approx(np.sqrt((0.15**2 + 0.05**2 + 0.05**2 + 0.15**2) / 4))
    assert metrics["mtv"] == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    # TV-I: 100 * (mtv / (max - min) - (L_T - L_1) / T)
    assert metrics["tv_i"] == pytest.approx(100 * ((0.5 / 3) / 0.3 - 0.3 / 4))
    assert metrics["noise"] == pytest.approx(metrics["std"] / 0.65)


def test_tv_i_is_zero_for_a_flat_series_and_noise_zero_for_zero_mean():
    flat = series_metrics([0.4, 0.4, 0.4])
    assert flat["tv_i"] == 0.0 and flat["mtv"] == 0.0 and flat["std"] == 0.0
    zero = series_metrics([0.0, 0.0, 0.0])
    assert zero["noise"] == 0.0 and zero["tv_i"] == 0.0


def test_a_steady_climb_has_low_tv_i():
    assert series_metrics([0.1, 0.2, 0.3, 0.4])["tv_i"] == pytest.approx(100 * (0.1 / 0.3 - 0.3 / 4))


# ---------------------------------------------------------------- example-level metrics


def test_instability_with_exact_similarity():
    predictions = [["a", "b", "c", "d"], ["a", "x", "c", "d"], ["a", "x", "y", "z"]]
    scores = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=float)
    metrics = example_metrics(scores, predictions, mode="choice", metric="exact_match")
    # step pairs: 1 of 4 predictions changes, then 2 of 4: mean of (1/4, 2/4)
    assert metrics["instability"] == pytest.approx((0.25 + 0.5) / 2)
    # per example mean |delta s|: 0, (1+0)/2, (0+1)/2, (0+1)/2
    assert metrics["example_mtv"] == pytest.approx((0 + 0.5 + 0.5 + 0.5) / 4)
    assert metrics["ever_flipped"] == pytest.approx(3 / 4)


def test_instability_with_char_f1_similarity_for_generation():
    predictions = [["東京都", "大阪"], ["東京", "大阪"]]
    scores = np.array([[0.8, 1.0], [1.0, 1.0]])
    metrics = example_metrics(scores, predictions, mode="generate", metric="char_f1")
    # char_f1("東京都", "東京") = 1 - 1/5; the second example keeps its prediction
    assert metrics["instability"] == pytest.approx(1 - (0.8 + 1.0) / 2)
    assert metrics["example_mtv"] == pytest.approx((0.2 + 0) / 2)
    assert metrics["ever_flipped"] == pytest.approx(0.5)


def test_generation_scored_by_exact_match_uses_equality():
    metrics = example_metrics(np.array([[1.0], [0.0]]), [["東京都"], ["東京"]], mode="generate",
                              metric="exact_match")
    assert metrics["instability"] == 1.0


# ---------------------------------------------------------------- segment


@pytest.mark.parametrize("count, fraction, largest, expected_length", [
    (30, 0.2, 8, 6),    # 20% of 30
    (31, 0.2, 8, 7),    # rounded up
    (10, 0.2, 2, 3),    # never fewer than 3
    (10, 1.0, 8, 3),    # only where the largest window exists: steps 8, 9, 10
    (10, 0.5, 6, 5),    # 5 steps, all with the window of 6
])
def test_final_segment(count, fraction, largest, expected_length):
    steps = list(range(100, 100 * (count + 1), 100))
    segment = final_segment(steps, fraction, largest)
    assert len(segment) == expected_length and segment == steps[-expected_length:]


def test_final_segment_needs_three_steps_with_the_largest_window():
    with pytest.raises(InputError, match="the final segment needs 3"):
        final_segment([1, 2, 3, 4, 5], 0.2, 4)


# ---------------------------------------------------------------- ensembles


def member(predictions, logprobs=None, mode="choice", metric="exact_match", gold=None, labels=("A", "B", "C")):
    gold = gold or ["A"] * len(predictions)
    return Predictions(
        example_id=np.arange(len(predictions)), prediction=list(predictions), gold=gold,
        score=np.array([float(p == g) for p, g in zip(predictions, gold)]),
        choice_logprobs=None if logprobs is None else np.log(np.asarray(logprobs, dtype=float)),
        provenance={"task": {"name": "t", "sha256": "x", "mode": mode, "metric": metric,
                             "label_list": list(labels) if mode == "choice" else None},
                    "prompt": {"prompts_sha256": "p"}, "backend": {}, "versions": {}, "model_path": "m"},
    )


def test_vote_majority_and_choice_tie_broken_by_mean_probability():
    members = [
        member(["A", "B"], [[0.5, 0.3, 0.2], [0.1, 0.5, 0.4]]),
        member(["A", "C"], [[0.6, 0.2, 0.2], [0.1, 0.2, 0.7]]),
        member(["B", "B"], [[0.3, 0.6, 0.1], [0.2, 0.6, 0.2]]),
        member(["C", "C"], [[0.2, 0.2, 0.6], [0.1, 0.3, 0.6]]),
    ]
    predicted, _ = vote(members, ["m"] * 4)
    # example 0: A has 2 votes (majority). example 1: B and C tie with 2 votes; mean probabilities
    # B = (0.5 + 0.2 + 0.6 + 0.3) / 4 = 0.4 < C = (0.4 + 0.7 + 0.2 + 0.6) / 4 = 0.475 -> C
    assert predicted == ["A", "C"]


def test_vote_tie_on_choice_goes_the_other_way_when_probabilities_say_so():
    members = [member(["B"], [[0.1, 0.8, 0.1]]), member(["C"], [[0.1, 0.3, 0.6]])]
    assert vote(members, ["m"] * 2)[0] == ["B"]  # B: 0.55 > C: 0.35


def test_vote_tie_on_generation_goes_to_the_latest_checkpoint():
    members = [member(["東京", "x"], mode="generate", metric="char_f1"),
               member(["大阪", "y"], mode="generate", metric="char_f1"),
               member(["大阪", "x"], mode="generate", metric="char_f1"),
               member(["東京", "y"], mode="generate", metric="char_f1")]
    # example 0: 東京 2 and 大阪 2 -> the latest (last) checkpoint said 東京; example 1: x 2, y 2 -> y
    assert vote(members, ["m"] * 4)[0] == ["東京", "y"]
    members.append(member(["大阪", "x"], mode="generate", metric="char_f1"))
    assert vote(members, ["m"] * 5)[0] == ["大阪", "x"]


def test_prob_ensemble_averages_probabilities():
    members = [member(["A"], [[0.5, 0.4, 0.1]]), member(["C"], [[0.1, 0.3, 0.6]]), member(["B"], [[0.3, 0.5, 0.2]])]
    predicted, logprobs = prob(members, ["m"] * 3)
    # means A 0.3, B 0.4, C 0.3 -> B, although each member said something else
    assert predicted == ["B"]
    np.testing.assert_allclose(np.exp(logprobs), [[0.3, 0.4, 0.3]])
    generated = [member(["x"], mode="generate")] * 2
    with pytest.raises(InputError, match="needs a choice task"):
        prob(generated, ["a.parquet", "b.parquet"])


def test_combined_predictions_are_rescored():
    members = [member(["A", "B"], [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], gold=["A", "C"]),
               member(["A", "C"], [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]], gold=["A", "C"]),
               member(["B", "C"], [[0.2, 0.6, 0.2], [0.1, 0.2, 0.7]], gold=["A", "C"])]
    result = combine(members, ["m"] * 3, "vote", {"window": 3})
    assert result.prediction == ["A", "C"] and result.score.tolist() == [1.0, 1.0]
    assert result.provenance["method"] == "vote" and result.provenance["window"] == 3


def test_ensemble_window_refuses_misaligned_members(tmp_path):
    for step, (predictions, gold) in {1: (["A", "B"], ["A", "B"]), 2: (["A", "A"], ["A", "C"])}.items():
        write_predictions(tmp_path / f"s{step}" / "t.parquet", member(predictions, [[0.4, 0.3, 0.3]] * 2, gold=gold))
    with pytest.raises(InputError, match=r"s2/t.parquet: examples or gold answers differ from those of .*s1/t.parquet"):
        ensemble_window([tmp_path / "s1", tmp_path / "s2"], ["t"], {"vote": tmp_path / "vote"})
    assert not (tmp_path / "vote").exists()


# ---------------------------------------------------------------- tables on a small hand-made plan


def write_series(plan, run, method, window, task, steps, score_rows, predictions_rows, mode="choice"):
    for step, scores, predictions in zip(steps, score_rows, predictions_rows):
        labels = ["A", "B"]
        write_predictions(plan.path(run, method, window, step, task), Predictions(
            example_id=np.arange(len(scores)), prediction=predictions, gold=["A"] * len(scores),
            score=np.asarray(scores, dtype=float),
            choice_logprobs=np.log(np.full((len(scores), 2), 0.5)) if mode == "choice" else None,
            provenance={"task": {"name": task, "sha256": "x", "mode": mode, "metric": "exact_match",
                                 "label_list": labels if mode == "choice" else None, "category": "X"},
                        "prompt": {"prompts_sha256": "p"}, "backend": {}, "versions": {}}))


@pytest.fixture
def small_plan(tmp_path):
    """One run of 5 steps, windows 1 and 2 with vote; task t1 (category C1) and t2, t3 (category C2)."""
    plan = Plan(runs={"r": [10, 20, 30, 40, 50]}, windows=[1, 2], methods=["vote"],
                tasks={"t1": {"category": "C1", "mode": "choice"}, "t2": {"category": "C2", "mode": "choice"},
                       "t3": {"category": "C2", "mode": "generate"}},
                final_fraction=0.5, predictions=str(tmp_path / "predictions"))
    rng = np.random.default_rng(0)
    for method, window, steps, tasks in plan.series("r"):
        for task in tasks:
            scores = rng.integers(0, 2, size=(len(steps), 4)).astype(float)
            predictions = [["A" if s else "B" for s in row] for row in scores]
            write_series(plan, "r", method, window, task, steps, scores, predictions, plan.tasks[task].mode)
    return plan


def test_tables_agree_with_metrics_computed_by_hand(small_plan):
    scores = gather_scores(small_plan)
    assert len(scores) == 5 * 3 + 4 * 3  # raw: 5 steps, vote2: 4 steps; 3 tasks each
    assert set(scores.columns) == {"run", "task", "category", "method", "window", "step", "metric", "score", "n_examples",
                                  "excluded", "effective_step"}
    # raw sits at its step; a vote of 2 checkpoints 10 steps apart weighs them equally: 5 steps back
    assert (scores["step"] - scores["effective_step"]).tolist() == [0.0 if window == 1 else 5.0
                                                                    for window in scores["window"]]
    table = stability_table(small_plan, scores)
    assert small_plan.segment("r") == [30, 40, 50]  # ceil(0.5 * 5) = 3
    assert len(table) == 2 * (3 + 2 + 1)  # (raw1, vote2) x (3 tasks, 2 categories, overall)

    def row(level, name, method):
        return table[(table.level == level) & (table.name == name) & (table.method == method)].iloc[0]

    segment = scores[scores.step.isin([30, 40, 50])]
    for task in ("t1", "t2", "t3"):
        series = segment[(segment.task == task) & (segment.method == "raw")].sort_values("step").score.to_numpy()
        assert row("task", task, "raw").mtv == pytest.approx(np.abs(np.diff(series)).mean())
        assert row("task", task, "raw").mean_score == pytest.approx(series.mean())
    c2 = [segment[(segment.task == t) & (segment.method == "vote")].sort_values("step").score.to_numpy()
          for t in ("t2", "t3")]
    category_series = (c2[0] + c2[1]) / 2
    assert row("category", "C2", "vote").mtv == pytest.approx(np.abs(np.diff(category_series)).mean())
    assert row("category", "C2", "vote")["std"] == pytest.approx(category_series.std())
    assert row("category", "C2", "vote").instability == pytest.approx(
        (row("task", "t2", "vote").instability + row("task", "t3", "vote").instability) / 2)
    # overall is the mean of the categories (llm-jp-eval's AVG): C1 = {t1}, C2 = {t2, t3}
    overall = row("overall", "overall", "raw")
    assert overall.ever_flipped == pytest.approx(
        np.mean([row("task", "t1", "raw").ever_flipped, row("category", "C2", "raw").ever_flipped]))
    raw = {t: segment[(segment.task == t) & (segment.method == "raw")].sort_values("step").score.to_numpy()
           for t in ("t1", "t2", "t3")}
    overall_series = (raw["t1"] + (raw["t2"] + raw["t3"]) / 2) / 2
    assert overall.mean_score == pytest.approx(overall_series.mean())
    assert overall.mtv == pytest.approx(np.abs(np.diff(overall_series)).mean())
    assert set(table.segment_start) == {30} and set(table.segment_steps) == {3}

    improvement = improvement_table(table, scores)
    assert len(improvement) == 6 and set(improvement.method) == {"vote"}
    t1 = improvement[improvement.name == "t1"].iloc[0]
    assert t1.delta_mean_score == pytest.approx(row("task", "t1", "vote").mean_score - row("task", "t1", "raw").mean_score)
    raw_mtv = row("task", "t1", "raw").mtv
    expected_ratio = row("task", "t1", "vote").mtv / raw_mtv if raw_mtv else np.nan
    assert t1.mtv_ratio == pytest.approx(expected_ratio, nan_ok=True)
    assert (t1.mtv_raw, t1.instability_raw) == (raw_mtv, row("task", "t1", "raw").instability)


def test_prob_rows_cover_choice_tasks_only(small_plan, tmp_path):
    plan = dataclasses.replace(small_plan, methods=["prob"])
    for method, window, steps, tasks in plan.series("r"):
        if method == "prob":
            assert tasks == ["t1", "t2"]
            for task in tasks:
                write_series(plan, "r", "prob", 2, task, steps, [[1, 0, 1, 0]] * len(steps),
                             [["A", "B", "A", "B"]] * len(steps))
    scores = gather_scores(plan)
    table = stability_table(plan, scores)
    prob_rows = table[table.method == "prob"]
    assert set(prob_rows[prob_rows.level == "task"].name) == {"t1", "t2"}
    assert prob_rows[prob_rows.level == "task"].mtv.tolist() == [0.0, 0.0]

    # against raw over the same (choice) tasks, not raw's overall row over all three
    improvement = improvement_table(table, scores).set_index(["level", "name"])
    raw = scores[(scores.method == "raw") & scores.step.isin([30, 40, 50])].sort_values("step")
    raw_choice = (raw[raw.task == "t1"].score.to_numpy() + raw[raw.task == "t2"].score.to_numpy()) / 2
    prob_overall = table[(table.method == "prob") & (table.level == "overall")].iloc[0]
    assert improvement.loc[("overall", "overall"), "delta_mean_score"] == pytest.approx(
        prob_overall.mean_score - raw_choice.mean())
    raw_mtv = np.abs(np.diff(raw_choice)).mean()
    assert raw_mtv > 0 and improvement.loc[("overall", "overall"), "mtv_ratio"] == 0
    assert improvement.loc[("overall", "overall"), "mtv_raw"] == pytest.approx(raw_mtv)
    raw_t1_t2 = table[(table.method == "raw") & table.name.isin(["t1", "t2"])]
    assert improvement.loc[("overall", "overall"), "instability_ratio"] == 0
    assert raw_t1_t2.instability.mean() > 0
    # category C2 holds t2 (choice) and t3 (generate): prob's C2 row is t2 against raw's t2
    c2 = improvement.loc[("category", "C2")]
    t2_raw = table[(table.method == "raw") & (table.name == "t2")].iloc[0]
    prob_c2 = table[(table.method == "prob") & (table.name == "C2")].iloc[0]
    assert c2.delta_mean_score == pytest.approx(prob_c2.mean_score - t2_raw.mean_score)


def test_missing_prediction_file_is_named(small_plan):
    path = small_plan.path("r", "vote", 2, 40, "t2")
    path.unlink()
    with pytest.raises(InputError, match="vote2/step40/t2.parquet: prediction file is missing"):
        gather_scores(small_plan)
