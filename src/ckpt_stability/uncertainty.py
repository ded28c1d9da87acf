"""Test-set sampling uncertainty of checkpoint scores: intervals, the Model Confidence Set, paired tests.

Every function takes the per-example scores of the checkpoints of one group as ``Strata``: one matrix
(checkpoints x examples) per task, with the task's weight in the level's score, so that a level's score is
``sum_t weight_t * mean_i scores_t[:, i]`` (a task: one stratum of weight 1; a category: its tasks, 1/tasks
each; ``overall``: the mean of the category means). A bootstrap resamples examples within each task
(stratified) and resamples the same examples for every checkpoint (paired), through one matrix of draw
counts per task, so that B draws cost one matrix product and no Python loop over draws.

References: Wilson (1927) as in statsmodels' ``proportion_confint(method="wilson")``; the Model Confidence
Set of Hansen, Lunde & Nason (2011, Econometrica 79(2)) with the T_max statistic, as arch's
``arch.bootstrap.MCS(method="max")`` computes it (arch's block bootstraps with blocks of 1 are the i.i.d.
bootstrap used here); McNemar's exact test as statsmodels' ``mcnemar(exact=True)``; Holm (1979) as
statsmodels' ``multipletests(method="holm")``. tests/test_uncertainty.py checks each against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
"""95 % intervals, and the MCS at level 0.05."""
INTERVAL_DRAWS = 2000
MCS_DRAWS = 1000
SEED = 0
TIE = 1e-9
"""relative tolerance under which a bootstrap statistic equals the observed one (a tie, not an exceedance)"""
_ZERO = 1e-12
"""a bootstrap standard deviation below this is a model no draw tells from the set's mean"""


@dataclass(frozen=True)
class Strata:
    """The per-example scores of k checkpoints on one level: ``scores[t]`` (k x n_t) and ``weights[t]``."""

    scores: list[np.ndarray]
    weights: list[float]

    @classmethod
    def single(cls, scores: np.ndarray) -> "Strata":
        return cls([np.asarray(scores, dtype=float)], [1.0])

    @property
    def models(self) -> int:
        return self.scores[0].shape[0]

    def level_scores(self) -> np.ndarray:
        """The level's score of each checkpoint."""
        return sum(weight * scores.mean(axis=1) for scores, weight in zip(self.scores, self.weights))

    def is_binary(self) -> bool:
        return len(self.scores) == 1 and bool(np.isin(self.scores[0], (0.0, 1.0)).all())

    def resample(self, draws: int, seed: int = SEED) -> list[np.ndarray]:
        """The draw counts of a stratified bootstrap: per task, (draws x n_t) counts of each example in each
        draw (every row sums to n_t), the same for every checkpoint (paired)."""
        rng = np.random.default_rng(seed)
        return [rng.multinomial(scores.shape[1], np.full(scores.shape[1], 1 / scores.shape[1]), size=draws)
                for scores in self.scores]

    def bootstrap_means(self, counts: list[np.ndarray], center: bool = False) -> np.ndarray:
        """(draws x checkpoints): the level's score of every checkpoint in each draw of ``counts``; with
        ``center``, of each checkpoint's scores minus their mean (the MCS's loss errors)."""
        total = np.zeros((counts[0].shape[0], self.models))
        for scores, weight, draw_counts in zip(self.scores, self.weights, counts):
            values = scores - scores.mean(axis=1, keepdims=True) if center else scores
            total += (weight / scores.shape[1]) * (draw_counts.astype(float) @ values.T)
        return total

    def paired_difference(self, reference: int) -> tuple[np.ndarray, np.ndarray]:
        """Each checkpoint's level score minus the reference checkpoint's, and its standard error from the
        per-example differences (sample variance, as lm-evaluation-harness's ``mean_stderr``)."""
        difference = np.zeros(self.models)
        variance = np.zeros(self.models)
        for scores, weight in zip(self.scores, self.weights):
            paired = scores - scores[reference]
            difference += weight * paired.mean(axis=1)
            if paired.shape[1] > 1:
                variance += weight ** 2 * paired.var(axis=1, ddof=1) / paired.shape[1]
        return difference, np.sqrt(variance)


def wilson_interval(successes: np.ndarray, trials: int, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval of a proportion successes / trials."""
    z = stats.norm.ppf(1 - alpha / 2)
    proportion = np.asarray(successes, dtype=float) / trials
    center = (proportion + z ** 2 / (2 * trials)) / (1 + z ** 2 / trials)
    half = z / (1 + z ** 2 / trials) * np.sqrt(proportion * (1 - proportion) / trials + z ** 2 / (4 * trials ** 2))
    return center - half, center + half


def score_intervals(strata: Strata, counts: list[np.ndarray] | None = None,
                    alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray, str]:
    """(low, high, method) of every checkpoint's level score: Wilson's for one task of 0/1 scores, else the
    percentile bootstrap (stratified by task) over ``counts`` (default: INTERVAL_DRAWS draws, seed SEED)."""
    if strata.is_binary():
        scores = strata.scores[0]
        low, high = wilson_interval(scores.sum(axis=1), scores.shape[1], alpha)
        return low, high, "wilson"
    means = strata.bootstrap_means(counts or strata.resample(INTERVAL_DRAWS))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high, "bootstrap"


def model_confidence_set(strata: Strata, counts: list[np.ndarray] | None = None) -> np.ndarray:
    """The MCS p-value of every checkpoint (Hansen, Lunde & Nason 2011, T_max; losses = -scores) over the
    bootstrap draws ``counts`` (default: MCS_DRAWS draws, seed SEED): the checkpoints with a p-value above
    alpha form the set that cannot be told apart from the best.

    As arch's ``MCS._compute_max``: each step standardises the included checkpoints' mean losses, minus
    their mean, by the bootstrap standard deviation of the same, tests their maximum against its bootstrap
    distribution and eliminates the checkpoint(s) attaining it; a p-value is the largest test p-value up to
    its checkpoint's elimination, and the last ones standing get 1."""
    losses_errors = -strata.bootstrap_means(counts or strata.resample(MCS_DRAWS), center=True)  # draws x k
    mean_losses = -strata.level_scores()
    included = np.ones(strata.models, dtype=bool)
    p_values = np.ones(strata.models)
    largest = 0.0
    while included.sum() > 1:
        indices = np.flatnonzero(included)
        draws_centered = losses_errors[:, indices] - losses_errors[:, indices].mean(axis=1, keepdims=True)
        deviations = np.sqrt((draws_centered ** 2).mean(axis=0))
        differences = mean_losses[indices] - mean_losses[indices].mean()
        constant = deviations < _ZERO
        if constant.all() and np.all(np.abs(differences) < _ZERO):
            break  # identical losses: nothing tells the rest apart
        with np.errstate(divide="ignore", invalid="ignore"):
            statistics = np.where(constant, np.where(np.abs(differences) < _ZERO, 0.0, np.sign(differences) * np.inf),
                                  differences / deviations)
            simulated = np.where(constant, 0.0, draws_centered / np.where(constant, 1.0, deviations)).max(axis=1)
        statistic = statistics.max()
        # a draw counts where its statistic exceeds the observed one (arch: T < T*); on 0/1 scores many draws
        # equal it exactly, and float rounding must not decide those ties
        largest = max(largest, float((simulated > statistic + TIE * max(1.0, abs(statistic))).mean()))
        worst = indices[statistics == statistic]
        p_values[worst] = largest
        included[worst] = False
    return p_values


def mcnemar_exact(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """McNemar's exact p-value of each row of ``first`` (checkpoints x examples, 0/1) against ``second``
    (examples): twice the binomial tail of the smaller discordant count, at most 1."""
    first = np.asarray(first, dtype=bool)
    second = np.asarray(second, dtype=bool)
    only_first = (first & ~second).sum(axis=1)
    only_second = (~first & second).sum(axis=1)
    return np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(only_first, only_second), only_first + only_second, 0.5))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN left out of the family and kept)."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    present = np.flatnonzero(~np.isnan(p_values))
    order = present[np.argsort(p_values[present], kind="stable")]
    family = len(order)
    scaled = np.minimum(1.0, (family - np.arange(family)) * p_values[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted
