"""Pretraining indicators: which checkpoint signals predict the outcome a team cares about.

Following Zeng et al., "Can Pre-training Indicators Reliably Predict Fine-tuning Outcomes of LLMs?"
(arXiv:2504.12491): every checkpoint (run, step) is a model; a **proxy** gives each model a number;
the **target** is the outcome (e.g. the score after fine-tuning, or a later-stage evaluation), read
from a CSV file ``run,step,target``. Proxies:

* ``1/PPL`` of the checkpoint (``raw1``) and of each averaged model (``avg{n}``), on a held-out text;
* each task's few-shot score and the mean over tasks (``overall``), raw and smoothed by every window
  and method (``avg``, ``vote``, ``prob``): the stabilised scores are proxies in their own right.

For every proxy: the **pairwise accuracy** over all pairs of models whose targets differ (the share of
pairs the proxy orders as the target does; a tie of the proxy counts half; chance is 0.5) and
**Kendall's tau** (tau-b). Then a **learned comparator** (logistic regression on the pair features of
the paper: p_i - p_j, p_i * p_j, p_i and p_j over all proxies) is evaluated by repeated random splits
of the models into halves: trained on the pairs within one half, scored on the pairs within the other;
its mean and spread over the splits are reported.

Without a targets file, the final checkpoint's stabilised score stands in as the target for the earlier
checkpoints of its run: the overall score at the run's last step with the largest window (of ``avg``,
else ``vote``, else raw). Every checkpoint of a run then shares one target, so the stand-in orders runs,
not the checkpoints within a run: it answers "which early signal picks the run that ends best", and
needs two runs or more.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ckpt_stability import layout
from ckpt_stability.errors import InputError
from ckpt_stability.methods import BY_NAME, EVALUATE, RAW, STABILISERS
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.stability import overall_score

COLUMNS = ["proxy", "kind", "method", "window", "task", "n_models", "n_pairs", "pairwise_accuracy",
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
                  if BY_NAME[method].produced_by == EVALUATE]
        for method, window, series_steps in series:
            for step in series_steps:
                path = Path(layout.perplexity(str(directory), run=run, method=method, n=window, step=step))
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    if EXCLUDED_KEY not in record:
                        rows.append((run, step, f"1/PPL {method}{window}", record["inverse_perplexity"]))
                except (OSError, ValueError, KeyError) as error:
                    raise InputError(f"{path}: not a perplexity file of this workflow ({error})") from None
    frame = pd.DataFrame(rows, columns=["run", "step", "proxy", "value"])
    return frame.pivot_table(index=["run", "step"], columns="proxy", values="value")


def read_targets(path: Path) -> pd.Series:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the targets CSV ({error})") from None
    missing = {"run", "step", "target"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected run,step,target)")
    if frame.duplicated(["run", "step"]).any():
        first = frame[frame.duplicated(["run", "step"])].iloc[0]
        raise InputError(f"{path}: run {first['run']} step {first['step']} has two targets")
    if not pd.api.types.is_numeric_dtype(frame["target"]):
        raise InputError(f"{path}: the target column must be numeric")
    frame["step"] = frame["step"].astype(int)
    return frame.set_index(["run", "step"])["target"].astype(float).rename(f"{path}")


def final_stabilised_targets(plan: Plan, proxies: pd.DataFrame) -> pd.Series:
    """The stand-in target: each run's overall score at its last step with the largest window (avg, else
    vote, else raw), given to the run's earlier checkpoints."""
    largest = max(plan.windows)
    # the first configured method, in the registry's order, that covers every task
    method = next((m for m in STABILISERS if m.name in plan.methods and not m.choice_only and largest > 1), RAW)
    column = f"overall {method.name}{1 if method is RAW else largest}"
    targets = {}
    for run, steps in plan.runs.items():
        final = proxies[column].get((run, steps[-1]), math.nan)  # NaN: that model was excluded
        for step in steps[:-1]:
            targets[run, step] = final
    return pd.Series(targets, name=f"{column} at the run's last step").rename_axis(["run", "step"])


# ---------------------------------------------------------------- statistics


def pairwise_accuracy(proxy: np.ndarray, target: np.ndarray) -> tuple[float, int]:
    """Share of the pairs with different targets that the proxy orders the same way (a proxy tie counts
    half), and the number of such pairs."""
    proxy, target = np.asarray(proxy, float), np.asarray(target, float)
    upper = np.triu_indices(len(proxy), k=1)
    target_sign = np.sign(target[:, None] - target[None, :])[upper]
    proxy_sign = np.sign(proxy[:, None] - proxy[None, :])[upper]
    comparable = target_sign != 0
    if not comparable.any():
        return math.nan, 0
    agreement = np.where(proxy_sign[comparable] == 0, 0.5, proxy_sign[comparable] == target_sign[comparable])
    return float(agreement.mean()), int(comparable.sum())


def kendall_tau(proxy: np.ndarray, target: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(set(np.asarray(target).tolist())) < 2 or len(set(np.asarray(proxy).tolist())) < 2:
        return math.nan
    return float(kendalltau(proxy, target).statistic)


def pair_features(values: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The paper's features of each pair (i, j): p_i - p_j, p_i * p_j, p_i and p_j over all proxies."""
    first, second = values[pairs[:, 0]], values[pairs[:, 1]]
    return np.hstack([first - second, first * second, first, second])


def comparator_accuracy(values: np.ndarray, target: np.ndarray, repeats: int = 20, seed: int = 0
                        ) -> tuple[float, float]:
    """Mean and standard deviation, over random halvings of the models, of a logistic-regression
    comparator's pairwise accuracy on the held-out half (trained on the other half's pairs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(repeats):
        order = rng.permutation(len(target))
        train, test = order[: len(order) // 2], order[len(order) // 2:]
        train_pairs = np.array([(i, j) for i, j in itertools.permutations(train, 2) if target[i] != target[j]])
        test_pairs = np.array([(i, j) for i, j in itertools.combinations(test, 2) if target[i] != target[j]])
        if len(train_pairs) == 0 or len(test_pairs) == 0 or len(set(target[train])) < 2:
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(pair_features(values, train_pairs), target[train_pairs[:, 0]] > target[train_pairs[:, 1]])
        predicted = model.predict(pair_features(values, test_pairs))
        accuracies.append(float(np.mean(predicted == (target[test_pairs[:, 0]] > target[test_pairs[:, 1]]))))
    if not accuracies:
        return math.nan, math.nan
    return float(np.mean(accuracies)), float(np.std(accuracies))


# ---------------------------------------------------------------- the table


def _describe(proxy: str) -> dict:
    name, series = proxy.rsplit(" ", 1)
    method = series.rstrip("0123456789")
    return {"kind": "perplexity" if name == "1/PPL" else "score", "method": method,
            "window": int(series[len(method):]), "task": "" if name == "1/PPL" else name}


def indicators_table(proxies: pd.DataFrame, targets: pd.Series, repeats: int = 20) -> pd.DataFrame:
    """One row per proxy (pairwise accuracy, Kendall's tau over the models it covers), then the learned
    comparator over the models that have every proxy; sorted by pairwise accuracy. The ``target`` column
    says what the models were ordered by (the name of ``targets``)."""
    models = proxies.join(targets.rename("target"), how="inner")
    rows = []
    for proxy in proxies.columns:
        covered = models[[proxy, "target"]].dropna()
        accuracy, pairs = pairwise_accuracy(covered[proxy].to_numpy(), covered["target"].to_numpy())
        rows.append({"proxy": proxy, **_describe(proxy), "n_models": len(covered), "n_pairs": pairs,
                     "pairwise_accuracy": accuracy,
                     "kendall_tau": kendall_tau(covered[proxy].to_numpy(), covered["target"].to_numpy()),
                     "spread": math.nan})
    complete = models.dropna()
    target = complete.pop("target").to_numpy()
    mean, spread = comparator_accuracy(complete.to_numpy(), target, repeats=repeats)
    _, pairs = pairwise_accuracy(np.zeros(len(target)), target)
    rows.append({"proxy": "learned comparator", "kind": "comparator", "method": "", "window": math.nan,
                 "task": "", "n_models": len(complete), "n_pairs": pairs, "pairwise_accuracy": mean,
                 "kendall_tau": math.nan, "spread": spread})
    table = pd.DataFrame(rows, columns=COLUMNS).assign(target=targets.name)
    return table.sort_values(["pairwise_accuracy", "proxy"], ascending=[False, True], na_position="last",
                             ignore_index=True)


def write_indicators(plan_path: Path, scores_path: Path, perplexity_dir: Path | None, targets_path: Path | None,
                     output: Path) -> None:
    """The indicators table (CSV, and Markdown beside it) of the workflow's plan and scores table: every
    score proxy, the 1/PPL proxies where a perplexity directory is given, against the targets of
    ``targets_path`` or, without it, each run's final stabilised score."""
    from ckpt_stability.stability import write_table

    plan = Plan.from_json(plan_path)
    proxies = score_proxies(pd.read_parquet(scores_path))
    if perplexity_dir is not None:
        proxies = proxies.join(perplexity_proxies(plan, perplexity_dir))
    targets = read_targets(targets_path) if targets_path is not None else final_stabilised_targets(plan, proxies)
    write_table(indicators_table(proxies, targets), output)
