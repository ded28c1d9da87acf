"""Shared fixtures: tiny real models and a tiny demo run, built once per test session."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_stability.demo import DemoSettings, ModelSize, documents, pretrain, train_tokenizer
from ckpt_stability.prompts import PromptTemplate

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the demo's tokenizer: real weights, arbitrary answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-model")
    corpus = documents(random.Random(0), PromptTemplate())
    tokenizer = train_tokenizer([next(corpus) for _ in range(300)], vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TINY_DEMO = DemoSettings(train_steps=40, save_every=10, samples_per_task=12, batch_size=8, seq_len=128,
                         vocab_size=400, heldout_documents=10, tokenizer_documents=300)
TINY_SIZE = ModelSize(hidden_size=32, num_layers=2)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A reduced demo run (4 checkpoints of a 2-layer model, 12 samples per task) in a few seconds:
    ``tasks/``, ``heldout.txt``, ``tokenizer/`` and ``checkpoints/checkpoint-{10,20,30,40}``."""
    directory = tmp_path_factory.mktemp("tiny-demo")
    pretrain(directory, TINY_DEMO, TINY_SIZE)
    return directory
