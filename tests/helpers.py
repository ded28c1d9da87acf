"""What the tests share besides fixtures: paths, the commands that run the workflow and the CLI, configs and
model copies. Fixtures are in conftest.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ckpt_stability.demo import DemoSettings, ModelSize

ROOT = Path(__file__).resolve().parents[1]
JGLUE = Path(__file__).parent / "data" / "jglue"


def snakemake_command(workdir, *args) -> list[str]:
    """The command that runs this repository's workflow in ``workdir`` (its config: ``workdir/config.yaml``)
    on 2 cores."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]


def snakemake(workdir, *args, env=None):
    """Run the workflow in ``workdir`` (see ``snakemake_command``); ``env`` adds environment variables."""
    return subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def cli_command(*args) -> list[str]:
    """The command ``ckpt-stability ARGS``, as ``python -m ckpt_stability`` of this interpreter."""
    return [sys.executable, "-m", "ckpt_stability", *map(str, args)]


def cli(*args, **options) -> subprocess.CompletedProcess:
    """Run ``ckpt-stability ARGS``; ``options`` go to ``subprocess.run``."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, **options)


def small_config(checkpoints, tasks_dir):
    """A config over the tiny demo's checkpoints (see ``tiny_demo``): windows 1 and 2, every method,
    two demo tasks and 8 JNLI samples."""
    return {
        "runs": {"tiny": f"{checkpoints}/checkpoint-{{step}}"},
        "windows": [1, 2],
        "methods": ["avg", "vote", "prob"],
        "tasks": {
            "demo_colors": {"path": str(tasks_dir / "demo_colors.json"), "category": "MC", "mode": "choice",
                            "num_fewshot": 2},
            "demo_arith": {"path": str(tasks_dir / "demo_arith.json"), "category": "MR", "mode": "generate",
                           "num_fewshot": 2},
            "jnli": {"path": str(JGLUE / "jnli.json"), "category": "NLI", "mode": "choice", "num_fewshot": 1,
                     "max_samples": 8},
        },
        "final_fraction": 0.5,
        "backend": "transformers",
    }


def with_context_length(model_dir: Path, directory: Path, context_length: int) -> Path:
    """A copy of the model under ``directory`` whose config declares another context length (RoPE: no
    weights depend on it)."""
    copy = directory / f"context-{context_length}"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context_length}))
    return copy


TINY_DEMO = DemoSettings(train_steps=40, save_every=10, samples_per_task=12, batch_size=8, seq_len=128,
                         vocab_size=400, heldout_documents=10, tokenizer_documents=300)
TINY_SIZE = ModelSize(hidden_size=32, num_layers=2)
VLLM_SIZE = ModelSize(hidden_size=128, num_layers=2)  # 4 heads of 32


POISONED = "model.layers.0.mlp.down_proj.weight"


def poison(checkpoint: Path) -> None:
    """One NaN in one tensor of the checkpoint, as a diverged run saves it."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors[POISONED][1, 2] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def engine_pids(log: str) -> list[int]:
    """The evaluation engines that a job's log says it started."""
    return [int(pid) for pid in re.findall(r"started evaluation engine (\d+)", log)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1]
    except FileNotFoundError:
        return False
    return not state.startswith("Z")  # an engine's parent has exited: a zombie waits for init to reap it


def ended(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def kill_engine_during(pid: int, command: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``command``, the engine ``pid``'s second evaluation job, and kill the engine once it works on it:
    the job's exit code and what it wrote after that."""
    job = subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True)
    for line in job.stderr:
        if re.search(rf"evaluation engine {pid} \(slot \w+\): job 2", line):
            os.kill(pid, signal.SIGKILL)
            break
    return job.wait(timeout=120), job.stderr.read()
