"""Runs laid out as users have them, through snakemake as users start it: directories whose names hold spaces
and shell-special characters, Megatron-style zero-padded steps, the README's cron line started with a PATH whose
``python`` lacks the project, and a diverged checkpoint among healthy ones."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, small_config

AWKWARD = "my runs 'a' $HOME & (b)"
"""a directory name with a space and the shell's special characters: quoted wrong, it splits, expands or forks"""


def cron_line(config: str) -> str:
    """The README's cron entry, exactly as written there, for a given config file."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if "flock -n .rerun.lock" in line)
    command = line.split("* * * *", 1)[1].strip()
    assert command.startswith("cd /path/to/ckpt-stability && ")
    return command.removeprefix("cd /path/to/ckpt-stability && ").replace("my-config.yaml", config)


def workflow_copy(directory: Path) -> Path:
    """The repository's workflow as a user's clone has it (Snakefile, workflow/, src/, config/, profiles/), with
    its ``.venv`` being the environment that runs these tests."""
    clone = directory / "ckpt-stability"
    clone.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "src", "config", "profiles", "envs"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, clone / name)
    (clone / ".venv").symlink_to(sys.prefix)
    return clone


def megatron_layout(checkpoints: Path, directory: Path) -> str:
    """The tiny demo's checkpoints as ``iter_{step:07d}/hf``; returns the run's pattern."""
    for checkpoint in sorted(checkpoints.iterdir()):
        step = int(checkpoint.name.removeprefix("checkpoint-"))
        shutil.copytree(checkpoint, directory / f"iter_{step:07d}" / "hf")
    return f"{directory}/iter_{{step}}/hf"


@pytest.fixture(scope="module")
def cron_run(tiny_demo, tmp_path_factory):
    """The cron line run in a clone whose path, run directory and task paths all hold AWKWARD, with a PATH
    whose first ``python`` is not the project's (it fails loudly if anything calls it)."""
    root = tmp_path_factory.mktemp("user") / AWKWARD
    clone = workflow_copy(root)
    run_dir = root / "checkpoints" / AWKWARD
    run_dir.mkdir(parents=True)
    pattern = megatron_layout(tiny_demo / "checkpoints", run_dir)
    tasks = root / "tasks" / AWKWARD
    shutil.copytree(tiny_demo / "tasks", tasks)
    config = small_config(Path("unused"), tasks)
    config["runs"] = {"edge": pattern}
    config["perplexity_text"] = str(shutil.copy(tiny_demo / "heldout.txt", tasks / "held out.txt"))
    (clone / "my config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    wrong = root / "bin"
    wrong.mkdir()
    for name in ("python", "python3"):
        (wrong / name).write_text("#!/bin/sh\necho 'not the project python' >&2\nexit 97\n")
        (wrong / name).chmod(0o755)
    result = subprocess.run(["/bin/sh", "-c", cron_line("'my config.yaml'")], cwd=clone, capture_output=True,
                            text=True, env={"PATH": f"{wrong}:/usr/bin:/bin", "HOME": str(root)})
    return clone, result


def test_the_cron_line_runs_the_workflow_in_awkward_paths(cron_run):
    clone, result = cron_run
    log = (clone / "rerun.log").read_text(encoding="utf-8") if (clone / "rerun.log").exists() else ""
    assert result.returncode == 0, log[-4000:] + result.stderr[-2000:]
    assert "not the project python" not in log
    results = clone / "results"
    scores = pd.read_parquet(results / "scores.parquet")
    assert sorted(set(scores.step)) == [10, 20, 30, 40]
    assert set(scores.method) == {"raw", "avg", "vote", "prob"}
    assert (results / "report" / "report.html").is_file()
    assert (results / "tables" / "indicators.csv").is_file()
    perplexity = json.loads((results / "perplexity" / "edge" / "raw1" / "step40.json").read_text())
    assert perplexity["text"].endswith(f"{AWKWARD}/held out.txt")


def test_the_cron_line_reruns_with_nothing_to_do(cron_run):
    clone, _ = cron_run
    result = subprocess.run([str(clone / ".venv" / "bin" / "snakemake"), "--configfile", "my config.yaml",
                             "--dry-run", "--quiet"], cwd=clone, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr
