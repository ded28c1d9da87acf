"""Pretraining indicators: which checkpoint signals predict the outcome a team cares about.

Following Zeng et al., "Can Pre-training Indicators Reliably Predict Fine-tuning Outcomes of LLMs?"
(arXiv:2504.12491): every checkpoint (run, step) is a model; a **proxy** gives each model a number;
the **target** is the outcome (e.g. the score after fine-tuning, or a later-stage evaluation), read
from a CSV file ``run,step,target``. Proxies:

* ``1/PPL`` of the checkpoint (``raw1``) and of each averaged model (``avg{n}``, ``wsm{n}``...), on a held-out
  text;
* each task's few-shot score and the mean over tasks (``overall``), raw and smoothed by every window
  and method (``avg``, ``vote``, ``prob``...): the stabilised scores are proxies in their own right;
* ``-Δθ/θ {group}``, the weight movement (``weights.csv``, where averages measured it), negated so that, as for
  every proxy, higher is better (settled weights): for ``raw1`` the checkpoint's relative distance to the previous
  checkpoint, for an averaging method's window the mean relative distance of its members to their average; over
  the whole model (``total``), and for ``raw1`` per parameter group too.

For every proxy: the **pairwise accuracy** over all pairs of models whose targets differ (the share of
pairs the proxy orders as the target does; a tie of the proxy counts half; chance is 0.5), with a 95 %
percentile bootstrap interval over the models (B = 1,000, seed 0), also over the
pairs within a run (which checkpoint to pick) and across runs (which run) apart, and **Kendall's tau**
(tau-b). Then a **learned comparator** (logistic regression on the pair features of
the paper: p_i - p_j, p_i * p_j, p_i and p_j over all proxies) is evaluated by repeated random splits
of the models into halves: trained on the pairs within one half, scored on the pairs within the other;
its mean and spread over the splits are reported.

The target is a CSV of the user's or, when the workflow fine-tunes, the fine-tuning stage's ``targets.csv``
(``targets``: each raw checkpoint's score after fine-tuning). Without either, the final checkpoint's
stabilised score stands in as the target for the earlier checkpoints of its run: the overall score at
the run's last step with the largest window (of ``avg``, else ``vote``, else raw). Every checkpoint of a
run then shares one target, so the stand-in orders runs, not the checkpoints within a run: it answers
"which early signal picks the run that ends best", and needs two runs or more.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ckpt_stability import layout
from ckpt_stability.errors import InputError
from ckpt_stability.methods import EVALUATE, RAW
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.stability import overall_score
from ckpt_stability.weight_movement import COLUMNS as WEIGHT_COLUMNS, TOTAL

PERPLEXITY_PROXY = "1/PPL"
WEIGHTS_PROXY = "-Δθ/θ"
"""The prefixes of the perplexity and weight movement proxies' names (``{prefix} {method}{n}``,
``{prefix} {group} {method}{n}``); a score proxy's name starts with its task."""
COLUMNS = ["proxy", "kind", "method", "window", "task", "n_models", "n_pairs", "pairwise_accuracy",
           "accuracy_ci_low", "accuracy_ci_high", "accuracy_within_run", "n_pairs_within_run",
           "accuracy_across_runs", "n_pairs_across_runs",
           "kendall_tau", "spread", "target"]


# ---------------------------------------------------------------- proxies and targets


def score_proxies(scores: pd.DataFrame) -> pd.DataFrame:
    """Models x proxies from the scores table: every task's score and the overall score (the mean of the
    categories' means, llm-jp-eval's AVG), per series. Excluded models (no score) have no proxy values."""
    frame = scores[scores["score"].notna()]
    category_of = dict(zip(frame["task"], frame["category"]))
    overall = []
    for (method, window), rows in frame.groupby(["method", "window"], sort=False):  # each on the tasks it covers
        wide = rows.pivot(index=["run", "step"], columns="task", values="score")
        overall.append(overall_score(wide, category_of).rename("score").reset_index().assign(
            method=method, window=window, task="overall"))
    columns = ["run", "method", "window", "step", "task", "score"]
    frame = pd.concat([frame[columns], *(part[columns] for part in overall)], ignore_index=True)
    frame["proxy"] = frame["task"] + " " + frame["method"] + frame["window"].astype(str)
    return frame.pivot_table(index=["run", "step"], columns="proxy", values="score")


def perplexity_proxies(plan: Plan, directory: Path) -> pd.DataFrame:
    """Models x ``1/PPL {method}{n}`` from the perplexity files written by ``perplexity``."""
    rows = []
    for run in plan.runs:
        # the evaluated models: the raw checkpoints and the averaged models
        series = [(method, window, model_steps) for method, window, model_steps, _ in plan.series(run)
                  if plan.registry[method].produced_by == EVALUATE]
        for method, window, series_steps in series:
            for step in series_steps:
                path = Path(layout.perplexity(str(directory), run=run, method=method, n=window, step=step))
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    if EXCLUDED_KEY not in record:
                        rows.append((run, step, f"{PERPLEXITY_PROXY} {method}{window}", record["inverse_perplexity"]))
                except (OSError, ValueError, KeyError) as error:
                    raise InputError(f"{path}: not a perplexity file of this workflow ({error})") from None
    frame = pd.DataFrame(rows, columns=["run", "step", "proxy", "value"])
    return frame.pivot_table(index=["run", "step"], columns="proxy", values="value")


def read_weights(path: Path) -> pd.DataFrame:
    """weights.csv (``weight_movement``): one row per (run, method, window, step, group); none without averages."""
    try:
        # round_trip: the distances as written, to the last bit (pandas' fast parser may be an ulp off)
        frame = pd.read_csv(path, dtype={"run": str, "method": str, "group": str}, float_precision="round_trip")
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the weight movement table ({error})") from None
    missing = set(WEIGHT_COLUMNS) - set(frame.columns)
    if missing:
        raise InputError(f"{path}: not a weight movement table (no column {', '.join(sorted(missing))})")
    return frame


def weight_proxies(weights: pd.DataFrame) -> pd.DataFrame:
    """Models x ``-Δθ/θ {group} {method}{n}`` from weights.csv: minus the relative distance, so that higher is
    better as for every proxy (a settled model moves little), and a model of the window ending at a step is the
    model of that step, as the score proxies have it. Every group for the raw checkpoints, the total for the
    averages (their groups would add rows that say the same)."""
    weights = weights[(weights["method"] == RAW.name) | (weights["group"] == TOTAL)]
    proxy = WEIGHTS_PROXY + " " + weights["group"] + " " + weights["method"] + weights["window"].astype(str)
    return (weights.assign(proxy=proxy, value=-weights["relative_distance"])
            .pivot_table(index=["run", "step"], columns="proxy", values="value"))


def read_targets(path: Path) -> pd.Series:
    """(run, step) -> target from a CSV ``run,step,target``. A file with a ``method`` column (the fine-tuning
    stage's targets.csv, which also holds fine-tuned averaged models) gives the rows of raw checkpoints."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the targets CSV ({error})") from None
    if "method" in frame.columns:
        frame = frame[frame["method"] == RAW.name]
    missing = {"run", "step", "target"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected run,step,target)")
    if frame.duplicated(["run", "step"]).any():
        first = frame[frame.duplicated(["run", "step"])].iloc[0]
        raise InputError(f"{path}: run {first['run']} step {first['step']} has two targets")
    if not pd.api.types.is_numeric_dtype(frame["target"]):
        raise InputError(f"{path}: the target column must be numeric")
    frame["step"] = frame["step"].astype(int)
    name = str(path)
    if {"tasks", "recipe"} <= set(frame.columns) and len(frame):  # the fine-tuning stage's targets.csv
        name = f"fine-tuned ({frame['recipe'].iloc[0]}), overall on {frame['tasks'].iloc[0]}: {path}"
    # a target left empty (a model that could not be fine-tuned) orders nothing
    return frame.set_index(["run", "step"])["target"].astype(float).dropna().rename(name)


def final_stabilised_targets(plan: Plan, proxies: pd.DataFrame) -> pd.Series:
    """The stand-in target: each run's overall score at its last step with the largest window (avg, else
    vote, else raw), given to the run's earlier checkpoints."""
    # the first configured method, in the registry's order, that covers every task, at its largest window (an
    # averaging method may be computed for some windows only); every run has the same series, by ascending window,
    # so the window kept for a method is its largest
    windows = {method: window for method, window, _, _ in plan.series(next(iter(plan.runs)))}
    method = next((m.name for m in plan.registry.stabilisers if m.name in windows and not m.choice_only), RAW.name)
    column = f"overall {method}{windows.get(method, 1)}"
    targets = {}
    for run, steps in plan.runs.items():
        final = proxies[column].get((run, steps[-1]), math.nan)  # NaN: that model was excluded
        for step in steps[:-1]:
            targets[run, step] = final
    return pd.Series(targets, name=f"{column} at the run's last step").rename_axis(["run", "step"])


# ---------------------------------------------------------------- statistics


def pairwise_accuracy(proxy: np.ndarray, target: np.ndarray, counted: np.ndarray | None = None
                      ) -> tuple[float, int]:
    """Share of the pairs with different targets that the proxy orders the same way (a proxy tie counts
    half), and the number of such pairs. ``counted``: a mask over the pairs i < j (``np.triu_indices``
    order) that restricts them, e.g. to pairs within a run (``pair_masks``)."""
    comparable, agreement = _pair_agreement(proxy, target)
    upper = np.triu_indices(len(comparable), k=1)
    comparable, agreement = comparable[upper].astype(bool), agreement[upper]
    if counted is not None:
        comparable &= counted
    if not comparable.any():
        return math.nan, 0
    return float(agreement[comparable].mean()), int(comparable.sum())


def _pair_agreement(proxy: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over every pair of models (i, j), as matrices: 1 where their targets differ, and where they do, 1 if
    the proxy orders them as the target does, 0.5 for a proxy tie, else 0."""
    proxy, target = np.asarray(proxy, float), np.asarray(target, float)
    target_sign = np.sign(target[:, None] - target[None, :])
    proxy_sign = np.sign(proxy[:, None] - proxy[None, :])
    comparable = (target_sign != 0).astype(float)
    return comparable, np.where(proxy_sign == 0, 0.5, proxy_sign == target_sign) * comparable


ACCURACY_DRAWS = 1000
"""bootstrap draws (over models, seed 0) of each proxy's pairwise-accuracy interval"""


def accuracy_interval(proxy: np.ndarray, target: np.ndarray, draws: int = ACCURACY_DRAWS, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float]:
    """The percentile bootstrap interval of ``pairwise_accuracy`` over the models: each draw resamples the
    models with replacement (counts ``w``) and counts every pair of drawn models, so that its accuracy is
    w'(agreement)w / w'(comparable)w; no Python loop over draws. A model drawn twice pairs with itself
    never: its targets are equal."""
    if len(target) < 2:
        return math.nan, math.nan
    # float32: exact for these halves and counts, and half the memory of a matmul over many models
    comparable, agreement = (matrix.astype(np.float32) for matrix in _pair_agreement(proxy, target))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(target), np.full(len(target), 1 / len(target)), size=draws).astype(np.float32)
    pairs = ((counts @ comparable) * counts).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracies = ((counts @ agreement) * counts).sum(axis=1) / pairs
    accuracies = accuracies[pairs > 0]
    if not len(accuracies):
        return math.nan, math.nan
    low, high = np.quantile(accuracies, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


PAIR_KINDS = ("within_run", "across_runs")
"""the pairs of models counted apart: two checkpoints of one run (which checkpoint to pick), and checkpoints
of two runs (which run to pick)"""


def pair_masks(runs: np.ndarray) -> dict[str, np.ndarray]:
    """For each of PAIR_KINDS, the mask over the pairs i < j of models whose runs are ``runs``."""
    runs = np.asarray(runs)
    same = (runs[:, None] == runs[None, :])[np.triu_indices(len(runs), k=1)]
    return {"within_run": same, "across_runs": ~same}


def kendall_tau(proxy: np.ndarray, target: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(set(np.asarray(target).tolist())) < 2 or len(set(np.asarray(proxy).tolist())) < 2:
        return math.nan
    return float(kendalltau(proxy, target).statistic)


def pair_features(values: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The paper's features of each pair (i, j): p_i - p_j, p_i * p_j, p_i and p_j over all proxies."""
    first, second = values[pairs[:, 0]], values[pairs[:, 1]]
    return np.hstack([first - second, first * second, first, second])


@dataclass(frozen=True)
class ComparatorAccuracy:
    """The learned comparator's pairwise accuracy on held-out models: the mean over random halvings, its
    standard deviation, and the means over the held-out pairs within a run and across runs."""

    mean: float
    spread: float
    within_run: float = math.nan
    across_runs: float = math.nan


def comparator_accuracy(values: np.ndarray, target: np.ndarray, repeats: int = 20, seed: int = 0,
                        runs: np.ndarray | None = None) -> ComparatorAccuracy:
    """A logistic-regression comparator's pairwise accuracy over random halvings of the models: trained on
    the pairs of one half, scored on the pairs within the other (``runs``: the models' runs, to also score
    the held-out pairs within a run and across runs apart)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    runs = np.zeros(len(target)) if runs is None else np.asarray(runs)
    accuracies: dict[str, list[float]] = {"all": [], **{kind: [] for kind in PAIR_KINDS}}
    for _ in range(repeats):
        order = rng.permutation(len(target))
        train, test = order[: len(order) // 2], order[len(order) // 2:]
        train_pairs = np.array([(i, j) for i, j in itertools.permutations(train, 2) if target[i] != target[j]])
        test_pairs = np.array([(i, j) for i, j in itertools.combinations(test, 2) if target[i] != target[j]])
        if len(train_pairs) == 0 or len(test_pairs) == 0 or len(set(target[train])) < 2:
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(pair_features(values, train_pairs), target[train_pairs[:, 0]] > target[train_pairs[:, 1]])
        correct = model.predict(pair_features(values, test_pairs)) == (
            target[test_pairs[:, 0]] > target[test_pairs[:, 1]])
        same_run = runs[test_pairs[:, 0]] == runs[test_pairs[:, 1]]
        for kind, selected in (("all", np.ones_like(same_run)), ("within_run", same_run), ("across_runs", ~same_run)):
            if selected.any():
                accuracies[kind].append(float(np.mean(correct[selected])))
    if not accuracies["all"]:
        return ComparatorAccuracy(math.nan, math.nan)
    means = {kind: float(np.mean(values)) if values else math.nan for kind, values in accuracies.items()}
    return ComparatorAccuracy(means["all"], float(np.std(accuracies["all"])), means["within_run"],
                              means["across_runs"])


# ---------------------------------------------------------------- the table


PROXY_KINDS = {PERPLEXITY_PROXY: "perplexity", WEIGHTS_PROXY: "weights"}
"""A proxy name's prefix -> its kind; a proxy without one of them is a task's or overall score."""


def _describe(proxy: str) -> dict:
    name, series = proxy.rsplit(" ", 1)
    method = series.rstrip("0123456789")
    kind = PROXY_KINDS.get(name.split(" ", 1)[0], "score")
    return {"kind": kind, "method": method, "window": int(series[len(method):]),
            "task": name if kind == "score" else ""}


def _accuracies(proxy: np.ndarray, target: np.ndarray, runs: np.ndarray) -> dict:
    """pairwise_accuracy and n_pairs over all pairs, and for each of PAIR_KINDS apart."""
    accuracy, pairs = pairwise_accuracy(proxy, target)
    row = {"n_pairs": pairs, "pairwise_accuracy": accuracy}
    for kind, mask in pair_masks(runs).items():
        row[f"accuracy_{kind}"], row[f"n_pairs_{kind}"] = pairwise_accuracy(proxy, target, mask)
    return row


def indicators_table(proxies: pd.DataFrame, targets: pd.Series, repeats: int = 20) -> pd.DataFrame:
    """One row per proxy (pairwise accuracy over all pairs, within runs and across runs; Kendall's tau over
    the models it covers), then the learned comparator over the models that have every proxy; sorted by
    pairwise accuracy. The ``target`` column says what the models were ordered by (the name of ``targets``)."""
    models = proxies.join(targets.rename("target"), how="inner")
    rows = []
    for proxy in proxies.columns:
        covered = models[[proxy, "target"]].dropna()
        values, target = covered[proxy].to_numpy(), covered["target"].to_numpy()
        rows.append({"proxy": proxy, **_describe(proxy), "n_models": len(covered),
                     **_accuracies(values, target, covered.index.get_level_values("run").to_numpy()),
                     **dict(zip(("accuracy_ci_low", "accuracy_ci_high"), accuracy_interval(values, target))),
                     "kendall_tau": kendall_tau(values, target), "spread": math.nan})
    complete = models.dropna()
    target = complete.pop("target").to_numpy()
    runs = complete.index.get_level_values("run").to_numpy()
    comparator = comparator_accuracy(complete.to_numpy(), target, repeats=repeats, runs=runs)
    pairs = _accuracies(np.zeros(len(target)), target, runs)  # the pair counts; a constant's accuracies are 0.5
    # the comparator's accuracy varies over its random halvings (spread); a bootstrap would refit it per draw
    rows.append({"proxy": "learned comparator", "kind": "comparator", "method": "", "window": math.nan,
                 "task": "", "n_models": len(complete), "n_pairs": pairs["n_pairs"],
                 "pairwise_accuracy": comparator.mean, "accuracy_within_run": comparator.within_run,
                 "n_pairs_within_run": pairs["n_pairs_within_run"], "accuracy_across_runs": comparator.across_runs,
                 "n_pairs_across_runs": pairs["n_pairs_across_runs"], "kendall_tau": math.nan,
                 "spread": comparator.spread})
    table = pd.DataFrame(rows, columns=COLUMNS).assign(target=targets.name)
    return table.sort_values(["pairwise_accuracy", "proxy"], ascending=[False, True], na_position="last",
                             ignore_index=True)


def write_indicators(plan_path: Path, scores_path: Path, perplexity_dir: Path | None, targets_path: Path | None,
                     output: Path, weights_path: Path | None = None) -> None:
    """The indicators table (CSV, and Markdown beside it) of the workflow's plan and scores table: every
    score proxy, the 1/PPL proxies where a perplexity directory is given, the weight movement proxies where a
    weights.csv is given, against the targets of ``targets_path`` or, without it, each run's final stabilised
    score."""
    from ckpt_stability.stability import write_table

    plan = Plan.from_json(plan_path)
    proxies = score_proxies(pd.read_parquet(scores_path))
    if perplexity_dir is not None:
        proxies = proxies.join(perplexity_proxies(plan, perplexity_dir))
    if weights_path is not None:
        proxies = proxies.join(weight_proxies(read_weights(weights_path)))
    targets = read_targets(targets_path) if targets_path is not None else final_stabilised_targets(plan, proxies)
    write_table(indicators_table(proxies, targets), output)
