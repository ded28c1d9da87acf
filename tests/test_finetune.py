"""The fine-tuning stage: its data formats, the recipe's determinism and refusals, and the workflow that turns
fine-tuning outcomes into the indicators' target (tiny demo models, real fine-tunes)."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from ckpt_stability.errors import InputError
from ckpt_stability.instruction_data import read_instruction_data
from ckpt_stability.prompts import PromptTemplate
from helpers import ROOT, cli_command, poison, snakemake

TASK = "demo_colors_open"
RECIPE = ["--steps", "40", "--learning-rate", "2e-2", "--batch-size", "8", "--threads", "1"]
"""enough for the tiny demo model to answer with a colour (it knows too little to pick the right one often)"""


# ---------------------------------------------------------------- instruction data


def test_every_instruction_format_gives_the_evaluation_prompts(tmp_path):
    """llm-jp-eval's dataset and tuning JSON and instruction JSONL give the prompts evaluation renders with no
    few-shot example; prompt/completion JSONL is taken as it is."""
    template = PromptTemplate()
    rows = [{"instruction": "色を答えてください。", "input": "りんご", "output": "赤"},
            {"instruction": "色を答えてください。", "input": "空", "output": "青"}]
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"instruction": "色を答えてください。", "output_length": 3, "metrics": ["exact_match"], "few_shots": [],
         "samples": [{"input": r["input"], "output": r["output"]} for r in rows]}, ensure_ascii=False))
    (tmp_path / "tuning.json").write_text(json.dumps(
        [{"ID": f"demo-{i}", **r, "text": "ignored"} for i, r in enumerate(rows)], ensure_ascii=False))
    (tmp_path / "instructions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Q: 1+1=", "completion": "2"}\n\n')
    expected = [(template.render(r["instruction"], [], r["input"]), r["output"]) for r in rows]
    for name in ("dataset.json", "tuning.json", "instructions.jsonl"):
        data = read_instruction_data(tmp_path / name)
        assert [(e.prompt, e.completion) for e in data.examples] == expected, name
    assert [(e.prompt, e.completion) for e in read_instruction_data(tmp_path / "pairs.jsonl").examples] == [
        ("Q: 1+1=", "2")]


@pytest.mark.parametrize("name, content, message", [
    ("data.json", "{not json", "the file is not valid JSON"),
    ("data.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', "line 2 is not valid JSON"),
    ("data.jsonl", '{"instruction": "a", "input": "b"}\n', "line 1 needs string fields instruction and output"),
    ("data.json", '{"instruction": "a", "samples": [{"input": "b", "output": ""}]}', "sample 0 has an empty output"),
    ("data.json", '{"rows": []}', "neither llm-jp-eval's dataset format"),
    ("data.jsonl", "\n", "no fine-tuning examples"),
])
def test_bad_instruction_data_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=rf"^{path}: {message}"):
        read_instruction_data(path)


# ---------------------------------------------------------------- the finetune command


def finetune_command(model, data, output, *options):
    return cli_command("finetune", "--model", model, "--data", data, "--output", output, "--record",
                       f"{output}.json", *options)


def test_fine_tuning_is_deterministic_and_lora_is_merged(tiny_demo, tmp_path):
    """The same recipe twice gives bitwise the same weights; LoRA gives an ordinary checkpoint with the base's
    tensors, merged. All three fine-tunes run side by side."""
    base = tiny_demo / "checkpoints" / "checkpoint-40"
    data = tiny_demo / "finetune" / "train" / f"{TASK}.json"
    runs = {name: subprocess.Popen(finetune_command(base, data, tmp_path / name, "--steps", "5", *options),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, options in {"first": [], "second": [], "lora": ["--lora-r", "4"]}.items()}
    for name, process in runs.items():
        _, stderr = process.communicate()
        assert process.returncode == 0, f"{name}: {stderr}"
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    original = load_file(base / "model.safetensors")
    for name, tensors in weights.items():
        assert tensors.keys() == original.keys(), name
        assert any(not tensors[key].equal(original[key]) for key in original), f"{name} did not train"
    assert all(weights["first"][key].equal(weights["second"][key]) for key in original)
    record = json.loads((tmp_path / "lora.json").read_text())
    assert record["recipe"]["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0} and record["final_loss"] > 0


def test_a_diverged_fine_tune_is_recorded_or_refused_with_the_checkpoint_named(tiny_demo, tmp_path):
    """Without --record-unusable, an error; with it (as the workflow runs it), the reason is the outcome. Both
    run side by side."""
    base = tiny_demo / "checkpoints" / "checkpoint-40"
    data = tiny_demo / "finetune" / "train" / f"{TASK}.json"
    diverging = ["--steps", "5", "--learning-rate", "1e30", "--batch-size", "8"]
    runs = {name: subprocess.Popen(finetune_command(base, data, tmp_path / name, *diverging, *options),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, options in {"refused": [], "recorded": ["--record-unusable"]}.items()}
    (_, refused), (_, recorded) = (process.communicate() for process in runs.values())
    assert runs["refused"].returncode == 2, refused
    assert f"{base}: fine-tuning diverged: the loss is nan at step" in refused
    assert not (tmp_path / "refused").exists()
    assert runs["recorded"].returncode == 0, recorded
    reason = json.loads((tmp_path / "recorded.json").read_text())["excluded"]
    assert reason.startswith(f"not fine-tuned: {base}: fine-tuning diverged")
    assert [path.name for path in (tmp_path / "recorded").iterdir()] == ["excluded.json"]


# ---------------------------------------------------------------- the workflow


def dry_run_jobs(output: str, rule: str) -> list[str]:
    """The jobs of ``rule`` in the output of ``snakemake --dry-run`` (blocks between blank lines)."""
    return [block for block in output.split("\n\n")
            if any(line.split(":")[0] in (f"rule {rule}", f"localrule {rule}") for line in block.splitlines())]


def finetune_config(root, tiny_demo) -> dict:
    """Windows 1 and 2 (avg), perplexity, the colour task and the target task itself (the checkpoints' score
    before fine-tuning); every checkpoint fine-tuned, raw and averaged."""
    target_task = {"path": str(tiny_demo / "finetune" / "test" / f"{TASK}.json"), "category": "MC",
                   "mode": "generate", "num_fewshot": 0}
    return {
        "runs": {"tiny": f"{root}/checkpoints/checkpoint-{{step}}"},
        "windows": [1, 2],
        "methods": ["avg"],
        "tasks": {"demo_colors": {"path": str(tiny_demo / "tasks" / "demo_colors.json"), "category": "MC",
                                  "mode": "choice", "num_fewshot": 2}, TASK: target_task},
        "final_fraction": 1.0,
        "backend": "transformers",
        "perplexity_text": str(tiny_demo / "heldout.txt"),
        "finetune": {
            "select": {"every": 10},
            "windows": [1, 2],
            "data": str(tiny_demo / "finetune" / "train" / f"{TASK}.json"),
            "tasks": {TASK: target_task},
            "recipe": {"steps": 40, "learning_rate": 2.0e-2, "batch_size": 8},
            "threads": 1,
        },
    }


@pytest.fixture(scope="module")
def finetuned(tiny_demo, tmp_path_factory):
    """The workflow with the fine-tuning stage over four checkpoints, in a directory whose name has a space;
    step 40 holds a NaN."""
    root = tmp_path_factory.mktemp("fine tune")
    for step, source in {10: 10, 20: 20, 30: 40, 40: 40}.items():
        shutil.copytree(tiny_demo / "checkpoints" / f"checkpoint-{source}", root / "checkpoints" / f"checkpoint-{step}")
    poison(root / "checkpoints" / "checkpoint-40")
    (root / "config.yaml").write_text(yaml.safe_dump(finetune_config(root, tiny_demo)))
    result = snakemake(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_fine_tuning_outcomes_become_the_indicators_target(finetuned, tiny_demo):
    targets = pd.read_csv(finetuned / "results" / "tables" / "targets.csv")
    assert list(zip(targets.method, targets.window, targets.step)) == [
        ("avg", 2, 20), ("avg", 2, 30), ("avg", 2, 40), ("raw", 1, 10), ("raw", 1, 20), ("raw", 1, 30), ("raw", 1, 40)]
    assert set(targets.tasks) == {TASK} and set(targets.recipe) == {"full, 40 steps, lr 0.02, batch 8, seed 0"}
    # the diverged checkpoint, and the average that holds it, are recorded; the others have their target
    excluded = targets[targets.excluded.notna()]
    assert list(zip(excluded.method, excluded.step)) == [("avg", 40), ("raw", 40)]
    assert "checkpoint-40/model.safetensors" in excluded.excluded.iloc[1] and excluded.target.isna().all()
    assert targets[targets.excluded.isna()].target.notna().all()
    # fine-tuned models are temporary; their records and predictions stay
    assert not list((finetuned / "results" / "finetune").glob("*/*/*/model"))
    assert len(list((finetuned / "results" / "finetune").glob(f"*/*/*/{TASK}.parquet"))) == 7

    indicators = pd.read_csv(finetuned / "results" / "tables" / "indicators.csv")
    assert indicators.target.str.startswith("fine-tuned (full, 40 steps").all()
    assert indicators.target.str.endswith("results/tables/targets.csv").all()
    perplexity = indicators.set_index("proxy").loc["1/PPL raw1"]
    # the raw checkpoints with a target: 10 to 30, all of one run
    assert perplexity.n_models == 3 and perplexity.n_pairs == perplexity.n_pairs_within_run
    assert perplexity.n_pairs_across_runs == 0
    page = (finetuned / "results" / "report" / "report.html").read_text(encoding="utf-8")
    assert "The fine-tuning outcome of each checkpoint" in page


def test_fine_tuning_improves_the_task_over_the_base_checkpoint(finetuned):
    """The checkpoints' own score on the target task (a task of the config too) against the fine-tuned one."""
    scores = pd.read_parquet(finetuned / "results" / "scores.parquet")
    before = scores[(scores.task == TASK) & (scores.method == "raw")].set_index("step").score
    targets = pd.read_csv(finetuned / "results" / "tables" / "targets.csv")
    after = targets[targets.method == "raw"].set_index("step").target
    assert (after[[10, 20, 30]] > before[[10, 20, 30]]).all(), (before, after)


def test_a_new_selected_checkpoint_brings_only_its_fine_tunes_and_the_reductions(finetuned):
    shutil.copytree(finetuned / "checkpoints" / "checkpoint-30", finetuned / "checkpoints" / "checkpoint-50")
    try:
        result = snakemake(finetuned, "--dry-run", "--quiet", "rules")
    finally:
        shutil.rmtree(finetuned / "checkpoints" / "checkpoint-50")
    assert result.returncode == 0, result.stderr
    counts = dict(line.split()[:2] for line in result.stdout.splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    # raw and avg2 at step 50: evaluated, averaged and fine-tuned; then the plan and every reduction once
    assert counts == {"average": "1", "evaluate": "2", "finetune": "2", "evaluate_finetuned": "2", "plan": "1",
                      "targets": "1", "scores": "1", "stability": "1", "pick": "1", "indicators": "1", "report": "1",
                      "weights": "1", "all": "1", "total": "16"}, result.stdout


@pytest.mark.parametrize("change, message", [
    ({"data": "missing.jsonl"}, "missing.jsonl: cannot read the fine-tuning data"),
    ({"select": {"steps": [1000]}}, "config finetune.select: names no existing checkpoint of any run"),
    ({"recipe": {"steps": 5, "epochs": 1}}, "finetune.recipe: "),
    ({"windows": [4]}, "finetune.windows: 4: fine-tuning an averaged model needs window 4 in windows"),
])
def test_a_bad_fine_tuning_config_stops_the_workflow_before_any_job(finetuned, tiny_demo, tmp_path, change, message):
    config = finetune_config(finetuned, tiny_demo)
    config["finetune"].update(change)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr


def test_on_slurm_each_fine_tune_and_its_evaluation_asks_for_a_gpu(finetuned):
    """profiles/slurm gives the stage's jobs a GPU each, as inference has (a dry run: no cluster needed)."""
    result = snakemake(finetuned, "--dry-run", "--profile", str(ROOT / "profiles" / "slurm"),
                       "--forcerun", "finetune", "evaluate_finetuned")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rule in ("finetune", "evaluate_finetuned"):
        resources = [line for job in dry_run_jobs(result.stdout, rule) for line in job.splitlines()
                     if line.strip().startswith("resources:")]
        assert len(resources) == 7 and all("gpu=1" in line for line in resources), (rule, resources)


def test_a_targets_file_of_the_users_wins_over_the_stage(finetuned, tiny_demo, tmp_path):
    """With both, the indicators read the user's CSV; the stage still runs and writes targets.csv."""
    config = finetune_config(finetuned, tiny_demo)
    (tmp_path / "mine.csv").write_text("run,step,target\ntiny,10,0.1\ntiny,20,0.3\n")
    config["targets"] = str(tmp_path / "mine.csv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [indicators] = dry_run_jobs(result.stdout, "indicators")
    assert f"--targets {tmp_path}/mine.csv" in indicators and "targets.csv" not in indicators
    assert "\nrule targets:" in result.stdout


def test_the_stages_targets_file_gives_the_raw_checkpoints_outcomes(tmp_path):
    from ckpt_stability.indicators import read_targets

    path = tmp_path / "targets.csv"
    path.write_text("run,step,method,window,target,tasks,recipe,excluded\n"
                    "a,10,avg,2,0.9,t,full,\na,10,raw,1,0.5,t,full,\na,20,raw,1,,t,full,diverged\n")
    targets = read_targets(path)
    assert targets.to_dict() == {("a", 10): 0.5} and targets.name == f"fine-tuned (full), overall on t: {path}"
