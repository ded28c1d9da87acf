"""The config schema: the default config is valid; anything wrong is refused with the key named."""

import copy
import re
import shutil

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from helpers import ROOT, small_config, snakemake

SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def refusal(config) -> str:
    with pytest.raises(WorkflowError) as error:
        validate(config, SCHEMA)
    return str(error.value)


def test_default_config_is_valid_and_defaults_are_filled(config):
    del config["final_fraction"], config["engine"]
    validate(config, SCHEMA)
    assert config["final_fraction"] == 0.2
    assert config["engine"] == {"enabled": True, "vllm": False, "idle_timeout": 60}
    assert config["tasks"]["demo_nli"]["max_samples"] is None


def test_unknown_key_is_refused_by_name(config):
    task_typo = copy.deepcopy(config)
    config["final_fracton"] = 0.3
    assert "'final_fracton' was unexpected" in refusal(config)
    task_typo["tasks"]["demo_nli"]["num_fewshots"] = 2
    assert "'num_fewshots' was unexpected" in refusal(task_typo)


@pytest.mark.parametrize("windows", [[0, 2], [1, -4], [1, 2.5], ["4"], [], [2, 2]])
def test_windows_must_be_distinct_positive_integers(config, windows):
    config["windows"] = windows
    assert "windows" in refusal(config)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_final_fraction_in_zero_one(config, fraction):
    config["final_fraction"] = fraction
    assert "final_fraction" in refusal(config)


def test_final_fraction_one_is_allowed(config):
    config["final_fraction"] = 1
    validate(config, SCHEMA)


def test_run_pattern_needs_step(config):
    config["runs"]["mine"] = "/data/run1/checkpoint"
    message = refusal(config)
    assert "runs" in message and "mine" in message and "step" in message


@pytest.mark.parametrize("key, value", [("backend", "tpu"), ("dtype", "int8"), ("keep_averaged", "yes")])
def test_enumerations(config, key, value):
    config[key] = value
    assert key in refusal(config)


def test_task_needs_a_valid_mode(config):
    config["tasks"]["demo_nli"]["mode"] = "loglik"
    message = refusal(config)
    assert "demo_nli" in message and "mode" in message


def test_snakemake_refuses_a_bad_config_naming_the_file_and_the_key(tmp_path, config):
    config["windows"] = [0, 2]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert f"Invalid config in {tmp_path / 'config.yaml'}: windows[0]: 0 is less than the minimum of 1" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_a_configfile_replaces_the_demo_config_instead_of_extending_it(tmp_path, tiny_demo):
    """Merged into the demo config, one's own config would still train and evaluate the demo runs."""
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config")  # the workflow's configfile, as in a clone
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run=tiny" in result.stdout
    assert not re.search(r"rule demo_|run=(base|small)|demo_nli|demo_qa", result.stdout)
