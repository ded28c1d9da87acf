"""Bad input: every case is refused with a message that names the file and the problem.

Checkpoints and task files are checked where the workflow meets them: while it is parsed (a dry run
fails before any job starts) and again by the command that reads them.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import JGLUE, ROOT, cli, snakemake


def dry_run(workdir: Path, config: dict | str) -> tuple[int, str]:
    """``snakemake --dry-run`` on ``config`` (a dict, or YAML text): its exit status and its output (stdout
    and stderr: snakemake 9 logs to stdout, but reports some errors on stderr)."""
    text = config if isinstance(config, str) else yaml.safe_dump(config, allow_unicode=True)
    (workdir / "config.yaml").write_text(text, encoding="utf-8")
    result = snakemake(workdir, "--dry-run")
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def run_copy(tiny_demo, tmp_path):
    """A writable copy of the tiny demo's 4 checkpoints and tasks."""
    shutil.copytree(tiny_demo / "checkpoints", tmp_path / "checkpoints")
    shutil.copytree(tiny_demo / "tasks", tmp_path / "tasks")
    return tmp_path


def config_for(root: Path, tasks: dict | None = None, windows: tuple[int, ...] = (1, 2)) -> dict:
    return {
        "runs": {"tiny": f"{root}/checkpoints/checkpoint-{{step}}"},
        "windows": list(windows),
        "tasks": tasks or {"demo_colors": {"path": str(root / "tasks" / "demo_colors.json"), "category": "MC",
                                          "mode": "choice"}},
        "backend": "transformers",
    }


def evaluate(model: Path, out: Path):
    return cli("evaluate", "--model", model, "--task", JGLUE / "jnli.json", "--num-fewshot", "1",
               "--max-samples", "2", "--backend", "transformers", "--output-dir", out)


# ---------------------------------------------------------------- checkpoints


def test_truncated_safetensors(run_copy, tmp_path):
    weights = run_copy / "checkpoints" / "checkpoint-30" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    # left out with a warning (it may still be being copied); the 3 checkpoints left suffice for window 1
    code, output = dry_run(tmp_path, config_for(run_copy, windows=(1,)))
    assert code == 0, output
    assert f"skipping incomplete checkpoint {weights.parent} (model.safetensors is unreadable: truncated safetensors file" \
        in output
    direct = evaluate(weights.parent, tmp_path / "out")
    assert direct.returncode == 2
    assert (f"{weights.parent}: not a complete checkpoint: model.safetensors is unreadable: truncated safetensors file"
            in direct.stderr)


def test_missing_shard_named_by_the_index(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, sharded / name)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = evaluate(sharded, tmp_path / "out")
    assert result.returncode == 2
    assert f"{sharded}: not a complete checkpoint: {shard.name} (named by model.safetensors.index.json) is missing" \
        in result.stderr


def test_index_naming_an_absent_tensor(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(tiny_model_dir / "tokenizer.json", sharded / "tokenizer.json")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    shutil.copytree(sharded, tmp_path / "sharded-copy")
    expected = (f"{index_path}: names tensor 'model.layers.9.mlp.up_proj.weight' in {first_shard}, "
                "which does not hold it")
    for result in (evaluate(sharded, tmp_path / "out"),
                   cli("average", "--output", tmp_path / "avg", sharded, tmp_path / "sharded-copy")):
        assert result.returncode == 2
        assert expected in result.stderr


def test_config_json_that_is_not_json(run_copy, tmp_path):
    config_json = run_copy / "checkpoints" / "checkpoint-20" / "config.json"
    config_json.write_text('{"architectures": ["LlamaForCausalLM"],')
    code, output = dry_run(tmp_path, config_for(run_copy, windows=(1,)))
    assert code == 0, output
    assert f"skipping incomplete checkpoint {config_json.parent} (config.json is not valid JSON" in output
    direct = evaluate(config_json.parent, tmp_path / "out")
    assert direct.returncode == 2
    assert f"{config_json}: config.json is not valid JSON" in direct.stderr


def test_different_architectures_within_one_run(run_copy, tmp_path):
    config_json = run_copy / "checkpoints" / "checkpoint-40" / "config.json"
    config = json.loads(config_json.read_text())
    config["num_hidden_layers"] += 1
    config_json.write_text(json.dumps(config))
    code, output = dry_run(tmp_path, config_for(run_copy))
    assert code != 0
    assert f"run tiny: {config_json} describes another model than step 10's" in output
    assert "differ in num_hidden_layers" in output


def test_tokenizer_missing(run_copy, tmp_path):
    checkpoint = run_copy / "checkpoints" / "checkpoint-40"
    (checkpoint / "tokenizer.json").unlink()
    result = evaluate(checkpoint, tmp_path / "out")
    assert result.returncode == 2
    assert f"{checkpoint}: no tokenizer (none of tokenizer.json, tokenizer.model" in result.stderr


# ---------------------------------------------------------------- tasks


def bad_task(tmp_path, name, content: bytes) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_bytes(content)
    return path


GOOD = {"instruction": "答えて", "output_length": 3, "metrics": ["exact_match"], "label_list": ["yes", "no"],
        "few_shots": [{"input": "q0", "output": "yes"}], "samples": [{"input": "q1", "output": "no"}]}


@pytest.mark.parametrize("case, content, num_fewshot, message", [
    ("invalid_json", b'{"instruction": "x", "samples": [', 0, "invalid JSON at line 1, column 34: Expecting value"),
    ("missing_keys", json.dumps({"instruction": "x"}).encode(), 0,
     "missing key(s) output_length, metrics, samples"),
    ("empty_samples", json.dumps({**GOOD, "samples": []}).encode(), 0, "samples is empty"),
    ("too_many_shots", json.dumps(GOOD).encode(), 3, "num_fewshot is 3 but the file has only 1 few_shots"),
    ("gold_outside", json.dumps({**GOOD, "samples": [{"input": "q", "output": "maybe"}]}).encode(), 0,
     "samples[0] has output 'maybe', which is not in label_list"),
    ("not_utf8", json.dumps(GOOD, ensure_ascii=False).encode().replace(b"\xe7\xad\x94", b"\x93\x9a\x82"), 0,
     "not UTF-8 (invalid byte at offset"),
])
def test_bad_task_files_stop_the_workflow_before_any_job(run_copy, tmp_path, case, content, num_fewshot, message):
    path = bad_task(tmp_path, case, content)
    task = {"path": str(path), "category": "X", "mode": "choice", "num_fewshot": num_fewshot}
    code, output = dry_run(tmp_path, config_for(run_copy, tasks={"bad": task}))
    assert code != 0
    assert f"{path}: {message}" in output


# ---------------------------------------------------------------- config


def test_two_runs_with_the_same_name(run_copy, tmp_path):
    text = yaml.safe_dump(config_for(run_copy))
    code, output = dry_run(tmp_path, text.replace("runs:\n", f"runs:\n  tiny: {run_copy}/other-{{step}}\n"))
    assert code != 0
    assert f"{tmp_path / 'config.yaml'}: line " in output
    assert "key 'tiny' appears twice" in output


# ---------------------------------------------------------------- backends


@pytest.fixture
def broken_vllm(tmp_path, monkeypatch):
    """A vllm package that fails to import, as a CUDA-less or mismatched install does."""
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{ROOT / 'src'}")


def test_vllm_that_does_not_import_is_an_error_with_the_fix(broken_vllm, tiny_model_dir, tmp_path):
    result = cli("evaluate", "--model", tiny_model_dir, "--task", JGLUE / "jnli.json", "--max-samples", "2",
                 "--backend", "vllm", "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "backend vllm: vllm does not import (ImportError: libcudart.so.12" in result.stderr
    assert "conda env create -f envs/gpu.yaml" in result.stderr and "backend: transformers" in result.stderr


def test_auto_falls_back_to_transformers_with_one_line(broken_vllm, tiny_model_dir, tmp_path):
    result = cli("evaluate", "--model", tiny_model_dir, "--task", JGLUE / "jnli.json", "--max-samples", "2",
                 "--num-fewshot", "1", "--backend", "auto", "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if "backend auto" in line]
    assert len(notices) == 1 and "transformers" in notices[0]
    assert (tmp_path / "out" / "jnli.parquet").is_file()
