"""Shared fixtures: tiny real models and a tiny demo run, built once per test session."""

import random
from pathlib import Path

import pytest

from ckpt_stability.demo import documents, pretrain, train_tokenizer
from ckpt_stability.prompts import PromptTemplate
from helpers import TINY_DEMO, TINY_SIZE, VLLM_SIZE


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


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A reduced demo run (4 checkpoints of a 2-layer model, 12 samples per task) in a few seconds:
    ``tasks/``, ``heldout.txt``, ``tokenizer/`` and ``checkpoints/checkpoint-{10,20,30,40}``."""
    directory = tmp_path_factory.mktemp("tiny-demo")
    pretrain(directory, TINY_DEMO, TINY_SIZE)
    return directory


@pytest.fixture(scope="session")
def vllm_demo(tmp_path_factory) -> Path:
    """The reduced demo run of ``tiny_demo`` with heads of 32 (the smallest size vLLM's CPU attention
    supports; the tiny model's are 8)."""
    directory = tmp_path_factory.mktemp("vllm-demo")
    pretrain(directory, TINY_DEMO, VLLM_SIZE)
    return directory
