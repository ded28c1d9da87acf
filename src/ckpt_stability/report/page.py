"""The page: each run's section and the indicators section, assembled from the figures, summary and
tables, rendered with the templates, and written with its figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from jinja2 import Environment, PackageLoader, StrictUndefined

from ckpt_stability.atomic import atomic_directory, write_text
from ckpt_stability.errors import InputError
from ckpt_stability.plan import Plan
from ckpt_stability.stability import excluded_models
from ckpt_stability.layout import WEIGHTS
from ckpt_stability.report.style import (HEATMAP_EXAMPLES, HEATMAP_STEPS, INDICATOR_PROXIES_PER_KIND, RAW,
                                         shown_methods)
from ckpt_stability.report.inputs import RawTask, ScoreSeries, read_raw, read_csv_table
from ckpt_stability.indicators import PERPLEXITY_PROXY, WEIGHTS_PROXY, read_weights, score_proxies
from ckpt_stability.report.figures import (FigureWriter, example_heatmap, flips_figure, indicators_figure,
                                           key_proxies_figure, pick_figure, safe_name, scheme_figure, targets_figure,
                                           trajectory_figure, variant_label, weights_figure, window_figure)
from ckpt_stability.report.tables import (STABILITY_SHOWN, INDICATOR_COLUMNS, IMPROVEMENT_SHOWN, cells, html_table,
                                          scheme_table)
from ckpt_stability.weight_movement import COLUMNS as WEIGHT_COLUMNS, TOTAL
from ckpt_stability.report.summary import pick_answer, scheme_windows, summarise
from ckpt_stability.report.provenance import settings_section


@dataclass(frozen=True)
class Pick:
    """pick.csv and pick_checkpoints.parquet."""

    table: pd.DataFrame
    checkpoints: pd.DataFrame


def run_section(plan: Plan, run: str, scores: pd.DataFrame, stability: pd.DataFrame, improvement: pd.DataFrame,
                pick: Pick, weights: pd.DataFrame, raw: dict[str, RawTask], figures: FigureWriter) -> dict:
    methods = shown_methods(plan)
    method_order = [method.name for method in methods]
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
    weights = weights[weights["run"] == run]
    if len(weights):  # measured by the averages: none without an averaging method
        trajectories.append(figures.save(
            weights_figure(weights, plan.runs[run], segment, series.excluded_raw_steps, methods),
            f"{directory}/weights", "How far the weights move",
            "On the step axis of the scores: each checkpoint's relative distance to the previous one, "
            "‖θ_step − θ_previous‖ / ‖θ_previous‖, over the whole model (dark) and per parameter group (faint); "
            "below it, the mean relative distance of a window's checkpoints to their average, per averaging "
            "method and window (results/tables/weights.csv)."))
    improvement = improvement[improvement["run"] == run]
    by_window = figures.save(
        window_figure(plan, table, improvement, groups), f"{directory}/stability_by_window",
        "MTV and instability against the window size",
        "Lower is steadier. Every line starts at n = 1 from the raw checkpoints on the method's own tasks "
        "(a window of one checkpoint is the raw checkpoint).")
    schemes = scheme_windows(plan, run, table)
    scheme_plot = figures.save(
        scheme_figure(schemes, methods), f"{directory}/schemes", "What each method and window buys, and its lag",
        "Over all tasks, on the final segment: each method's mean score, MTV and instability against its lag, the "
        "mean of step − effective step (Σ c_j s_j of the window's checkpoints with the scheme's coefficients c_j); "
        "one point per window, marked with n. Raw is the star at lag 0. Lower MTV and instability for less lag is "
        "the better trade.")
    flips = figures.save(flips_figure(table, tasks, methods), f"{directory}/ever_flipped",
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
    summary = summarise(plan, run, series, table, improvement)
    answer = pick_answer(pick.table, run, summary["steadiest"])
    pick_plot = figures.save(
        pick_figure(pick.checkpoints[(pick.checkpoints["run"] == run) & (pick.checkpoints["level"] == "overall")],
                    [(row["method"], row["window"], variant_label(row["method"], row["window"])
                      + (" (choice tasks)" if row["choice_only"] else "")) for row in answer]),
        f"{directory}/pick", "Which checkpoint to pick",
        "The overall score of every checkpoint with its 95 % interval (band); dots: the checkpoints that cannot "
        "be told apart from the recommended one (Model Confidence Set, 5 %); star: the recommended one.")
    return {
        "name": run,
        "anchor": safe_name(run),
        "segment_text": segment_text,
        "summary": summary,
        "pick": answer,
        "pick_figure": pick_plot,
        "excluded": excluded_models(scores[scores["run"] == run]).to_dict("records"),
        "trajectories": trajectories,
        "by_window": by_window,
        "schemes": {"table": scheme_table(schemes), "figure": scheme_plot},
        "flips": flips,
        "heatmaps": heatmaps,
        "flip_stats": flip_stats,
        "heatmap_steps": HEATMAP_STEPS,
        "heatmap_examples": HEATMAP_EXAMPLES,
        "stability_groups": html_table(table[table["level"] != "task"], STABILITY_SHOWN, method_order),
        "stability_tasks": html_table(table[table["level"] == "task"], STABILITY_SHOWN, method_order),
        "improvement_groups": html_table(improvement[improvement["level"] != "task"], IMPROVEMENT_SHOWN, method_order),
        "improvement_tasks": html_table(improvement[improvement["level"] == "task"], IMPROVEMENT_SHOWN, method_order),
    }


def key_proxies(table: pd.DataFrame) -> pd.DataFrame:
    """The proxies of Zeng et al.'s question: the raw checkpoint's 1/PPL, weight movement and overall score, the
    best stabilised overall score, and the learned comparator (those the table has)."""
    overall = table[(table["kind"] == "score") & (table["task"] == "overall")].dropna(subset=["pairwise_accuracy"])
    stabilised = overall[overall["method"] != RAW].head(1)
    chosen = [table[table["proxy"] == f"{PERPLEXITY_PROXY} {RAW}1"],
              table[table["proxy"] == f"{WEIGHTS_PROXY} {TOTAL} {RAW}1"], overall[overall["method"] == RAW],
              stabilised, table[table["kind"] == "comparator"]]
    return pd.concat(chosen).dropna(subset=["pairwise_accuracy"])


def indicators_section(table: pd.DataFrame, figures: FigureWriter, scores: pd.DataFrame,
                       targets: pd.DataFrame | None) -> dict:
    scores_rows = table[table["kind"] == "score"].dropna(subset=["pairwise_accuracy"])
    perplexity = table[table["kind"] == "perplexity"].dropna(subset=["pairwise_accuracy"])
    comparator = table[table["kind"] == "comparator"].dropna(subset=["pairwise_accuracy"])
    raw = scores_rows[scores_rows["method"] == RAW]
    stabilised = scores_rows[scores_rows["method"] != RAW]
    key = key_proxies(table)
    section = {
        "target": table["target"].iloc[0] if len(table) else "",
        "best": scores_rows.iloc[0].to_dict() if len(scores_rows) else None,
        "best_raw": raw.iloc[0].to_dict() if len(raw) else None,
        "best_stabilised": stabilised.iloc[0].to_dict() if len(stabilised) else None,
        "perplexity": perplexity.iloc[0].to_dict() if len(perplexity) else None,
        "comparator": comparator.iloc[0].to_dict() if len(comparator) else None,
        "key": [row._asdict() for row in key.itertuples(index=False)],
        "figures": [figures.save(indicators_figure(table), "indicators/pairwise_accuracy",
                                 "Pairwise accuracy of the proxies",
                                 f"The {INDICATOR_PROXIES_PER_KIND} best proxies of each kind (scores, 1/PPL, "
                                 f"weight movement) and the learned comparator (its bar: the mean over random "
                                 f"splits of the models, with their standard deviation). Chance is 0.5.")],
        "table": cells(table, INDICATOR_COLUMNS),
    }
    if len(key):
        section["figures"].append(figures.save(
            key_proxies_figure(key), "indicators/key_proxies", "The key proxies, within and across runs",
            "Pairwise accuracy over all pairs of models, over the pairs of two checkpoints of one run (which "
            "checkpoint to pick) and over the pairs of checkpoints of two runs (which run to pick)."))
    if targets is not None:
        finetuned = targets[(targets["method"] == RAW) & targets["target"].notna()]
        target_tasks = " ".join(sorted(set(finetuned["tasks"])))
        section["figures"].append(figures.save(
            targets_figure(finetuned, score_proxies(scores).get(f"overall {RAW}1", pd.Series(dtype=float))),
            "indicators/targets", "The fine-tuning outcome of each checkpoint",
            f"Each fine-tuned raw checkpoint's overall score on the target tasks ({target_tasks}; solid), beside "
            f"the same checkpoint's overall score on the evaluation tasks before fine-tuning (dashed)."))
    return section


def template_environment() -> Environment:
    environment = Environment(loader=PackageLoader("ckpt_stability", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["score"] = lambda value: f"{value:.3f}"
    environment.filters["num"] = lambda value: f"{value:.3g}"
    environment.filters["percent"] = lambda value: f"{value:.0%}"
    return environment


def build_report(plan: Path, scores: Path, tables: Path, settings: Path, output: Path,
                 targets: Path | None = None) -> None:
    """Write ``output`` (the HTML page) and its figures under ``figures/`` beside it; the indicators
    section when ``tables`` holds indicators.csv, with the fine-tuning outcomes of ``targets`` (the
    fine-tuning stage's targets.csv) when given; the weight movement where ``tables`` holds weights.csv
    with rows."""
    plan = Plan.from_json(plan)
    scores_frame = pd.read_parquet(scores)
    stability = read_csv_table(tables / "stability.csv")
    improvement = read_csv_table(tables / "improvement.csv")
    pick = Pick(read_csv_table(tables / "pick.csv"), pd.read_parquet(tables / "pick_checkpoints.parquet"))
    # the workflow writes weights.csv beside the other tables, header only when nothing measured the weights
    weights_path = tables / Path(WEIGHTS).name
    weights = read_weights(weights_path) if weights_path.is_file() else pd.DataFrame(columns=WEIGHT_COLUMNS)
    try:
        settings_data = json.loads(Path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{settings}: unreadable evaluation settings ({error})") from None
    raw = {run: read_raw(plan, run) for run in plan.runs}
    with (sns.axes_style("whitegrid"), sns.plotting_context("paper"),
          atomic_directory(output.parent / "figures") as directory):
        writer = FigureWriter(directory, "figures")
        runs = [run_section(plan, run, scores_frame, stability, improvement, pick, weights, raw[run], writer)
                for run in plan.runs]
        indicators = (indicators_section(pd.read_csv(tables / "indicators.csv", dtype={"task": str, "target": str}),
                                         writer, scores_frame, read_csv_table(targets) if targets else None)
                      if (tables / "indicators.csv").is_file() else None)
    settings_view, warnings = settings_section(plan, settings_data, raw)
    page = template_environment().get_template("report.html.j2").render(
        runs=runs, indicators=indicators, settings=settings_view, warnings=warnings, tasks=list(plan.tasks),
        methods=[m.name for m in shown_methods(plan)], method_labels={m.name: m.label for m in plan.registry.methods},
        raw_method=RAW)
    write_text(output, page)
