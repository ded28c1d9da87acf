"""Test-set uncertainty against the reference implementations: statsmodels' Wilson interval, McNemar test
and Holm adjustment, arch's Model Confidence Set, and a per-draw loop for the stratified paired bootstrap."""

import warnings

import numpy as np
import pytest
from arch.bootstrap import MCS
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from ckpt_stability.uncertainty import (INTERVAL_DRAWS, MCS_DRAWS, Strata, holm, mcnemar_exact,
                                        model_confidence_set, score_intervals, wilson_interval)


def binary_scores(accuracies, examples, seed):
    """A (checkpoints x examples) 0/1 matrix, each row correct with its accuracy."""
    rng = np.random.default_rng(seed)
    return (rng.random((len(accuracies), examples)) < np.asarray(accuracies)[:, None]).astype(float)


def arch_mcs(scores, reps, seed):
    """arch's MCS (T_max, i.i.d. bootstrap) of losses -scores, and its draws as (reps x examples) counts."""
    mcs = MCS(-scores.T, 0.05, reps=reps, block_size=1, method="max", bootstrap="circular", seed=seed)
    mcs.compute()
    examples = scores.shape[1]
    counts = np.stack([np.bincount(index, minlength=examples) for index in mcs._bootstrap_indices])
    return mcs, counts


def mcs_set(p_values):
    return [int(i) for i in np.flatnonzero(p_values > 0.05)]


# ---------------------------------------------------------------- Wilson intervals


@pytest.mark.parametrize("shape, seed", [((3, 10), 0), ((5, 57), 1), ((4, 1000), 2), ((2, 1), 3)])
def test_wilson_intervals_equal_statsmodels(shape, seed):
    """Binary scores of one task: Wilson's interval as statsmodels computes it, all-0 and all-1 rows too."""
    scores = (np.random.default_rng(seed).random(shape) < 0.6).astype(float)
    scores[0] = 0.0
    scores[-1] = 1.0
    low, high, method = score_intervals(Strata.single(scores))
    expected_low, expected_high = proportion_confint(scores.sum(axis=1), shape[1], alpha=0.05, method="wilson")
    assert method == "wilson"
    assert np.allclose(low, expected_low, rtol=1e-12, atol=1e-15)
    assert np.allclose(high, expected_high, rtol=1e-12, atol=1e-15)
    # contains the score up to rounding: for all-0 / all-1 rows statsmodels' bounds miss 0 / 1 by ~1e-17 too
    assert np.all(low <= scores.mean(axis=1) + 1e-12) and np.all(scores.mean(axis=1) <= high + 1e-12)


def test_wilson_interval_directly_equals_statsmodels():
    """wilson_interval on counts 0..n, at two levels."""
    for trials in (1, 7, 200):
        successes = np.arange(trials + 1)
        for alpha in (0.05, 0.1):
            low, high = wilson_interval(successes, trials, alpha)
            expected_low, expected_high = proportion_confint(successes, trials, alpha=alpha, method="wilson")
            assert np.allclose(low, expected_low, rtol=1e-12, atol=1e-15)
            assert np.allclose(high, expected_high, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- stratified paired bootstrap


def two_task_strata(seed=0):
    """3 checkpoints, char_f1-like scores in [0, 1] on two tasks of 40 and 25 examples, weights 1/4 and 3/4."""
    rng = np.random.default_rng(seed)
    return Strata([rng.random((3, 40)), rng.beta(2, 5, (3, 25))], [0.25, 0.75])


def test_bootstrap_means_equal_a_loop_over_resampled_indices():
    """Per draw: resample each task's examples, take the weighted mean of task means, as the matrix product."""
    strata = two_task_strata()
    rng = np.random.default_rng(1)
    draws = 300
    indices = [rng.integers(0, scores.shape[1], size=(draws, scores.shape[1])) for scores in strata.scores]
    counts = [np.stack([np.bincount(row, minlength=scores.shape[1]) for row in index])
              for index, scores in zip(indices, strata.scores)]
    expected = np.array([sum(weight * scores[:, index[draw]].mean(axis=1)
                             for scores, weight, index in zip(strata.scores, strata.weights, indices))
                         for draw in range(draws)])
    assert np.allclose(strata.bootstrap_means(counts), expected, rtol=1e-12, atol=1e-14)
    centered = [scores - scores.mean(axis=1, keepdims=True) for scores in strata.scores]
    expected_centered = np.array([sum(weight * values[:, index[draw]].mean(axis=1)
                                      for values, weight, index in zip(centered, strata.weights, indices))
                                  for draw in range(draws)])
    assert np.allclose(strata.bootstrap_means(counts, center=True), expected_centered, rtol=1e-12, atol=1e-14)


def test_resample_draws_counts_per_task_shared_by_all_checkpoints():
    """One (draws x n_t) count matrix per task, each row a resample of n_t examples; same seed, same draws."""
    strata = two_task_strata()
    counts = strata.resample(50, seed=3)
    assert [c.shape for c in counts] == [(50, 40), (50, 25)]
    assert all(np.all(c.sum(axis=1) == c.shape[1]) and np.all(c >= 0) for c in counts)
    assert all(np.array_equal(a, b) for a, b in zip(counts, strata.resample(50, seed=3)))


def test_percentile_bootstrap_interval_for_non_binary_scores():
    """Non-binary scores: the 2.5 % and 97.5 % quantiles of the bootstrap means, each containing its score."""
    strata = two_task_strata()
    counts = strata.resample(500, seed=5)
    low, high, method = score_intervals(strata, counts)
    expected_low, expected_high = np.quantile(strata.bootstrap_means(counts), [0.025, 0.975], axis=0)
    assert method == "bootstrap"
    assert np.array_equal(low, expected_low) and np.array_equal(high, expected_high)
    assert np.all(low <= strata.level_scores()) and np.all(strata.level_scores() <= high)

    low, high, method = score_intervals(strata)  # default draws
    expected_low, expected_high = np.quantile(strata.bootstrap_means(strata.resample(INTERVAL_DRAWS)),
                                              [0.025, 0.975], axis=0)
    assert method == "bootstrap"
    assert np.array_equal(low, expected_low) and np.array_equal(high, expected_high)
    assert np.all(low <= strata.level_scores()) and np.all(strata.level_scores() <= high)


def test_binary_scores_on_several_tasks_use_the_bootstrap():
    """Wilson only for one task: 0/1 scores on two tasks get the stratified bootstrap."""
    rng = np.random.default_rng(0)
    strata = Strata([(rng.random((2, 30)) < 0.5).astype(float), (rng.random((2, 20)) < 0.7).astype(float)],
                    [0.5, 0.5])
    low, high, method = score_intervals(strata)
    assert method == "bootstrap"
    assert np.all(low <= strata.level_scores()) and np.all(strata.level_scores() <= high)


# ---------------------------------------------------------------- paired differences


def test_paired_difference_single_task():
    """Differences of level scores; SE the sample SD of per-example differences over sqrt(n); 0 for the reference."""
    scores = np.random.default_rng(0).random((4, 60))
    strata = Strata.single(scores)
    for reference in range(4):
        difference, se = strata.paired_difference(reference)
        assert np.allclose(difference, strata.level_scores() - strata.level_scores()[reference], atol=1e-15)
        expected = [np.std(scores[i] - scores[reference], ddof=1) / np.sqrt(60) for i in range(4)]
        assert np.allclose(se, expected, rtol=1e-12)
        assert difference[reference] == 0.0 and se[reference] == 0.0


def test_paired_difference_stratified_matches_the_bootstrap():
    """Two tasks: the SE agrees with the SD of bootstrapped paired differences (within Monte-Carlo error)."""
    strata = two_task_strata(seed=2)
    difference, se = strata.paired_difference(0)
    assert np.allclose(difference, strata.level_scores() - strata.level_scores()[0], atol=1e-15)
    means = strata.bootstrap_means(strata.resample(4000, seed=7))
    bootstrap_se = (means - means[:, [0]]).std(axis=0)
    assert se[0] == 0.0 and bootstrap_se[0] == 0.0
    assert np.allclose(se[1:], bootstrap_se[1:], rtol=0.08)


# ---------------------------------------------------------------- Model Confidence Set vs arch


MCS_CASES = [
    # (a) clear separation: two checkpoints at 0.9, four at 0.5
    ([0.9, 0.5, 0.9, 0.5, 0.5, 0.5], 1000, 0),
    ([0.9, 0.5, 0.9, 0.5, 0.5, 0.5], 1000, 1),
    # (b) close checkpoints
    ([0.50, 0.51, 0.52, 0.53, 0.54, 0.55, 0.56], 400, 2),
    ([0.50, 0.51, 0.52, 0.53, 0.54, 0.55, 0.56], 400, 3),
    ([0.50, 0.52, 0.54, 0.56], 400, 4),
    ([0.6, 0.7, 0.65], 300, 5),
]


def jittered(scores, seed):
    """Scores plus noise below 1e-3: off the 0/1 lattice, so no bootstrap statistic ties the observed one."""
    return scores + 1e-3 * np.random.default_rng(seed + 50).random(scores.shape)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("accuracies, examples, seed", MCS_CASES)
def test_mcs_on_arch_draws_equals_arch(accuracies, examples, seed):
    """On arch's own draws, tie-free scores: p-values within 2/B of arch's and the same set."""
    reps = 1000
    scores = jittered(binary_scores(accuracies, examples, seed), seed)
    mcs, counts = arch_mcs(scores, reps, seed)
    p_values = model_confidence_set(Strata.single(scores), [counts])
    expected = mcs.pvalues.sort_index()["Pvalue"].to_numpy()
    assert np.max(np.abs(p_values - expected)) <= 2 / reps
    assert mcs_set(p_values) == [int(i) for i in sorted(mcs.included)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("accuracies, examples, seed", MCS_CASES)
def test_mcs_on_arch_draws_equals_arch_for_binary_scores(accuracies, examples, seed):
    """0/1 scores on arch's draws: the same set. On the 0/1 lattice many draws tie the observed statistic
    exactly (T = T*_b in exact arithmetic); we count a tie as no exceedance (arch's T < T*_b, exactly), where
    arch lets float rounding decide each tie, so that our p-values are at most arch's (within 2/B)."""
    reps = 1000
    scores = binary_scores(accuracies, examples, seed)
    mcs, counts = arch_mcs(scores, reps, seed)
    p_values = model_confidence_set(Strata.single(scores), [counts])
    expected = mcs.pvalues.sort_index()["Pvalue"].to_numpy()
    assert np.all(p_values <= expected + 2 / reps)
    assert mcs_set(p_values) == [int(i) for i in sorted(mcs.included)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcs_clear_separation_keeps_exactly_the_good_checkpoints(seed):
    """Two of six checkpoints far better: the set is exactly those two, for arch and for us."""
    scores = binary_scores([0.5, 0.9, 0.5, 0.5, 0.9, 0.5], 1000, seed)
    mcs, counts = arch_mcs(scores, 1000, seed)
    assert [int(i) for i in sorted(mcs.included)] == [1, 4]
    assert mcs_set(model_confidence_set(Strata.single(scores), [counts])) == [1, 4]
    assert mcs_set(model_confidence_set(Strata.single(scores))) == [1, 4]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("accuracies, examples, seed", MCS_CASES)
def test_mcs_default_draws_agree_with_arch_within_monte_carlo_error(accuracies, examples, seed):
    """Our own draws (counts=None): p-values within Monte-Carlo error of arch's; same set when clearly separated."""
    scores = binary_scores(accuracies, examples, seed)
    mcs, _ = arch_mcs(scores, MCS_DRAWS, seed + 100)
    p_values = model_confidence_set(Strata.single(scores))
    expected = mcs.pvalues.sort_index()["Pvalue"].to_numpy()
    assert np.max(np.abs(p_values - expected)) <= 0.08
    if examples == 1000:
        assert mcs_set(p_values) == [int(i) for i in sorted(mcs.included)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_mcs_on_non_binary_scores_equals_arch():
    """char_f1-like scores on one task: same p-values and set as arch on arch's draws."""
    rng = np.random.default_rng(9)
    scores = np.clip(rng.beta(5, 5, (5, 300)) + np.array([0.0, 0.02, 0.04, 0.1, 0.1])[:, None], 0, 1)
    mcs, counts = arch_mcs(scores, 1000, 9)
    p_values = model_confidence_set(Strata.single(scores), [counts])
    assert np.max(np.abs(p_values - mcs.pvalues.sort_index()["Pvalue"].to_numpy())) <= 2 / 1000
    assert mcs_set(p_values) == [int(i) for i in sorted(mcs.included)]


def test_mcs_of_identical_checkpoints_is_all_ones_without_warning():
    """All rows equal (random and constant): every p-value 1, no warning or error."""
    row = (np.random.default_rng(0).random(200) < 0.6).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scores in (np.tile(row, (5, 1)), np.ones((3, 50)), np.tile(np.random.default_rng(1).random(80), (4, 1))):
            assert np.array_equal(model_confidence_set(Strata.single(scores)), np.ones(scores.shape[0]))
        strata = Strata([np.tile(row[:120], (3, 1)), np.tile(row[120:], (3, 1))], [0.5, 0.5])
        assert np.array_equal(model_confidence_set(strata), np.ones(3))


# ---------------------------------------------------------------- the hand-built cases


def test_checkpoints_differing_on_one_example_are_both_in_the_set():
    """1,000 examples, one checkpoint right on exactly one more: both in the set, McNemar p = 1."""
    better = np.zeros(1000)
    better[:600] = 1.0
    worse = better.copy()
    worse[0] = 0.0
    scores = np.stack([worse, better])
    p_values = model_confidence_set(Strata.single(scores))
    assert p_values[1] == 1.0 and p_values[0] > 0.05
    assert mcs_set(p_values) == [0, 1]
    assert mcnemar_exact(scores[:1], better)[0] == 1.0


def test_mcs_p_value_of_one_differing_example_follows_exact_arithmetic():
    """Two checkpoints differing on one example (c = its count in a draw): T < T*_b iff |c - 1| > 1, so
    the worse one's p-value is the share of draws with c >= 3 (about 0.08); c in {0, 2} ties exactly."""
    better = np.zeros(1000)
    better[:600] = 1.0
    worse = better.copy()
    worse[0] = 0.0
    strata = Strata.single(np.stack([worse, better]))
    counts = strata.resample(MCS_DRAWS)
    assert model_confidence_set(strata, counts)[0] == pytest.approx(np.mean(counts[0][:, 0] >= 3), abs=1e-12)


def test_checkpoints_differing_on_200_examples_are_told_apart():
    """1,000 examples, one checkpoint right on 200 more: only the better in the set, McNemar p < 1e-10."""
    better = np.zeros(1000)
    better[:600] = 1.0
    worse = better.copy()
    worse[:200] = 0.0
    scores = np.stack([worse, better])
    p_values = model_confidence_set(Strata.single(scores))
    assert mcs_set(p_values) == [1]
    assert mcnemar_exact(scores[:1], better)[0] < 1e-10


# ---------------------------------------------------------------- McNemar and Holm vs statsmodels


def statsmodels_mcnemar(first, second):
    both = int(np.sum((first == 1) & (second == 1)))
    first_only = int(np.sum((first == 1) & (second == 0)))
    second_only = int(np.sum((first == 0) & (second == 1)))
    neither = int(np.sum((first == 0) & (second == 0)))
    return mcnemar(np.array([[both, first_only], [second_only, neither]]), exact=True).pvalue


@pytest.mark.parametrize("examples, seed", [(10, 0), (50, 1), (300, 2), (1000, 3)])
def test_mcnemar_exact_equals_statsmodels(examples, seed):
    """Random 0/1 checkpoints against a reference vector, including an identical row (no discordant pairs)."""
    rng = np.random.default_rng(seed)
    second = (rng.random(examples) < 0.6).astype(float)
    first = (rng.random((6, examples)) < np.array([0.3, 0.5, 0.6, 0.6, 0.7, 0.9])[:, None]).astype(float)
    first[2] = second  # no discordant pairs
    first[3, :] = second
    first[3, 0] = 1.0 - second[0]  # exactly one discordant pair
    p_values = mcnemar_exact(first, second)
    expected = [statsmodels_mcnemar(row, second) for row in first]
    assert np.allclose(p_values, expected, rtol=1e-12, atol=1e-300)
    assert p_values[2] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_holm_equals_statsmodels(seed):
    """Random p-values (with ties and ones) adjusted as multipletests(method="holm")."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.random(8) ** 3, [0.01, 0.01, 1.0, 0.0]])
    rng.shuffle(p)
    assert np.allclose(holm(p), multipletests(p, method="holm")[1], rtol=1e-12, atol=0)


def test_holm_leaves_nan_out_of_the_family():
    """NaN stays NaN and is not counted in the family size."""
    p = np.array([0.02, np.nan, 0.001, 0.04, np.nan, 0.3, 0.012])
    adjusted = holm(p)
    present = ~np.isnan(p)
    assert np.array_equal(np.isnan(adjusted), ~present)
    assert np.allclose(adjusted[present], multipletests(p[present], method="holm")[1], rtol=1e-12, atol=0)
    assert np.all(np.isnan(holm(np.array([np.nan, np.nan]))))
