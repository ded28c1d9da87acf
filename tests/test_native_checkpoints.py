"""Runs as their trainer left them: checkpoints saved by torch.distributed.checkpoint (as torchtitan and
accelerate's FSDP lay them out), converted inside the workflow by torch's own converter
(``torch.distributed.checkpoint.format_utils dcp_to_torch``), beside the same weights given as a Hugging Face
run; a copy in progress, a checkpoint whose conversion fails, a converter that is not installed."""

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from ckpt_stability.native_formats import FORMATS, native_incomplete_reason, zip_archive_problem
from ckpt_stability.predictions import read_predictions
from helpers import ROOT, cli, small_config, snakemake

STEPS = (10, 20, 30, 40)


def save_dcp(checkpoint: Path, directory: Path) -> None:
    """The checkpoint's weights saved by torch.distributed.checkpoint in one process (no process group), with
    their Hugging Face names, as ``dcp.save(model.state_dict())`` and accelerate's FSDP sharded save write them."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    dcp.save(load_file(checkpoint / "model.safetensors"), checkpoint_id=directory)


def dcp_converter(assets: Path) -> str:
    """The convert command: torch's DCP-to-torch.save converter, then the run's config.json and tokenizer."""
    return (f"{shlex.quote(sys.executable)} -m torch.distributed.checkpoint.format_utils dcp_to_torch {{src}} "
            f"{{out}}/pytorch_model.bin && cp {shlex.quote(str(assets))}/* {{out}}/")


@pytest.fixture(scope="module")
def native_run(tiny_demo, tmp_path_factory):
    """A DCP run (iter_0000010 ... iter_0000040, Megatron-style names, in a directory whose name has a space)
    whose iter_0000025 is broken (a data file cut short: its conversion fails) and whose iter_0000050 is a copy
    in progress (no .metadata yet); the tiny demo's checkpoints as a Hugging Face run beside it."""
    workdir = tmp_path_factory.mktemp("native")
    native, assets = workdir / "native run", workdir / "hf assets"
    assets.mkdir()
    for path in (tiny_demo / "checkpoints" / "checkpoint-10").iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, assets)
    for step in STEPS:
        save_dcp(tiny_demo / "checkpoints" / f"checkpoint-{step}", native / f"iter_{step:07d}")
    broken = native / "iter_0000025"
    shutil.copytree(native / "iter_0000020", broken)
    data = next(broken.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    in_progress = native / "iter_0000050"
    shutil.copytree(native / "iter_0000040", in_progress)
    (in_progress / ".metadata").unlink()
    config = small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")
    config["runs"] = {"hf": config["runs"]["tiny"],
                      "native": {"path": f"{native}/iter_{{step}}", "format": "dcp", "convert": dcp_converter(assets)}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir)
    return workdir, result


def test_a_native_run_gives_the_predictions_of_the_same_weights_in_hugging_face_format(native_run):
    workdir, result = native_run
    assert result.returncode == 0, result.stderr[-4000:]
    predictions = workdir / "results" / "predictions"
    # the windows of 2 whose members are the same in both runs (the native run's step 25 sits between 20 and 30)
    for method, steps in (("raw1", STEPS), ("avg2", (20, 40)), ("vote2", (20, 40)), ("prob2", (20, 40))):
        for step in steps:
            for task in ("demo_colors", "jnli") if method == "prob2" else ("demo_colors", "demo_arith", "jnli"):
                native = read_predictions(predictions / "native" / method / f"step{step}" / f"{task}.parquet")
                hf = read_predictions(predictions / "hf" / method / f"step{step}" / f"{task}.parquet")
                assert native.prediction == hf.prediction and (native.score == hf.score).all()
                if hf.choice_logprobs is not None:
                    assert (native.choice_logprobs == hf.choice_logprobs).all()  # bit for bit


def test_conversions_are_temporary_but_the_last_ones(native_run):
    """With windows up to 2, the last checkpoint's conversion is kept, for the window of the next one; the
    others were deleted once read."""
    workdir, _ = native_run
    assert [path.name for path in (workdir / "results" / "converted" / "native").iterdir()] == ["step40"]


def test_a_failed_conversion_is_recorded_and_the_others_go_on(native_run):
    workdir, result = native_run
    assert result.returncode == 0
    import pandas as pd

    excluded = pd.read_csv(workdir / "results" / "tables" / "excluded.csv")
    native = excluded[excluded.run == "native"]
    # the raw checkpoint at 25, and the windows of 2 that contain it (ending at 25 and at 30)
    assert set(zip(native.method, native.step)) == {("raw", 25), *((method, step) for method in ("avg", "vote", "prob")
                                                                    for step in (25, 30))}
    reason = native[native.method == "raw"].reason.item()
    assert "iter_0000025: the conversion failed (exit status" in reason
    assert "iter_0000025" in (workdir / "logs" / "convert" / "native" / "step25.log").read_text()
    assert excluded[excluded.run == "hf"].empty


def test_a_copy_in_progress_is_picked_up_once_complete(native_run, tiny_demo):
    workdir, result = native_run
    in_progress = workdir / "native run" / "iter_0000050"
    assert f"skipping incomplete checkpoint {in_progress} (.metadata missing" in result.stderr + result.stdout
    shutil.copy(workdir / "native run" / "iter_0000040" / ".metadata", in_progress)
    dry_run = snakemake(workdir, "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    # one conversion, its raw evaluation, the average and ensemble of the window of 2 ending at it, the reductions
    jobs = dry_run.stdout
    assert len(re.findall(r"^rule convert(?:_trailing)?:", jobs, re.MULTILINE)) == 1
    assert "wildcards: run=native, step=50" in jobs
    assert "run=native, method=raw, n=1, step=50" in jobs and "run=native, n=2, step=50" in jobs
    assert "run=hf" not in jobs
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # 40's conversion, read once more by the window ending at 50, is gone; 50's is kept for the next one
    assert [path.name for path in (workdir / "results" / "converted" / "native").iterdir()] == ["step50"]


def test_a_converter_that_is_not_installed_stops_the_workflow_before_any_job(tiny_demo, tmp_path):
    config = small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")
    native = tmp_path / "native"
    for step in (10, 20, 30):
        save_dcp(tiny_demo / "checkpoints" / f"checkpoint-{step}", native / f"step-{step}")
    config["runs"] = {"titan": {"path": f"{native}/step-{{step}}", "format": "dcp",
                                "convert": "convert-titan-to-hf {src} {out}"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert ("config runs.titan.convert: 'convert-titan-to-hf {src} {out}': its program 'convert-titan-to-hf' is "
            "not found on PATH") in result.stderr + result.stdout


def test_a_native_format_without_a_converter_is_refused(tiny_demo, tmp_path):
    config = small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")
    config["runs"] = {"megatron": {"path": f"{tmp_path}/iter_{{step}}", "format": "megatron"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert "config runs.megatron: format megatron needs a convert command" in result.stderr + result.stdout


# ---------------------------------------------------------------- completeness, per format


def touch(path: Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_megatron_torch_dist_is_complete_once_metadata_json_is_written(tmp_path):
    iteration = tmp_path / "iter_0001000"
    touch(iteration / "__0_0.distcp")
    touch(iteration / ".metadata")
    assert "metadata.json" in native_incomplete_reason(iteration, "megatron")
    touch(iteration / "metadata.json", b'{"sharded_backend": "torch_dist"}')
    assert native_incomplete_reason(iteration, "megatron") is None
    touch(tmp_path / "latest_checkpointed_iteration.txt", b"500\n")  # the save of 1000 is not finalised yet
    assert "past latest_checkpointed_iteration.txt's 500" in native_incomplete_reason(iteration, "megatron")
    touch(tmp_path / "latest_checkpointed_iteration.txt", b"1000\n")
    assert native_incomplete_reason(iteration, "megatron") is None


def test_megatron_legacy_archives_must_be_whole(tmp_path):
    import torch

    iteration = tmp_path / "iter_0000200"
    archive = iteration / "mp_rank_00" / "model_optim_rng.pt"
    archive.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(64)}}, archive)
    assert native_incomplete_reason(iteration, "megatron") is None
    archive.write_bytes(archive.read_bytes()[:-40])
    assert "mp_rank_00/model_optim_rng.pt is not a whole zip archive" in native_incomplete_reason(iteration, "megatron")


def test_litgpt_olmo_core_and_nemo_rules(tmp_path):
    import torch

    litgpt = tmp_path / "step-00001000"
    litgpt.mkdir()
    torch.save({"model": {"w": torch.ones(4)}}, litgpt / "lit_model.pth")
    assert "model_config.yaml" in native_incomplete_reason(litgpt, "litgpt")
    touch(litgpt / "model_config.yaml", b"n_layer: 2\n")
    assert native_incomplete_reason(litgpt, "litgpt") is None
    assert zip_archive_problem(litgpt / "lit_model.pth") is None

    olmo = tmp_path / "step1000"
    for name in ("model_and_optim/.metadata", "train/rank0.pt", "config.json"):
        touch(olmo / name)
    assert ".metadata.json" in native_incomplete_reason(olmo, "olmo-core")
    touch(olmo / ".metadata.json", b"{}")
    assert native_incomplete_reason(olmo, "olmo-core") is None

    nemo = tmp_path / "llama--val_loss=1.00-step=999-consumed_samples=1000.0"
    touch(nemo / "weights" / "metadata.json")
    touch(nemo / "context" / "io.json")
    unfinished = nemo.with_name(nemo.name + "-unfinished")
    touch(unfinished, b"")
    assert "-unfinished is there" in native_incomplete_reason(nemo, "nemo")
    unfinished.unlink()
    assert native_incomplete_reason(nemo, "nemo") is None


def test_the_schema_lists_the_formats_the_package_reads():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    run = schema["properties"]["runs"]["additionalProperties"]["oneOf"][1]
    assert tuple(run["properties"]["format"]["enum"]) == FORMATS


def test_a_conversion_that_does_not_validate_is_recorded_not_put_in_place(tiny_demo, tmp_path):
    """A converter that exits 0 but leaves a tensor out: the output holds the reason, naming the tensor."""
    checkpoint = tiny_demo / "checkpoints" / "checkpoint-10"
    converter = tmp_path / "drop_norm.py"
    converter.write_text(
        "import shutil, sys\nfrom pathlib import Path\nfrom safetensors.torch import load_file, save_file\n"
        "src, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "for path in src.iterdir():\n"
        "    if path.name != 'model.safetensors':\n        shutil.copy(path, out)\n"
        "weights = load_file(src / 'model.safetensors')\ndel weights['model.norm.weight']\n"
        "save_file(weights, out / 'model.safetensors', metadata={'format': 'pt'})\n")
    output = tmp_path / "converted"
    result = cli("convert", checkpoint, "--command", f"{shlex.quote(sys.executable)} {converter} {{src}} {{out}}",
                 "--step", 10, "--run", "r", "--output", output)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in output.iterdir()) == ["excluded.json"]
    reason = (output / "excluded.json").read_text()
    assert "not a usable Hugging Face checkpoint" in reason and "missing model.norm.weight (1)" in reason
