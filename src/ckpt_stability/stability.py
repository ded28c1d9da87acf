"""Prediction files -> the scores table and the stability tables.

The **final segment** of a run is its last ``final_fraction`` of checkpoints (``ceil(final_fraction *
m)`` of the run's m checkpoints, never fewer than 3), keeping only the steps where the largest
configured window exists, so that every method and window is measured on the same steps. With
``L_t`` the task score at the segment's t-th step (T steps) and ``s_{i,t}`` example i's score:

==============  ==========================================================================
mean_score      mean of L_t
final_score     L_T
std             population standard deviation of L_t
mtv             mean total variation, (1/(T-1)) sum_t |L_{t+1} - L_t|
instability     (1/(T-1)) sum_t [1 - mean_i sim(x_{i,t}, x_{i,t+1})], x the predictions; sim is
                equality for choice and exact_match tasks, else char_f1 between the predictions
example_mtv     mean over examples of (1/(T-1)) sum_t |s_{i,t+1} - s_{i,t}|
ever_flipped    share of examples whose score changes at least once in the segment
tv_i            Signal-and-Noise TV-I: 100 * (mtv / (max L - min L) - (L_T - L_1) / T); 0 where max = min
noise           Signal-and-Noise relative std: std / mean_score (0 where mean_score = 0)
==============  ==========================================================================

Category rows: the category score at step t is the mean of its tasks' scores, and mean_score,
final_score, std, mtv, tv_i and noise come from that series; instability, example_mtv and
ever_flipped are the mean over its tasks. ``overall`` is the same over all tasks. The ``prob``
method exists for choice tasks only, so its category and overall rows cover those, and the
improvement table compares them with raw over the same tasks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ckpt_stability.atomic import atomic_file, write_text
from ckpt_stability.errors import InputError
from ckpt_stability.methods import RAW
from ckpt_stability.metrics import exact_match, prediction_similarity
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.predictions import read_provenance, read_table

SERIES_COLUMNS = ["mean_score", "final_score", "std", "mtv", "tv_i", "noise"]
EXAMPLE_COLUMNS = ["instability", "example_mtv", "ever_flipped"]
STABILITY_COLUMNS = ["mean_score", "final_score", "std", "mtv", "instability", "example_mtv", "ever_flipped",
                     "tv_i", "noise"]
KEYS = ["run", "level", "name", "method", "window"]
SEGMENT_COLUMNS = ["segment_start", "segment_end", "segment_steps", "excluded_steps", "lag"]
"""the final segment, its steps whose model was excluded (space-separated) and left out of the row, and the
mean lag over the segment's steps: step - effective step (``Plan.effective_step``), how far back the method's
models sit (0 for raw)"""


# ---------------------------------------------------------------- scores


def gather_scores(plan: Plan, threads: int = 4) -> pd.DataFrame:
    """The long scores table, read from the prediction files' footers (cheap)."""
    rows = []
    for run in plan.runs:
        for method, window, steps, tasks in plan.series(run):
            for step in steps:
                for task in tasks:
                    rows.append((run, task, plan.tasks[task].category, method, window, step))
    paths = [plan.path(run, method, window, step, task) for run, task, _, method, window, step in rows]
    with ThreadPoolExecutor(threads) as pool:
        provenances = list(pool.map(read_provenance, paths))
    frame = pd.DataFrame(rows, columns=["run", "task", "category", "method", "window", "step"])
    frame["metric"] = [p["task"]["metric"] for p in provenances]
    frame["score"] = [p["score"] for p in provenances]
    frame["n_examples"] = [p["n_examples"] for p in provenances]
    frame[EXCLUDED_KEY] = [p.get(EXCLUDED_KEY) for p in provenances]
    models = frame[["run", "method", "window", "step"]].drop_duplicates()
    models["effective_step"] = [plan.effective_step(*model) for model in models.itertuples(index=False)]
    return frame.merge(models, on=["run", "method", "window", "step"], how="left", validate="m:1")


def category_means(scores: pd.DataFrame, category_of: dict[str, str], skipna: bool = False) -> pd.DataFrame:
    """One column per category (in the order of its first task), the mean of its tasks' columns of
    ``scores``; NaN where one of them is NaN, unless ``skipna``."""
    tasks_of: dict[str, list[str]] = {}
    for task in scores.columns:
        tasks_of.setdefault(category_of[task], []).append(task)
    return pd.DataFrame({category: scores[tasks].mean(axis=1, skipna=skipna) for category, tasks in tasks_of.items()},
                        index=scores.index)


def overall_score(scores: pd.DataFrame, category_of: dict[str, str]) -> pd.Series:
    """llm-jp-eval's AVG of the tasks' columns of ``scores``: the mean of the categories' means, so that a
    category of many tasks weighs as much as one of a single task. The one definition of ``overall``, for
    the tables, the report and the indicators."""
    return category_means(scores, category_of).mean(axis=1, skipna=False)


def excluded_models(scores: pd.DataFrame) -> pd.DataFrame:
    """The models left out of the results, one row each: run, method, window, step and the reason."""
    rows = scores[scores[EXCLUDED_KEY].notna()]
    return (rows.drop_duplicates(["run", "method", "window", "step"])[["run", "method", "window", "step", EXCLUDED_KEY]]
            .rename(columns={EXCLUDED_KEY: "reason"}).sort_values(["run", "step", "method", "window"])
            .reset_index(drop=True))


# ---------------------------------------------------------------- metrics


def series_metrics(scores: np.ndarray) -> dict[str, float]:
    """The metrics of one score series L_1..L_T; NaN where T < 2 (excluded models left too few steps)."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) < 2:
        return dict.fromkeys(SERIES_COLUMNS, np.nan)
    steps = len(scores)
    mean = scores.mean()
    std = (scores - scores[0]).std()  # shifted first: a flat series has exactly 0
    mtv = np.abs(np.diff(scores)).mean()
    spread = scores.max() - scores.min()
    tv_i = 0.0 if spread == 0 else 100 * (mtv / spread - (scores[-1] - scores[0]) / steps)
    return {"mean_score": mean, "final_score": scores[-1], "std": std, "mtv": mtv, "tv_i": tv_i,
            "noise": 0.0 if mean == 0 else std / mean}


def example_metrics(scores: np.ndarray, predictions: list[list[str]], mode: str, metric: str) -> dict[str, float]:
    """instability, example_mtv and ever_flipped from ``scores[t, i]`` and ``predictions[t][i]``."""
    scores = np.asarray(scores, dtype=float)
    changes = np.abs(np.diff(scores, axis=0))
    codes, uniques = pd.factorize(np.concatenate([np.asarray(p, dtype=object) for p in predictions]))
    codes = codes.reshape(len(predictions), -1)
    similarity = (codes[1:] == codes[:-1]).astype(float)
    sim = prediction_similarity(mode, metric)
    if sim is not exact_match:
        # char_f1 between differing predictions, once per distinct pair
        cache: dict[tuple[int, int], float] = {}
        for t, i in zip(*np.nonzero(similarity == 0)):
            pair = (codes[t, i], codes[t + 1, i])
            if pair not in cache:
                cache[pair] = sim(uniques[pair[0]], uniques[pair[1]])
            similarity[t, i] = cache[pair]
    return {
        "instability": float((1 - similarity.mean(axis=1)).mean()),
        "example_mtv": float(changes.mean(axis=0).mean()),
        "ever_flipped": float((changes > 0).any(axis=0).mean()),
    }


def read_example_scores(plan: Plan, run: str, method: str, window: int, task: str, steps: list[int],
                        predictions: bool = False) -> tuple[np.ndarray, list[list[str]] | None]:
    """``scores[t, i]``: example i's score at ``steps[t]`` (the same examples at every step), and with
    ``predictions`` the predictions ``[t][i]``."""
    paths = [plan.path(run, method, window, step, task) for step in steps]
    columns = ["example_id", "score"] + (["prediction"] if predictions else [])
    tables = [read_table(path, columns=columns) for path in paths]
    first = tables[0].column("example_id").to_numpy()
    for path, table in zip(paths[1:], tables[1:]):
        if not np.array_equal(table.column("example_id").to_numpy(), first):
            raise InputError(f"{path}: its examples differ from those of {paths[0]}")
    scores = np.stack([table.column("score").to_numpy() for table in tables])
    return scores, [table.column("prediction").to_pylist() for table in tables] if predictions else None


def stability_table(plan: Plan, scores: pd.DataFrame, threads: int = 4) -> pd.DataFrame:
    """One row per (run, level, name, method, window); see the module docstring."""
    metric_of = {}
    excluded = scores[scores[EXCLUDED_KEY].notna()].groupby(["run", "method", "window"])["step"].agg(set)
    jobs = []
    for run in plan.runs:
        segment = plan.segment(run)
        for method, window, _, tasks in plan.series(run):
            healthy = [step for step in segment if step not in excluded.get((run, method, window), set())]
            for task in tasks:
                jobs.append((run, method, window, task, segment, healthy))
    for task in plan.tasks:
        path = next(plan.path(run, RAW.name, 1, plan.runs[run][-1], task) for run in plan.runs)
        metric_of[task] = read_provenance(path)["task"]["metric"]

    def task_row(job):
        run, method, window, task, _, healthy = job
        if len(healthy) < 2:
            return dict.fromkeys(EXAMPLE_COLUMNS, np.nan)
        matrix, predictions = read_example_scores(plan, run, method, window, task, healthy, predictions=True)
        return example_metrics(matrix, predictions, plan.tasks[task].mode, metric_of[task])

    with ThreadPoolExecutor(threads) as pool:
        example_rows = list(pool.map(task_row, jobs))

    segment_scores = scores[scores[EXCLUDED_KEY].isna()].merge(
        pd.DataFrame([(run, step) for run in plan.runs for step in plan.segment(run)], columns=["run", "step"]))
    series = {key: group.sort_values("step")["score"].to_numpy()
              for key, group in segment_scores.groupby(["run", "method", "window", "task"])}
    lags = {(run, method, window): float(np.mean([step - plan.effective_step(run, method, window, step)
                                                  for step in plan.segment(run)]))
            for run, method, window, *_ in jobs}
    per_task = []
    for (run, method, window, task, segment, healthy), example_row in zip(jobs, example_rows):
        per_task.append({"run": run, "level": "task", "name": task, "method": method, "window": window,
                         "category": plan.tasks[task].category, "metric": metric_of[task],
                         **series_metrics(series.get((run, method, window, task), np.zeros(0))), **example_row,
                         "segment_start": segment[0], "segment_end": segment[-1], "segment_steps": len(segment),
                         "excluded_steps": " ".join(str(step) for step in segment if step not in healthy),
                         "lag": lags[run, method, window]})
    tasks_frame = pd.DataFrame(per_task)

    aggregated = []
    for (run, method, window), group in tasks_frame.groupby(["run", "method", "window"], sort=False):
        aggregated += _aggregate(group, lambda task: series.get((run, method, window, task), np.zeros(0)))
    table = pd.concat([tasks_frame, pd.DataFrame(aggregated)], ignore_index=True)
    order = {"task": 0, "category": 1, "overall": 2}
    table = table.sort_values(["run", "level", "name", "method", "window"],
                              key=lambda col: col.map(order) if col.name == "level" else col)
    return table[KEYS + ["category", "metric"] + STABILITY_COLUMNS + SEGMENT_COLUMNS]


def _aggregate(task_rows: pd.DataFrame, series_of) -> list[dict]:
    """The category and overall rows of one (run, method, window) from its task rows; ``series_of(task)``
    is the task's score series over the final segment. A category averages its tasks; ``overall``
    averages the categories (``overall_score``)."""
    first = task_rows.iloc[0]
    category_of = dict(zip(task_rows["name"], task_rows["category"]))
    series = pd.DataFrame({task: series_of(task) for task in task_rows["name"]})  # segment steps x tasks
    examples = task_rows.set_index("name")[EXAMPLE_COLUMNS].T  # example-level metric x tasks
    category_series = category_means(series, category_of)
    category_examples = category_means(examples, category_of, skipna=True)  # a task may lack a value
    segment = task_rows[SEGMENT_COLUMNS].iloc[0].to_dict()
    rows = [{"run": first["run"], "level": "category", "name": category, "method": first["method"],
             "window": first["window"], "category": category, "metric": "", "series": category_series[category],
             **category_examples[category].to_dict(), **segment} for category in category_series.columns]
    rows.append({**rows[0], "level": "overall", "name": "overall", "category": "",
                 "series": category_series.mean(axis=1, skipna=False),
                 **category_examples.mean(axis=1, skipna=False).to_dict()})
    return [{**{key: value for key, value in row.items() if key != "series"},
             **series_metrics(row["series"].to_numpy())} for row in rows]


IMPROVEMENT_COLUMNS = ["delta_mean_score", "mtv_ratio", "instability_ratio", "mtv_raw", "instability_raw"]
"""The improvement table's columns besides its keys; ``*_raw`` are raw's values on the method's tasks."""


def improvement_table(stability: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Each method and window against raw: difference of mean_score, ratios of mtv and instability (NaN
    where raw's is 0: the one rule for a zero baseline, which the report follows), and raw's mtv and
    instability themselves.

    The baseline covers the same tasks: a method that exists for some tasks only (``prob``, choice
    tasks) is compared, on its category and overall rows, with raw aggregated over those tasks."""
    task_rows = stability[stability["level"] == "task"]
    raw_rows = task_rows[task_rows["method"] == RAW.name]
    segments = raw_rows.groupby("run")[["segment_start", "segment_end"]].first()
    raw_scores = scores[(scores["method"] == RAW.name) & scores[EXCLUDED_KEY].isna()].join(segments, on="run")
    raw_scores = raw_scores[raw_scores["step"].between(raw_scores["segment_start"], raw_scores["segment_end"])]
    raw_series = {key: group.sort_values("step")["score"].to_numpy()
                  for key, group in raw_scores.groupby(["run", "task"])}

    baselines = []
    for (run, method, window), rows in task_rows[task_rows["method"] != RAW.name].groupby(
            ["run", "method", "window"], sort=False):
        same_tasks = raw_rows[(raw_rows["run"] == run) & raw_rows["name"].isin(rows["name"])]
        same_tasks = same_tasks.assign(method=method, window=window)
        baselines += same_tasks.to_dict("records")
        baselines += _aggregate(same_tasks, lambda task: raw_series.get((run, task), np.zeros(0)))
    baseline = pd.DataFrame(baselines, columns=stability.columns)
    others = stability[stability["method"] != RAW.name].merge(baseline, on=KEYS, suffixes=("", "_raw"), validate="1:1")

    def ratio(column):
        denominator = others[f"{column}_raw"].to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denominator == 0, np.nan, others[column].to_numpy() / denominator)

    delta = others["mean_score"].to_numpy() - others["mean_score_raw"].to_numpy()
    # means of the same scores summed in another order differ by rounding (-2.2e-16): that is no difference
    others["delta_mean_score"] = np.where(np.abs(delta) < 1e-12, 0.0, delta)
    others["mtv_ratio"] = ratio("mtv")
    others["instability_ratio"] = ratio("instability")
    return others[KEYS + IMPROVEMENT_COLUMNS].reset_index(drop=True)


def write_table(frame: pd.DataFrame, csv_path: Path) -> None:
    """The table as CSV, and as Markdown beside it (``.md``) for reading in a terminal."""
    with atomic_file(csv_path) as tmp:
        frame.to_csv(tmp, index=False)  # full precision: the CSV is data; the Markdown is for reading
    write_text(csv_path.with_suffix(".md"), frame.to_markdown(index=False, floatfmt=".4g") + "\n")


def write_scores(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_tables(plan_path: Path, scores_path: Path, output_dir: Path) -> None:
    """stability, improvement and excluded (CSV, and Markdown beside each) under ``output_dir``, from the
    workflow's plan and scores table."""
    scores = pd.read_parquet(scores_path)
    stability = stability_table(Plan.from_json(plan_path), scores)
    write_table(stability, output_dir / "stability.csv")
    write_table(improvement_table(stability, scores), output_dir / "improvement.csv")
    write_table(excluded_models(scores), output_dir / "excluded.csv")
