"""Which checkpoint to pick, with its uncertainty: results/tables/pick.{csv,md} and pick_checkpoints.parquet.

For each run, method and window, and each level (a task, a category, ``overall``), over the checkpoints of
the pick range (``all`` the series' steps, or ``final``: the stability tables' final segment), from the
per-example scores of the prediction files (``uncertainty`` holds the statistics):

* every checkpoint's score with a 95 % interval (Wilson's for a task of 0/1 scores, else the percentile
  bootstrap over examples, stratified by task above the task level; B = 2,000, seed 0);
* the **recommended** checkpoint: the highest score; ties go to the higher mean score of its neighbours
  (the two checkpoints before it and the two after it in the range, as far as they exist; the tied
  checkpoints' own scores are equal), then to the later step;
* the **indistinguishable set**: the Model Confidence Set (T_max, alpha 0.05, B = 1,000, seed 0), with
  every checkpoint's MCS p-value;
* per checkpoint, the paired difference to the recommended one with its standard error, and for a task of
  0/1 scores McNemar's exact p-value against it, Holm-corrected over the range.

An excluded checkpoint is outside every set, named as such; a group of fewer than 2 usable checkpoints gets
a row with an empty set and its reason. These intervals cover test-set sampling only (not seed or
data-order variance), and the recommended checkpoint's interval is optimistic: it was selected on the same
examples.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ckpt_stability.atomic import atomic_file
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import PICK_RANGES, Plan
from ckpt_stability.stability import read_example_scores, write_table
from ckpt_stability.uncertainty import (ALPHA, INTERVAL_DRAWS, MCS_DRAWS, Strata, holm, mcnemar_exact,
                                        model_confidence_set, score_intervals)

NEIGHBOURS = 2
GROUP_KEYS = ["run", "method", "window", "level", "name"]
PICK_COLUMNS = GROUP_KEYS + ["recommended_step", "score", "ci_low", "ci_high", "interval", "set_steps", "set_size",
                             "range_size", "range_start", "range_end", "excluded_steps", "reason"]
CHECKPOINT_COLUMNS = GROUP_KEYS + ["step", "score", "ci_low", "ci_high", "mcs_p_value", "in_set", "recommended",
                                   "difference", "difference_se", "mcnemar_p", "mcnemar_p_holm", "excluded"]


@dataclass(frozen=True)
class Level:
    """A level of one series: its tasks and each one's weight in its score (a mean of task means, llm-jp-eval's
    AVG for ``overall``: the mean of the category means)."""

    level: str
    name: str
    weights: dict[str, float]


def levels(plan: Plan, tasks: list[str]) -> list[Level]:
    """The task, category and overall levels over ``tasks`` (a method's tasks), as the stability table has."""
    categories: dict[str, list[str]] = {}
    for task in tasks:
        categories.setdefault(plan.tasks[task].category, []).append(task)
    result = [Level("task", task, {task: 1.0}) for task in tasks]
    result += [Level("category", category, dict.fromkeys(members, 1 / len(members)))
               for category, members in categories.items()]
    result.append(Level("overall", "overall", {task: 1 / len(categories) / len(members)
                                               for members in categories.values() for task in members}))
    return result


def recommended(scores: np.ndarray, steps: list[int]) -> int:
    """The position of the recommended checkpoint: the highest score, then the higher mean of its neighbours,
    then the later step."""
    best = np.flatnonzero(np.isclose(scores, scores.max(), rtol=0, atol=1e-12))
    neighbourhood = [np.delete(scores[max(0, i - NEIGHBOURS): i + NEIGHBOURS + 1], min(i, NEIGHBOURS)).mean()
                     for i in best]
    return max(zip(neighbourhood, [steps[i] for i in best], best))[2]


def pick_group(strata: Strata, steps: list[int]) -> tuple[dict, pd.DataFrame]:
    """The pick of one group of at least 2 checkpoints: its pick.csv fields and its checkpoints' rows."""
    scores = strata.level_scores()
    low, high, interval = score_intervals(strata, strata.resample(INTERVAL_DRAWS))
    p_values = model_confidence_set(strata, strata.resample(MCS_DRAWS))
    best = recommended(scores, steps)
    difference, difference_se = strata.paired_difference(best)
    mcnemar = np.full(len(steps), np.nan)
    if strata.is_binary():
        mcnemar = mcnemar_exact(strata.scores[0], strata.scores[0][best])
        mcnemar[best] = np.nan
    in_set = p_values > ALPHA
    rows = pd.DataFrame({"step": steps, "score": scores, "ci_low": low, "ci_high": high, "mcs_p_value": p_values,
                         "in_set": in_set, "recommended": np.arange(len(steps)) == best, "difference": difference,
                         "difference_se": difference_se, "mcnemar_p": mcnemar, "mcnemar_p_holm": holm(mcnemar)})
    summary = {"recommended_step": steps[best], "score": scores[best], "ci_low": low[best], "ci_high": high[best],
               "interval": interval, "set_steps": " ".join(str(step) for step, kept in zip(steps, in_set) if kept),
               "set_size": int(in_set.sum()), "reason": ""}
    return summary, rows


@dataclass(frozen=True)
class Series:
    """One (run, method, window) over the pick range: its steps and the excluded ones with their reasons."""

    run: str
    method: str
    window: int
    tasks: list[str]
    steps: list[int]
    excluded: dict[int, str]

    @property
    def usable(self) -> list[int]:
        return [step for step in self.steps if step not in self.excluded]


def pick_series(plan: Plan, series: Series, threads: int = 4) -> tuple[list[dict], list[pd.DataFrame]]:
    """The pick.csv rows and the checkpoint rows of every level of one series."""
    usable = series.usable
    keys = {"run": series.run, "method": series.method, "window": series.window}
    context = {"range_size": len(series.steps), "range_start": series.steps[0], "range_end": series.steps[-1],
               "excluded_steps": " ".join(map(str, series.excluded))}
    with ThreadPoolExecutor(threads) as pool:
        matrices = dict(zip(series.tasks, pool.map(
            lambda task: read_example_scores(plan, series.run, series.method, series.window, task, usable)[0]
            if len(usable) >= 2 else None, series.tasks)))
    rows, checkpoint_rows = [], []
    for level in levels(plan, series.tasks):
        group = {**keys, "level": level.level, "name": level.name}
        if len(usable) < 2:
            rows.append({**group, **context, "set_steps": "", "set_size": 0, "reason": (
                f"{len(usable)} usable checkpoint(s) in the range: nothing to compare")})
            continue
        strata = Strata([matrices[task] for task in level.weights], list(level.weights.values()))
        summary, checkpoints = pick_group(strata, usable)
        rows.append({**group, **context, **summary})
        excluded = pd.DataFrame({"step": list(series.excluded), "excluded": list(series.excluded.values()),
                                 "in_set": False, "recommended": False})
        checkpoint_rows.append(pd.concat([checkpoints.assign(excluded=None), excluded], ignore_index=True)
                               .sort_values("step").assign(**group))
    return rows, checkpoint_rows


def series_in_range(plan: Plan, scores: pd.DataFrame, pick_range: str) -> list[Series]:
    """Every (run, method, window) of the plan over the pick range, with its excluded checkpoints."""
    excluded = scores[scores[EXCLUDED_KEY].notna()].drop_duplicates(["run", "method", "window", "step"])
    reasons = {(run, method, window): dict(zip(group["step"], group[EXCLUDED_KEY]))
               for (run, method, window), group in excluded.groupby(["run", "method", "window"])}
    result = []
    for run in plan.runs:
        segment = set(plan.segment(run))
        for method, window, steps, tasks in plan.series(run):
            if not tasks:
                continue
            in_range = [step for step in steps if pick_range == PICK_RANGES[0] or step in segment]
            mine = reasons.get((run, method, window), {})
            result.append(Series(run, method, window, tasks, in_range,
                                 {step: mine[step] for step in in_range if step in mine}))
    return result


def pick_tables(plan: Plan, scores: pd.DataFrame, pick_range: str = PICK_RANGES[0]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pick.csv's table and the checkpoints table."""
    rows, checkpoint_rows = [], []
    for series in series_in_range(plan, scores, pick_range):
        mine, checkpoints = pick_series(plan, series)
        rows += mine
        checkpoint_rows += checkpoints
    table = pd.DataFrame(rows, columns=PICK_COLUMNS)
    checkpoints = (pd.concat(checkpoint_rows, ignore_index=True)[CHECKPOINT_COLUMNS] if checkpoint_rows
                   else pd.DataFrame(columns=CHECKPOINT_COLUMNS))
    return table, checkpoints


def write_pick(plan_path: Path, scores_path: Path, output: Path, checkpoints_output: Path,
               pick_range: str = PICK_RANGES[0]) -> None:
    """pick.csv (and .md beside it) and pick_checkpoints.parquet from the workflow's plan and scores table."""
    table, checkpoints = pick_tables(Plan.from_json(plan_path), pd.read_parquet(scores_path), pick_range)
    write_table(table, output)
    with atomic_file(checkpoints_output) as tmp:
        checkpoints.to_parquet(tmp, index=False)
