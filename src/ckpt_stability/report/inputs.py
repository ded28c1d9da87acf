"""What the report reads besides the tables: the score series of a run, and the raw checkpoints'
per-example scores."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ckpt_stability.errors import InputError
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.predictions import METADATA_KEY, read_table
from ckpt_stability.stability import overall_score
from ckpt_stability.report.style import RAW


@dataclass
class RawTask:
    """The raw checkpoints' per-example scores of one task over every step of a run."""

    example_ids: np.ndarray
    steps: list[int]
    """the run's steps whose model was evaluated (excluded ones are left out)"""
    scores: np.ndarray
    """[step, example], over ``steps``"""
    provenance: list[dict]
    """one per step of the run, excluded ones included"""


class ScoreSeries:
    """A run's score series, indexed by step, averaged over any set of tasks."""

    def __init__(self, scores: pd.DataFrame, run: str):
        self._category = dict(zip(scores["task"], scores["category"]))
        raw = scores[(scores["run"] == run) & (scores["method"] == RAW)]
        self.excluded_raw_steps = sorted(set(raw.loc[raw[EXCLUDED_KEY].notna(), "step"]))
        """the checkpoints that could not be evaluated, marked on the trajectories"""
        self._wide = scores[scores["run"] == run].pivot_table(index="step", columns=["method", "window", "task"],
                                                              values="score", dropna=False)

    def mean(self, method: str, window: int, tasks: list[str]) -> pd.Series:
        """The score of ``tasks`` (the mean of their categories' means, as llm-jp-eval's AVG) at every step
        whose model was evaluated (excluded ones are NaN, left out)."""
        return overall_score(self._wide[method][window][tasks], self._category).dropna()


def _read_raw_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    table = read_table(path, columns=["example_id", "score"])
    provenance = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return table.column("example_id").to_numpy(), table.column("score").to_numpy(), provenance


def read_raw(plan: Plan, run: str, threads: int = 4) -> dict[str, RawTask]:
    steps = plan.runs[run]
    paths = {task: [plan.path(run, RAW, 1, step, task) for step in steps] for task in plan.tasks}
    with ThreadPoolExecutor(threads) as pool:
        read = {task: list(pool.map(_read_raw_file, task_paths)) for task, task_paths in paths.items()}
    result = {}
    for task, files in read.items():
        evaluated = [(step, path, file) for step, path, file in zip(steps, paths[task], files)
                     if EXCLUDED_KEY not in file[2]]
        first_path, (first_ids, _, _) = evaluated[0][1], evaluated[0][2]
        for _, path, (ids, _, _) in evaluated[1:]:
            if not np.array_equal(ids, first_ids):
                raise InputError(f"{path}: its examples differ from those of {first_path}")
        result[task] = RawTask(first_ids, [step for step, _, _ in evaluated],
                               np.stack([scores for _, _, (_, scores, _) in evaluated]),
                               [provenance for _, _, provenance in files])
    return result


LISTS = ["excluded_steps", "set_steps", "reason"]
"""the tables' text columns that may be empty: read as "" rather than NaN"""


def read_csv_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: table is missing")
    # names stay strings even where they look like numbers (a run called 2024)
    frame = pd.read_csv(path, dtype={"run": str, "level": str, "name": str, "method": str, "category": str,
                                     **dict.fromkeys(LISTS, str)})
    return frame.fillna({column: "" for column in LISTS if column in frame})
