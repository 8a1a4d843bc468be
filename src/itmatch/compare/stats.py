"""Statistics of `itmatch compare`: Student-t intervals over seeds and a paired bootstrap over queries.

Pure numpy and the standard library (the t quantile is computed here, from the regularized
incomplete beta function, so nothing depends on scipy's version). See docs/compare.md for the
definitions and how to read them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from itmatch.errors import ItmatchError


# ------------------------------------------------------------------------------ Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError("degrees of freedom must be positive")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on the CDF to double precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie strictly between 0 and 1")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """mean ± half_width = [low, high] over n values; half_width is None below two values."""

    mean: float | None
    half_width: float | None
    low: float | None
    high: float | None
    n: int
    std: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean: mean ± t_{(1+c)/2, n-1} * s / sqrt(n), s with ddof 1.

    Values that are None or NaN (a metric a run could not compute) are left out.
    """
    x = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(None, None, None, None, 0, None)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, None, None, None, 1, None)
    std = float(x.std(ddof=1))
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, half, mean - half, mean + half, n, std)


# ------------------------------------------------------------------------ paired bootstrap
@dataclass
class BootstrapResult:
    """The observed mean difference, its percentile interval and P*(difference > 0) over resamples."""

    mean: float | None
    low: float | None
    high: float | None
    frac_positive: float | None
    n_resamples: int
    method: str = "bootstrap"

    def to_dict(self) -> dict:
        return asdict(self)


def paired_query_difference(arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-query difference of two arms, each (seeds x queries), paired by seed, averaged over seeds.

    Row s of `arm` and of `base` must come from the same seed. Because every seed is resampled with
    the same query indices, the mean over seeds of the per-seed mean differences on a resample equals
    the resampled mean of this seed-averaged per-query difference. NaN (a query without relevant
    items) is NaN in every run, and stays NaN here.
    """
    a, b = np.atleast_2d(np.asarray(arm, np.float64)), np.atleast_2d(np.asarray(base, np.float64))
    if a.shape != b.shape:
        raise ItmatchError(f"paired arms differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(d)).sum(0)
        total = np.where(np.isnan(d), 0.0, d).sum(0)
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def resample_counts(n_units: int, n_resamples: int, seed: int, chunk: int | None = None) -> Iterator[np.ndarray]:
    """Bootstrap resamples as multiplicity counts: chunks of (resamples x units) integer arrays.

    Each row draws n_units units uniformly with replacement. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(n_resamples, 2**21 // max(1, n_units)))
    p = np.full(n_units, 1.0 / n_units)
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        yield rng.multinomial(n_units, p, size=b).astype(np.float64)
        done += b


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of `values` under each row of query weights, ignoring NaN values."""
    ok = ~np.isnan(values)
    w = weights[:, ok]
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w @ values[ok]) / np.where(total > 0, total, 1.0), np.nan)


def paired_bootstrap(differences: Mapping[str, np.ndarray], unit_of_query: Mapping[str, np.ndarray | None],
                     n_units: int, *, sums: Mapping[str, Sequence[str]] | None = None,
                     n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
                     ) -> dict[str, BootstrapResult]:
    """Percentile bootstrap of mean per-query differences, every metric on the same resamples.

    differences[m]: per-query differences of metric m (see `paired_query_difference`).
    unit_of_query[m]: the resampling unit (test image) of each query of m, or None where the queries
    are the units themselves. A resample draws n_units units with replacement; a query counts as
    often as its unit was drawn. sums[name] = [m1, m2, ...] adds a statistic that is the sum of
    those metrics' differences on the same resample (rSum = the six recalls).
    Returns, per metric: the observed mean difference (every unit once), the (1-c)/2 and (1+c)/2
    percentiles of the resampled differences, and the fraction of resamples with difference > 0.
    """
    sums = dict(sums or {})
    names = list(differences)
    for total, parts in sums.items():
        missing = [p for p in parts if p not in differences]
        if missing:
            raise ItmatchError(f"bootstrap sum {total!r} needs {missing[0]!r}, which has no per-query values")
    maps = {}
    for m in names:
        u = unit_of_query.get(m)
        maps[m] = None if u is None else np.asarray(u, dtype=np.int64)
        n_q = len(differences[m])
        if (maps[m] is None and n_q != n_units) or (maps[m] is not None and len(maps[m]) != n_q):
            raise ItmatchError(f"metric {m!r}: {n_q} per-query values do not match the resampling units")

    def stats(counts: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for m in names:
            w = counts if maps[m] is None else counts[:, maps[m]]
            out[m] = _weighted_means(w, np.asarray(differences[m], np.float64))
        for total, parts in sums.items():
            out[total] = np.sum([out[p] for p in parts], axis=0)
        return out

    observed = stats(np.ones((1, n_units)))
    draws: dict[str, list[np.ndarray]] = {m: [] for m in observed}
    for counts in resample_counts(n_units, n_resamples, seed):
        for m, v in stats(counts).items():
            draws[m].append(v)
    q = (100.0 * (1.0 - confidence) / 2.0, 100.0 * (1.0 + confidence) / 2.0)
    results = {}
    for m in observed:
        d = np.concatenate(draws[m])
        d = d[~np.isnan(d)]
        obs = float(observed[m][0])
        if len(d) == 0 or math.isnan(obs):
            results[m] = BootstrapResult(None, None, None, None, n_resamples)
            continue
        low, high = np.percentile(d, q)
        results[m] = BootstrapResult(obs, float(low), float(high), float(np.mean(d > 0)), n_resamples)
    return results


def seed_paired_difference(arm: Sequence[float | None], base: Sequence[float | None],
                           confidence: float = 0.95) -> BootstrapResult:
    """For metrics without per-query values: the mean of per-seed differences with its t interval.

    frac_positive is then the fraction of seeds whose difference is > 0.
    """
    d = [None if (a is None or b is None) else float(a) - float(b) for a, b in zip(arm, base)]
    iv = t_interval(d, confidence)
    valid = [x for x in d if x is not None and not math.isnan(x)]
    frac = float(np.mean([x > 0 for x in valid])) if valid else None
    return BootstrapResult(iv.mean, iv.low, iv.high, frac, 0, method="seed-paired t")
