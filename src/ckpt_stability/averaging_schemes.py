"""Averaging schemes: the coefficients c_j of the window's checkpoints in the averaged model Σ_j c_j θ_j.

For the window ending at step s_k with checkpoints θ_0 ... θ_k at steps s_0 < ... < s_k (n = k + 1):

* ``uniform``: c_j = 1/n (Nishida et al.; PMA's SMA).
* ``wsm`` with a decay shape f on [0, 1], f(0) = 1, f(1) = 0 (``SHAPES``): the update between θ_{j-1} and θ_j
  gets the multiplier w_j = f(x_j), j = 1..k, with x_j = (k / (k + 1)) (s_j - s_0) / (s_k - s_0); then
  c_0 = 1 - w_1, c_j = w_j - w_{j+1} (0 < j < k), c_k = w_k (WSM, Tian et al. 2025, arXiv 2507.17634). On
  equal spacing x_j = j / n: Megatron-LM's ``tools/checkpoint/weighted_merge.py`` (PR #5114), which spaces the
  checkpoints equally whatever their steps and has ``linear`` and ``minus-sqrt`` (our ``1-sqrt``) only.
* ``ema`` with a half-life h in steps: c_j ∝ 2^(-(s_k - s_j) / h), normalised over the window: the closed form
  of PMA's EMA weights (Li et al. 2025, arXiv 2505.12082, §4.2) restricted to the window, not a recursion
  started at its first checkpoint.

Coefficients are computed in float64. Where all of them are within ``UNIFORM_TOLERANCE`` of 1/n (``wsm linear``
on equal spacing, where w_j - w_{j+1} rounds to 1/n give or take an ulp), they are exactly 1/n, and the
average is computed as the uniform mean, bit for bit. A window of one checkpoint has c_0 = 1: the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt_stability.errors import InputError

SHAPES = {
    "linear": lambda x: 1.0 - x,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
}
"""WSM's decay shapes f(x), x in [0, 1]"""
UNIFORM, WSM, EMA = "uniform", "wsm", "ema"
SCHEMES = (UNIFORM, WSM, EMA)
UNIFORM_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Scheme:
    """How a window's checkpoints are weighted (module docstring)."""

    scheme: str = UNIFORM
    shape: str | None = None
    """wsm only: a key of SHAPES"""
    half_life: float | None = None
    """ema only: in steps, > 0"""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if (self.scheme == WSM) != (self.shape is not None):
            raise InputError(f"shape {self.shape!r}: a shape goes with scheme wsm, and scheme wsm needs one "
                             f"({', '.join(SHAPES)})")
        if self.shape is not None and self.shape not in SHAPES:
            raise InputError(f"shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if (self.scheme == EMA) != (self.half_life is not None):
            raise InputError(f"half_life {self.half_life!r}: a half-life goes with scheme ema, and scheme ema "
                             f"needs one (in steps)")
        if self.half_life is not None and not (isinstance(self.half_life, (int, float)) and self.half_life > 0
                                               and math.isfinite(self.half_life)):
            raise InputError(f"half_life must be a positive number of steps, got {self.half_life!r}")

    @property
    def description(self) -> str:
        """In words, for labels and provenance: ``uniform``, ``wsm 1-sqrt``, ``ema half-life 64``."""
        if self.scheme == WSM:
            return f"wsm {self.shape}"
        if self.scheme == EMA:
            return f"ema half-life {self.half_life:g}"
        return self.scheme

    def coefficients(self, steps: Sequence[int]) -> list[float]:
        """c_0 ... c_k of the window whose checkpoints are at ``steps`` (increasing), oldest first."""
        steps = check_steps(steps)
        n = len(steps)
        if n == 1:
            return [1.0]
        span = steps[-1] - steps[0]
        if self.scheme == WSM:
            shape = SHAPES[self.shape]
            k = n - 1
            multipliers = [shape(k / n * (step - steps[0]) / span) for step in steps[1:]]  # w_1 ... w_k
            coefficients = [1.0 - multipliers[0]]
            coefficients += [multipliers[j] - multipliers[j + 1] for j in range(k - 1)]
            coefficients.append(multipliers[-1])
        elif self.scheme == EMA:
            decays = [2.0 ** (-(steps[-1] - step) / self.half_life) for step in steps]
            coefficients = [decay / sum(decays) for decay in decays]
        else:
            coefficients = [1.0 / n] * n
        if all(abs(c - 1.0 / n) <= UNIFORM_TOLERANCE for c in coefficients):
            return [1.0 / n] * n
        return coefficients


def check_steps(steps: Sequence[int]) -> list[int]:
    """``steps`` as a list, refused (InputError naming them) unless non-empty and strictly increasing."""
    steps = list(steps)
    if not steps or any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise InputError(f"steps must be strictly increasing (oldest checkpoint first), got {steps}")
    return steps


def is_uniform(coefficients: Sequence[float]) -> bool:
    """Whether the average is the uniform mean (computed as such: sum, then one division)."""
    return len(set(coefficients)) == 1


def effective_step(steps: Sequence[int], coefficients: Sequence[float]) -> float:
    """Σ_j c_j s_j: where the averaged model sits on the step axis (its lag behind s_k is s_k minus this)."""
    return math.fsum(c * s for c, s in zip(coefficients, steps))
