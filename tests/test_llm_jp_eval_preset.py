"""The llm-jp-eval v1.4.1 preset, end to end on a data directory laid out as llm-jp-eval ships it:
``evaluation/dev/<task>.json`` without few-shots beside ``evaluation/train/<task>.json``, for all 25 tasks of
the suite, with each task's metrics as v1.4.1 lists them (MT tasks included, with the COMET and BERTScore
metrics this project skips)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import JGLUE, ROOT, snakemake, with_context_length

PRESET = ROOT / "config" / "llm-jp-eval-v1.4.1.yaml"
# the JGLUE subset each fake task borrows its samples from, and its metrics as llm-jp-eval v1.4.1 lists them
FAKE_TASKS = {
    "jamp": ("jnli", ["exact_match"]), "janli": ("jnli", ["exact_match"]), "jnli": ("jnli", ["exact_match"]),
    "jsem": ("jnli", ["exact_match"]), "jsick": ("jnli", ["exact_match"]),
    "jemhopqa": ("jsquad", ["char_f1"]), "niilc": ("jsquad", ["char_f1"]), "aio": ("jsquad", ["char_f1"]),
    "jsquad": ("jsquad", ["char_f1"]),
    "jcommonsenseqa": ("jcommonsenseqa", ["exact_match"]), "commonsensemoralja": ("jcommonsenseqa", ["exact_match"]),
    "kuci": ("jcommonsenseqa", ["exact_match"]),
    "chabsa": ("jsquad", ["set_f1"]),
    "wiki_reading": ("jsquad", ["char_f1"]), "wiki_ner": ("jsquad", ["set_f1"]),
    "wiki_dependency": ("jsquad", ["set_f1"]), "wiki_pas": ("jsquad", ["set_f1"]),
    "wiki_coreference": ("jsquad", ["set_f1"]),
    "mawps": ("jnli", ["exact_match"]),
    "alt-e-to-j": ("jsquad", ["bleu_ja", "bert_score_ja_f1", "comet_wmt22"]),
    "alt-j-to-e": ("jsquad", ["bleu_en", "bert_score_en_f1", "comet_wmt22"]),
    "wikicorpus-e-to-j": ("jsquad", ["bleu_ja", "bert_score_ja_f1", "comet_wmt22"]),
    "wikicorpus-j-to-e": ("jsquad", ["bleu_en", "bert_score_en_f1", "comet_wmt22"]),
    "mmlu_en": ("jcommonsenseqa", ["exact_match"]), "jmmlu": ("jcommonsenseqa", ["exact_match"]),
}
SAMPLES = 3


def fake_llm_jp_eval(root: Path) -> Path:
    """``root/1.4.1/evaluation/{dev,train}/<task>.json`` as llm-jp-eval v1.4.1 writes them: the dev files have an
    empty few_shots list, the train files hold the few-shot pool; the set_f1 tasks have multi-line answers."""
    evaluation = root / "1.4.1" / "evaluation"
    for split in ("dev", "train"):
        (evaluation / split).mkdir(parents=True)
    for name, (source, metrics) in FAKE_TASKS.items():
        data = json.loads((JGLUE / f"{source}.json").read_text(encoding="utf-8"))
        examples = data["few_shots"] + data["samples"]
        if metrics == ["set_f1"]:
            examples = [{**example, "output": f"{example['output']}\n{example['output']}の一部"} for example in examples]
        data["metrics"] = metrics
        data.pop("label_list", None)  # v1.4.1 generates every answer; the file still may list labels
        dev = {**data, "few_shots": [], "samples": examples[4:]}
        train = {**data, "few_shots": [], "samples": examples[:4]}
        for split, content in (("dev", dev), ("train", train)):
            (evaluation / split / f"{name}.json").write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return evaluation / "dev"


@pytest.fixture(scope="module")
def preset_run(tiny_demo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preset")
    dev = fake_llm_jp_eval(workdir / "llm-jp-eval")
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir()
    for checkpoint in sorted((tiny_demo / "checkpoints").iterdir()):
        # 4-shot JGLUE prompts are 2,400 tokens of the tiny model's tokenizer, beyond its 512 positions (RoPE: no weight depends on it)
        with_context_length(checkpoint, workdir, 4096).rename(checkpoints / checkpoint.name)
    mine = {"runs": {"tiny": f"{checkpoints}/checkpoint-{{step}}"}, "task_dir": str(dev), "windows": [1, 2],
            "final_fraction": 1.0, "backend": "transformers",
            "tasks": {name: {"max_samples": SAMPLES} for name in FAKE_TASKS}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(mine))
    result = snakemake(workdir, "--configfile", str(PRESET), str(workdir / "config.yaml"))
    return workdir, result


def test_the_preset_covers_the_leaderboard_suite():
    preset = yaml.safe_load(PRESET.read_text(encoding="utf-8"))
    categories = {}
    for name, task in preset["tasks"].items():
        categories.setdefault(task["category"], []).append(name)
        assert (task["mode"], task["num_fewshot"], task["few_shot_source"], task["max_samples"]) == (
            "generate", 4, "train", 100), name
    assert categories == {
        "NLI": ["jamp", "janli", "jnli", "jsem", "jsick"], "QA": ["jemhopqa", "niilc", "aio"], "RC": ["jsquad"],
        "MC": ["jcommonsenseqa", "commonsensemoralja", "kuci"], "EL": ["chabsa"],
        "FA": ["wiki_reading", "wiki_ner", "wiki_dependency", "wiki_pas", "wiki_coreference"], "MR": ["mawps"],
        "MT": ["alt-e-to-j", "alt-j-to-e", "wikicorpus-e-to-j", "wikicorpus-j-to-e"], "HE": ["mmlu_en", "jmmlu"]}
    assert preset["prompt"] == {"add_special_tokens": False}


def test_the_preset_runs_on_llm_jp_eval_s_layout(preset_run):
    workdir, result = preset_run
    assert result.returncode == 0, result.stderr[-4000:]
    scores = pd.read_parquet(workdir / "results" / "scores.parquet")
    assert set(scores.task) == set(FAKE_TASKS) and set(scores.n_examples) == {SAMPLES}
    # the MT tasks are scored by their BLEU, the metrics this project does not compute were named once
    from ckpt_stability.predictions import read_predictions

    raw = workdir / "results" / "predictions" / "tiny" / "raw1" / "step40"
    assert read_predictions(raw / "alt-e-to-j.parquet").provenance["task"]["metric"] == "bleu_ja"
    assert read_predictions(raw / "wikicorpus-j-to-e.parquet").provenance["task"]["metric"] == "bleu_en"
    jnli = read_predictions(raw / "jnli.parquet")
    assert jnli.provenance["prompt"]["few_shot_path"].endswith("1.4.1/evaluation/train/jnli.json")
    assert jnli.provenance["prompt"]["add_special_tokens"] is False
    stability = pd.read_csv(workdir / "results" / "tables" / "stability.csv")
    assert set(stability[stability.level == "category"].name) == {"NLI", "QA", "RC", "MC", "EL", "FA", "MR", "MT",
                                                                  "HE"}
    assert (workdir / "results" / "report" / "report.html").is_file()


def test_prompts_have_no_bos_and_take_the_train_split_s_first_samples(tmp_path, tiny_demo):
    from ckpt_stability.evaluate import EvaluationSettings

    dev = fake_llm_jp_eval(tmp_path)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"tasks": {"jnli": {"path": str(dev / "jnli.json"), "few_shot_source": "train"}},
                                         "add_special_tokens": False}))
    settings = EvaluationSettings.from_json(settings_file)
    train = json.loads((dev.parent / "train" / "jnli.json").read_text(encoding="utf-8"))
    task = settings.tasks[0]
    assert [shot.input for shot in task.few_shots] == [sample["input"] for sample in train["samples"][:4]]
    assert settings.add_special_tokens is False

    from ckpt_stability.backends.transformers import TransformersBackend

    checkpoint = tiny_demo / "checkpoints" / "checkpoint-10"
    with_bos = TransformersBackend(str(checkpoint)).encode(["テスト"])[0]
    without = TransformersBackend(str(checkpoint), add_special_tokens=False).encode(["テスト"])[0]
    assert with_bos[1:] == without and len(with_bos) == len(without) + 1


def test_missing_task_files_are_named_in_one_error(tmp_path, tiny_demo):
    dev = fake_llm_jp_eval(tmp_path / "data")
    for name in ("jsick", "kuci", "mawps"):
        (dev / f"{name}.json").unlink()
    mine = {"runs": {"tiny": f"{tiny_demo}/checkpoints/checkpoint-{{step}}"}, "task_dir": str(dev)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(mine))
    result = snakemake(tmp_path, "--configfile", str(PRESET), str(tmp_path / "config.yaml"), "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "3 task file(s) missing" in output
    for name in ("jsick", "kuci", "mawps"):
        assert f"{name}: {dev / name}.json" in output
