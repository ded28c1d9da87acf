"""The report's figures, each drawn from the tables and the inputs, and saved as a PNG file that the page
also embeds."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ckpt_stability.methods import Method
from ckpt_stability.plan import Plan
from ckpt_stability.report.style import (DPI, EXCLUDED_STYLE, HEATMAP_EXAMPLES, HEATMAP_STEPS, INDICATOR_COLORS,
                                         INDICATOR_PROXIES_PER_KIND, RAW, SCORE_COLORS, SEGMENT_COLOR,
                                         WEIGHT_TOTAL_STYLE, series_windows, shown_methods)
from ckpt_stability.report.inputs import RawTask, ScoreSeries
from ckpt_stability.report.summary import SchemeWindow
from ckpt_stability.weight_movement import GROUPS, TOTAL


@dataclass
class Figure:
    title: str
    caption: str
    path: str
    """relative to the report"""
    data_uri: str


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class FigureWriter:
    """Saves each figure as a PNG file and keeps it as a data URI for the page."""

    def __init__(self, directory: Path, relative_to: str):
        self.directory = directory
        self.relative_to = relative_to

    def save(self, figure: MplFigure, name: str, title: str, caption: str) -> Figure:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
        data = buffer.getvalue()
        path = self.directory / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return Figure(title, caption, f"{self.relative_to}/{path.relative_to(self.directory).as_posix()}",
                      "data:image/png;base64," + base64.b64encode(data).decode("ascii"))


def trajectory_figure(plan: Plan, run: str, series: ScoreSeries, rows: list[tuple[str, list[str]]]) -> MplFigure:
    """Rows: tasks or task groups; columns: the stabilising methods, each of its windows against raw."""
    segment = plan.segment(run)
    methods = shown_methods(plan)
    raw_method = methods[0]
    series_of = series_windows(plan, run)
    columns = [method for method in methods[1:] if method.name in series_of] or [raw_method]
    windows = sorted({window for method in columns for window in series_of[method.name] if window > 1})
    window_colors = dict(zip(windows, sns.color_palette("flare", len(windows))))
    figure = MplFigure(figsize=(1.2 + 3.6 * len(columns), 0.9 + 2.0 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), sharex=True, sharey="row", squeeze=False)
    for r, (label, tasks) in enumerate(rows):
        for c, method in enumerate(columns):
            ax = axes[r][c]
            tasks_here = plan.covered_tasks(method.name, tasks)
            ax.axvspan(segment[0], segment[-1], color=SEGMENT_COLOR, zorder=0)
            if r == 0:
                ax.set_title(f"{method.name}: {method.label}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{label}\nscore", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("step")
            ax.tick_params(labelsize=8)
            if not tasks_here:
                ax.text(0.5, 0.5, "choice tasks only", ha="center", va="center", transform=ax.transAxes,
                        color="#777777")
                continue
            if method is not raw_method:
                for window in series_of[method.name]:
                    values = series.mean(method.name, window, tasks_here)
                    ax.plot(values.index, values.to_numpy(), color=window_colors[window], lw=2.0)
            # raw thin and on top, so that it stays visible where a window's line coincides with it
            raw = series.mean(RAW, 1, tasks_here)
            ax.plot(raw.index, raw.to_numpy(), color=raw_method.color, **raw_method.style)
            for step in series.excluded_raw_steps:
                ax.axvline(step, **EXCLUDED_STYLE)
    handles = ([Line2D([], [], color=raw_method.color, **raw_method.style, label="raw (n = 1)")]
               + [Line2D([], [], color=window_colors[w], lw=2.0, label=f"n = {w}") for w in windows]
               + [Patch(color=SEGMENT_COLOR, label="final segment")]
               + [Line2D([], [], label="excluded checkpoint", **EXCLUDED_STYLE)] * bool(series.excluded_raw_steps))
    figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False)
    return figure


def pick_figure(checkpoints: pd.DataFrame, variants: list[tuple[str, int, str]]) -> MplFigure:
    """The overall score of each variant (method, window, label) with its 95 % interval as a band, the
    checkpoints indistinguishable from the recommended one marked, the recommended one starred."""
    figure = MplFigure(figsize=(9, 3.4), layout="constrained")
    ax = figure.subplots()
    colors = sns.color_palette("colorblind", len(variants))
    for (method, window, label), color in zip(variants, colors):
        rows = checkpoints[(checkpoints["method"] == method) & (checkpoints["window"] == window)
                           & checkpoints["excluded"].isna()].sort_values("step")
        ax.fill_between(rows["step"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.18, lw=0)
        ax.plot(rows["step"], rows["score"], color=color, lw=1.2, label=label)
        kept = rows[rows["in_set"]]
        ax.scatter(kept["step"], kept["score"], color=color, s=14, zorder=3,
                   label=f"{label}: indistinguishable from its pick")
        best = rows[rows["recommended"]]
        ax.scatter(best["step"], best["score"], color=color, marker="*", s=160, edgecolor="black", lw=0.6, zorder=4,
                   label=f"{label}: recommended")
    ax.set_xlabel("step")
    ax.set_ylabel("overall score")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return figure


def window_figure(plan: Plan, table: pd.DataFrame, improvement: pd.DataFrame,
                  groups: list[tuple[str, str, list[str]]]) -> MplFigure:
    """MTV and instability against the window size, one line per method, one row per group. Each line
    starts at n = 1 from raw on the method's own tasks (a window of one is the raw checkpoint), as the
    improvement table gives it."""
    methods = shown_methods(plan)[1:]
    windows = sorted(plan.windows)
    figure = MplFigure(figsize=(8.5, 0.9 + 2.2 * len(groups)), layout="constrained")
    axes = figure.subplots(len(groups), 2, squeeze=False)
    for r, (level, name, tasks) in enumerate(groups):
        rows = table[(table["level"] == level) & (table["name"] == name)].sort_values("window")
        baselines = improvement[(improvement["level"] == level) & (improvement["name"] == name)]
        for c, metric in enumerate(["mtv", "instability"]):
            ax = axes[r][c]
            top = 0.0
            for method in methods:
                method_rows = rows[rows["method"] == method.name]
                baseline = baselines.loc[baselines["method"] == method.name, f"{metric}_raw"]
                if not plan.covered_tasks(method.name, tasks) or method_rows.empty or baseline.empty:
                    continue
                values = [float(baseline.iloc[0]), *method_rows[metric]]
                ax.plot([1, *method_rows["window"]], values, color=method.color, **method.style)
                top = max(top, *values)
            ax.set_xscale("log", base=2)
            ax.set_xticks(windows, [str(w) for w in windows])
            ax.minorticks_off()
            ax.set_ylim(0, 1.15 * top or 1)
            ax.tick_params(labelsize=8)
            ax.set_title(f"{name}: {'MTV' if metric == 'mtv' else 'instability'}", fontsize=10)
            if r == len(groups) - 1:
                ax.set_xlabel("window n")
    handles = [Line2D([], [], color=m.color, label=m.name, **m.style) for m in methods]
    if handles:
        figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False)
    return figure


SCHEME_METRICS = {"mean_score": "mean score", "mtv": "MTV", "instability": "instability"}
"""The scheme × window figure's panels: each against the lag."""


def scheme_figure(rows: list[SchemeWindow], methods: list[Method]) -> MplFigure:
    """Each method's overall mean score, MTV and instability against its lag behind the checkpoint, one point
    per window (marked with n), joined in window order: what a scheme buys (lower MTV and instability) and
    what it costs (lag)."""
    figure = MplFigure(figsize=(10, 3.4), layout="constrained")
    axes = figure.subplots(1, len(SCHEME_METRICS), sharex=True)
    handles = []
    for method in methods:
        mine = [row for row in rows if row.method == method.name]
        if not mine:
            continue
        style = {"marker": "*", "ms": 9, **method.style}  # raw is a single point: a marker, or it is not drawn
        for ax, metric in zip(axes, SCHEME_METRICS):
            values = [getattr(row, metric) for row in mine]
            ax.plot([row.lag for row in mine], values, color=method.color, **style)
            for row, value in zip(mine, values):
                if row.window > 1:
                    ax.annotate(str(row.window), (row.lag, value), xytext=(3, 3), textcoords="offset points",
                                fontsize=7, color=method.color)
        handles.append(Line2D([], [], color=method.color, **style,
                              label=method.name + " (choice tasks)" * mine[0].choice_only))
    for ax, title in zip(axes, SCHEME_METRICS.values()):
        ax.set_title(f"overall {title}", fontsize=10)
        ax.set_xlabel("lag (steps behind the checkpoint)", fontsize=9)
        ax.tick_params(labelsize=8)
    figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False)
    return figure


def weights_figure(weights: pd.DataFrame, steps: list[int], segment: list[int], excluded_steps: list[int],
                   methods: list[Method]) -> MplFigure:
    """How far the weights move, on the step axis of the score trajectories (``steps``: the run's): each raw
    checkpoint's relative distance to the previous one, the whole model bold and each parameter group faint;
    below it, the mean relative distance of a window's members to their average (the whole model), per averaging
    method (``methods``: those shown, for their colours) and window."""
    raw = weights[weights["method"] == RAW]
    spread = weights[(weights["method"] != RAW) & (weights["group"] == TOTAL)]
    panels = [(rows, title) for rows, title in (
        (raw, "relative distance to the previous checkpoint"),
        (spread, "mean relative distance of a window's checkpoints to their average")) if len(rows)]
    figure = MplFigure(figsize=(9, 0.8 + 2.4 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    group_colors = dict(zip(GROUPS, sns.color_palette("tab10", len(GROUPS))))
    for ax, (rows, title) in zip(axes, panels):
        ax.axvspan(segment[0], segment[-1], color=SEGMENT_COLOR, zorder=0)
        for step in excluded_steps:
            ax.axvline(step, **EXCLUDED_STYLE)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        if (rows["relative_distance"] > 0).all():  # distances shrink by orders of magnitude as training settles
            ax.set_yscale("log")
    if len(raw):
        ax = axes[0]
        for group, color in group_colors.items():
            rows = raw[raw["group"] == group].sort_values("step")
            if rows.empty:  # a model without tensors of this group
                continue
            ax.plot(rows["step"], rows["relative_distance"], color=color, lw=1.0, alpha=0.55, label=group)
        total = raw[raw["group"] == TOTAL].sort_values("step")
        ax.plot(total["step"], total["relative_distance"], **WEIGHT_TOTAL_STYLE, label="whole model")
        ax.legend(fontsize=7, ncols=4, frameon=False)
    if len(spread):
        ax = axes[-1]
        for method in methods:
            windows = sorted(set(spread.loc[spread["method"] == method.name, "window"]))
            for window, shade in zip(windows, sns.light_palette(method.color, len(windows) + 2)[2:]):
                rows = spread[(spread["method"] == method.name) & (spread["window"] == window)].sort_values("step")
                # the method's dashes keep methods of equal spread apart where their lines overlap
                ax.plot(rows["step"], rows["relative_distance"], color=shade, lw=1.6, ls=method.style.get("ls", "-"),
                        label=variant_label(method.name, window))
        ax.legend(fontsize=7, ncols=4, frameon=False)
    margin = 0.05 * (steps[-1] - steps[0])  # matplotlib's default margins around the trajectories' steps
    axes[-1].set_xlim(steps[0] - margin, steps[-1] + margin)
    axes[-1].set_xlabel("step")
    return figure


def variant_label(method: str, window: int) -> str:
    return RAW if method == RAW else f"{method} n={window}"


def flips_figure(table: pd.DataFrame, tasks: list[str], methods: list[Method]) -> MplFigure:
    """The share of examples that ever flip in the final segment, per task and method/window (``methods``:
    those shown, in order)."""
    rows = table[table["level"] == "task"]
    variants = set(zip(rows["method"], rows["window"]))
    palette = {}
    for method in methods:
        windows = sorted(w for m, w in variants if m == method.name)
        shades = sns.light_palette(method.color, len(windows) + 2)[2:]
        palette.update({variant_label(method.name, w): shade for w, shade in zip(windows, shades)})
    data = rows.assign(variant=[variant_label(m, w) for m, w in zip(rows["method"], rows["window"])])
    figure = MplFigure(figsize=(min(14.0, max(6.0, 1.5 + 0.12 * len(tasks) * len(variants))), 3.6),
                       layout="constrained")
    ax = figure.subplots()
    sns.barplot(data, x="name", y="ever_flipped", hue="variant", order=tasks, hue_order=list(palette),
                palette=palette, ax=ax)
    handles, labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()
    figure.legend(handles, labels, loc="outside upper center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    ax.set_xlabel("")
    ax.set_ylabel("share of examples that\never flip (final segment)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", labelrotation=30 if len(tasks) > 4 else 0, labelsize=8)
    return figure


def indicators_figure(table: pd.DataFrame) -> MplFigure:
    """Pairwise accuracy of the proxies: the best of each kind (score, 1/PPL, weight movement) and the comparator."""
    rows = table.groupby("kind", sort=False).head(INDICATOR_PROXIES_PER_KIND)  # the table is sorted by accuracy
    rows = rows.dropna(subset=["pairwise_accuracy"]).sort_values("pairwise_accuracy", ascending=False)
    figure = MplFigure(figsize=(7.5, 1.0 + 0.26 * len(rows)), layout="constrained")
    ax = figure.subplots()
    colors = [INDICATOR_COLORS[kind] for kind in rows["kind"]]
    # the bootstrap interval of a proxy, the spread over halvings of the comparator
    below = (rows["pairwise_accuracy"] - rows["accuracy_ci_low"]).fillna(rows["spread"]).fillna(0)
    above = (rows["accuracy_ci_high"] - rows["pairwise_accuracy"]).fillna(rows["spread"]).fillna(0)
    ax.barh(rows["proxy"], rows["pairwise_accuracy"], xerr=[below, above], color=colors)
    ax.axvline(0.5, color="#555555", ls="--", lw=1)
    ax.text(0.5, -0.9, " chance", fontsize=8, color="#555555", va="bottom")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pairwise accuracy (share of model pairs ordered as the target)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(handles=[Patch(color=color, label=kind) for kind, color in INDICATOR_COLORS.items()
                       if kind in set(rows["kind"])], fontsize=8, loc="lower right")
    return figure


PAIR_SETS = {"pairwise_accuracy": "all pairs", "accuracy_within_run": "pairs within a run",
             "accuracy_across_runs": "pairs across runs"}


def key_proxies_figure(rows: pd.DataFrame) -> MplFigure:
    """The key proxies' pairwise accuracy over all pairs, the pairs within a run and those across runs."""
    long = rows.melt(id_vars="proxy", value_vars=list(PAIR_SETS), var_name="pairs", value_name="accuracy")
    long["pairs"] = long["pairs"].map(PAIR_SETS)
    figure = MplFigure(figsize=(7.5, 1.2 + 0.55 * len(rows)), layout="constrained")
    ax = figure.subplots()
    sns.barplot(long, y="proxy", x="accuracy", hue="pairs", ax=ax, palette=["#555555", "#0173b2", "#de8f05"])
    ax.axvline(0.5, color="#555555", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("pairwise accuracy (chance 0.5)", fontsize=9)
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
    return figure


def targets_figure(targets: pd.DataFrame, pretraining: pd.Series) -> MplFigure:
    """Each run's fine-tuning outcome by step (solid), beside its raw checkpoints' overall score (dashed)."""
    figure = MplFigure(figsize=(7.5, 3.2), layout="constrained")
    ax = figure.subplots()
    for number, (run, rows) in enumerate(targets.groupby("run", sort=False)):
        color = sns.color_palette("colorblind")[number % 10]
        ax.plot(rows["step"], rows["target"], marker="o", color=color, label=f"{run}: fine-tuned")
        before = pretraining.xs(run, level="run") if run in pretraining.index.get_level_values("run") else None
        if before is not None:
            ax.plot(before.index, before.to_numpy(), ls="--", lw=1, color=color, label=f"{run}: raw, before")
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.legend(fontsize=8, ncols=2)
    return figure


def example_heatmap(task: str, segment: list[int], raw: RawTask) -> tuple[MplFigure, dict]:
    """Correct/incorrect per example and step for the examples whose raw score changes most often,
    ranked by changes in the final segment, then over all steps (the evaluated ones)."""
    steps = raw.steps
    segment = [step for step in segment if step in steps]
    changed = np.diff(raw.scores, axis=0) != 0
    in_segment = changed[len(steps) - len(segment):].sum(axis=0)
    overall = changed.sum(axis=0)
    order = np.lexsort((raw.example_ids, -overall, -in_segment))
    chosen = [i for i in order[:HEATMAP_EXAMPLES] if overall[i] > 0]
    shown_steps = steps[-max(HEATMAP_STEPS, len(segment)):]
    stats = {"task": task, "examples": len(raw.example_ids), "shown": len(chosen),
             "flipped_all": float((overall > 0).mean()), "flipped_segment": float((in_segment > 0).mean()),
             "most_changes": int(overall.max())}
    figure = MplFigure(figsize=(min(14.0, 2.8 + 0.2 * len(shown_steps)), 1.4 + 0.24 * max(len(chosen), 1)),
                       layout="constrained")
    ax = figure.subplots()
    if not chosen:
        ax.text(0.5, 0.5, "no example changes its score", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return figure, stats
    frame = pd.DataFrame(raw.scores[-len(shown_steps):, chosen].T, columns=shown_steps,
                         index=[f"#{raw.example_ids[i]} ({overall[i]}×)" for i in chosen])
    sns.heatmap(frame, ax=ax, cmap=SCORE_COLORS, vmin=0, vmax=1, linewidths=0.3, linecolor="white",
                xticklabels="auto", yticklabels=True, cbar_kws={"label": "score (1 = correct)", "shrink": 0.8})
    boundary = len(shown_steps) - len(segment)
    ax.axvline(boundary, color="black", lw=2)
    ax.annotate("final segment", xy=(boundary + len(segment) / 2, 1.0), xycoords=("data", "axes fraction"),
                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("example (score changes)")
    ax.tick_params(labelsize=7)
    return figure, stats
