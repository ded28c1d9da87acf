"""The report: ``results/report/report.html``, one self-contained page, and its figures as PNG files
under ``figures/{run}/`` (and ``figures/indicators/``) beside it.

Per run the page shows, summary first: the steadiest method and window and how much the mean total
variation (MTV) dropped, the best checkpoint by each method; the score trajectories per task and per
category; MTV and instability against the window size; the stability and improvement tables (sortable);
an example-level view of the raw checkpoints. Then, across runs, the pretraining indicators (how well
each proxy orders the models by the target); and the settings that produced the results. Figures are
embedded as data URIs and the few lines of script are inline, so the page needs no network and no other
file.

Every comparison with raw uses the same tasks on both sides: ``prob`` covers the choice tasks only, so
its raw baseline is the raw checkpoints' mean over those tasks.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ckpt_stability import __version__
from ckpt_stability import methods as registry
from ckpt_stability.atomic import atomic_directory, write_text
from ckpt_stability.errors import InputError
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan
from ckpt_stability.predictions import METADATA_KEY, read_table
from ckpt_stability.stability import IMPROVEMENT_COLUMNS, KEYS, STABILITY_COLUMNS, excluded_models

RAW = registry.RAW.name
METHODS = [method.name for method in registry.METHODS]
METHOD_LABELS = {method.name: method.label for method in registry.METHODS}
METHOD_COLORS = {method.name: method.color for method in registry.METHODS}
METHOD_STYLES = {method.name: method.style for method in registry.METHODS}
HEATMAP_EXAMPLES = 20
HEATMAP_STEPS = 120
"""The heatmaps show at most this many of the last steps (always the whole final segment)."""
SEGMENT_COLOR = "#e6e6e6"
EXCLUDED_STYLE = {"color": "#c0392b", "ls": ":", "lw": 1.4}
SCORE_COLORS = LinearSegmentedColormap.from_list("score", ["#e8912d", "#f7f7f7", "#2166ac"])
DPI = 110
REPORT_PACKAGES = ["numpy", "pandas", "pyarrow", "matplotlib", "seaborn", "jinja2"]
STABILITY_SHOWN = [*KEYS[1:], *STABILITY_COLUMNS, "excluded_steps"]
"""the stability table's columns in the report (the run is that of its section)"""
INDICATOR_COLUMNS = ["proxy", "kind", "method", "window", "task", "n_models", "n_pairs", "pairwise_accuracy",
                     "kendall_tau", "spread"]
INDICATOR_SCORE_PROXIES = 15
INDICATOR_COLORS = {"score": "#0173b2", "perplexity": "#cc78bc", "comparator": "#de8f05"}
IMPROVEMENT_SHOWN = [*KEYS[1:], *IMPROVEMENT_COLUMNS]


@dataclass
class Figure:
    title: str
    caption: str
    path: str
    """relative to the report"""
    data_uri: str


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


# ---------------------------------------------------------------- inputs


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
        frame = self._wide[method][window][tasks]
        categories = pd.concat([frame[group].mean(axis=1, skipna=False)
                                for group in pd.Series(tasks).groupby([self._category[t] for t in tasks]).agg(list)],
                               axis=1)
        return categories.mean(axis=1, skipna=False).dropna()


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


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: table is missing")
    # names stay strings even where they look like numbers (a run called 2024)
    frame = pd.read_csv(path, dtype={"run": str, "level": str, "name": str, "method": str, "category": str,
                                     "excluded_steps": str})
    return frame.fillna({"excluded_steps": ""}) if "excluded_steps" in frame else frame


# ---------------------------------------------------------------- figures


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
    """Rows: tasks or task groups; columns: the stabilising methods, each window against raw."""
    segment = plan.segment(run)
    windows = sorted(w for w in plan.windows if w > 1)
    columns = [m for m in METHODS[1:] if m in plan.methods and windows] or [RAW]
    window_colors = dict(zip(windows, sns.color_palette("flare", len(windows))))
    figure = MplFigure(figsize=(1.2 + 3.6 * len(columns), 0.9 + 2.0 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), sharex=True, sharey="row", squeeze=False)
    for r, (label, tasks) in enumerate(rows):
        for c, method in enumerate(columns):
            ax = axes[r][c]
            tasks_here = plan.covered_tasks(method, tasks)
            ax.axvspan(segment[0], segment[-1], color=SEGMENT_COLOR, zorder=0)
            if r == 0:
                ax.set_title(f"{method}: {METHOD_LABELS[method]}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{label}\nscore", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("step")
            ax.tick_params(labelsize=8)
            if not tasks_here:
                ax.text(0.5, 0.5, "choice tasks only", ha="center", va="center", transform=ax.transAxes,
                        color="#777777")
                continue
            if method != RAW:
                for window in windows:
                    values = series.mean(method, window, tasks_here)
                    ax.plot(values.index, values.to_numpy(), color=window_colors[window], lw=2.0)
            # raw thin and on top, so that it stays visible where a window's line coincides with it
            raw = series.mean(RAW, 1, tasks_here)
            ax.plot(raw.index, raw.to_numpy(), color=METHOD_COLORS[RAW], **METHOD_STYLES[RAW])
            for step in series.excluded_raw_steps:
                ax.axvline(step, **EXCLUDED_STYLE)
    handles = ([Line2D([], [], color=METHOD_COLORS[RAW], **METHOD_STYLES[RAW], label="raw (n = 1)")]
               + [Line2D([], [], color=window_colors[w], lw=2.0, label=f"n = {w}") for w in windows]
               + [Patch(color=SEGMENT_COLOR, label="final segment")]
               + [Line2D([], [], label="excluded checkpoint", **EXCLUDED_STYLE)] * bool(series.excluded_raw_steps))
    figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False)
    return figure


def window_figure(plan: Plan, table: pd.DataFrame, improvement: pd.DataFrame,
                  groups: list[tuple[str, str, list[str]]]) -> MplFigure:
    """MTV and instability against the window size, one line per method, one row per group. Each line
    starts at n = 1 from raw on the method's own tasks (a window of one is the raw checkpoint), as the
    improvement table gives it."""
    methods = [m for m in METHODS[1:] if m in plan.methods]
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
                method_rows = rows[rows["method"] == method]
                baseline = baselines.loc[baselines["method"] == method, f"{metric}_raw"]
                if not plan.covered_tasks(method, tasks) or method_rows.empty or baseline.empty:
                    continue
                values = [float(baseline.iloc[0]), *method_rows[metric]]
                ax.plot([1, *method_rows["window"]], values, color=METHOD_COLORS[method], **METHOD_STYLES[method])
                top = max(top, *values)
            ax.set_xscale("log", base=2)
            ax.set_xticks(windows, [str(w) for w in windows])
            ax.minorticks_off()
            ax.set_ylim(0, 1.15 * top or 1)
            ax.tick_params(labelsize=8)
            ax.set_title(f"{name}: {'MTV' if metric == 'mtv' else 'instability'}", fontsize=10)
            if r == len(groups) - 1:
                ax.set_xlabel("window n")
    handles = [Line2D([], [], color=METHOD_COLORS[m], label=m, **METHOD_STYLES[m]) for m in methods]
    if handles:
        figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False)
    return figure


def variant_label(method: str, window: int) -> str:
    return RAW if method == RAW else f"{method} n={window}"


def flips_figure(table: pd.DataFrame, tasks: list[str]) -> MplFigure:
    """The share of examples that ever flip in the final segment, per task and method/window."""
    rows = table[table["level"] == "task"]
    variants = sorted(set(zip(rows["method"], rows["window"])), key=lambda v: (METHODS.index(v[0]), v[1]))
    palette = {}
    for method in METHODS:
        windows = [w for m, w in variants if m == method]
        shades = sns.light_palette(METHOD_COLORS[method], len(windows) + 2)[2:]
        palette.update({variant_label(method, w): shade for w, shade in zip(windows, shades)})
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
    """Pairwise accuracy of the proxies: the best score proxies, every 1/PPL proxy and the comparator."""
    rows = pd.concat([table[table["kind"] == "score"].head(INDICATOR_SCORE_PROXIES), table[table["kind"] != "score"]])
    rows = rows.dropna(subset=["pairwise_accuracy"]).sort_values("pairwise_accuracy", ascending=False)
    figure = MplFigure(figsize=(7.5, 1.0 + 0.26 * len(rows)), layout="constrained")
    ax = figure.subplots()
    colors = [INDICATOR_COLORS[kind] for kind in rows["kind"]]
    ax.barh(rows["proxy"], rows["pairwise_accuracy"], xerr=rows["spread"].fillna(0), color=colors)
    ax.axvline(0.5, color="#555555", ls="--", lw=1)
    ax.text(0.5, -0.9, " chance", fontsize=8, color="#555555", va="bottom")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pairwise accuracy (share of model pairs ordered as the target)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(handles=[Patch(color=color, label=kind) for kind, color in INDICATOR_COLORS.items()
                       if kind in set(rows["kind"])], fontsize=8, loc="lower right")
    return figure


def indicators_section(table: pd.DataFrame, figures: FigureWriter) -> dict:
    scores = table[table["kind"] == "score"].dropna(subset=["pairwise_accuracy"])
    perplexity = table[table["kind"] == "perplexity"].dropna(subset=["pairwise_accuracy"])
    comparator = table[table["kind"] == "comparator"].dropna(subset=["pairwise_accuracy"])
    raw = scores[scores["method"] == RAW]
    stabilised = scores[scores["method"] != RAW]
    return {
        "target": table["target"].iloc[0] if len(table) else "",
        "best": scores.iloc[0].to_dict() if len(scores) else None,
        "best_raw": raw.iloc[0].to_dict() if len(raw) else None,
        "best_stabilised": stabilised.iloc[0].to_dict() if len(stabilised) else None,
        "perplexity": perplexity.iloc[0].to_dict() if len(perplexity) else None,
        "comparator": comparator.iloc[0].to_dict() if len(comparator) else None,
        "figure": figures.save(indicators_figure(table), "indicators/pairwise_accuracy", "Pairwise accuracy of the proxies",
                               f"The {INDICATOR_SCORE_PROXIES} best score proxies, every 1/PPL proxy and the learned "
                               f"comparator (its bar: the mean over random splits of the models, with their "
                               f"standard deviation). Chance is 0.5."),
        "table": {"columns": INDICATOR_COLUMNS,
                  "rows": [[_cell(column, value) for column, value in zip(INDICATOR_COLUMNS, row)]
                           for row in table[INDICATOR_COLUMNS].itertuples(index=False)]},
    }


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


# ---------------------------------------------------------------- summary


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
                         "instability": float(row["instability"]), "raw_instability": float(baseline["instability_raw"]),
                         "instability_ratio": float(baseline["instability_ratio"])})

    def steadiness(variant: dict) -> float:  # no ratio (raw's MTV is 0): nothing to improve on
        return variant["mtv_ratio"] if np.isfinite(variant["mtv_ratio"]) else np.inf

    steadiest = min(variants, key=steadiness, default=None)
    if steadiest is not None and not steadiness(steadiest) < 1:
        steadiest = None

    methods = []
    for method in [m for m in METHODS if m == RAW or m in plan.methods]:
        tasks = plan.covered_tasks(method)
        windows = [1] if method == RAW else sorted(w for w in plan.windows if w > 1)
        if not tasks or not windows:
            continue
        best = None
        for window in windows:
            values = series.mean(method, window, tasks)
            if best is None or values.max() > best["score"]:
                best = {"step": int(values.idxmax()), "window": window, "score": float(values.max())}
        mine = [v for v in variants if v["method"] == method]
        methods.append({"method": method, "label": METHOD_LABELS[method], "choice_only": len(tasks) < len(plan.tasks),
                        "best": best, "steadiest": min(mine, key=steadiness, default=None)})
    raw_overall = overall.loc[(RAW, 1)]
    return {"variants": variants, "steadiest": steadiest, "methods": methods, "segment": plan.segment(run),
            "raw_mtv": float(raw_overall["mtv"]), "raw_instability": float(raw_overall["instability"]),
            "raw_flipped": float(raw_overall["ever_flipped"])}


# ---------------------------------------------------------------- tables


def _cell(column: str, value) -> dict:
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


def html_table(frame: pd.DataFrame, columns: list[str]) -> dict:
    order = {"overall": 0, "category": 1, "task": 2}
    frame = frame.sort_values(["level", "name", "method", "window"],
                              key=lambda col: col.map(order) if col.name == "level" else
                              col.map(METHODS.index) if col.name == "method" else col)
    return {"columns": columns,
            "rows": [[_cell(column, value) for column, value in zip(columns, row)]
                     for row in frame[columns].itertuples(index=False)]}


# ---------------------------------------------------------------- settings


def _distinct(values) -> list:
    seen = {}
    for value in values:
        seen.setdefault(json.dumps(value, sort_keys=True, ensure_ascii=False), value)
    return list(seen.values())


def settings_section(plan: Plan, settings: dict, raw: dict[str, dict[str, RawTask]]) -> tuple[dict, list[str]]:
    """The settings that produced the results, from the prediction files' provenance; a task file or prompt
    hash that differs between checkpoints is reported as a warning."""
    warnings = []
    provenances = {task: [p for run in raw for p in raw[run][task].provenance] for task in plan.tasks}
    tasks = []
    for task, records in provenances.items():
        configured = settings.get("tasks", {}).get(task, {})
        hashes = {key: _distinct(get(p) for p in records) for key, get in {
            "task_sha256": lambda p: p.get("task", {}).get("sha256"),
            "prompts_sha256": lambda p: p.get("prompt", {}).get("prompts_sha256"),
            "template_sha256": lambda p: p.get("prompt", {}).get("template_sha256"),
        }.items()}
        for key, values in hashes.items():
            if len(values) > 1:
                warnings.append(f"task {task}: the raw predictions carry {len(values)} different {key} values")
        last = records[-1]
        tasks.append({"name": task, "category": plan.tasks[task].category, "mode": plan.tasks[task].mode,
                      "metric": last.get("task", {}).get("metric"),
                      "num_fewshot": last.get("prompt", {}).get("num_fewshot", configured.get("num_fewshot")),
                      "max_samples": configured.get("max_samples"), "examples": len(raw[next(iter(raw))][task].example_ids),
                      "path": configured.get("path", last.get("task", {}).get("path")), **hashes})
    records = [p for run in raw for task in raw[run] for p in raw[run][task].provenance]
    runs = []
    for run, steps in plan.runs.items():
        first_task = next(iter(plan.tasks))
        runs.append({"name": run, "checkpoints": len(steps), "first_step": steps[0], "last_step": steps[-1],
                     "segment": plan.segment(run),
                     "first_model": raw[run][first_task].provenance[0].get("model_path"),
                     "last_model": raw[run][first_task].provenance[-1].get("model_path")})
    report_versions = {"ckpt_stability": __version__, "python": platform.python_version()}
    report_versions.update({name: metadata.version(name) for name in REPORT_PACKAGES})
    return {
        "runs": runs,
        "windows": plan.windows,
        "methods": plan.methods,
        "final_fraction": plan.final_fraction,
        "tasks": tasks,
        "templates": _distinct(p.get("prompt", {}).get("template") for p in records),
        "stop": _distinct(p.get("prompt", {}).get("stop") for p in records),
        "inference": _distinct({"backend": p.get("backend"), "versions": p.get("versions")} for p in records),
        "report_versions": report_versions,
        "plan_json": json.dumps(dataclasses.asdict(plan), indent=1, ensure_ascii=False),
        "settings_json": json.dumps(settings, indent=1, ensure_ascii=False, sort_keys=True),
    }, warnings


# ---------------------------------------------------------------- the page


def run_section(plan: Plan, run: str, scores: pd.DataFrame, stability: pd.DataFrame, improvement: pd.DataFrame,
                raw: dict[str, RawTask], figures: FigureWriter) -> dict:
    table = stability[stability["run"] == run]
    series = ScoreSeries(scores, run)
    tasks = list(plan.tasks)
    categories = list(dict.fromkeys(plan.tasks[task].category for task in tasks))
    groups = [("overall", "overall", tasks)] + [
        ("category", category, [t for t in tasks if plan.tasks[t].category == category]) for category in categories]
    directory = safe_name(run)
    segment = plan.segment(run)
    segment_text = f"steps {segment[0]}–{segment[-1]}, {len(segment)} checkpoints"

    trajectories = [
        figures.save(trajectory_figure(plan, run, series, [(f"{t} ({plan.tasks[t].category})", [t]) for t in tasks]),
                     f"{directory}/trajectories_tasks", "Score per task",
                     f"Each panel: the raw checkpoints (dark) and every window of one method; the shaded band is the "
                     f"final segment ({segment_text}), on which the stability metrics are computed."),
        figures.save(trajectory_figure(plan, run, series, [(name, group) for _, name, group in groups]),
                     f"{directory}/trajectories_categories", "Score overall and per category",
                     "The mean of the tasks' scores. In the prob column, raw is averaged over the same (choice) tasks "
                     "as prob, so the lines are comparable."),
    ]
    improvement = improvement[improvement["run"] == run]
    by_window = figures.save(
        window_figure(plan, table, improvement, groups), f"{directory}/stability_by_window",
        "MTV and instability against the window size",
        "Lower is steadier. Every line starts at n = 1 from the raw checkpoints on the method's own tasks "
        "(a window of one checkpoint is the raw checkpoint).")
    flips = figures.save(flips_figure(table, tasks), f"{directory}/ever_flipped",
                         "Share of examples whose score ever changes in the final segment",
                         "Per task, for the raw checkpoints and every method and window.")
    heatmaps, flip_stats = [], []
    for task in tasks:
        figure, stats = example_heatmap(task, segment, raw[task])
        heatmaps.append(figures.save(
            figure, f"{directory}/examples_{safe_name(task)}", task,
            f"{stats['shown']} of {stats['examples']} examples; {stats['flipped_all']:.0%} of the examples change "
            f"their score at least once over the run, {stats['flipped_segment']:.0%} in the final segment."))
        flip_stats.append(stats)
    return {
        "name": run,
        "anchor": safe_name(run),
        "segment_text": segment_text,
        "summary": summarise(plan, run, series, table, improvement),
        "excluded": excluded_models(scores[scores["run"] == run]).to_dict("records"),
        "trajectories": trajectories,
        "by_window": by_window,
        "flips": flips,
        "heatmaps": heatmaps,
        "flip_stats": flip_stats,
        "heatmap_steps": HEATMAP_STEPS,
        "heatmap_examples": HEATMAP_EXAMPLES,
        "stability_groups": html_table(table[table["level"] != "task"], STABILITY_SHOWN),
        "stability_tasks": html_table(table[table["level"] == "task"], STABILITY_SHOWN),
        "improvement_groups": html_table(improvement[improvement["level"] != "task"], IMPROVEMENT_SHOWN),
        "improvement_tasks": html_table(improvement[improvement["level"] == "task"], IMPROVEMENT_SHOWN),
    }


def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("ckpt_stability", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["score"] = lambda value: f"{value:.3f}"
    environment.filters["num"] = lambda value: f"{value:.3g}"
    environment.filters["percent"] = lambda value: f"{value:.0%}"
    return environment


def build_report(plan: Path, scores: Path, tables: Path, settings: Path, output: Path) -> None:
    """Write ``output`` (the HTML page) and its figures under ``figures/`` beside it; the indicators
    section when ``tables`` holds indicators.csv."""
    plan = Plan.from_json(plan)
    scores_frame = pd.read_parquet(scores)
    stability = _read_csv(tables / "stability.csv")
    improvement = _read_csv(tables / "improvement.csv")
    try:
        settings_data = json.loads(Path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{settings}: unreadable evaluation settings ({error})") from None
    raw = {run: read_raw(plan, run) for run in plan.runs}
    with (sns.axes_style("whitegrid"), sns.plotting_context("paper"),
          atomic_directory(output.parent / "figures") as directory):
        writer = FigureWriter(directory, "figures")
        runs = [run_section(plan, run, scores_frame, stability, improvement, raw[run], writer) for run in plan.runs]
        indicators = (indicators_section(pd.read_csv(tables / "indicators.csv", dtype={"task": str, "target": str}),
                                         writer)
                      if (tables / "indicators.csv").is_file() else None)
    settings_view, warnings = settings_section(plan, settings_data, raw)
    page = _environment().get_template("report.html.j2").render(
        runs=runs, indicators=indicators, settings=settings_view, warnings=warnings, tasks=list(plan.tasks),
        methods=[m for m in METHODS if m == RAW or m in plan.methods], method_labels=METHOD_LABELS, raw_method=RAW)
    write_text(output, page)
