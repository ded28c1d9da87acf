"""Megatron-LM's WSM merge coefficients, verbatim, to test ``averaging_schemes`` against.

From NVIDIA/Megatron-LM, ``tools/checkpoint/weighted_merge.py`` at commit 812d36dbc43c (pull request #5114,
"Weighted Checkpoint Merging & WSM Support"; not on main as fetched on 2026-08-22), lines 104-105, 423-438 and 462-480.
Copyright (c) 2026, NVIDIA CORPORATION. All rights reserved. Licensed under the Apache License, Version 2.0.
Only the definitions below are copied; the rest of that file (merging the checkpoints) needs a Megatron
checkpoint and is not used. The tool spaces checkpoints equally whatever their steps, and has these two shapes.
"""

import math
from typing import Callable


class WeightedMergeError(ValueError):
    """Raised when weighted checkpoint merge inputs are invalid."""


def _schedule_linear_decay(x: float) -> float:
    if x < 0:
        raise WeightedMergeError(f"Schedule position must be non-negative, got {x}.")
    return 1 - x


def _schedule_minus_sqrt_decay(x: float) -> float:
    if x < 0:
        raise WeightedMergeError(f"Schedule position must be non-negative, got {x}.")
    return 1 - math.sqrt(x)


SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": _schedule_linear_decay,
    "minus-sqrt": _schedule_minus_sqrt_decay,
}


def _schedule_to_merge_coefficients(
    schedule_fn: Callable[[float], float], n_checkpoints: int
) -> list[float]:
    """Convert a decay schedule into discrete checkpoint merge coefficients."""

    if n_checkpoints < 0:
        raise WeightedMergeError(
            f"Number of checkpoints must be non-negative, got {n_checkpoints}."
        )
    if n_checkpoints <= 1:
        return [1.0] * n_checkpoints

    decay_schedule = [schedule_fn(index / n_checkpoints) for index in range(n_checkpoints)]
    coefficients = [0.0 for _ in range(n_checkpoints)]
    coefficients[-1] = decay_schedule[-1]
    for index in range(1, n_checkpoints - 1):
        coefficients[index] = decay_schedule[index] - decay_schedule[index + 1]
    coefficients[0] = 1 - sum(coefficients)
    return coefficients
