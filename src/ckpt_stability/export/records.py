"""What an export sends to a tracker, as typed records read from the workflow's results.

One ``TrackerRun`` per score series, i.e. per (run, method, window), raw included. Its ``points`` are the
series' steps in ascending order, each with the metrics known at that step:

* ``eval/<task>``: the task's score; ``eval/<category>``: the mean of its tasks' scores; ``eval/overall``:
  llm-jp-eval's AVG, the mean of the category means (``stability.overall_score``, the tables' definition);
* ``eval/perplexity``: the model's perplexity on the held-out text (raw and averaged models, when measured);
* ``eval/finetuned``: the model's ``overall`` score after fine-tuning (``targets.csv``), where it was fine-tuned.

An excluded model (no score) has no value at its step. The stability, improvement and pick tables go with
the run as ``SummaryTable``s, restricted to the run's rows, and the report as a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ckpt_stability import layout
from ckpt_stability.errors import InputError
from ckpt_stability.methods import EVALUATE
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.stability import category_means, overall_score

PREFIX = "eval/"
"""Every metric's prefix: W&B plots ``eval/*`` against the training step (``define_metric``)."""
STEP_METRIC = "train/step"
"""The training step, as the training run logs it: the x axis of every ``eval/*`` metric in W&B."""
OVERALL = "overall"
PERPLEXITY = "perplexity"
FINETUNED = "finetuned"
TABLES = ("stability", "improvement", "pick")
"""The tables of results/tables/ that each tracker run carries, restricted to its (run, method, window)."""


@dataclass(frozen=True)
class Point:
    """The metrics of one model: the checkpoint (or the window ending) at ``step``."""

    step: int
    metrics: dict[str, float]
    """metric name (``eval/...``) -> value"""


@dataclass(frozen=True)
class SummaryTable:
    name: str
    """stability, improvement or pick"""
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    """None where a value is empty"""

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows), columns=list(self.columns))

    def markdown(self) -> str:
        return self.frame().to_markdown(index=False, floatfmt=".4g")


@dataclass(frozen=True)
class TrackerRun:
    """One score series of the workflow, as one run in a tracker."""

    run: str
    method: str
    window: int
    points: tuple[Point, ...]
    """in ascending step order"""
    tables: tuple[SummaryTable, ...]
    report: Path | None
    """the HTML report, where it has been written"""

    @property
    def series(self) -> str:
        """``raw1``, ``avg4``: the series' name in file names and tables."""
        return f"{self.method}{self.window}"

    @property
    def name(self) -> str:
        """The run's display name, beside the training run's: ``base avg4``."""
        return f"{self.run} {self.series}"

    @property
    def summary_digest(self) -> str:
        """A hash of the tables and the report: a tracker re-sends them only when it changed."""
        digest = hashlib.sha256(json.dumps([[t.name, t.columns, t.rows] for t in self.tables], default=str).encode())
        if self.report is not None:
            digest.update(self.report.read_bytes())
        return digest.hexdigest()

    def points_after(self, held: set[int]) -> tuple[list[Point], list[int]]:
        """For a tracker whose steps only go forward (TensorBoard, W&B) and that holds the steps ``held``: the
        points past the last of them, and the steps it lacks before that one, which it cannot take any more (a
        checkpoint that landed after a later one was exported)."""
        last = max(held, default=-1)
        return ([point for point in self.points if point.step > last],
                [point.step for point in self.points if point.step < last and point.step not in held])


@dataclass(frozen=True)
class Results:
    """Where the workflow's results are (`ckpt-stability export` defaults to the workflow's layout)."""

    scores: Path
    tables: Path
    plan: Path
    """results/plan.json: its methods (the configured averaging methods among them) and their order"""
    perplexity: Path | None = None
    """results/perplexity: each model's file is read where it is (perplexity is measured when configured)"""
    targets: Path | None = None
    """results/tables/targets.csv, read where it is (the fine-tuning stage writes it)"""
    report: Path | None = None
    """read where it is"""


def _metric_names(frame: pd.DataFrame) -> None:
    """Refuse a task named like a category, or like a metric of this module: both would be one metric."""
    tasks, categories = set(frame["task"]), set(frame["category"])
    clash = (tasks & categories) | ((tasks | categories) & {OVERALL, PERPLEXITY, FINETUNED})
    if clash:
        raise InputError(f"cannot export: {', '.join(sorted(clash))} would name two metrics (eval/<task>, "
                         f"eval/<category>, eval/{OVERALL}, eval/{PERPLEXITY}, eval/{FINETUNED}); rename the task")


def _score_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """step x metric name: the tasks', categories' and overall scores of one series (NaN where excluded)."""
    wide = scores.pivot(index="step", columns="task", values="score")
    category_of = dict(zip(scores["task"], scores["category"]))
    frame = pd.concat([wide, category_means(wide, category_of), overall_score(wide, category_of).rename(OVERALL)],
                      axis=1)
    return frame.add_prefix(PREFIX)


def _perplexity(directory: Path, run: str, method: str, window: int, step: int) -> float:
    path = Path(layout.perplexity(str(directory), run=run, method=method, n=window, step=step))
    if not path.is_file():
        return math.nan
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return math.nan if EXCLUDED_KEY in record else float(record["perplexity"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a perplexity file of this workflow ({error})") from None


def _read(path: Path, read, columns: set[str], what: str) -> pd.DataFrame:
    """The table at ``path`` (``read``: pandas' reader of its format), refused unless it has ``columns``."""
    try:
        frame = read(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read {what} ({error})") from None
    missing = columns - set(frame.columns)
    if missing:
        raise InputError(f"{path}: not {what} (no column {', '.join(sorted(missing))})")
    return frame


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV of results/tables/, names kept as text (a run called 2024); not with the report's reader, which
    would import the plotting libraries."""
    return pd.read_csv(path, dtype={"run": str, "level": str, "name": str, "method": str})


SERIES_KEYS = ["run", "method", "window"]


def _of_series(frame: pd.DataFrame, run: str, method: str, window: int) -> pd.DataFrame:
    """The rows of ``frame`` that belong to one score series."""
    return frame[(frame["run"] == run) & (frame["method"] == method) & (frame["window"] == window)]


def _tables(run: str, method: str, window: int,
            tables: dict[str, pd.DataFrame]) -> tuple[SummaryTable, ...]:
    result = []
    for name, frame in tables.items():
        rows = _of_series(frame, run, method, window)
        if len(rows):  # raw has no improvement over itself
            rows = rows.astype(object).where(rows.notna(), None)
            result.append(SummaryTable(name, tuple(rows.columns), tuple(map(tuple, rows.itertuples(index=False)))))
    return tuple(result)


def read_tracker_runs(results: Results) -> list[TrackerRun]:
    """Every score series of the results as a TrackerRun, by run, then raw first and the methods' order."""
    keys = set(SERIES_KEYS)
    scores = _read(results.scores, pd.read_parquet, keys | {"task", "category", "step", "score"},
                   "the workflow's scores table")
    _metric_names(scores)
    tables = {name: _read(results.tables / f"{name}.csv", _read_csv, keys, f"the workflow's {name} table")
              for name in TABLES}
    targets = None
    if results.targets and results.targets.is_file():
        targets = _read(results.targets, _read_csv, keys | {"step", "target"}, "the fine-tuning stage's targets")
    report = results.report if results.report and results.report.is_file() else None
    registry = Plan.from_json(results.plan).registry
    runs = []
    order = {name: position for position, name in enumerate(registry.names)}
    all_series = scores[SERIES_KEYS].drop_duplicates()
    all_series = all_series.sort_values(SERIES_KEYS, key=lambda c: c.map(order) if c.name == "method" else c)
    for run, method, window in all_series.itertuples(index=False):
        window = int(window)
        metrics = _score_metrics(_of_series(scores, run, method, window))
        if results.perplexity and registry[method].produced_by == EVALUATE:
            metrics[PREFIX + PERPLEXITY] = [_perplexity(results.perplexity, run, method, window, int(step))
                                            for step in metrics.index]
        if targets is not None:
            tuned = _of_series(targets, run, method, window).set_index("step")["target"]
            metrics[PREFIX + FINETUNED] = tuned.reindex(metrics.index)
        points = tuple(Point(int(step), {name: float(value) for name, value in row.items() if pd.notna(value)})
                       for step, row in metrics.sort_index().iterrows() if row.notna().any())
        runs.append(TrackerRun(run, method, window, points, _tables(run, method, window, tables), report))
    return runs
