"""The embedded demo: valid llm-jp-eval tasks, bitwise-reproducible checkpoints, and a full dry run."""

import hashlib
import subprocess
import sys
from dataclasses import replace

from ckpt_stability.checkpoints import discover
from ckpt_stability.demo import COLOR_OF, FINETUNE_TASK, OBJECTS, TASKS, pretrain
from ckpt_stability.tasks import load_task
from helpers import ROOT, TINY_DEMO, TINY_SIZE


def digests(directory):
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_same_seed_gives_bitwise_the_same_checkpoints(tiny_demo, tmp_path):
    pretrain(tmp_path, TINY_DEMO, TINY_SIZE)
    first, second = digests(tiny_demo), digests(tmp_path)
    assert first == second
    assert "checkpoints/checkpoint-40/model.safetensors" in first
    assert "checkpoints/checkpoint-40/tokenizer.json" in first


def test_another_seed_gives_other_weights(tiny_demo, tmp_path):
    settings = replace(TINY_DEMO, seed=1, train_steps=10, save_every=10)
    pretrain(tmp_path, settings, TINY_SIZE)
    name = "checkpoints/checkpoint-10/model.safetensors"
    assert digests(tmp_path)[name] != digests(tiny_demo)[name]


def test_demo_writes_complete_checkpoints_and_valid_tasks(tiny_demo):
    assert list(discover(str(tiny_demo / "checkpoints" / "checkpoint-{step}")).complete) == [10, 20, 30, 40]
    tasks = [load_task(tiny_demo / "tasks" / f"{task.name}.json", mode=task.mode, category=task.category,
                       num_fewshot=4) for task in TASKS]
    assert len({task.category for task in tasks}) >= 3
    assert {task.mode for task in tasks} == {"choice", "generate"}
    for task in tasks:
        assert len(task.samples) == TINY_DEMO.samples_per_task
        # the few-shot examples are held out of the samples
        assert not {(s.input, s.output) for s in task.few_shots} & {(s.input, s.output) for s in task.samples}
    assert (tiny_demo / "heldout.txt").read_text().count("### 指示") == TINY_DEMO.heldout_documents
    # the fine-tuning task: half of each colour's objects to fine-tune on, the other half held out
    train, test = (load_task(tiny_demo / "finetune" / split / f"{FINETUNE_TASK}.json", num_fewshot=0)
                   for split in ("train", "test"))
    objects = [{sample.input.removesuffix("の色は？") for sample in split.samples} for split in (train, test)]
    assert len(objects[0]) == len(objects[1]) == len(OBJECTS) // 2 and not objects[0] & objects[1]
    assert {sample.output for sample in test.samples} == set(COLOR_OF.values())


def test_default_config_dry_run_shows_training_and_per_checkpoint_jobs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    # two runs of 30 checkpoints, windows 1, 2, 4, 8: 30 raw + (29 + 27 + 23) averaged models each (avg), and wsm's
    # 27 of window 4
    assert counts["demo_data"] == 1 and counts["demo_pretrain"] == 2
    assert counts["evaluate"] == 2 * (30 + 29 + 27 + 23 + 27)
    assert counts["average"] == 2 * (29 + 27 + 23 + 27) and counts["ensemble"] == 2 * (29 + 27 + 23)
    # the fine-tuning stage: the steps that are multiples of 48, every third checkpoint, of both runs
    assert counts["finetune"] == counts["evaluate_finetuned"] == 2 * 10 and counts["targets"] == 1
