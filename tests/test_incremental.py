"""Incremental reruns: after a complete run, a new checkpoint brings exactly its own jobs and the reductions;
a checkpoint still being copied is left out until it is complete."""

import re
import shutil

import pytest
import yaml

from helpers import small_config, snakemake

# Jobs that run whenever the run's checkpoints change: the plan lists the steps, and every reduction reads it.
REDUCTIONS = {("plan", ""), ("scores", ""), ("stability", ""), ("pick", ""), ("indicators", ""), ("report", ""),
              ("all", "")}


def jobs_for(step):
    """What a new last checkpoint at ``step`` needs with windows 1 and 2: its raw evaluation, and the
    average (with its evaluation) and the ensembles of the window of 2 that ends at it."""
    return {
        ("evaluate", f"run=tiny, method=raw, n=1, step={step}"),
        ("average", f"run=tiny, n=2, step={step}"),
        ("evaluate", f"run=tiny, method=avg, n=2, step={step}"),
        ("ensemble", f"run=tiny, n=2, step={step}"),
    }


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
    """A complete run over a copy of the tiny demo's checkpoints (10 to 40), which the tests add to."""
    workdir = tmp_path_factory.mktemp("incremental")
    shutil.copytree(tiny_demo / "checkpoints", workdir / "checkpoints")
    config = small_config(workdir / "checkpoints", tiny_demo / "tasks")
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


def test_a_new_checkpoint_runs_only_its_own_jobs_and_the_reductions(finished_run, checkpoints):
    shutil.copytree(checkpoints / "checkpoint-40", checkpoints / "checkpoint-50")
    jobs, _ = planned_jobs(finished_run)
    assert jobs == jobs_for(50) | REDUCTIONS


def test_a_checkpoint_being_copied_is_picked_up_once_complete(finished_run, checkpoints):
    copying = checkpoints / "checkpoint-60"
    copying.mkdir()
    shutil.copy(checkpoints / "checkpoint-40" / "config.json", copying)  # the weights are not there yet
    jobs, log = planned_jobs(finished_run)
    assert jobs == set()
    assert re.search(rf"skipping incomplete checkpoint {re.escape(str(copying))} \(neither model.safetensors", log)

    shutil.copytree(checkpoints / "checkpoint-40", copying, dirs_exist_ok=True)
    jobs, log = planned_jobs(finished_run)
    assert jobs == jobs_for(60) | REDUCTIONS
    assert "incomplete" not in log
