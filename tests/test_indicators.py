"""Pretraining indicators: pairwise accuracy and Kendall's tau, perplexity, the learned comparator."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ckpt_stability.errors import InputError
from ckpt_stability.indicators import (ACCURACY_DRAWS, accuracy_interval, comparator_accuracy,
                                       final_stabilised_targets, indicators_table, kendall_tau, pair_masks,
                                       pairwise_accuracy, read_targets, read_weights, score_proxies, weight_proxies,
                                       write_indicators)
from ckpt_stability.plan import Plan
from helpers import with_context_length

HELDOUT = "質問：りんごの色は何色ですか？\n回答：赤\n" * 6


# ---------------------------------------------------------------- pairwise accuracy and tau


def test_pairwise_accuracy_and_tau_by_hand():
    # one discordant pair (the 2nd and 3rd models) out of six
    proxy, target = [1, 2, 3, 4], [1, 3, 2, 4]
    assert pairwise_accuracy(proxy, target) == (pytest.approx(5 / 6), 6)
    assert kendall_tau(proxy, target) == pytest.approx((5 - 1) / 6)
    assert pairwise_accuracy(proxy[::-1], target) == (pytest.approx(1 / 6), 6)


def test_pairs_within_a_run_and_across_runs_are_counted_apart():
    runs = np.array(["a", "a", "b", "b"])
    proxy, target = [2, 1, 3, 4], [1, 2, 3, 4]  # orders run a's two checkpoints wrongly, all else rightly
    masks = pair_masks(runs)
    assert pairwise_accuracy(proxy, target, masks["within_run"]) == (0.5, 2)
    assert pairwise_accuracy(proxy, target, masks["across_runs"]) == (1.0, 4)
    assert pairwise_accuracy(proxy, target) == (pytest.approx(5 / 6), 6)


def test_a_proxy_tie_counts_half_and_target_ties_are_left_out():
    assert pairwise_accuracy([1, 1, 2], [1, 2, 3]) == (pytest.approx(2.5 / 3), 3)
    # the first two models share their target: only the two pairs with the third count, both ordered right
    assert pairwise_accuracy([2, 1, 3], [1, 1, 2]) == (1.0, 2)
    assert math.isnan(pairwise_accuracy([1, 2], [5, 5])[0])
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------- the learned comparator


def test_the_comparator_learns_a_known_function_of_the_proxies():
    rng = np.random.default_rng(1)
    proxies = rng.normal(size=(60, 3))
    # neither proxy alone orders the models well; the target is a fixed combination of both
    target = proxies[:, 0] - proxies[:, 1] + 0.05 * rng.normal(size=60)
    result = comparator_accuracy(proxies, target, repeats=10)
    mean, spread = result.mean, result.spread
    single = max(pairwise_accuracy(proxies[:, k], target)[0] for k in range(3))
    assert mean > 0.9 and spread < 0.05
    assert single < 0.8 < mean


def test_the_comparator_is_at_chance_when_the_target_is_noise():
    rng = np.random.default_rng(2)
    assert 0.4 < comparator_accuracy(rng.normal(size=(60, 3)), rng.normal(size=60), repeats=10).mean < 0.6


# ---------------------------------------------------------------- proxies, stand-in target, the table


def two_runs() -> tuple[Plan, pd.DataFrame]:
    """Scores of two runs; run "good" is better at every step, and its averaged series is steadier."""
    plan = Plan(runs={"good": [10, 20, 30, 40], "weak": [10, 20, 30, 40]}, windows=[1, 2], methods=["avg"],
                tasks={"a": {"category": "C1", "mode": "choice"}, "b": {"category": "C2", "mode": "generate"}})
    rows = []
    for run, base in (("good", 0.6), ("weak", 0.3)):
        for position, step in enumerate(plan.runs[run]):
            wobble = 0.1 if position % 2 else -0.1
            rows += [(run, "a", "raw", 1, step, base + 0.05 * position + wobble),
                     (run, "b", "raw", 1, step, base - wobble)]
            if position:
                rows += [(run, "a", "avg", 2, step, base + 0.05 * position), (run, "b", "avg", 2, step, base)]
    scores = pd.DataFrame(rows, columns=["run", "task", "method", "window", "step", "score"])
    return plan, scores.assign(category=scores.task.map({"a": "C1", "b": "C2"}))


def test_score_proxies_have_every_task_and_the_overall_mean_per_series():
    _, scores = two_runs()
    proxies = score_proxies(scores)
    assert sorted(proxies.columns) == ["a avg2", "a raw1", "b avg2", "b raw1", "overall avg2", "overall raw1"]
    assert proxies.loc[("good", 20), "overall raw1"] == pytest.approx((0.6 + 0.05 + 0.1 + 0.6 - 0.1) / 2)
    assert math.isnan(proxies.loc[("good", 10), "a avg2"])  # no full window of 2 at the first step


def test_the_overall_proxy_is_the_mean_of_the_categories():
    rows = [("r", task, category, "raw", 1, 10, score)
            for task, category, score in (("x", "C1", 0.9), ("y", "C2", 0.2), ("z", "C2", 0.4))]
    proxies = score_proxies(pd.DataFrame(rows, columns=["run", "task", "category", "method", "window", "step", "score"]))
    assert proxies.loc[("r", 10), "overall raw1"] == pytest.approx((0.9 + (0.2 + 0.4) / 2) / 2)


def test_the_stand_in_target_is_each_runs_final_stabilised_score():
    plan, scores = two_runs()
    targets = final_stabilised_targets(plan, score_proxies(scores))
    final_good = (0.6 + 0.15 + 0.6) / 2
    assert targets.to_dict() == {("good", 10): pytest.approx(final_good), ("good", 20): pytest.approx(final_good),
                                 ("good", 30): pytest.approx(final_good),
                                 ("weak", 10): pytest.approx((0.3 + 0.15 + 0.3) / 2),
                                 ("weak", 20): pytest.approx((0.3 + 0.15 + 0.3) / 2),
                                 ("weak", 30): pytest.approx((0.3 + 0.15 + 0.3) / 2)}


def test_indicators_table_orders_proxies_by_pairwise_accuracy():
    plan, scores = two_runs()
    proxies = score_proxies(scores)
    table = indicators_table(proxies, final_stabilised_targets(plan, proxies), repeats=5)
    rows = table.set_index("proxy")
    # 3 checkpoints per run share their run's target: 9 pairs across the runs
    assert rows.loc["overall raw1", "n_models"] == 6 and rows.loc["overall raw1", "n_pairs"] == 9
    assert rows.loc["overall avg2", "pairwise_accuracy"] == 1.0
    assert rows.loc["overall avg2", "kendall_tau"] > 0
    assert (rows.loc["overall avg2", ["kind", "method", "window", "task"]].tolist()
            == ["score", "avg", 2, "overall"])
    assert "learned comparator" in rows.index and rows.loc["learned comparator", "kind"] == "comparator"
    accuracies = table["pairwise_accuracy"].dropna().tolist()
    assert accuracies == sorted(accuracies, reverse=True)


@pytest.mark.parametrize("content, message", [
    ("run,step\ngood,10\n", "missing column(s) target"),
    ("run,step,target\ngood,10,0.5\ngood,10,0.6\n", "run good step 10 has two targets"),
    ("run,step,target\ngood,10,high\n", "the target column must be numeric"),
])
def test_bad_targets_files_are_named(tmp_path, content, message):
    path = tmp_path / "targets.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=rf"{path}: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        read_targets(path)


# ---------------------------------------------------------------- perplexity


def measure(model_dir, text_path, output_dir):
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_stability", "evaluate", "--model", str(model_dir), "--task",
         str(text_path.parent / "task.json"), "--num-fewshot", "0", "--backend", "transformers",
         "--output-dir", str(output_dir), "--perplexity-text", str(text_path),
         "--perplexity-output", str(output_dir / "perplexity.json")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads((output_dir / "perplexity.json").read_text())


@pytest.fixture
def heldout(tmp_path):
    task = {"instruction": "答えてください。", "output_length": 3, "metrics": ["exact_match"], "few_shots": [],
            "samples": [{"input": "りんごの色は？", "output": "赤"}]}
    (tmp_path / "task.json").write_text(json.dumps(task, ensure_ascii=False), encoding="utf-8")
    path = tmp_path / "heldout.txt"
    path.write_text(HELDOUT, encoding="utf-8")
    return path


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_model_dir, heldout, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    measured = measure(tiny_model_dir, heldout, tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(HELDOUT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        mean_nll = model(input_ids=ids, labels=ids).loss.item()  # the mean over every token but the first
    assert measured["tokens"] == ids.shape[1] - 1
    assert measured["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-4)
    assert measured["inverse_perplexity"] == pytest.approx(1 / measured["perplexity"])


def test_a_text_longer_than_the_context_is_scored_in_windows(tiny_model_dir, heldout, tmp_path):
    """Every token but the first is predicted exactly once, whatever the context length."""
    short_context = with_context_length(tiny_model_dir, tmp_path, 256)  # room for the task's prompt
    heldout.write_text(HELDOUT * 10, encoding="utf-8")
    full = measure(tiny_model_dir, heldout, tmp_path / "full")
    windowed = measure(short_context, heldout, tmp_path / "windowed")
    assert windowed["tokens"] == full["tokens"] > 4 * 256
    assert windowed["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)  # less context per token


def test_accuracy_interval_is_the_bootstrap_over_models():
    """Each draw's accuracy equals pairwise_accuracy on the models drawn (a model drawn twice is two models,
    with equal targets: never a pair with itself); the interval is the percentile interval of those."""
    rng = np.random.default_rng(3)
    target = rng.normal(size=25).round(1)  # some equal targets: pairs not counted
    proxy = target + rng.normal(scale=0.8, size=25)
    proxy[:4] = proxy[0]  # some proxy ties: half a pair each
    counts = np.random.default_rng(0).multinomial(25, np.full(25, 1 / 25), size=ACCURACY_DRAWS)
    by_hand = [pairwise_accuracy(np.repeat(proxy, draw), np.repeat(target, draw))[0] for draw in counts]
    low, high = accuracy_interval(proxy, target)
    assert (low, high) == pytest.approx(tuple(np.quantile(by_hand, [0.025, 0.975])), abs=1e-6)
    assert low < pairwise_accuracy(proxy, target)[0] < high


# ---------------------------------------------------------------- weight movement


def hand_made_weights(path) -> pd.DataFrame:
    """weights.csv for two_runs(): each raw checkpoint's distance to the previous one (none for the first
    checkpoint), in total and for attention, and avg2's mean member distance to the average; run good moves less."""
    rows = []
    for run, scale in (("good", 1.0), ("weak", 3.0)):
        for previous, step in ((10, 20), (20, 30), (30, 40)):
            rows += [(run, "raw", 1, step, previous, "total", scale * 0.1 / step),
                     (run, "raw", 1, step, previous, "attention", scale * 0.2 / step),
                     (run, "avg", 2, step, None, "total", scale * 0.05 / step),
                     (run, "avg", 2, step, None, "mlp", scale * 0.07 / step)]
    frame = pd.DataFrame(rows, columns=["run", "method", "window", "step", "previous_step", "group",
                                        "relative_distance"])
    frame.to_csv(path, index=False)
    return frame


def test_weight_proxies_are_minus_the_relative_distances(tmp_path):
    weights = hand_made_weights(tmp_path / "weights.csv")
    proxies = weight_proxies(read_weights(tmp_path / "weights.csv"))
    assert sorted(proxies.columns) == ["-Δθ/θ attention raw1", "-Δθ/θ total avg2", "-Δθ/θ total raw1"]
    for row in weights[weights["group"] != "mlp"].itertuples():  # an average's groups make no proxy: its total does
        column = f"-Δθ/θ {row.group} {row.method}{row.window}"
        assert proxies.loc[(row.run, row.step), column] == -row.relative_distance


def test_weight_movement_is_a_proxy_of_the_indicators_table(tmp_path):
    """Through write_indicators, as the workflow runs it: the weight proxies are rows of kind weights, over the
    models they cover (no distance to a previous checkpoint at the first step)."""
    plan, scores = two_runs()
    (tmp_path / "plan.json").write_text(json.dumps(dataclasses.asdict(plan)))
    scores.to_parquet(tmp_path / "scores.parquet")
    hand_made_weights(tmp_path / "weights.csv")
    write_indicators(tmp_path / "plan.json", tmp_path / "scores.parquet", None, None, tmp_path / "indicators.csv",
                     weights_path=tmp_path / "weights.csv")
    rows = pd.read_csv(tmp_path / "indicators.csv").set_index("proxy")
    total = rows.loc["-Δθ/θ total raw1"]
    assert (total["kind"], total["method"], total["window"]) == ("weights", "raw", 1) and pd.isna(total["task"])
    # the stand-in target orders the runs: good (moving less, so a higher proxy) above weak at every step
    assert (total["n_models"], total["n_pairs"], total["pairwise_accuracy"]) == (4, 4, 1.0)
    assert rows.loc["-Δθ/θ total avg2", "kind"] == "weights"


def test_an_empty_weights_table_adds_no_proxy(tmp_path):
    (tmp_path / "weights.csv").write_text("run,method,window,step,previous_step,group,relative_distance\n")
    _, scores = two_runs()
    proxies = score_proxies(scores)
    assert proxies.join(weight_proxies(read_weights(tmp_path / "weights.csv"))).equals(proxies)


def test_a_table_without_the_weight_columns_is_refused(tmp_path):
    (tmp_path / "weights.csv").write_text("run,step,distance\nr,10,0.1\n")
    with pytest.raises(InputError, match="not a weight movement table .no column"):
        read_weights(tmp_path / "weights.csv")
