"""Checkpoint stability: how much do few-shot scores jump between neighbouring pretraining
checkpoints, and how much do checkpoint averaging and ensembling steady them."""

__version__ = "0.1.0"

from ckpt_stability.torch_builds import hide_companions_of_another_build

hide_companions_of_another_build()  # before anything imports transformers
