"""Runs laid out as users have them, through snakemake as users start it: directories whose names hold spaces
and shell-special characters, Megatron-style zero-padded steps, checkpoints saved as ``pytorch_model.bin``
(single and sharded) among safetensors ones, the README's cron line started with a PATH whose ``python`` lacks
the project, and a diverged checkpoint among healthy ones."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import POISONED, ROOT, poison, small_config, snakemake

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


def save_as_bin(checkpoint: Path, shards: int) -> None:
    """Rewrite a checkpoint's weights as ``pytorch_model.bin``, or as ``shards`` shards with their index, as
    older runs and many converters save them."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    if shards == 1:
        torch.save(tensors, checkpoint / "pytorch_model.bin")
        return
    names = sorted(tensors)
    weight_map = {}
    for number in range(shards):
        shard = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = names[number::shards]
        torch.save({name: tensors[name] for name in part}, checkpoint / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def megatron_layout(checkpoints: Path, directory: Path) -> str:
    """The tiny demo's checkpoints as ``iter_{step:07d}/hf``, step 20 saved as ``pytorch_model.bin`` and step 30
    as two ``.bin`` shards; returns the run's pattern."""
    for checkpoint in sorted(checkpoints.iterdir()):
        step = int(checkpoint.name.removeprefix("checkpoint-"))
        shutil.copytree(checkpoint, directory / f"iter_{step:07d}" / "hf")
    save_as_bin(directory / "iter_0000020" / "hf", shards=1)
    save_as_bin(directory / "iter_0000030" / "hf", shards=2)
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
    assert sorted(set(scores.step)) == [10, 20, 30, 40]  # the .bin checkpoints 20 and 30 too
    assert scores.excluded.isna().all()
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


# ---------------------------------------------------------------- a diverged checkpoint among healthy ones

@pytest.fixture(scope="module")
def diverged_run(tiny_demo, tmp_path_factory):
    """Six checkpoints (steps 50 and 60 are copies of 30 and 40); step 40 holds a NaN. Windows 1 and 2, every
    method, the held-out text; the final segment is every step where a window of 2 exists (20 to 60)."""
    workdir = tmp_path_factory.mktemp("diverged")
    checkpoints = workdir / "checkpoints"
    for step, source in {10: 10, 20: 20, 30: 30, 40: 40, 50: 30, 60: 40}.items():
        shutil.copytree(tiny_demo / "checkpoints" / f"checkpoint-{source}", checkpoints / f"checkpoint-{step}")
    poison(checkpoints / "checkpoint-40")
    config = small_config(checkpoints, tiny_demo / "tasks")
    config["final_fraction"] = 1.0
    config["perplexity_text"] = str(tiny_demo / "heldout.txt")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir)
    return workdir, result


def test_a_diverged_checkpoint_leaves_the_others_their_results(diverged_run):
    workdir, result = diverged_run
    assert result.returncode == 0, result.stderr[-4000:]
    scores = pd.read_parquet(workdir / "results" / "scores.parquet")
    excluded = scores[scores.excluded.notna()]
    # the raw checkpoint, and every window that contains it (avg, vote, prob of 2 at steps 40 and 50)
    assert set(zip(excluded.method, excluded.step)) == {("raw", 40), ("avg", 40), ("avg", 50), ("vote", 40),
                                                        ("vote", 50), ("prob", 40), ("prob", 50)}
    assert excluded.score.isna().all()
    raw = excluded[excluded.method == "raw"].excluded.iloc[0]
    assert "checkpoint-40/model.safetensors" in raw and POISONED in raw and "nan" in raw
    for method in ("avg", "vote", "prob"):
        reason = excluded[excluded.method == method].excluded.iloc[0]
        assert reason.startswith("not built") and POISONED in reason, reason
    healthy = scores[scores.excluded.isna()]
    assert healthy.score.notna().all() and len(healthy) == len(scores) - len(excluded)


def test_the_diverged_checkpoint_has_no_weight_distance_and_takes_none_from_the_others(diverged_run):
    """Windows of 2: the pairs (30, 40) and (40, 50) are only in the averages that hold step 40, which are not built;
    every other pair and average has its distances."""
    workdir, _ = diverged_run
    weights = pd.read_csv(workdir / "results" / "tables" / "weights.csv")
    total = weights[weights.group == "total"]
    assert set(zip(total.method, total.step)) == {(method, step) for method in ("raw", "avg") for step in (20, 30, 60)}
    assert total.relative_distance.gt(0).all() and weights.relative_distance.notna().all()


def test_the_tables_cover_the_healthy_steps_and_say_which_were_excluded(diverged_run):
    workdir, _ = diverged_run
    tables = workdir / "results" / "tables"
    stability = pd.read_csv(tables / "stability.csv", dtype={"excluded_steps": str})
    assert stability[["mean_score", "mtv", "instability", "ever_flipped"]].notna().all().all()
    assert set(stability[stability.method == "raw"].excluded_steps) == {"40"}
    assert set(stability[stability.method != "raw"].excluded_steps) == {"40 50"}
    listed = pd.read_csv(tables / "excluded.csv")
    assert set(zip(listed.method, listed.window, listed.step)) == {
        ("raw", 1, 40), *((method, 2, step) for method in ("avg", "vote", "prob") for step in (40, 50))}
    indicators = pd.read_csv(tables / "indicators.csv")
    # 1/PPL of steps 10, 20, 30 and 50: 40 was excluded, 60 (the last) gives the stand-in target, as the
    # workflow has no fine-tuning stage and no targets file
    assert indicators[indicators.proxy == "1/PPL raw1"].n_models.item() == 4
    assert set(indicators.target) == {"overall avg2 at the run's last step"}


def test_excluded_checkpoints_are_outside_every_pick(diverged_run):
    workdir, _ = diverged_run
    tables = workdir / "results" / "tables"
    pick = pd.read_csv(tables / "pick.csv", dtype={"set_steps": str, "excluded_steps": str})
    assert set(pick[pick.method == "raw"].excluded_steps) == {"40"}
    assert set(pick[pick.method != "raw"].excluded_steps) == {"40 50"}
    checkpoints = pd.read_parquet(tables / "pick_checkpoints.parquet")
    excluded = checkpoints[checkpoints.excluded.notna()]
    assert set(zip(excluded.method, excluded.step)) == {("raw", 40), *((method, step) for method in ("avg", "vote",
                                                                                                      "prob")
                                                                       for step in (40, 50))}
    assert not excluded.in_set.any() and excluded.score.isna().all()
    assert all(POISONED in reason for reason in excluded.excluded)
    for steps in pick.set_steps:
        assert "40" not in steps.split()
    # windows of 2 keep steps 20, 30 and 60: a pick among 3 of their 5
    assert set(pick[pick.method != "raw"].range_size) == {5}


def test_the_report_names_the_broken_step_and_tensor(diverged_run):
    workdir, _ = diverged_run
    page = (workdir / "results" / "report" / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="excluded-tiny"'):]
    section = section[:section.index("</div>")]
    assert "<td class=\"number\">40</td><td>raw1</td>" in section
    assert POISONED in section and "checkpoint-40/model.safetensors" in section


def test_a_checkpoint_that_does_not_load_is_recorded_with_the_reason(tiny_model_dir, tmp_path):
    """A model transformers cannot build (an unknown architecture) is an outcome with --record-unusable, as the
    workflow runs it; without the flag it stays an error."""
    from ckpt_stability.predictions import read_predictions
    from helpers import JGLUE, cli

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    arguments = ["evaluate", "--model", broken, "--task", JGLUE / "jnli.json", "--num-fewshot", "1",
                 "--max-samples", "2", "--backend", "transformers"]

    refused = cli(*arguments, "--output-dir", tmp_path / "refused")
    assert refused.returncode == 2 and "the model does not load" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused" / "jnli.parquet").exists()

    recorded = cli(*arguments, "--output-dir", tmp_path / "recorded", "--record-unusable")
    assert recorded.returncode == 0, recorded.stderr
    predictions = read_predictions(tmp_path / "recorded" / "jnli.parquet")
    assert predictions.excluded.startswith(f"{broken}: the model does not load") and predictions.prediction == []
