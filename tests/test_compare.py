"""itmatch compare: the statistics against independent computations, and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from itmatch.compare.stats import (
    betainc,
    paired_bootstrap,
    paired_query_difference,
    resample_counts,
    seed_paired_difference,
    t_cdf,
    t_interval,
    t_ppf,
)


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 50, 1000])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_scipy(df, p):
    assert t_ppf(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)
    assert t_ppf(1 - p, df) == pytest.approx(sps.t.ppf(1 - p, df), rel=1e-9, abs=1e-12)
    assert t_cdf(sps.t.ppf(p, df), df) == pytest.approx(p, abs=1e-12)


def test_closed_forms_of_the_t_distribution():
    # df = 1 is Cauchy, df = 2 has F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))
    for p in (0.7, 0.9, 0.975):
        assert t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(sps.beta.cdf(0.4, 2.0, 3.0), rel=1e-12)


def test_t_interval_against_scipy():
    x = np.array([71.2, 69.8, 73.5, 70.1])
    iv = t_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (iv.mean, iv.low, iv.high) == pytest.approx((x.mean(), lo, hi), rel=1e-10)
    assert iv.n == 4 and iv.std == pytest.approx(x.std(ddof=1))
    # known value: three seeds 1, 2, 3 -> 2 ± 4.302653 / sqrt(3)
    assert t_interval([1, 2, 3]).half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-10)


def test_t_interval_edge_cases():
    one = t_interval([5.0])
    assert one.mean == 5.0 and one.half_width is None and one.n == 1
    assert t_interval([]).mean is None
    assert t_interval([2.0, None, 4.0, float("nan")]).n == 2  # missing values are left out
    same = t_interval([3.0, 3.0, 3.0])
    assert same.half_width == 0.0 and same.low == same.high == 3.0


def test_bootstrap_of_a_constant_difference_is_that_constant():
    d = np.full(50, 2.5)
    r = paired_bootstrap({"m": d}, {"m": None}, 50, n_resamples=500, seed=3)["m"]
    assert (r.mean, r.low, r.high, r.frac_positive) == (2.5, 2.5, 2.5, 1.0)
    zero = paired_bootstrap({"m": np.zeros(50)}, {"m": None}, 50, n_resamples=500)["m"]
    assert (zero.mean, zero.low, zero.high, zero.frac_positive) == (0.0, 0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_for_a_seed_and_varies_with_it():
    d = np.random.default_rng(0).normal(size=300)
    a = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=7)["m"]
    b = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=7)["m"]
    c = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=8)["m"]
    assert a == b and (a.low, a.high) != (c.low, c.high)
    # chunking does not change the draws' distribution: every row draws n units
    for counts in resample_counts(300, 1000, 0, chunk=128):
        assert (counts.sum(1) == 300).all()


def test_bootstrap_interval_matches_the_normal_approximation():
    # i.i.d. queries: the bootstrap sd of the mean is sd / sqrt(n); 95% interval ~ mean ± 1.96 sd / sqrt(n)
    n = 4000
    d = np.random.default_rng(1).normal(0.3, 2.0, size=n)
    r = paired_bootstrap({"m": d}, {"m": None}, n, n_resamples=4000, seed=0)["m"]
    half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert r.mean == pytest.approx(d.mean())
    assert r.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r.high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert r.frac_positive == pytest.approx(1 - sps.norm.cdf(0, d.mean(), half / 1.96), abs=0.02)


def test_bootstrap_resamples_units_with_their_queries_and_sums_on_the_same_resamples():
    # 3 images with 2 captions each; caption queries follow their image
    img = np.array([1.0, 0.0, 0.0])
    cap = np.array([0.0, 0.0, 4.0, 4.0, 0.0, 0.0])
    c2i = np.array([0, 0, 1, 1, 2, 2])
    res = paired_bootstrap({"a": img, "b": cap}, {"a": None, "b": c2i}, 3, sums={"ab": ["a", "b"]},
                           n_resamples=2000, seed=0)
    assert res["a"].mean == pytest.approx(1 / 3) and res["b"].mean == pytest.approx(4 / 3)
    assert res["ab"].mean == pytest.approx(5 / 3)
    # each resample is a multiset of images: a and b can never both be 0 unless image 0 and 1 are missed,
    # and the sum lies within the range of the per-metric sums
    assert res["ab"].low >= res["a"].low + res["b"].low - 1e-12
    assert res["ab"].high <= res["a"].high + res["b"].high + 1e-12
    # an independent loop over the same draws
    draws = np.concatenate(list(resample_counts(3, 2000, 0)))
    ab = draws[:, 0] / 3 + draws[:, 1] * 2 * 4 / (2 * 3)
    assert res["ab"].low == pytest.approx(np.percentile(ab, 2.5))
    assert res["ab"].high == pytest.approx(np.percentile(ab, 97.5))
    assert res["ab"].frac_positive == pytest.approx(np.mean(ab > 0))


def test_paired_query_difference_pairs_by_seed_and_keeps_nan():
    arm = np.array([[1.0, 2.0, np.nan], [3.0, 2.0, np.nan]])
    base = np.array([[0.0, 2.0, np.nan], [1.0, 0.0, np.nan]])
    d = paired_query_difference(arm, base)
    assert d[:2].tolist() == [1.5, 1.0] and np.isnan(d[2])
    r = paired_bootstrap({"m": d}, {"m": None}, 3, n_resamples=300)["m"]
    assert r.mean == pytest.approx(1.25)  # the NaN query is left out of every mean


def test_seed_paired_difference_is_a_t_interval_of_per_seed_differences():
    r = seed_paired_difference([50.0, 52.0, 55.0], [49.0, 50.0, 51.0])
    iv = t_interval([1.0, 2.0, 4.0])
    assert (r.mean, r.low, r.high) == pytest.approx((iv.mean, iv.low, iv.high))
    assert r.frac_positive == 1.0 and r.method == "seed-paired t"
    same = seed_paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (same.mean, same.low, same.high, same.frac_positive) == (0.0, 0.0, 0.0, 0.0)
