"""The HTML report, built from small synthetic predictions and tables, and opened in headless Chromium."""

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image

from ckpt_stability.indicators import indicators_table, read_targets, score_proxies
from ckpt_stability.plan import Plan
from ckpt_stability.pick import pick_tables
from ckpt_stability.predictions import Predictions, write_predictions
from ckpt_stability.report import build_report
from ckpt_stability.stability import gather_scores, improvement_table, stability_table, write_scores, write_table
from ckpt_stability.weight_movement import COLUMNS as WEIGHT_COLUMNS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TASKS = {"t1": {"category": "C1", "mode": "choice"}, "t2": {"category": "C2", "mode": "choice"},
         "t3": {"category": "C2", "mode": "generate"}}
RUNS = {"main": list(range(100, 1100, 100)), "second": [5, 10, 15, 20, 25, 30]}
AVERAGING = {"wsm": {"scheme": "wsm", "shape": "1-sqrt", "windows": [3]}}
"""an averaging method besides avg, computed for the window of 3 only"""
EXAMPLES = 12
# Examples 0..k-1 of a series are right on even steps and wrong on odd ones, so its task score alternates
# and its MTV is k / EXAMPLES: vote with a window of 3 is flat, hence the steadiest.
FLIPPING = {("raw", 1): 6, ("avg", 2): 4, ("avg", 3): 3, ("wsm", 3): 2, ("vote", 2): 3, ("vote", 3): 0,
            ("prob", 2): 4, ("prob", 3): 2}
WEIGHT_GROUPS = {"total": 1.0, "attention": 1.5, "mlp": 0.5}
"""group -> its share of the total movement in the hand-made weights.csv"""
TASK_SHA = {task: f"{index}" * 64 for index, task in enumerate(TASKS, start=1)}
PROMPTS_SHA = "ab" * 32


def synthetic_predictions(plan: Plan, run: str, method: str, window: int, step: int, task: str) -> Predictions:
    position = plan.runs[run].index(step)
    flipping = FLIPPING[method, window]
    correct = np.array([(i % 2 == 0) if i >= flipping else (position % 2 == 0) for i in range(EXAMPLES)])
    choice = TASKS[task]["mode"] == "choice"
    return Predictions(
        example_id=np.arange(EXAMPLES), prediction=["東京" if c else "大阪" for c in correct], gold=["東京"] * EXAMPLES,
        score=correct.astype(float),
        choice_logprobs=np.log(np.where(correct[:, None], [0.7, 0.3], [0.3, 0.7])) if choice else None,
        provenance={"model_path": f"/checkpoints/{run}/checkpoint-{step}",
                    "task": {"name": task, "path": f"/tasks/{task}.json", "sha256": TASK_SHA[task],
                             "category": TASKS[task]["category"], "mode": TASKS[task]["mode"],
                             "metric": "exact_match" if choice else "char_f1",
                             "label_list": ["東京", "大阪"] if choice else None},
                    "prompt": {"num_fewshot": 2, "template": {"header": "指示: {instruction}",
                                                              "example": "\n入力: {input}\n応答: {output}"},
                               "template_sha256": "cd" * 32, "prompts_sha256": PROMPTS_SHA, "stop": ["\n"]},
                    "backend": {"backend": "transformers", "device": "cpu"}, "versions": {"ckpt_stability": "0.1.0"}})


def hand_made_weights() -> pd.DataFrame:
    """weights.csv as rule weights writes it, for run main only (run second has none): the raw checkpoints'
    relative distance to the previous one, falling as 20 / step, per group; the averages' mean distance of
    their members to the average, 0.01 · n."""
    steps = RUNS["main"]
    rows = [("main", "raw", 1, step, previous, group, share * 20 / step)
            for previous, step in zip(steps, steps[1:]) for group, share in WEIGHT_GROUPS.items()]
    rows += [("main", method, window, step, None, "total", 0.01 * window)
             for method, window in (("avg", 2), ("avg", 3), ("wsm", 3)) for step in steps[window - 1:]]
    return pd.DataFrame(rows, columns=WEIGHT_COLUMNS).astype({"previous_step": "Int64"})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    plan = Plan(runs=RUNS, windows=[1, 2, 3], methods=["avg", "wsm", "vote", "prob"], tasks=TASKS, final_fraction=0.5,
                predictions=str(root / "predictions"), averaging=AVERAGING)
    for run in plan.runs:
        for method, window, steps, tasks in plan.series(run):
            for step in steps:
                for task in tasks:
                    write_predictions(plan.path(run, method, window, step, task),
                                      synthetic_predictions(plan, run, method, window, step, task))
    scores = gather_scores(plan)
    stability = stability_table(plan, scores)
    write_scores(scores, root / "scores.parquet")
    write_table(stability, root / "tables" / "stability.csv")
    write_table(improvement_table(stability, scores), root / "tables" / "improvement.csv")
    pick, pick_checkpoints = pick_tables(plan, scores)
    write_table(pick, root / "tables" / "pick.csv")
    pick_checkpoints.to_parquet(root / "tables" / "pick_checkpoints.parquet")
    hand_made_weights().to_csv(root / "tables" / "weights.csv", index=False)
    # a fine-tuning outcome that grows with the step (the stage's targets.csv): the proxies of these alternating
    # series order it partly
    (root / "targets.csv").write_text("run,step,method,window,target,tasks,recipe,excluded\n" + "".join(
        f"{run},{step},raw,1,{index / len(steps) + (run == 'main') * 0.05},ft,\"full, 10 steps\",\n"
        for run, steps in RUNS.items() for index, step in enumerate(steps)))
    write_table(indicators_table(score_proxies(scores), read_targets(root / "targets.csv"), repeats=3),
                root / "tables" / "indicators.csv")
    (root / "plan.json").write_text(json.dumps(dataclasses.asdict(plan)))
    settings = {"tasks": {task: {**spec, "path": f"/tasks/{task}.json", "num_fewshot": 2, "max_samples": None}
                          for task, spec in TASKS.items()}, "prompt": {}, "stop": ["\n"]}
    (root / "evaluation_settings.json").write_text(json.dumps(settings, ensure_ascii=False))
    output = root / "report" / "report.html"
    build_report(plan=root / "plan.json", scores=root / "scores.parquet", tables=root / "tables",
                 settings=root / "evaluation_settings.json", output=output, targets=root / "targets.csv")
    return output


@pytest.fixture(scope="module")
def html(report) -> str:
    return report.read_text(encoding="utf-8")


def cells(html: str) -> set[str]:
    return set(re.findall(r"<td[^>]*>([^<]*)</td>", html))


def test_every_task_method_and_run_appears(html):
    assert set(TASKS) <= cells(html)
    assert {"raw", "avg", "wsm", "vote", "prob"} <= cells(html)
    for run in RUNS:
        assert f'id="summary-{run}"' in html
    for category in ("C1", "C2"):
        assert category in cells(html)


def test_figures_are_files_and_embedded(report, html):
    figures = sorted((report.parent / "figures").rglob("*.png"))
    expected = {"trajectories_tasks", "trajectories_categories", "stability_by_window", "ever_flipped", "pick",
                *(f"examples_{task}" for task in TASKS)}
    assert ({(path.parent.name, path.stem) for path in figures}
            == {(run, name) for run in RUNS for name in {*expected, "schemes"}}
            | {("main", "weights")}  # run second has no rows in weights.csv: no figure
            | {("indicators", name) for name in ("pairwise_accuracy", "key_proxies", "targets")})
    for path in figures:
        assert base64.b64encode(path.read_bytes()).decode("ascii") in html
    assert html.count('src="data:image/png;base64,') == len(figures)


def run_html(html: str, run: str) -> str:
    start = html.index(f'<h2 id="{run}">')
    return html[start:html.index("<h2", start + 1)]


def scheme_rows(html: str, run: str) -> list[list[str]]:
    """The scheme × window table of a run's section: each row's cells' exact values (data-value)."""
    section = run_html(html, run)
    section = section[section.index("<h3>Schemes and windows"):section.index("<h3>Tables")]
    body = section[section.index("<tbody>"):section.index("</tbody>")]
    return [re.findall(r'data-value="([^"]*)"', row) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_the_scheme_window_view_shows_every_method_and_window_with_its_lag(report, html):
    """One row per method and window in the registry's order (wsm at its only window), with the overall rows'
    mean score, MTV and instability of stability.csv, and the lag: for the uniform mean and the ensembles on
    equally spaced checkpoints (n − 1) / 2 spacings; for wsm the mean over the final segment of step − Σ c_j s_j."""
    plan = Plan.from_json(report.parent.parent / "plan.json")
    stability = pd.read_csv(report.parent.parent / "tables" / "stability.csv")
    for run, spacing in (("main", 100), ("second", 5)):
        rows = scheme_rows(html, run)
        assert [(row[0], int(row[2])) for row in rows] == [
            ("raw", 1), ("avg", 2), ("avg", 3), ("wsm", 3), ("vote", 2), ("vote", 3), ("prob", 2), ("prob", 3)]
        assert [row[1] for row in rows[:4]] == ["raw checkpoint", "uniform", "uniform", "wsm 1-sqrt"]
        assert [row[3] for row in rows] == ["all"] * 6 + ["choice only"] * 2
        lags = {(row[0], int(row[2])): float(row[7]) for row in rows}
        wsm_lag = np.mean([step - plan.effective_step(run, "wsm", 3, step) for step in plan.segment(run)])
        assert lags == pytest.approx({("raw", 1): 0, ("avg", 2): spacing / 2, ("avg", 3): spacing,
                                      ("wsm", 3): wsm_lag, ("vote", 2): spacing / 2, ("vote", 3): spacing,
                                      ("prob", 2): spacing / 2, ("prob", 3): spacing})
        assert wsm_lag > spacing  # WSM weighs the early updates fully and the late ones less: more lag than avg
        overall = stability[(stability.run == run) & (stability.level == "overall")].set_index(["method", "window"])
        for row in rows:
            expected = overall.loc[(row[0], int(row[2])), ["mean_score", "mtv", "instability", "lag"]]
            assert [float(value) for value in row[4:8]] == pytest.approx(expected.tolist())


def test_the_weights_figure_draws_weights_csv():
    """Each raw checkpoint's movement per group and in total, and each average's spread, as weights.csv has them."""
    from ckpt_stability.report.figures import weights_figure

    weights = hand_made_weights()
    plan = Plan(runs=RUNS, windows=[1, 2, 3], methods=["avg", "wsm"], tasks=TASKS, averaging=AVERAGING)
    averaging = [plan.registry["avg"], plan.registry["wsm"]]
    figure = weights_figure(weights, RUNS["main"], plan.segment("main"), [], averaging)
    movement, spread = figure.axes
    lines = {line.get_label(): line for line in movement.get_lines()}
    assert set(lines) == {"whole model", "attention", "mlp"}  # groups without rows are not drawn
    for label, group in (("whole model", "total"), ("attention", "attention"), ("mlp", "mlp")):
        assert lines[label].get_xdata().tolist() == RUNS["main"][1:]
        expected = [WEIGHT_GROUPS[group] * 20 / step for step in RUNS["main"][1:]]
        assert lines[label].get_ydata() == pytest.approx(expected)
    assert movement.get_yscale() == "log"
    lines = {line.get_label(): line for line in spread.get_lines()}
    assert set(lines) == {"avg n=2", "avg n=3", "wsm n=3"}
    assert lines["wsm n=3"].get_xdata().tolist() == RUNS["main"][2:]
    assert lines["wsm n=3"].get_ydata() == pytest.approx([0.03] * 8)
    # the step axis of the score trajectories: the run's first to last step, with matplotlib's margins
    assert spread.get_xlim() == pytest.approx((100 - 45, 1000 + 45))


def test_an_empty_weights_table_gives_no_weights_figure(report, tmp_path):
    """Without averages nothing measured the weights: weights.csv has its header only, and the report has no
    weights figure (and no error)."""
    root = report.parent.parent
    shutil.copytree(root / "tables", tmp_path / "tables")
    pd.DataFrame(columns=WEIGHT_COLUMNS).to_csv(tmp_path / "tables" / "weights.csv", index=False)
    output = tmp_path / "report" / "report.html"
    build_report(plan=root / "plan.json", scores=root / "scores.parquet", tables=tmp_path / "tables",
                 settings=root / "evaluation_settings.json", output=output)
    assert not list((output.parent / "figures").rglob("weights.png"))
    assert "How far the weights move" not in output.read_text(encoding="utf-8")
    assert "How far the weights move" in report.read_text(encoding="utf-8")


def test_summary_opens_with_the_pick(report, html):
    """Each run's summary answers which checkpoint to pick: raw's and the steadiest method's recommended step,
    its score and interval, and how many checkpoints are indistinguishable from it, as pick.csv has them."""
    pick = pd.read_csv(report.parent.parent / "tables" / "pick.csv")
    for run in RUNS:
        summary = html[html.index(f'id="summary-{run}"'):]
        summary = summary[:summary.index("</div>")]
        table = summary[summary.index('class="pick-table"'):]
        raw = pick[(pick.run == run) & (pick.method == "raw") & (pick.level == "overall")].iloc[0]
        row = re.search(r"<td>raw</td>\s*<td[^>]*>(\d+)</td>\s*<td[^>]*>([\d.]+) \(([\d.]+)–([\d.]+)\)</td>\s*"
                        r"<td[^>]*>(\d+) of (\d+)</td>", table)
        assert row, table[:2000]
        assert int(row[1]) == raw.recommended_step
        assert float(row[2]) == pytest.approx(raw.score, abs=5e-4)
        assert float(row[3]) <= float(row[2]) <= float(row[4])
        assert (int(row[5]), int(row[6])) == (raw.set_size, raw.range_size)
        assert "(the steadiest)" in table


def test_indicators_section_names_the_target_and_the_proxies(html):
    section = html[html.index('<h2 id="indicators">'):html.index('<h2 id="settings">')]
    assert "<b>fine-tuned (full, 10 steps), overall on ft: " in section and "targets.csv</b>" in section
    assert re.search(r"Learned comparator: 0\.\d{3} ± 0\.\d{3}", section)
    # the key proxies over all pairs, those within a run and those across the two runs
    assert re.search(r"<code>overall raw1</code>: 0\.\d{3} /\s*0\.\d{3} /\s*0\.\d{3}", section)
    assert {"overall raw1", "overall vote3", "t1 avg2", "learned comparator"} <= cells(section)


def test_the_page_is_self_contained(html):
    assert not re.search(r"https?://", html)
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert references and all(ref.startswith(("data:", "#")) for ref in references), references


def test_summary_names_the_steadiest_method(html):
    summary = html[html.index('id="summary-main"'):html.index("<h3>")]
    assert '<span class="steadiest-method">vote</span>' in summary
    assert '<span class="steadiest-window">3</span>' in summary
    assert "MTV dropped by 100%" in summary
    for method in ("raw", "avg", "wsm", "vote", "prob"):
        assert re.search(rf"<td>{method} — ", summary), method


def test_the_summary_takes_its_baselines_from_the_improvement_table(report, html):
    from ckpt_stability.report.page import template_environment

    number = template_environment().filters["num"]
    improvement = pd.read_csv(report.parent.parent / "tables" / "improvement.csv")
    vote3 = improvement[(improvement.run == "main") & (improvement.level == "overall") & (improvement.method == "vote")
                        & (improvement.window == 3)].iloc[0]
    summary = html[html.index('id="summary-main"'):html.index("<h3>")]
    assert f"against {number(vote3.mtv_raw)} for the raw checkpoints" in summary
    assert re.search(rf"goes from\s+{re.escape(number(vote3.instability_raw))} to", summary)


def test_settings_show_hashes_and_checkpoints(html):
    for sha in [*TASK_SHA.values(), PROMPTS_SHA]:
        assert f'title="{sha}"' in html
    assert "/checkpoints/main/checkpoint-100" in html and "/checkpoints/main/checkpoint-1000" in html
    assert 'class="warning"' not in html  # the hashes agree across checkpoints: no warning


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed when missing (CI runs as root); no browser is downloaded by playwright."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install it")
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            if result.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is still missing after apt-get install chromium")
    return CHROMIUM


def test_opens_in_headless_chromium_without_errors(report, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(report.as_uri(), wait_until="load")
        assert page.evaluate("Array.from(document.images).every((img) => img.complete && img.naturalWidth > 0)")
        # sorting: a click on the mtv header of the first table orders its rows by mtv
        table = page.locator("table.sortable").first
        table.locator("th", has_text="mtv").first.click()
        column = table.evaluate("(t) => Array.from(t.querySelectorAll('th')).findIndex((th) => th.textContent === 'mtv')")
        values = table.evaluate(f"(t) => Array.from(t.tBodies[0].rows).map((r) => Number(r.cells[{column}].dataset.value))")
        screenshot = page.screenshot(full_page=True)
        browser.close()
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert values == sorted(values) and len(values) > 1
    (tmp_path / "report.png").write_bytes(screenshot)
    pixels = (image.imread(io.BytesIO(screenshot), format="png")[..., :3] * 255).astype(np.uint32)
    colours = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert pixels.shape[0] > 2000  # the full page, figures included
    assert len(colours) > 200
    assert (pixels < 230).any(axis=-1).mean() > 0.02  # not a blank white page
