"""Incremental reruns of a run averaged with three schemes (uniform, wsm, ema) over windows 1, 2 and 4: every scheme
reaches the tables, the weight distances and the report; a new checkpoint brings exactly its own jobs and the
reductions; a checkpoint still being copied is left out until it is complete."""

import re
import shutil

import pandas as pd
import pytest
import yaml

from ckpt_stability.averaging_schemes import Scheme
from helpers import small_config, snakemake

# Jobs that run whenever the run's checkpoints change: the plan lists the steps, and every reduction reads it.
REDUCTIONS = {("plan", ""), ("scores", ""), ("stability", ""), ("pick", ""), ("indicators", ""), ("report", ""),
              ("weights", ""), ("all", "")}
AVERAGING = {"avg": {"scheme": "uniform"}, "wsm": {"scheme": "wsm", "shape": "1-sqrt"},
             "ema": {"scheme": "ema", "half_life": 20}}
WINDOWS = [2, 4]
STEPS = [10, 20, 30, 40, 50, 60]


def jobs_for(step):
    """What a new last checkpoint at ``step`` needs: its raw evaluation, and for each window the averages of every
    scheme (with their evaluations) and the ensembles of the window that ends at it."""
    return {("evaluate", f"run=tiny, method=raw, n=1, step={step}")} | {
        job for n in WINDOWS for job in [
            *((rule, f"run=tiny, method={method}, n={n}, step={step}") for method in AVERAGING
              for rule in ("average", "evaluate")),
            ("ensemble", f"run=tiny, n={n}, step={step}")]}


def planned_jobs(workdir):
    """The (rule, wildcards) of every job a dry run plans, and the run's log."""
    result = snakemake(workdir, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = set()
    for block in re.split(r"\n\s*\n", result.stdout):
        rule = re.search(r"^\s*(?:local)?rule (\w+):", block, re.MULTILINE)
        if rule:
            wildcards = re.search(r"^\s*wildcards: (.*)$", block, re.MULTILINE)
            jobs.add((rule.group(1), wildcards.group(1) if wildcards else ""))
    return jobs, result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished_run(tiny_demo, tmp_path_factory):
    """A complete run over a copy of the tiny demo's checkpoints (10 to 40, then 50 and 60 as copies of 20 and 30: a
    window of 4 needs 6 checkpoints for a final segment of 3), which the tests add to."""
    workdir = tmp_path_factory.mktemp("incremental")
    shutil.copytree(tiny_demo / "checkpoints", workdir / "checkpoints")
    for step, source in [(50, 20), (60, 30)]:
        shutil.copytree(tiny_demo / "checkpoints" / f"checkpoint-{source}",
                        workdir / "checkpoints" / f"checkpoint-{step}")
    config = small_config(workdir / "checkpoints", tiny_demo / "tasks")
    del config["tasks"]["demo_arith"]  # two tasks show it all; the generated one is the slowest
    config.update(windows=[1, *WINDOWS], averaging=AVERAGING, methods=[*AVERAGING, "vote", "prob"])
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(workdir)[0] == set()
    return workdir


@pytest.fixture
def checkpoints(finished_run):
    """The run's checkpoint directory; checkpoints a test adds are removed after it."""
    directory = finished_run / "checkpoints"
    before = set(directory.iterdir())
    yield directory
    for added in set(directory.iterdir()) - before:
        shutil.rmtree(added)


def test_every_scheme_reaches_the_tables_the_weights_and_the_report(finished_run):
    stability = pd.read_csv(finished_run / "results/tables/stability.csv")
    overall = stability[stability["level"] == "overall"].set_index(["method", "window"])
    assert set(overall.index) == {("raw", 1)} | {(method, n) for method in [*AVERAGING, "vote", "prob"]
                                                 for n in WINDOWS}
    segment = STEPS[-3:]  # the lag: step minus the effective step Σ c_j s_j, averaged over the final segment
    for method, settings in AVERAGING.items():
        for n in WINDOWS:
            lags = [step - sum(c * s for c, s in zip(Scheme(**settings).coefficients(STEPS[i - n + 1:i + 1]),
                                                      STEPS[i - n + 1:i + 1]))
                    for i, step in enumerate(STEPS) if step in segment]
            assert overall.loc[(method, n), "lag"] == pytest.approx(sum(lags) / 3, rel=1e-12)
    assert overall.loc[("avg", 4), "lag"] == 15 and overall.loc[("vote", 4), "lag"] == 15
    assert overall.loc[("raw", 1), "lag"] == 0
    assert overall.loc[("wsm", 4), "lag"] > overall.loc[("avg", 4), "lag"] > overall.loc[("ema", 4), "lag"]

    scores = pd.read_parquet(finished_run / "results/scores.parquet")
    wsm = scores[(scores["method"] == "wsm") & (scores["window"] == 2) & (scores["step"] == 20)]
    oldest_weighs_most = 10 * 0.5 ** 0.5 + 20 * (1 - 0.5 ** 0.5)
    assert list(wsm["effective_step"]) == pytest.approx([oldest_weighs_most] * len(wsm), rel=1e-15)

    weights = pd.read_csv(finished_run / "results/tables/weights.csv")
    total = weights[weights["group"] == "total"]
    raw = total[total["method"] == "raw"]
    assert list(raw["step"]) == STEPS[1:] and list(raw["previous_step"]) == STEPS[:-1]
    # 50 is a copy of 20, 60 of 30: the same weights, the same distance from 50 to 60 as from 20 to 30
    assert raw.set_index("step").loc[60, "relative_distance"] == \
        raw.set_index("step").loc[30, "relative_distance"] > 0
    averaged = total[total["method"] != "raw"]
    assert set(zip(averaged["method"], averaged["window"])) == {(m, n) for m in AVERAGING for n in WINDOWS}

    indicators = pd.read_csv(finished_run / "results/tables/indicators.csv").set_index("proxy")
    for method in AVERAGING:
        for n in WINDOWS:
            assert {f"overall {method}{n}", f"-Δθ/θ total {method}{n}"} <= set(indicators.index)
    assert indicators.loc["-Δθ/θ total raw1", "kind"] == "weights"

    report = (finished_run / "results/report/report.html").read_text()
    for method, settings in AVERAGING.items():
        assert Scheme(**settings).description in report


def test_a_new_checkpoint_runs_only_its_own_jobs_and_the_reductions(finished_run, checkpoints):
    shutil.copytree(checkpoints / "checkpoint-40", checkpoints / "checkpoint-70")
    jobs, _ = planned_jobs(finished_run)
    assert jobs == jobs_for(70) | REDUCTIONS


def test_a_checkpoint_being_copied_is_picked_up_once_complete(finished_run, checkpoints):
    copying = checkpoints / "checkpoint-80"
    copying.mkdir()
    shutil.copy(checkpoints / "checkpoint-40" / "config.json", copying)  # the weights are not there yet
    jobs, log = planned_jobs(finished_run)
    assert jobs == set()
    assert re.search(rf"skipping incomplete checkpoint {re.escape(str(copying))} \(neither model.safetensors", log)

    shutil.copytree(checkpoints / "checkpoint-40", copying, dirs_exist_ok=True)
    jobs, log = planned_jobs(finished_run)
    assert jobs == jobs_for(80) | REDUCTIONS
    assert "incomplete" not in log
