"""The analyses' pure functions against hand-computed cases and brute-force references (docs/method.md §7)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from lminfluence.analysis import crosslingual_rows, fit_power_law, is_spurious, l2_l1_ratio, layer_shares, layer_thirds, rank_curve, third_rank_agreement, top_share
from lminfluence.analysis.stats import average_ranks, spearman, top_k_indices
from lminfluence.analysis.tokens import grouped_l2_l1

nan = float("nan")


def pareto(n: int, alpha: float, x_min: float, rng) -> np.ndarray:
    """Samples of p(x) ∝ x^(-alpha), x ≥ x_min, by inverting the survival function (x/x_min)^(1-alpha)."""
    return x_min * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def brute_force_fit(x: np.ndarray, min_tail: int) -> tuple[float, float, int, float]:
    """(alpha, x_min, tail, ks) by a plain loop over every distinct value as x_min (Clauset et al. 2009)."""
    x = np.sort(x[x > 0])
    best = None
    for x_min in np.unique(x):
        tail = x[x >= x_min]
        spread = np.log(tail / x_min).sum()
        if tail.size < min_tail or spread == 0:
            continue
        alpha = 1 + tail.size / spread
        below = np.array([(tail < v).sum() for v in tail]) / tail.size  # empirical CDF just below each value
        ks = np.max(np.abs(1 - (tail / x_min) ** (1 - alpha) - below))
        if best is None or ks < best[3]:
            best = (alpha, x_min, tail.size, ks)
    return best


# ------------------------------------------------------------- power law


@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.0])
def test_fit_recovers_alpha_on_pareto_samples(alpha):
    """10⁴ Pareto samples: the fitted exponent is within 0.1 of the true one (the issue's bar; the
    estimator's standard error (alpha-1)/√n is 0.005–0.03 here, so 0.1 is > 3 standard errors)."""
    x = pareto(10_000, alpha, 1.0, np.random.default_rng(int(alpha * 10)))
    fit = fit_power_law(x)
    assert abs(fit.alpha - alpha) < 0.1, fit
    assert fit.n == 10_000 and fit.tail_size >= 50 and 0 < fit.ks < 0.05


@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.0])
def test_fit_finds_the_tail_above_a_non_power_law_body(alpha):
    """8,000 Pareto samples above x_min = 1 and 2,000 uniform ones below it: the KS search puts x_min
    at the start of the power law (within the lowest 10 % of the Pareto part) and alpha within 0.1."""
    rng = np.random.default_rng(7)
    x = np.concatenate([pareto(8_000, alpha, 1.0, rng), rng.uniform(0.01, 1.0, 2_000)])
    fit = fit_power_law(x)
    assert abs(fit.alpha - alpha) < 0.1, fit
    assert 1.0 <= fit.x_min <= np.quantile(x[x >= 1], 0.1), fit


def test_vectorised_search_equals_a_loop_over_candidates():
    """Every distinct value tried (max_candidates=None): the same x_min, alpha and KS as a plain loop,
    also with tied values (rounded data). Float64 sums in another order: agreement to 1e-12."""
    rng = np.random.default_rng(3)
    for x in (rng.lognormal(0, 1.5, 400), np.round(rng.lognormal(0, 1.0, 400), 1)):
        fit = fit_power_law(x, min_tail=5, max_candidates=None)
        alpha, x_min, tail, ks = brute_force_fit(x, 5)
        assert (fit.x_min, fit.tail_size) == (x_min, tail)
        assert fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.ks == pytest.approx(ks, rel=1e-12)


def test_candidate_grid_is_close_to_the_exhaustive_search():
    """The default grid of ≤ 2000 tail sizes (10⁴ points): alpha within 0.01 and KS within 0.001 of
    trying every value; the grid's neighbouring tails differ by < 0.4 %, so the optimum moves little."""
    x = pareto(10_000, 2.5, 1.0, np.random.default_rng(11))
    grid, full = fit_power_law(x), fit_power_law(x, max_candidates=None)
    assert abs(grid.alpha - full.alpha) < 0.01 and abs(grid.ks - full.ks) < 1e-3 and grid.ks >= full.ks


@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.0])
def test_fit_agrees_with_the_powerlaw_package(alpha):
    """Against ``powerlaw.Fit`` (continuous, x_min by KS) searching the same candidates (every value but
    the largest: min_tail=2). powerlaw 2.0 bounds alpha to [0, 3] by default, which breaks alpha = 4,
    so the range is widened. x_min must be the same value. Outside (1.5, 3] powerlaw refines the
    closed-form alpha by Nelder–Mead (tol 1e-4) from that very optimum: alpha within 1e-3, and KS
    within 1e-3 too (|dD/dalpha| ≤ max ln(r)·r^(1-alpha) ≤ 1/(e(alpha-1)) < 1 for alpha > 1.4)."""
    powerlaw = pytest.importorskip("powerlaw")
    x = pareto(2_000, alpha, 1.0, np.random.default_rng(int(alpha * 100)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(x, verbose=False, parameter_ranges={"alpha": [1, 20]})
    fit = fit_power_law(x, min_tail=2, max_candidates=None)
    assert fit.x_min == ref.xmin and fit.tail_size == int(ref.n_tail)
    assert abs(fit.alpha - ref.alpha) < 1e-3 and abs(fit.ks - ref.D) < 1e-3


def test_too_few_positive_values_give_a_nan_fit():
    """Fewer positive values than the minimum tail, none at all, or one repeated value: NaN, no exception."""
    for x in ([], [-1.0, -2.0, 0.0], np.linspace(1, 2, 49), np.full(100, 3.0), [nan, math.inf, 1.0]):
        fit = fit_power_law(np.asarray(x, dtype=float))
        assert math.isnan(fit.alpha) and math.isnan(fit.x_min) and math.isnan(fit.ks) and fit.tail_size == 0 and not fit.ok
    assert fit_power_law(np.linspace(1, 2, 49)).n == 49
    assert fit_power_law(np.linspace(1, 2, 50)).ok  # exactly the minimum tail
    with pytest.raises(ValueError, match="min_tail"):
        fit_power_law(np.ones(3), min_tail=1)


def test_expected_rank_matches_the_tail_count():
    """The fitted law's rank of x is tail · (x/x_min)^(1-alpha): tail at x_min, tail/2 where the survival halves."""
    fit = fit_power_law(pareto(5_000, 3.0, 2.0, np.random.default_rng(5)))
    half = fit.x_min * 2 ** (1 / (fit.alpha - 1))
    assert fit.expected_rank(np.array([fit.x_min, half])) == pytest.approx([fit.tail_size, fit.tail_size / 2])


# ------------------------------------------------------------- top shares and the rank curve


def test_top_share_hand_computed():
    """Ten scores with positive total 10: the top 1, 2 and 5 hold 5, 8 and 10 of it."""
    s = np.array([0, 3, -1, 5, 0, 2, 0, 0, 0, 0], dtype=float)
    assert top_share(s, [0.001, 0.1, 0.2, 0.5]).tolist() == [0.5, 0.5, 0.8, 1.0]
    assert top_share(np.array([4.0, -1.0, -2.0]), [1.0, 0.5]).tolist() == [1.0, 1.0]  # negatives in the top add nothing
    assert top_share(np.array([2.0, nan, 1.0, 1.0]), [0.25, 0.5]).tolist() == [0.5, 0.75]  # n = 3 finite: m = 1, 2
    assert np.isnan(top_share(np.array([-1.0, 0.0]), [0.1])).all() and np.isnan(top_share(np.array([]), [0.1])).all()


def test_top_count_is_immune_to_float_noise():
    """0.001 · 1000 is 1.0000000000000002 in floats: still the top 1 sequence, not 2; 1001 → 2."""
    s = np.r_[np.array([10.0, 5.0]), np.zeros(998)]
    assert top_share(s, [0.001]).tolist() == [10 / 15]
    assert top_share(np.r_[s, 0.0], [0.001]).tolist() == [1.0]


def test_rank_curve():
    """Positive scores sorted descending at ranks 1..P: all of them when P ≤ 256, else ≤ 256 log-spaced ranks from 1 to P."""
    r, v = rank_curve(np.array([1.0, -2.0, 3.0, 2.0, 0.0]))
    assert r.tolist() == [1, 2, 3] and v.tolist() == [3.0, 2.0, 1.0]
    s = np.random.default_rng(0).random(10_000) - 0.2
    r, v = rank_curve(s)
    desc = np.sort(s[s > 0])[::-1]
    assert r[0] == 1 and r[-1] == desc.size and len(r) <= 256 and np.all(np.diff(r) > 0)
    assert np.array_equal(v, desc[r - 1]) and r.dtype == np.int64
    assert rank_curve(np.array([-1.0]))[0].size == 0


# ------------------------------------------------------------- spurious tokens


def test_l2_l1_ratio_and_the_two_thirds_rule():
    """One spike: ratio 1, spurious. Flat over 4 tokens: 1/√4 = 0.5, kept. (3, -4): 5/7 > 2/3, spurious.
    (2, 1, 0): √5/3 = 0.745, spurious. Flat over 9: 1/3. All zero: NaN and not flagged."""
    cases = {(0, 0, 5, 0): 1.0, (1, 1, 1, 1): 0.5, (3, -4): 5 / 7, (2, 1, 0): math.sqrt(5) / 3, (1,) * 9: 1 / 3}
    for a, expected in cases.items():
        assert l2_l1_ratio(np.array(a)) == pytest.approx(expected, rel=1e-15)
    ratios = np.array([l2_l1_ratio(np.array(a)) for a in cases] + [l2_l1_ratio(np.zeros(3)), l2_l1_ratio(np.zeros(0))])
    assert np.isnan(ratios[-2:]).all()
    assert is_spurious(ratios).tolist() == [True, False, True, True, False, False, False]
    assert is_spurious(np.array([2 / 3])).tolist() == [False]  # the paper's rule is strict


def test_grouped_ratio_equals_one_sequence_at_a_time():
    values = np.array([0, 0, 5, 0, 1, 1, 1, 1, 0, 0, 3, -4], dtype=float)
    starts = np.array([0, 4, 8, 10])
    expected = [l2_l1_ratio(values[a:b]) for a, b in zip(starts, [4, 8, 10, 12])]
    np.testing.assert_array_equal(grouped_l2_l1(values, starts), expected)


# ------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "blocks, expected",
    [
        (1, "M"), (2, "LU"), (3, "LMU"), (4, "LMMU"), (5, "LLMUU"), (6, "LLMMUU"), (7, "LLMMMUU"), (8, "LLLMMUUU"),
    ],
)  # fmt: skip
def test_layer_thirds_split_blocks_by_their_centre(blocks, expected):
    """Block i of n goes to third floor(3(i+½)/n): a symmetric split, two layers per block share their third."""
    names = [f"model.layers.{b}.mlp.{p}" for b in range(blocks) for p in ("up_proj", "down_proj")]
    got = "".join(t[0].upper() for t in layer_thirds(names))[::2]
    assert got == expected
    assert layer_thirds(list(reversed(names))) == list(reversed(layer_thirds(names)))  # by block number, not by position


def test_layers_without_a_block_number_are_placed_by_model_order():
    """The embedding comes before the blocks, the head after them: 4 units split lower, middle, middle, upper."""
    names = ["transformer.wte", "transformer.h.0.mlp.c_fc", "transformer.h.10.mlp.c_fc", "lm_head"]
    assert layer_thirds(names) == ["lower", "middle", "middle", "upper"]


def test_layer_shares_hand_computed():
    """Two sequences' per-layer scores (1, 2, 3) and (1, 0, -1) sum to (2, 2, 2): a third each."""
    np.testing.assert_allclose(layer_shares(np.array([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]])), [1 / 3] * 3, rtol=1e-15)
    assert np.isnan(layer_shares(np.array([[1.0, -2.0]]))).all() and np.isnan(layer_shares(np.zeros((0, 2)))).all()


def test_third_rank_agreement_hand_computed():
    """Full score = lower + middle + upper = 14, 23, 32, 41: the lower third ranks alike (+1), the upper
    the other way (-1), the middle is constant (NaN); fewer than 3 sequences give NaN."""
    per_layer = np.array([[10, 0, 4], [20, 0, 3], [30, 0, 2], [40, 0, 1]], dtype=float)
    rho = third_rank_agreement(per_layer, ["lower", "middle", "upper"])
    assert rho["lower"] == pytest.approx(1.0) and rho["upper"] == pytest.approx(-1.0) and math.isnan(rho["middle"])
    assert all(math.isnan(v) for v in third_rank_agreement(per_layer[:2], ["lower", "middle", "upper"]).values())


# ------------------------------------------------------------- cross-lingual


def test_crosslingual_two_languages_hand_computed():
    """k = 2: top(en) = {0, 1}, top(es) = {2, 1}. en→es captures (1+3)/(6+3), es→en (1+4)/(5+4);
    overlap 1/2; over the union {0, 1, 2} the scores rank in opposite orders (-1). The lone-language
    group and the query without a language give no rows."""
    scores = np.array([[5, 4, 1, 0, nan], [1, 3, 6, 2, 0], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1]], dtype=float)
    cols = crosslingual_rows(scores, ["q_en", "q_es", "solo", "nolang"], ["g", "g", "h", "g"], ["en", "es", "en", None], k=2)
    assert cols["query_from"] == ["q_en", "q_es"] and cols["language_to"] == ["es", "en"] and cols["group"] == ["g", "g"]
    np.testing.assert_allclose(cols["captured"], [4 / 9, 5 / 9])
    assert cols["overlap"] == [0.5, 0.5] and cols["k"] == [2, 2]
    np.testing.assert_allclose(cols["spearman"], [-1, -1])


def test_crosslingual_three_languages_with_missing_scores():
    """k = 2 with es not scoring sequence 1: en→es has a top sequence es did not score (captured NaN)
    and only 2 jointly scored sequences in the union (Spearman NaN); the other pairs by hand."""
    en = [6, 5, 4, 1, 0, 2]
    es = [5, nan, 6, 1, 2, 0]
    fr = [1, 2, 3, 4, 5, 6]
    cols = crosslingual_rows(np.array([en, es, fr], dtype=float), ["a", "b", "c"], ["g"] * 3, ["en", "es", "fr"], k=2)
    pairs = list(zip(cols["language_from"], cols["language_to"]))
    assert pairs == [("en", "es"), ("en", "fr"), ("es", "en"), ("es", "fr"), ("fr", "en"), ("fr", "es")]
    np.testing.assert_allclose(cols["captured"], [nan, 3 / 11, 10 / 11, 4 / 11, 2 / 11, 2 / 11])
    np.testing.assert_allclose(cols["overlap"], [0.5, 0, 0.5, 0, 0, 0])
    np.testing.assert_allclose(cols["spearman"], [nan, -0.8, nan, -0.8, -0.8, -0.8])


# ------------------------------------------------------------- shared statistics


def test_ranks_and_spearman_match_scipy():
    """Average ranks with ties and Spearman over finite pairs equal scipy's (to float rounding)."""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=200), 1)
    y = np.round(x + rng.normal(size=200), 1)
    np.testing.assert_allclose(average_ranks(x), sps.rankdata(x), rtol=0, atol=1e-12)
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    y[:5] = nan
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x[5:], y[5:]).statistic, abs=1e-12)
    assert math.isnan(spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0]))) and math.isnan(spearman(np.ones(5), x[:5]))


def test_top_k_indices_order_and_ties():
    """Largest first, ties to the lower position, NaN skipped, fewer than k when fewer are finite."""
    assert top_k_indices(np.array([1.0, 3.0, nan, 3.0, 2.0]), 3).tolist() == [1, 3, 4]
    assert top_k_indices(np.array([nan, 1.0]), 5).tolist() == [1]
