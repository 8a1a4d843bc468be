"""Ranking losses and global similarity against explicit loops and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmatch.data.batch import positive_mask
from itmatch.objectives.contrastive import InfoNCE
from itmatch.objectives.ranking import DistanceWeightedTriplet, HingeLoss, distance_weighted_log_weights
from itmatch.similarity.dense import cosine_similarity, dot_similarity, l2_normalize, pair_dot


def batch_with_repeats(square=True, seed=1):
    """sims and positives of a training batch where images 0 and 3 come with two captions each."""
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.tensor([0, 0, 1, 2, 3, 3])
    row_image = caption_image if square else torch.tensor([0, 1, 2, 3])  # one row per distinct image
    sims = torch.rand(len(row_image), len(caption_image), generator=g, dtype=torch.float64) * 2 - 1
    return sims, positive_mask(row_image, caption_image)


def hinge_reference(sims, positives, margin, hardest):
    """Every positive pair is an anchor against the negatives of its row and of its column."""
    total = 0.0
    n_img, n_txt = sims.shape
    for r in range(n_img):
        for c in range(n_txt):
            if not positives[r, c]:
                continue
            s = float(sims[r, c])
            row = [max(0.0, margin + float(sims[r, j]) - s) for j in range(n_txt) if not positives[r, j]]
            col = [max(0.0, margin + float(sims[i, c]) - s) for i in range(n_img) if not positives[i, c]]
            if hardest:
                total += max(row, default=0.0) + max(col, default=0.0)
            else:
                total += sum(row) + sum(col)
    return total


@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("hardest", [False, True])
def test_hinge_matches_loop_with_repeated_images(hardest, square):
    sims, positives = batch_with_repeats(square)
    expected = hinge_reference(sims, positives, 0.2, hardest)
    assert float(HingeLoss(0.2, max_violation=hardest)(sims, positives)) == pytest.approx(expected, rel=1e-9)
    # The call's flag overrides the constructor's.
    assert float(HingeLoss(0.2, max_violation=not hardest)(sims, positives, max_violation=hardest)) == \
        pytest.approx(expected, rel=1e-9)


def test_hinge_never_treats_a_second_caption_of_the_image_as_negative():
    # Two captions of one image, both far more similar to it than anything else: no loss at all,
    # although each caption is off the diagonal of the other.
    sims = torch.tensor([[0.9, 0.8, 0.0], [0.9, 0.8, 0.0], [0.0, 0.1, 0.9]])
    positives = positive_mask(torch.tensor([5, 5, 7]), torch.tensor([5, 5, 7]))
    assert float(HingeLoss(0.2)(sims, positives)) == 0.0
    assert float(HingeLoss(0.2, max_violation=True)(sims, positives)) == 0.0
    diagonal_only = torch.eye(3, dtype=torch.bool)
    assert float(HingeLoss(0.2)(sims, diagonal_only)) > 0  # what diagonal positives would do


def test_hinge_gradient_is_finite_and_touches_the_hardest_negative_only():
    sims, positives = batch_with_repeats()
    sims = sims.clone().requires_grad_(True)
    HingeLoss(0.2, max_violation=True)(sims, positives).backward()
    assert torch.isfinite(sims.grad).all()
    # Negatives can only be pushed down, positives only pulled up.
    assert (sims.grad[~positives] >= 0).all() and (sims.grad[positives] <= 0).all()


# ------------------------------------------------------------------ distance-weighted triplet
def test_distance_weights_equal_the_closed_form_ratio():
    dim, cutoff = 10, 0.5
    d = torch.tensor([0.3, 0.5, 0.8, 1.0, 1.3, 1.6, 1.9], dtype=torch.float64)
    logw = distance_weighted_log_weights(d, dim, cutoff)

    def w(x):  # 1 / q(x), q the density of distances between uniform points on S^(dim-1)
        x = max(x, cutoff)
        return x ** (2 - dim) * (1 - x * x / 4) ** (-(dim - 3) / 2)

    for i in range(len(d)):
        for j in range(len(d)):
            assert math.exp(float(logw[i] - logw[j])) == pytest.approx(w(float(d[i])) / w(float(d[j])), rel=1e-9)
    # Large dims stay finite in log space (the raw powers overflow a double for dim 512).
    assert torch.isfinite(distance_weighted_log_weights(d, 512, cutoff)).all()


def test_inverse_weights_are_the_density_of_distances_on_the_sphere():
    # Why the weights are what they are: exp(-logw) must follow the histogram of distances between
    # random unit vectors in that dimension (above the cutoff, where the weights are not clipped).
    dim = 8
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(100_000, dim, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(100_000, dim, generator=g, dtype=torch.float64), dim=1)
    dist = (a - b).norm(dim=1)
    edges = torch.linspace(0.6, 1.9, 14, dtype=torch.float64)
    hist = torch.histc(dist, bins=13, min=0.6, max=1.9)
    centers = (edges[1:] + edges[:-1]) / 2
    density = torch.exp(-distance_weighted_log_weights(centers, dim, cutoff=0.0))
    hist, density = hist / hist.sum(), density / density.sum()
    torch.testing.assert_close(hist, density, atol=0.006, rtol=0.0)


def test_sampling_logits_mask_positives_and_far_negatives():
    dwt = DistanceWeightedTriplet(margin=0.2, dim=16, cutoff=0.5, nonzero_loss_cutoff=1.4)
    sims = torch.tensor([[0.9, 0.5, -0.2, 0.1, 0.99]], dtype=torch.float64)
    negatives = torch.tensor([[False, True, True, True, True]])
    logits = dwt.sampling_logits(sims, negatives)[0]
    for j, s in enumerate(sims[0].tolist()):
        d = math.sqrt(2 - 2 * s)
        if j == 0 or d >= 1.4:
            assert logits[j] == float("-inf")
        else:
            d = max(d, 0.5)  # 0.99 -> d = 0.14, clipped
            assert float(logits[j]) == pytest.approx(-(14 * math.log(d) + 6.5 * math.log(1 - d * d / 4)), rel=1e-9)


def test_draws_follow_the_weights_and_never_pick_disallowed_candidates():
    dwt = DistanceWeightedTriplet(dim=8, cutoff=0.5, nonzero_loss_cutoff=1.6)
    n = 40_000
    sims = torch.tensor([[1.0, 0.6, 0.2, -0.1, 0.4, -0.5]]).repeat(n, 1)  # last: d = 1.73 > cutoff
    negatives = torch.tensor([[False, True, True, True, True, True]]).repeat(n, 1)
    logits = dwt.sampling_logits(sims, negatives)
    draws = dwt.draw(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    expected = torch.softmax(logits[0].double(), 0)
    assert freq[0] == 0 and freq[5] == 0
    # Binomial standard error is below 0.0025 here; allow 4 of them.
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0.0)
    # A generator makes the draw reproducible.
    torch.testing.assert_close(dwt.draw(logits[:50], torch.Generator().manual_seed(3)),
                               dwt.draw(logits[:50], torch.Generator().manual_seed(3)))
    # A row with nothing allowed gets -1.
    assert dwt.draw(torch.full((1, 4), float("-inf")))[0] == -1


def test_triplet_loss_given_negatives_matches_loop():
    dwt = DistanceWeightedTriplet(margin=0.2)
    sims, positives = batch_with_repeats()
    pos_r, pos_c = positives.nonzero(as_tuple=True)
    assert len(pos_r) == 10
    neg_c = torch.tensor([2, 3, 2, 5, 1, 2, 0, 0, -1, 3])  # -1: no allowed negative for that anchor
    neg_r = torch.tensor([3, 2, 4, 0, -1, 1, 1, 2, 0, 0])
    got = dwt.loss_given_negatives(sims, pos_r, pos_c, neg_c, neg_r)
    ref = 0.0
    for k in range(len(pos_r)):
        s = float(sims[pos_r[k], pos_c[k]])
        if neg_c[k] >= 0:
            ref += max(0.0, 0.2 + float(sims[pos_r[k], neg_c[k]]) - s)
        if neg_r[k] >= 0:
            ref += max(0.0, 0.2 + float(sims[neg_r[k], pos_c[k]]) - s)
    assert float(got) == pytest.approx(ref, rel=1e-9)


def test_triplet_forward_draws_negatives_of_each_anchor_and_differentiates():
    dwt = DistanceWeightedTriplet(margin=0.2, dim=16, nonzero_loss_cutoff=1.9)
    sims, positives = batch_with_repeats(square=False)
    sims = sims.clone().requires_grad_(True)
    loss = dwt(sims, positives, torch.Generator().manual_seed(7))
    # Same seed, same draws, done by hand in the forward's order: rows first, then columns.
    g = torch.Generator().manual_seed(7)
    pos_r, pos_c = positives.nonzero(as_tuple=True)
    with torch.no_grad():
        neg_c = dwt.draw(dwt.sampling_logits(sims[pos_r], ~positives[pos_r]), g)
        neg_r = dwt.draw(dwt.sampling_logits(sims[:, pos_c].T, ~positives[:, pos_c].T), g)
    assert not positives[pos_r, neg_c].any() and not positives[neg_r, pos_c].any()
    torch.testing.assert_close(loss, dwt.loss_given_negatives(sims, pos_r, pos_c, neg_c, neg_r))
    loss.backward()
    assert torch.isfinite(sims.grad).all()


def test_triplet_anchor_without_allowed_negatives_adds_nothing():
    dwt = DistanceWeightedTriplet(margin=0.2, nonzero_loss_cutoff=1.0)
    # All negatives at cosine -0.9 (distance 1.95): none allowed, loss exactly 0, no NaN.
    sims = torch.full((3, 3), -0.9)
    sims.fill_diagonal_(0.5)
    assert float(dwt(sims, torch.eye(3, dtype=torch.bool))) == 0.0


# ----------------------------------------------------------------------------------- InfoNCE
def test_infonce_matches_loop_with_repeated_images():
    for square in (True, False):
        sims, positives = batch_with_repeats(square)
        got = InfoNCE(temperature=0.1)(sims, positives)
        n_img, n_txt = sims.shape
        i2t, t2i = [], []
        for r in range(n_img):
            for c in range(n_txt):
                if positives[r, c]:
                    s = 10 * float(sims[r, c])
                    row = [10 * float(sims[r, j]) for j in range(n_txt) if not positives[r, j]] + [s]
                    col = [10 * float(sims[i, c]) for i in range(n_img) if not positives[i, c]] + [s]
                    i2t.append(math.log(sum(math.exp(v) for v in row)) - s)
                    t2i.append(math.log(sum(math.exp(v) for v in col)) - s)
        assert float(got) == pytest.approx((np.mean(i2t) + np.mean(t2i)) / 2, rel=1e-9)


def test_infonce_is_clip_loss_with_diagonal_positives_and_learns_its_temperature():
    sims = torch.rand(5, 5, dtype=torch.float64) * 2 - 1
    labels = torch.arange(5)
    clip = (F.cross_entropy(sims / 0.05, labels) + F.cross_entropy(sims.T / 0.05, labels)) / 2
    loss = InfoNCE(0.05)(sims, torch.eye(5, dtype=torch.bool))
    torch.testing.assert_close(loss, clip)
    learnable = InfoNCE(0.05, learnable=True)
    assert learnable.temperature == pytest.approx(0.05)
    learnable(sims.float(), torch.eye(5, dtype=torch.bool)).backward()
    assert learnable.log_scale.grad is not None and learnable.log_scale.grad != 0
    assert "log_scale" not in dict(InfoNCE(0.05).named_parameters())  # fixed: a buffer


# -------------------------------------------------------------------------------- similarity
def test_cosine_dot_and_pair_similarities_against_a_loop():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    expected = torch.tensor([[float(a @ b) / float(a.norm() * b.norm()) for b in txt] for a in img])
    torch.testing.assert_close(cosine_similarity(img, txt), expected)
    # unit vectors: the dot product is the cosine, and the pair form is its diagonal
    torch.testing.assert_close(dot_similarity(l2_normalize(img), l2_normalize(txt)), expected)
    torch.testing.assert_close(pair_dot(l2_normalize(img), l2_normalize(txt[:7])), expected.diagonal())
