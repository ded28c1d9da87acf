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

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TASKS = {"t1": {"category": "C1", "mode": "choice"}, "t2": {"category": "C2", "mode": "choice"},
         "t3": {"category": "C2", "mode": "generate"}}
RUNS = {"main": list(range(100, 1100, 100)), "second": [5, 10, 15, 20, 25, 30]}
EXAMPLES = 12
# Examples 0..k-1 of a series are right on even steps and wrong on odd ones, so its task score alternates
# and its MTV is k / EXAMPLES: vote with a window of 3 is flat, hence the steadiest.
FLIPPING = {("raw", 1): 6, ("avg", 2): 4, ("avg", 3): 3, ("vote", 2): 3, ("vote", 3): 0, ("prob", 2): 4, ("prob", 3): 2}
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


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    plan = Plan(runs=RUNS, windows=[1, 2, 3], methods=["avg", "vote", "prob"], tasks=TASKS, final_fraction=0.5,
                predictions=str(root / "predictions"))
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
    assert {"raw", "avg", "vote", "prob"} <= cells(html)
    for run in RUNS:
        assert f'id="summary-{run}"' in html
    for category in ("C1", "C2"):
        assert category in cells(html)


def test_figures_are_files_and_embedded(report, html):
    figures = sorted((report.parent / "figures").rglob("*.png"))
    expected = {"trajectories_tasks", "trajectories_categories", "stability_by_window", "ever_flipped", "pick",
                *(f"examples_{task}" for task in TASKS)}
    assert ({(path.parent.name, path.stem) for path in figures}
            == {(run, name) for run in RUNS for name in expected}
            | {("indicators", name) for name in ("pairwise_accuracy", "key_proxies", "targets")})
    for path in figures:
        assert base64.b64encode(path.read_bytes()).decode("ascii") in html
    assert html.count('src="data:image/png;base64,') == len(figures)


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
    for method in ("raw", "avg", "vote", "prob"):
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
