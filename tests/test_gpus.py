"""GPU pinning: concurrent jobs get distinct GPUs; a single visible GPU is left alone; the workflow runs at
most as many GPU jobs at once as there are GPUs."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from ckpt_stability.gpus import claim_gpu, visible_gpus
from helpers import small_config, snakemake

CLAIM = ("import os, sys, time; from ckpt_stability.gpus import claim_gpu\n"
         "print(claim_gpu(sys.argv[1], poll_seconds=0.05), os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
         "time.sleep(float(sys.argv[2]))\n")


def claim_in_subprocess(lock_dir, hold_seconds, devices="0,1,2"):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices)
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(lock_dir), str(hold_seconds)], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_jobs_get_distinct_gpus_and_wait_for_a_free_one(tmp_path):
    holders = [claim_in_subprocess(tmp_path, 3) for _ in range(3)]
    claimed = sorted(holder.stdout.readline().split()[0] for holder in holders)
    assert claimed == ["0", "1", "2"]
    late = claim_in_subprocess(tmp_path, 0)  # a fourth job waits until one of the three exits
    got, visible = late.stdout.readline().split()
    assert got == visible and got in {"0", "1", "2"}
    for process in [*holders, late]:
        process.wait()


def test_a_crashed_job_releases_its_gpu(tmp_path):
    holder = claim_in_subprocess(tmp_path, 30, devices="4,5")
    first = holder.stdout.readline().split()[0]
    holder.kill()
    holder.wait()
    again = claim_in_subprocess(tmp_path, 0, devices="4,5")
    assert again.stdout.readline().split()[0] in {"4", "5"}
    again.wait()
    assert first in {"4", "5"}


def test_single_or_no_gpu_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert claim_gpu(tmp_path) == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and claim_gpu(tmp_path) is None
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("visible", "options", "limit", "per_job"), [
    ("0,1", [], 2, 1),  # two GPUs: inference takes one each, at most two at once
    ("", [], 0, 0),  # none: inference runs on the CPU and is not limited
    ("0,1,2", ["--resources", "gpu=1"], 1, 1),  # the user's --resources wins
])
def test_the_workflow_limits_gpu_jobs_to_the_visible_gpus(tiny_demo, tmp_path, visible, options, limit, per_job):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")))
    gpus = {"CUDA_VISIBLE_DEVICES": visible}
    # a real run (of one small local job) is where Snakemake states the resources it schedules against
    result = snakemake(tmp_path, "results/evaluation_settings.json", *options, env=gpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Provided resources: gpu=\D*(\d+)", result.stderr).group(1) == str(limit)
    result = snakemake(tmp_path, "--dry-run", "results/predictions/tiny/raw1/step10/jnli.parquet", *options, env=gpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"rule evaluate:.*?resources: [^\n]*gpu=(\d+)", result.stdout, re.DOTALL).group(1) == str(per_job)
