"""Block scoring of fragment (`score`) models: MrSw and its variants against a slow per-pair loop, and the
engine's tiled (sharded) path equal to one naive call, entry for entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itmatch.evaluation.scores import model_scores
from itmatch.similarity.fragment import fragment_scores, pair_fragment_scores, unit_fragments


def random_fragments(n: int, length: int, dim: int, seed: int, empty_row: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, dim, generator=g, dtype=torch.float64)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n,), generator=g)[:, None]
    if empty_row:
        mask[0] = False
    return x.masked_fill(~mask[..., None], 0.0), mask


def slow_score(img, imask, txt, tmask, region_reduce, word_reduce) -> float:
    """One pair, loops over words and regions with explicit cosines."""
    regions = [r for r, ok in zip(img, imask) if ok]
    words = [w for w, ok in zip(txt, tmask) if ok]
    total = 0.0
    for w in words:
        cos = [float(torch.dot(r, w) / (r.norm() * w.norm())) for r in regions]
        if not cos:
            continue
        total += max(cos) if region_reduce == "max" else sum(cos)
    return total / len(words) if word_reduce == "mean" else total


@pytest.mark.parametrize("region_reduce", ["max", "sum"])
@pytest.mark.parametrize("word_reduce", ["sum", "mean"])
def test_block_scores_equal_a_slow_loop(region_reduce, word_reduce):
    img, imask = random_fragments(5, 6, 8, seed=0, empty_row=True)
    txt, tmask = random_fragments(7, 5, 8, seed=1)
    fast = fragment_scores(img, imask, txt, tmask, region_reduce, word_reduce)
    slow = torch.tensor([[slow_score(img[i], imask[i], txt[j], tmask[j], region_reduce, word_reduce)
                          for j in range(7)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # unit fragments given once (what score models store) give the same scores
    pre = fragment_scores(unit_fragments(img, imask), imask, unit_fragments(txt, tmask), tmask, region_reduce,
                          word_reduce, normalized=True)
    torch.testing.assert_close(pre, fast, rtol=1e-12, atol=1e-12)
    # the diagonal reader agrees with the block
    pairs = pair_fragment_scores(img, imask, txt[:5], tmask[:5], region_reduce, word_reduce)
    torch.testing.assert_close(pairs, torch.diagonal(fast[:, :5]), rtol=1e-12, atol=1e-12)


def test_sharded_scoring_equals_the_naive_scorer_exactly():
    """Tiles (the engine's sharding) give bit-identical scores to one call on everything. A tile of a single
    image or caption may take another BLAS kernel (GEMV-like shapes): equal to float32 rounding there."""
    img, imask = random_fragments(23, 7, 16, seed=2)
    txt, tmask = random_fragments(41, 9, 16, seed=3)
    img, txt = unit_fragments(img, imask).float(), unit_fragments(txt, tmask).float()
    from itmatch.models.contract import Fragments

    images, captions = Fragments(img, imask), Fragments(txt, tmask)

    def sim(a, b):
        return fragment_scores(a.features, a.mask, b.features, b.mask, normalized=True)

    naive = sim(images, captions).numpy()
    for block in [(4, 7), (23, 41), (64, 512), (6, 9), (5, 21)]:
        np.testing.assert_array_equal(model_scores(sim, images, captions, block).dense(), naive)
    for block in [(1, 1), (5, 40), (23, 1)]:  # tiles with one image or one caption
        np.testing.assert_allclose(model_scores(sim, images, captions, block).dense(), naive, rtol=0, atol=2e-6)
    # row blocks of the same tiling read twice are identical (no state, no order effects)
    source = model_scores(sim, images, captions, (4, 7))
    np.testing.assert_array_equal(source.dense(), source.dense())
