"""Set similarities (similarity/sets.py) against scipy and against per-pair Python loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from itmatch.similarity import sets as S


def unit_sets(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("ki,kt", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (3, 5), (5, 2), (7, 7), (8, 5)])
def test_assignment_matches_scipy_on_random_matrices(ki, kt):
    g = torch.Generator().manual_seed(ki * 10 + kt)
    mats = torch.randn(40, ki, kt, generator=g, dtype=torch.float64)
    mask = S.assignment_mask(mats)
    for p in range(len(mats)):
        rows, cols = linear_sum_assignment(mats[p].numpy(), maximize=True)
        best = mats[p].numpy()[rows, cols].sum()
        assert mask[p].sum() == min(ki, kt)
        assert mask[p].sum(1).max() <= 1 and mask[p].sum(0).max() <= 1  # one-to-one
        assert float(mats[p][mask[p]].sum()) == pytest.approx(best, abs=1e-12)
    if S.n_assignments(ki, kt) > S.MAX_ENUMERATED:
        return
    # the batched maxpair score is the mean of scipy's matched values, both scalings
    for scaling, g_fn in (("mean", lambda x: x), ("exp", np.expm1)):
        scores = S.maxpair_scores(mats, scaling)
        for p in range(len(mats)):
            rows, cols = linear_sum_assignment(mats[p].numpy(), maximize=True)
            assert float(scores[p]) == pytest.approx(g_fn(mats[p].numpy()[rows, cols]).mean(), abs=1e-12)


def test_enumeration_and_scipy_paths_agree():
    mats = torch.randn(30, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(S.assignment_mask(mats), S._scipy_mask(mats))


def test_gradient_reaches_only_the_matched_pairs():
    cos = torch.randn(5, 4, 4, dtype=torch.float64, requires_grad=True)
    S.maxpair_scores(cos, "exp").sum().backward()
    mask = S.assignment_mask(cos)
    assert torch.all(cos.grad[~mask] == 0)
    torch.testing.assert_close(cos.grad[mask], torch.exp(cos.detach()[mask]) / 4)


def loop_similarity(which, a, b, **kw):
    """Per-pair, per-element Python reference of each similarity on one (Ki, D), (Kt, D) pair."""
    kind = which
    ki, kt = len(a), len(b)
    A = [[float(a[i] @ b[j]) for j in range(kt)] for i in range(ki)]
    g = math.expm1 if kw.get("scaling") == "exp" else (lambda x: x)
    if kind == "maxpair":
        small = min(ki, kt)
        best, best_vals = -math.inf, None
        if ki <= kt:
            cands = [[(i, c[i]) for i in range(ki)] for c in itertools.permutations(range(kt), ki)]
        else:
            cands = [[(r[j], j) for j in range(kt)] for r in itertools.permutations(range(ki), kt)]
        for cells in cands:
            total = sum(A[i][j] for i, j in cells)
            if total > best:
                best, best_vals = total, [A[i][j] for i, j in cells]
        return sum(g(v) for v in best_vals) / small
    if kind == "chamfer":
        tau = kw["tau"]
        rows = sum(math.log(sum(math.exp(tau * A[i][j]) for j in range(kt))) for i in range(ki)) / (ki * tau)
        cols = sum(math.log(sum(math.exp(tau * A[i][j]) for i in range(ki))) for j in range(kt)) / (kt * tau)
        return (rows + cols) / 2
    if kind == "max":
        return max(max(r) for r in A)
    if kind == "mean":
        return sum(sum(r) for r in A) / (ki * kt)
    if kind == "topk":
        vals = sorted((v for r in A for v in r), reverse=True)[:kw["topk"]]
        return sum(g(v) for v in vals) / len(vals)
    if kind == "sinkhorn":
        P = [[math.exp(A[i][j] / kw["sinkhorn_temperature"]) for j in range(kt)] for i in range(ki)]
        for _ in range(kw["sinkhorn_iters"]):
            P = [[v / sum(r) for v in r] for r in P]
            colsum = [sum(P[i][j] for i in range(ki)) for j in range(kt)]
            P = [[P[i][j] / colsum[j] * ki / kt for j in range(kt)] for i in range(ki)]
        P = [[v / sum(r) for v in r] for r in P]
        return sum(P[i][j] * g(A[i][j]) for i in range(ki) for j in range(kt)) / ki
    raise AssertionError(kind)


CASES = [
    dict(kind="maxpair", scaling="mean"), dict(kind="maxpair", scaling="exp"),
    dict(kind="chamfer", tau=16.0), dict(kind="chamfer", tau=2.0), dict(kind="max"), dict(kind="mean"),
    dict(kind="topk", topk=3, scaling="mean"), dict(kind="topk", topk=5, scaling="exp"),
    dict(kind="sinkhorn", sinkhorn_iters=5, sinkhorn_temperature=0.1, scaling="mean"),
    dict(kind="sinkhorn", sinkhorn_iters=20, sinkhorn_temperature=0.5, scaling="exp"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("ki,kt", [(4, 4), (3, 5)])
def test_every_similarity_equals_a_per_pair_loop(case, ki, kt):
    img, txt = unit_sets(5, ki, 8, 1), unit_sets(6, kt, 8, 2)
    sim = S.SetSimilarity(**case)
    got = sim(img, txt)
    ref = torch.tensor([[loop_similarity(case["kind"], img[n], txt[m], **case) for m in range(6)] for n in range(5)],
                       dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # aligned pairs, re-ranking and tiling give the same values
    torch.testing.assert_close(sim.pairs(img, txt[:5]), got.diagonal(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sim.rerank(img[2], txt), got[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([sim(img[:2], txt), sim(img[2:], txt)]), got, rtol=1e-12, atol=1e-12)


def test_sinkhorn_plan_is_doubly_stochastic_and_hardens_at_low_temperature():
    cos = torch.randn(7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plan = S.sinkhorn_plan(cos, 200, 1.0)
    torch.testing.assert_close(plan.sum(-1), torch.ones(7, 4, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(-2), torch.ones(7, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    sharp = S.sinkhorn_scores(cos, 2000, 0.01)
    torch.testing.assert_close(sharp, S.maxpair_scores(cos), atol=1e-3, rtol=0)


def test_collapse_diagnostics_on_known_sets():
    collapsed = torch.nn.functional.normalize(torch.ones(2, 4, 3), dim=-1)
    assert S.within_set_cosine(collapsed).tolist() == pytest.approx([1.0, 1.0])
    assert S.circular_variance(collapsed).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    basis = torch.eye(4)[None]  # orthogonal elements: cosine 0, ||mean|| = 1/2
    assert float(S.within_set_cosine(basis)) == pytest.approx(0.0)
    assert float(S.circular_variance(basis)) == pytest.approx(0.5)
    x = unit_sets(3, 5, 6, 9)
    c, cv = S.within_set_cosine(x), S.circular_variance(x)
    torch.testing.assert_close(1 - cv, torch.sqrt(1 / 5 + (1 - 1 / 5) * c))


def test_score_block_bounds_the_tile():
    for kind in ("maxpair", "chamfer"):
        sim = S.SetSimilarity(kind=kind)
        rows, cols = sim.score_block(4, 4)
        assert rows * cols * sim.elements_per_pair(4, 4) <= S.TILE_ELEMENTS
        assert rows >= 64 and cols >= 64


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="set similarity"):
        S.SetSimilarity(kind="hungarian")
    with pytest.raises(ValueError, match="scaling"):
        S.SetSimilarity(scaling="log")


@pytest.mark.parametrize("ki,kt,dtype", [(4, 4, torch.float32), (3, 5, torch.float32), (5, 2, torch.float64),
                                          (1, 4, torch.float32)])
def test_scoring_path_of_maxpair_equals_the_assignment_of_the_cosine_tensor(ki, kt, dtype):
    """The evaluation path (cosines written per element pair, no permuted copy) scores like the
    training path on the (N, M, Ki, Kt) cosines, which the tests above check against scipy and a loop."""
    n, m = S.TABLE_MIN_ITEMS + 3, S.TABLE_MIN_ITEMS + 11
    img, txt = unit_sets(n, ki, 24, 3).to(dtype), unit_sets(m, kt, 24, 4).to(dtype)
    ref = S.maxpair_scores(S.element_cosines(img, txt), "mean")
    got = S.maxpair_table_scores(img, txt)
    assert got.dtype == dtype and got.shape == (n, m)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    sim = S.SetSimilarity("maxpair")
    torch.testing.assert_close(sim(img, txt), got, rtol=0, atol=0)  # __call__ takes it when no gradient is needed
    one = S.maxpair_scores(S.element_cosines(img[:1], txt), "mean")
    torch.testing.assert_close(sim(img[:1], txt), one, rtol=0, atol=0)  # one query: the cosine tensor path
    a = img.clone().requires_grad_()
    train = sim(a, txt)  # with gradient: the cosine tensor path, gradient only through matched pairs
    torch.testing.assert_close(train.detach(), got, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    train.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
