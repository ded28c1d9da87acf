"""Runs as their trainer left them, through the workflow: a Megatron run saved by megatron-core's
``dist_checkpointing`` and converted inside the workflow, and a run saved by torch.distributed.checkpoint (as
accelerate's FSDP and torchtitan lay it out) read in place (``hf_assets``), beside the same weights given as a
Hugging Face run; a copy in progress, a checkpoint whose conversion fails, a converter that is not installed;
torch's own DCP converter; DCP checkpoints saved by several ranks, averaged in place."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckpt_stability.config import RunSource
from ckpt_stability.errors import InputError
from ckpt_stability.native_formats import FORMATS, native_incomplete_reason, zip_archive_problem
from ckpt_stability.predictions import read_predictions
from helpers import ROOT, cli, small_config, snakemake, snakemake_command

STEPS = (10, 20, 30, 40)


def save_dcp(checkpoint: Path, directory: Path) -> None:
    """The checkpoint's weights saved by torch.distributed.checkpoint in one process (no process group), with
    their Hugging Face names, as ``dcp.save(model.state_dict())`` and accelerate's FSDP sharded save write them."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    dcp.save(load_file(checkpoint / "model.safetensors"), checkpoint_id=directory)


MEGATRON = Path(__file__).parent / "data" / "megatron"


def dcp_converter(assets: Path) -> str:
    """The convert command: torch's DCP-to-torch.save converter, then the run's config.json and tokenizer."""
    return (f"{shlex.quote(sys.executable)} -m torch.distributed.checkpoint.format_utils dcp_to_torch {{src}} "
            f"{{out}}/pytorch_model.bin && cp {shlex.quote(str(assets))}/* {{out}}/")


@pytest.fixture(scope="module")
def native_run(tiny_demo, tmp_path_factory):
    """Two runs as their trainers left them, in directories whose names have a space, each with iter_0000010 ...
    iter_0000040, a broken iter_0000025 (a data file cut short) and a copy in progress at iter_0000050:

    * ``megatron``: saved by megatron-core's ``dist_checkpointing`` (torch_dist, Megatron's names), converted by a
      converter built on megatron-core's loader (25's conversion fails); 50 has no metadata.json yet and is past
      latest_checkpointed_iteration.txt;
    * ``inplace``: saved by ``torch.distributed.checkpoint`` with Hugging Face names, read in place (25 cannot be
      read); 50 has no .metadata yet;

    and the tiny demo's checkpoints as a Hugging Face run beside them. Started with the venv's ``snakemake``,
    without activating the venv (a PATH without it)."""
    workdir = tmp_path_factory.mktemp("native")
    native, megatron, assets = workdir / "native run", workdir / "megatron run", workdir / "hf assets"
    assets.mkdir()
    for path in (tiny_demo / "checkpoints" / "checkpoint-10").iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, assets)
    for step in STEPS:
        save_dcp(tiny_demo / "checkpoints" / f"checkpoint-{step}", native / f"iter_{step:07d}")
    subprocess.run([sys.executable, str(MEGATRON / "save_megatron.py"), str(megatron),
                    *(f"{tiny_demo / 'checkpoints' / f'checkpoint-{step}'}:{step}" for step in STEPS)],
                   check=True, capture_output=True)
    for run, last_written in ((native, ".metadata"), (megatron, "metadata.json")):
        broken = run / "iter_0000025"
        shutil.copytree(run / "iter_0000020", broken)
        data = next(broken.glob("*.distcp"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        in_progress = run / "iter_0000050"
        shutil.copytree(run / "iter_0000040", in_progress)
        (in_progress / last_written).unlink()
    megatron_converter = " ".join(map(shlex.quote, (sys.executable, str(MEGATRON / "megatron_to_hf.py"))))
    config = small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")
    del config["tasks"]["demo_arith"]  # generation is tested elsewhere: these runs are about the weights
    config["runs"] = {"hf": config["runs"]["tiny"],
                      "inplace": {"path": f"{native}/iter_{{step}}", "format": "dcp", "hf_assets": str(assets)},
                      "megatron": {"path": f"{megatron}/iter_{{step}}", "format": "megatron",
                                   "convert": f"{megatron_converter} {{src}} {{out}} {shlex.quote(str(assets))}"}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    venv_snakemake = str(Path(sys.executable).parent / "snakemake")
    result = subprocess.run([venv_snakemake, *snakemake_command(workdir)[3:]], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(workdir))})
    return workdir, result


def test_a_native_run_gives_the_predictions_of_the_same_weights_in_hugging_face_format(native_run):
    workdir, result = native_run
    assert result.returncode == 0, result.stderr[-4000:]
    predictions = workdir / "results" / "predictions"
    # the windows of 2 whose members are the same in every run (the native runs' step 25 sits between 20 and 30)
    assert (workdir / "megatron run" / "iter_0000040" / "metadata.json").is_file()  # megatron-core's torch_dist
    for method, steps in (("raw1", STEPS), ("avg2", (20, 40)), ("vote2", (20, 40)), ("prob2", (20, 40))):
        for step in steps:
            for task in ("demo_colors", "jnli"):
                hf = read_predictions(predictions / "hf" / method / f"step{step}" / f"{task}.parquet")
                for run in ("inplace", "megatron"):
                    native = read_predictions(predictions / run / method / f"step{step}" / f"{task}.parquet")
                    assert native.prediction == hf.prediction and (native.score == hf.score).all()
                    if hf.choice_logprobs is not None:
                        assert (native.choice_logprobs == hf.choice_logprobs).all()  # bit for bit


def test_conversions_are_temporary_but_the_last_ones(native_run):
    """With windows up to 2, the last checkpoint's conversion is kept, for the window of the next one; the
    others were deleted once read. A run read in place keeps none: its averages read the checkpoints."""
    workdir, _ = native_run
    assert kept_conversions(workdir, "megatron") == ["step40"] and kept_conversions(workdir, "inplace") == []


def kept_conversions(workdir: Path, run: str) -> list[str]:
    directory = workdir / "results" / "converted" / run
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def test_a_failed_conversion_is_recorded_and_the_others_go_on(native_run):
    workdir, result = native_run
    assert result.returncode == 0
    import pandas as pd

    excluded = pd.read_csv(workdir / "results" / "tables" / "excluded.csv")
    for run in ("megatron", "inplace"):
        rows = excluded[excluded.run == run]
        # the raw checkpoint at 25, and the windows of 2 that contain it (ending at 25 and at 30)
        assert set(zip(rows.method, rows.step)) == {("raw", 25), *((method, step) for method in ("avg", "vote", "prob")
                                                                   for step in (25, 30))}
    reasons = excluded.set_index(["run", "method", "step"]).reason
    assert "megatron run/iter_0000025: the conversion failed (exit status 1): " in reasons["megatron", "raw", 25]
    assert "iter_0000025" in (workdir / "logs" / "convert" / "megatron" / "step25.log").read_text()
    # read in place: the data file cut short is named, in the raw checkpoint's reason and in the averages'
    for method, step in (("raw", 25), ("avg", 25), ("avg", 30)):
        assert re.search(r"iter_0000025/__0_0\.distcp: truncated", reasons["inplace", method, step])
    assert excluded[excluded.run == "hf"].empty
    report = (workdir / "results" / "report" / "report.html").read_text()  # the report names them too
    assert "megatron run/iter_0000025: the conversion failed" in report and "iter_0000025/__0_0.distcp" in report


def test_a_copy_in_progress_is_picked_up_once_complete(native_run, tiny_demo):
    workdir, result = native_run
    native, megatron = workdir / "native run", workdir / "megatron run"
    assert (f"skipping incomplete checkpoint {native / 'iter_0000050'} (.metadata missing"
            in result.stderr + result.stdout)
    assert f"skipping incomplete checkpoint {megatron / 'iter_0000050'} (" in result.stderr + result.stdout
    shutil.copy(native / "iter_0000040" / ".metadata", native / "iter_0000050")
    shutil.copy(megatron / "iter_0000040" / "metadata.json", megatron / "iter_0000050")
    (megatron / "latest_checkpointed_iteration.txt").write_text("50\n")  # what Megatron-LM's save writes last
    dry_run = snakemake(workdir, "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    # per run, one conversion, its raw evaluation, the average and ensemble of the window of 2 ending at it; the
    # reductions
    jobs = dry_run.stdout
    assert len(re.findall(r"^rule convert(?:_trailing)?:", jobs, re.MULTILINE)) == 2
    assert re.search(r"^average\s+2$", jobs, re.MULTILINE)  # the job counts
    for run in ("megatron", "inplace"):
        assert f"wildcards: run={run}, step=50" in jobs
        assert f"run={run}, method=raw, n=1, step=50" in jobs and f"run={run}, n=2, step=50" in jobs
    assert "run=hf" not in jobs
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # 40's conversion, read once more by the window ending at 50, is gone; 50's is kept for the next one
    assert kept_conversions(workdir, "megatron") == ["step50"] and kept_conversions(workdir, "inplace") == []


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


def test_torch_s_dcp_converter_line_converts_a_dcp_checkpoint(tiny_demo, tmp_path):
    """The README's convert line for a DCP with Hugging Face names, by torch's own converter."""
    from safetensors.torch import load_file

    checkpoint = tiny_demo / "checkpoints" / "checkpoint-20"
    assets = tmp_path / "hf assets"
    shutil.copytree(checkpoint, assets, ignore=shutil.ignore_patterns("*.safetensors"))
    save_dcp(checkpoint, tmp_path / "step-20")
    output = tmp_path / "converted"
    result = cli("convert", tmp_path / "step-20", "--command", dcp_converter(assets), "--step", 20, "--run", "r",
                 "--output", output)
    assert result.returncode == 0 and not (output / "excluded.json").exists(), result.stderr[-2000:]
    import torch

    converted = torch.load(output / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(converted[name], tensor) for name, tensor in
               load_file(checkpoint / "model.safetensors").items())


# ---------------------------------------------------------------- torch.distributed checkpoints read in place

SHARDED_SAVE = """
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from safetensors.torch import load_file

def save(rank, port, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    for source, target, dim in jobs:
        state = {name: distribute_tensor(tensor, mesh, [Shard(min(dim, tensor.dim() - 1))])
                 for name, tensor in load_file(source).items()}
        # as accelerate's FSDP SHARDED_STATE_DICT saves it: the model's state dict under "model"
        dcp.save({"model": state}, checkpoint_id=target)
    dist.destroy_process_group()

if __name__ == "__main__":
    jobs = [(source, target, int(dim)) for source, target, dim in zip(*[iter(sys.argv[2:])] * 3)]
    mp.spawn(save, args=(sys.argv[1], jobs), nprocs=2)
"""


def save_sharded_dcp(jobs: list[tuple[Path, Path, int]], scratch: Path) -> None:
    """For each (weights, directory, dim): ``weights`` (a safetensors file) saved into ``directory`` by two gloo
    ranks, each tensor sharded along ``dim``, as FSDP2 (``Shard(0)``) or tensor parallelism (``Shard(1)``) hold
    it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = scratch / "sharded_save.py"
    script.write_text(SHARDED_SAVE)
    subprocess.run([sys.executable, str(script), str(port), *(str(value) for job in jobs for value in job)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def dcp_members(tiny_model_dir, tmp_path_factory):
    """Three checkpoints of the tiny model (its weights plus noise, the embedding in bfloat16), each as a Hugging
    Face directory (safetensors), as a DCP saved in one process, and as a DCP saved by two ranks (rows of each
    tensor split unevenly between them); and the first saved by two ranks with tensor parallelism
    (``tensor_parallel``: chunks along the second dimension)."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("dcp-members")
    weights = load_file(tiny_model_dir / "model.safetensors")
    members = {"safetensors": [], "dcp": [], "sharded": []}
    for k in range(3):
        generator = torch.Generator().manual_seed(k)
        state = {name: (tensor + torch.randn(tensor.shape, generator=generator)).contiguous()
                 for name, tensor in weights.items()}
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.bfloat16)
        hf = root / f"hf-{k}"
        shutil.copytree(tiny_model_dir, hf)
        save_file(state, hf / "model.safetensors")
        save_dcp(hf, root / f"dcp-{k}")
        for kind, directory in zip(members, (hf, root / f"dcp-{k}", root / f"sharded-{k}")):
            members[kind].append(directory)
    tensor_parallel = root / "tensor-parallel"
    save_sharded_dcp([*((hf / "model.safetensors", sharded, 0) for hf, sharded in zip(members["safetensors"],
                                                                                          members["sharded"])),
                      (members["safetensors"][0] / "model.safetensors", tensor_parallel, 1)], root)
    return members, tensor_parallel


def test_dcp_read_in_place_averages_bit_for_bit_as_safetensors(dcp_members, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    dcp_members, _ = dcp_members
    assert len(list(dcp_members["sharded"][0].glob("__*_0.distcp"))) == 2  # one data file per rank
    outputs = {}
    for kind, members in dcp_members.items():
        outputs[kind] = tmp_path / kind
        assets = [] if kind == "safetensors" else ["--assets", tiny_model_dir]
        done = cli("average", "--output", outputs[kind], *assets, *members)
        assert done.returncode == 0, done.stderr[-2000:]
    reference = load_file(outputs["safetensors"] / "model.safetensors")
    assert reference["model.embed_tokens.weight"].dtype.is_floating_point and len(reference) > 10
    for kind in ("dcp", "sharded"):
        averaged = load_file(outputs[kind] / "model.safetensors")
        assert averaged.keys() == reference.keys()
        for name, tensor in reference.items():
            assert averaged[name].dtype == tensor.dtype and averaged[name].view(-1).view(torch_uint(tensor)).equal(
                tensor.view(-1).view(torch_uint(tensor))), name  # bit for bit
        assert (outputs[kind] / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def torch_uint(tensor):
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]


def test_dcp_refusals_name_the_checkpoint_and_the_problem(dcp_members, tiny_model_dir, tmp_path):
    dcp_members, tensor_parallel = dcp_members
    members = dcp_members["dcp"][:2]
    done = cli("average", "--output", tmp_path / "no-assets", *members)
    assert done.returncode != 0 and "a torch.distributed checkpoint holds weights only" in done.stderr
    # tensor parallelism: chunks along the second dimension are not runs of elements
    done = cli("average", "--output", tmp_path / "tp-avg", "--assets", tiny_model_dir, members[0], tensor_parallel)
    assert done.returncode != 0
    assert re.search(rf"{re.escape(str(tensor_parallel))}: tensor 'model\.[\w.]+' is saved in chunks of \[\d+, \d+\] "
                     r"at \[0, \d+\], not along its first dimension", done.stderr), done.stderr[-2000:]


def test_a_run_read_in_place_must_have_hugging_face_names(tiny_demo, tmp_path):
    """Checked when the workflow starts, before any job: a torchtitan checkpoint (its own names) takes a convert
    command; hf_assets goes with format dcp only."""
    import torch
    import torch.distributed.checkpoint as dcp

    config = small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")
    assets = tiny_demo / "checkpoints" / "checkpoint-10"
    for step in STEPS:
        dcp.save({"tok_embeddings.weight": torch.zeros(4, 2), "norm.weight": torch.ones(2)},
                 checkpoint_id=tmp_path / f"step-{step}", no_dist=True)
    config["runs"] = {"titan": {"path": f"{tmp_path}/step-{{step}}", "format": "dcp", "hf_assets": str(assets)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert re.search(rf"config runs\.titan\.hf_assets: {re.escape(str(tmp_path))}/step-40: its tensors are not those "
                     r"of the model its config\.json builds: missing model\.[\w.]+.*; unexpected norm\.weight, "
                     r"tok_embeddings\.weight \(2\) .*takes a convert command", result.stderr + result.stdout)
    with pytest.raises(InputError, match=r"config runs\.titan\.hf_assets: for format dcp without a convert command "
                                         r"\(checkpoints with Hugging Face names, read in place\); this run has "
                                         r"format megatron"):
        RunSource.from_config("titan", {**config["runs"]["titan"], "format": "megatron"})


def test_dcp_averaging_memory_is_a_few_chunks_not_the_model(tiny_model_dir, tmp_path):
    """Two DCP checkpoints of 256 MiB: the averaging job's peak RSS is a few chunk buffers, not the model (torch
    is not even imported: .metadata is read without it)."""
    import torch
    import torch.distributed.checkpoint as dcp

    members = []
    for k in range(2):
        state = {f"layer.{i}.weight": torch.full((4096, 2048), float(k)) for i in range(8)}
        dcp.save(state, checkpoint_id=tmp_path / f"member-{k}", no_dist=True)
        members.append(tmp_path / f"member-{k}")
        model_mib = sum(tensor.nbytes for tensor in state.values()) / 2**20
        del state
    script = ("import sys; from ckpt_stability.cli import main; code = main(sys.argv[1:]); "
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1], "
              "'torch' in sys.modules); sys.exit(code)")
    job = subprocess.run([sys.executable, "-c", script, "average", "--output", str(tmp_path / "avg"), "--assets",
                          str(tiny_model_dir), *map(str, members)], capture_output=True, text=True, check=True)
    peak_kib, torch_imported = job.stdout.split()[-2:]
    assert model_mib == 256 and int(peak_kib) / 1024 < 150 and torch_imported == "False", job.stdout
    shutil.rmtree(tmp_path)  # do not keep 768 MB in pytest's kept temporary directories
