"""The summary at the top of each run's section: every method and window against raw, the steadiest of
them, and each method's best checkpoint; and the scheme × window view, what each method and window buys in
steadiness and what it costs in lag."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ckpt_stability.errors import InputError
from ckpt_stability.plan import Plan
from ckpt_stability.report.style import RAW, series_windows
from ckpt_stability.report.inputs import ScoreSeries


def summarise(plan: Plan, run: str, series: ScoreSeries, table: pd.DataFrame, improvement: pd.DataFrame) -> dict:
    """Every method and window against raw on the same tasks (overall, from the improvement table), the
    steadiest of them, and the best checkpoint of each method over the whole run."""
    overall = table[table["level"] == "overall"].set_index(["method", "window"])
    against_raw = improvement[improvement["level"] == "overall"].set_index(["method", "window"])
    variants = []
    for method, window, _, tasks in plan.series(run)[1:]:
        if not tasks:
            continue
        row, baseline = overall.loc[(method, window)], against_raw.loc[(method, window)]
        variants.append({"method": method, "window": window, "choice_only": len(tasks) < len(plan.tasks),
                         "mtv": float(row["mtv"]), "raw_mtv": float(baseline["mtv_raw"]),
                         "mtv_ratio": float(baseline["mtv_ratio"]),
                         "instability": float(row["instability"]),
                         "raw_instability": float(baseline["instability_raw"]),
                         "instability_ratio": float(baseline["instability_ratio"])})

    def steadiness(variant: dict) -> float:  # no ratio (raw's MTV is 0): nothing to improve on
        return variant["mtv_ratio"] if np.isfinite(variant["mtv_ratio"]) else np.inf

    steadiest = min(variants, key=steadiness, default=None)
    if steadiest is not None and not steadiness(steadiest) < 1:
        steadiest = None

    methods = []
    for method, windows in series_windows(plan, run).items():
        tasks = plan.covered_tasks(method)
        if not tasks:
            continue
        best = None
        for window in windows:
            values = series.mean(method, window, tasks)
            if best is None or values.max() > best["score"]:
                best = {"step": int(values.idxmax()), "window": window, "score": float(values.max())}
        mine = [v for v in variants if v["method"] == method]
        methods.append({"method": method, "label": plan.registry[method].label,
                        "choice_only": len(tasks) < len(plan.tasks),
                        "best": best, "steadiest": min(mine, key=steadiness, default=None)})
    raw_overall = overall.loc[(RAW, 1)]
    return {"variants": variants, "steadiest": steadiest, "methods": methods, "segment": plan.segment(run),
            "raw_mtv": float(raw_overall["mtv"]), "raw_instability": float(raw_overall["instability"]),
            "raw_flipped": float(raw_overall["ever_flipped"])}


def pick_answer(pick: pd.DataFrame, run: str, steadiest: dict | None) -> list[dict]:
    """The pick over ``overall`` (pick.csv) of the raw checkpoints and of the steadiest method and window:
    the recommended step, its score and interval, and how many checkpoints are indistinguishable from it."""
    overall = pick[(pick["run"] == run) & (pick["level"] == "overall")].set_index(["method", "window"])
    variants = [(RAW, 1)] + ([(steadiest["method"], steadiest["window"])] if steadiest else [])
    return [{"method": method, "window": window, "choice_only": bool(steadiest and method != RAW
                                                                     and steadiest["choice_only"]),
             **overall.loc[(method, window)].to_dict()}
            for method, window in variants if (method, window) in overall.index]


@dataclass(frozen=True)
class SchemeWindow:
    """One method at one window, over all tasks (``overall``, on the final segment): what it buys, a steadier
    score, and what it costs, its lag behind the checkpoint it is reported at."""

    method: str
    scheme: str
    """how it combines the window's checkpoints: the averaging scheme, or the ensemble's label"""
    window: int
    choice_only: bool
    """the method scores the choice tasks only (prob), so its values are over those"""
    mean_score: float
    mtv: float
    instability: float
    lag: float
    """the mean over the final segment of step − effective step (Σ c_j s_j of the window's members)"""


SCHEME_COLUMNS = ["method", "scheme", "window", "tasks", "mean_score", "mtv", "instability", "lag"]
"""The scheme × window table's columns in the report."""


def scheme_windows(plan: Plan, run: str, table: pd.DataFrame) -> list[SchemeWindow]:
    """Raw, then every stabilising method at each of its windows, in the registry's order, from the run's
    ``overall`` rows of the stability table."""
    if "lag" not in table.columns:
        raise InputError("stability.csv has no lag column: it was written by an older version, run its rule again")
    overall = table[table["level"] == "overall"].set_index(["method", "window"])
    rows = []
    for name, windows in series_windows(plan, run).items():
        method = plan.registry[name]
        for window in windows:
            if (name, window) not in overall.index:  # a method without a task of its mode (prob) has no row
                continue
            row = overall.loc[(name, window)]
            rows.append(SchemeWindow(name, method.scheme.description if method.scheme else method.label, window,
                                     len(plan.covered_tasks(name)) < len(plan.tasks), float(row["mean_score"]),
                                     float(row["mtv"]), float(row["instability"]), float(row["lag"])))
    return rows
