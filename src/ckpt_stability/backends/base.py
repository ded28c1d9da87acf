"""The one small interface every inference backend implements."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the jobs that hand their work to an engine: no numpy there
    import numpy as np


class WeightsNotSwappable(Exception):
    """A model's weights cannot replace the loaded ones in place exactly as a fresh load would set them
    (see ``Backend.swap_weights``); the message says why, and the backend is built anew instead."""


class Backend(ABC):
    """A loaded model that answers prompts.

    Prompts are complete strings (see ``prompts``); everything is greedy and deterministic."""

    name: str
    context_length: int
    """How many tokens a prompt with its answer may have (``max_position_embeddings``; for vLLM, which
    needs room for one generated token, ``max_model_len - 1``)."""
    tokenizer: object
    """the model's Hugging Face tokenizer"""
    add_special_tokens: bool = True
    """whether prompts get the tokenizer's special tokens (BOS); llm-jp's v1.4.1 runs add none"""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids of each text, as this backend tokenizes prompts."""
        # verbose=False: no "longer than the specified maximum sequence length" warning; callers window long
        # texts (token_nll) or check prompts against context_length themselves
        return self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens, verbose=False)["input_ids"]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens each text is, as this backend tokenizes prompts."""
        return [len(ids) for ids in self.encode(texts)]

    @abstractmethod
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuation of each prompt, up to ``max_new_tokens`` tokens, cut before the first stop
        string."""

    @abstractmethod
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        """``[len(prompts), len(choices)]``: the summed log-probability of each choice's tokens after each
        prompt. The choice tokens are those of ``tokenize(prompt + choice)`` past ``tokenize(prompt)``."""

    @abstractmethod
    def token_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of every predicted token of the texts, and their count. A
        text longer than the context is scored in non-overlapping windows of ``context_length`` tokens less
        one, the same for every backend (vLLM's longest scored prompt), each window's first token context only."""

    @abstractmethod
    def provenance(self) -> dict:
        """What produced the outputs: backend, library versions, device, dtype."""

    def swap_weights(self, model_dir: str) -> None:
        """Take the weights of ``model_dir``, a model of the same identity as the loaded one (architecture,
        tokenizer and generation files: ``checkpoints.model_identity``), in place of the loaded ones, so
        that every later answer is bit-identical to that of a backend built on ``model_dir``. Raise
        WeightsNotSwappable where that cannot be guaranteed: the backend is then closed and built anew."""
        raise WeightsNotSwappable(f"the {self.name} backend does not swap weights")

    def close(self) -> None:
        """Release the model (and the GPU)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def continuation_split(prompt_ids: list[int], whole_ids: list[int]) -> int:
    """Where the choice's tokens start in ``tokenize(prompt + choice)``: after as many tokens as the
    prompt alone has (lm-evaluation-harness's convention, so that a merge across the boundary counts
    towards the choice)."""
    return min(len(prompt_ids), len(whole_ids) - 1)


def inference_dtype(requested: str, on_gpu: bool, model_dir: str) -> str:
    """``auto``: float32 on the CPU (16-bit matmuls are slow there, and float32 keeps the CPU scores
    comparable across machines); on a GPU the checkpoint's 16-bit dtype, or bfloat16 for a float32
    checkpoint. The same rule for every backend, so that their scores are comparable."""
    if requested != "auto":
        return requested
    if not on_gpu:
        return "float32"
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("bfloat16", "float16") else "bfloat16"
