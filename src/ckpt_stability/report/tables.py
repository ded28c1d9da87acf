"""The report's sortable tables: which columns it shows, and how each cell reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ckpt_stability.stability import IMPROVEMENT_COLUMNS, KEYS, STABILITY_COLUMNS
from ckpt_stability.report.summary import SCHEME_COLUMNS, SchemeWindow

STABILITY_SHOWN = [*KEYS[1:], *STABILITY_COLUMNS, "excluded_steps"]
"""the stability table's columns in the report (the run is that of its section)"""
INDICATOR_COLUMNS = ["proxy", "kind", "method", "window", "task", "n_models", "n_pairs", "pairwise_accuracy",
                     "accuracy_ci_low", "accuracy_ci_high", "accuracy_within_run", "accuracy_across_runs", "kendall_tau", "spread"]
IMPROVEMENT_SHOWN = [*KEYS[1:], *IMPROVEMENT_COLUMNS]


def table_cell(column: str, value) -> dict:
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return {"text": "–", "value": "", "class": "number"}
        css = "number"
        if column.endswith("_ratio"):
            css += " better" if value < 1 else " worse" if value > 1 else ""
        elif column == "delta_mean_score":
            css += " better" if value > 0 else " worse" if value < 0 else ""
        return {"text": f"{value:.4g}", "value": repr(float(value)), "class": css}
    if isinstance(value, (int, np.integer)):
        return {"text": str(value), "value": str(value), "class": "number"}
    return {"text": str(value), "value": str(value), "class": ""}


def cells(frame: pd.DataFrame, columns: list[str]) -> dict:
    """``columns`` of ``frame``, in its row order, as the page's sortable table."""
    return {"columns": columns,
            "rows": [[table_cell(column, value) for column, value in zip(columns, row)]
                     for row in frame[columns].itertuples(index=False)]}


def html_table(frame: pd.DataFrame, columns: list[str], method_order: list[str]) -> dict:
    """A stability or improvement table: overall rows first, then categories, then tasks; within a group the
    methods in ``method_order`` (the registry's), each by window."""
    order = {"overall": 0, "category": 1, "task": 2}
    frame = frame.sort_values(["level", "name", "method", "window"],
                              key=lambda col: col.map(order) if col.name == "level" else
                              col.map(method_order.index) if col.name == "method" else col)
    return cells(frame, columns)


def scheme_table(rows: list[SchemeWindow]) -> dict:
    """The scheme × window view as a sortable table, in the order of ``rows``."""
    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows],
                         columns=[field.name for field in dataclasses.fields(SchemeWindow)])
    frame["tasks"] = np.where(frame["choice_only"], "choice only", "all")
    return cells(frame, SCHEME_COLUMNS)
