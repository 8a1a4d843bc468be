"""The chunked ranking engine against slow, explicit references (loops, sorts, the tie policy)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from itmatch.errors import ItmatchError
from itmatch.evaluation.ranking import (
    Ranks,
    ground_truth_ranks,
    recall_metrics,
    relevance_ranking,
    retrieval_metrics,
    twin_accuracy,
)
from itmatch.evaluation.scores import BlockScores, DenseScores, MeanScores, embedding_scores

POLICIES = ("pessimistic", "optimistic")


# ------------------------------------------------------------------------ slow references
def ordered(scores_row: np.ndarray, positive: np.ndarray, policy: str) -> list[int]:
    """Items sorted by score descending; among equal scores negatives come first when pessimistic."""
    tie = (lambda j: positive[j]) if policy == "pessimistic" else (lambda j: not positive[j])
    return sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], tie(j)))


def reference_ranks(S: np.ndarray, c2i: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    n_img, n_cap = S.shape
    i2t = np.zeros(n_img, dtype=int)
    for i in range(n_img):
        pos = c2i == i
        order = ordered(S[i], pos, policy)
        i2t[i] = min(order.index(c) for c in np.flatnonzero(pos))
    t2i = np.zeros(n_cap, dtype=int)
    for c in range(n_cap):
        pos = np.arange(n_img) == c2i[c]
        t2i[c] = ordered(S[:, c], pos, policy).index(c2i[c])
    return i2t, t2i


def reference_relevance(S_query: np.ndarray, positives: np.ndarray, policy: str, n_rel=None):
    """Per query (rows of S_query): mAP@R, R-Precision, R@1 by walking the explicit ranking."""
    out = []
    for q in range(S_query.shape[0]):
        R = int(positives[q].sum()) if n_rel is None else int(n_rel[q])
        if R == 0:
            out.append((np.nan, np.nan, np.nan))
            continue
        order = ordered(S_query[q], positives[q], policy)
        rel = positives[q][order]
        precisions = [rel[: r + 1].sum() / (r + 1) if rel[r] else 0.0 for r in range(min(R, len(rel)))]
        out.append((sum(precisions) / R, rel[:R].sum() / R, float(rel[0])))
    return np.array(out)


def random_c2i(rng, n_img: int, low: int = 3, high: int = 7, shuffle: bool = True) -> np.ndarray:
    c2i = np.repeat(np.arange(n_img), rng.integers(low, high + 1, size=n_img))
    return rng.permutation(c2i) if shuffle else c2i


# ------------------------------------------------------------------------ recall / ranks
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ties", [False, True])
def test_ranks_match_reference_with_variable_caption_counts(policy, ties):
    rng = np.random.default_rng(1 if ties else 2)
    n_img = 23
    c2i = random_c2i(rng, n_img)
    if ties:  # few distinct values: ties everywhere, also between positives
        S = rng.integers(0, 3, size=(n_img, len(c2i))).astype(np.float32)
    else:
        S = rng.standard_normal((n_img, len(c2i))).astype(np.float32)
        S[c2i, np.arange(len(c2i))] += 1.0
    ref_i2t, ref_t2i = reference_ranks(S, c2i, policy)
    ranks = ground_truth_ranks(S, c2i, tie_policy=policy, chunk_rows=4)
    np.testing.assert_array_equal(ranks.i2t, ref_i2t)
    np.testing.assert_array_equal(ranks.t2i, ref_t2i)


def test_tie_policy_on_a_hand_made_example():
    # image 0 owns captions 0 and 1, image 1 owns caption 2
    S = np.array([[1.0, 1.0, 1.0],
                  [1.0, 0.0, 0.5]], dtype=np.float32)
    c2i = np.array([0, 0, 1])
    pess = ground_truth_ranks(S, c2i, tie_policy="pessimistic")
    opt = ground_truth_ranks(S, c2i, tie_policy="optimistic")
    # image 0: both positives tie each other (no harm) and one negative (caption 2) ties them
    assert pess.i2t[0] == 1 and opt.i2t[0] == 0
    # image 1: caption 0 (1.0) is above its caption (0.5) whatever the policy
    assert pess.i2t[1] == 1 and opt.i2t[1] == 1
    # caption 0: image 1 ties image 0 -> pessimistic puts the ground truth second
    np.testing.assert_array_equal(pess.t2i, [1, 0, 1])
    np.testing.assert_array_equal(opt.t2i, [0, 0, 1])


def test_positives_tied_with_each_other_do_not_hurt():
    # image 0: three positives tied at the top, both policies rank it first
    S = np.array([[2.0, 2.0, 2.0, 1.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    c2i = np.array([0, 0, 0, 1, 1])
    for policy in POLICIES:
        assert ground_truth_ranks(S, c2i, tie_policy=policy).i2t[0] == 0


def test_recall_metrics_closed_form():
    ranks = Ranks(i2t=np.array([0, 0, 4, 9, 20]), t2i=np.array([0, 1, 2, 3, 5, 10, 11, 30]))
    m = recall_metrics(ranks)
    assert m["i2t_r1"] == pytest.approx(40.0)
    assert m["i2t_r5"] == pytest.approx(60.0)
    assert m["i2t_r10"] == pytest.approx(80.0)
    assert m["t2i_r1"] == pytest.approx(12.5)
    assert m["t2i_r5"] == pytest.approx(50.0)
    assert m["t2i_r10"] == pytest.approx(62.5)
    assert m["rsum"] == pytest.approx(40 + 60 + 80 + 12.5 + 50 + 62.5)
    assert m["i2t_medr"] == 5.0  # floor(median(0,0,4,9,20)=4) + 1
    assert m["t2i_medr"] == 5.0  # floor(median = 4.0) + 1
    assert m["i2t_meanr"] == pytest.approx(np.mean([0, 0, 4, 9, 20]) + 1)
    assert m["t2i_meanr"] == pytest.approx(np.mean([0, 1, 2, 3, 5, 10, 11, 30]) + 1)
    even = recall_metrics(Ranks(i2t=np.array([0, 3]), t2i=np.array([1, 2])))
    assert even["i2t_medr"] == 2.0 and even["t2i_medr"] == 2.0  # floor(1.5)+1, floor(1.5)+1


def test_chunked_equals_unchunked_and_sources_agree():
    rng = np.random.default_rng(3)
    n_img = 37
    c2i = random_c2i(rng, n_img)
    # integer embeddings: dot products are exact, so every source yields bitwise equal scores (and ties)
    img = torch.as_tensor(rng.integers(-2, 3, size=(n_img, 4)), dtype=torch.float32)
    cap = torch.as_tensor(rng.integers(-2, 3, size=(len(c2i), 4)), dtype=torch.float32)
    dense = (img @ cap.T).numpy()
    expected = retrieval_metrics(dense, c2i, chunk_rows=n_img)
    for chunk in (1, 5, 16, None):
        assert retrieval_metrics(dense, c2i, chunk_rows=chunk) == expected
    assert retrieval_metrics(torch.as_tensor(dense), c2i, chunk_rows=7) == expected
    assert retrieval_metrics(embedding_scores(img, cap), c2i, chunk_rows=6) == expected
    no_pairs = BlockScores(lambda a, b: dense[a:b], dense.shape, chunk_rows=10)
    assert retrieval_metrics(no_pairs, c2i, chunk_rows=9) == expected
    mmap_like = np.asfortranarray(dense.astype(">f4"))  # non-native byte order, not C-contiguous
    assert retrieval_metrics(mmap_like, c2i, chunk_rows=8) == expected


def test_mean_scores_is_the_average():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((10, 30)).astype(np.float32)
    b = rng.standard_normal((10, 30)).astype(np.float32)
    c2i = np.repeat(np.arange(10), 3)
    mean = MeanScores([DenseScores(a, "a.npy"), DenseScores(b, "b.npy")])
    assert retrieval_metrics(mean, c2i, chunk_rows=3) == retrieval_metrics((a + b) / 2, c2i)
    with pytest.raises(ItmatchError, match="shape mismatch: a.npy is 10 x 30 but c.npy is 10 x 29"):
        MeanScores([DenseScores(a, "a.npy"), DenseScores(b[:, :29], "c.npy")])


def test_nan_and_bad_maps_are_clear_errors():
    S = np.zeros((4, 8), dtype=np.float32)
    S[2, 5] = np.nan
    c2i = np.repeat(np.arange(4), 2)
    with pytest.raises(ItmatchError, match=r"NaN or infinite score in row\(s\) 2"):
        ground_truth_ranks(DenseScores(S, "x.npy"), c2i, chunk_rows=1)
    S[2, 5] = 0
    with pytest.raises(ItmatchError, match="maps 7 captions"):
        ground_truth_ranks(S, c2i[:7])
    with pytest.raises(ItmatchError, match=r"image row\(s\) 3 have no caption"):
        ground_truth_ranks(S, np.array([0, 0, 1, 1, 2, 2, 2, 2]))
    with pytest.raises(ItmatchError, match="outside the 4 image rows"):
        ground_truth_ranks(S, np.array([0, 0, 1, 1, 2, 2, 3, 4]))
    with pytest.raises(ItmatchError, match="unknown tie policy"):
        ground_truth_ranks(S, c2i, tie_policy="random")


# ------------------------------------------------------------------ mAP@R and R-Precision
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ties", [False, True])
def test_relevance_metrics_match_loops(policy, ties):
    rng = np.random.default_rng(5 if ties else 6)
    n_img, n_cap = 19, 53
    pos_i2t = rng.random((n_img, n_cap)) < 0.12
    pos_t2i = rng.random((n_cap, n_img)) < 0.15
    pos_i2t[3] = False  # an image query without positives -> NaN, left out of means
    if ties:
        S = rng.integers(0, 4, size=(n_img, n_cap)).astype(np.float32)
    else:
        S = rng.standard_normal((n_img, n_cap)).astype(np.float32) + 0.8 * pos_i2t
    i2t, t2i = relevance_ranking(S, sp.csr_matrix(pos_i2t), sp.csr_matrix(pos_t2i), tie_policy=policy,
                                 chunk_rows=4)
    ref_i2t = reference_relevance(S, pos_i2t, policy)
    ref_t2i = reference_relevance(S.T, pos_t2i, policy)
    for got, ref in ((i2t, ref_i2t), (t2i, ref_t2i)):
        np.testing.assert_allclose(got.map_at_r, ref[:, 0], equal_nan=True)
        np.testing.assert_allclose(got.r_precision, ref[:, 1], equal_nan=True)
        np.testing.assert_allclose(got.r1, ref[:, 2], equal_nan=True)
    assert np.isnan(i2t.map_at_r[3])
    assert i2t.summary()["map_at_r"] == pytest.approx(100 * np.nanmean(ref_i2t[:, 0]))


def test_relevance_metrics_with_unreachable_positives_and_chunks():
    rng = np.random.default_rng(7)
    n_img, n_cap = 12, 40
    pos_i2t = rng.random((n_img, n_cap)) < 0.2
    pos_t2i = rng.random((n_cap, n_img)) < 0.2
    S = rng.standard_normal((n_img, n_cap)).astype(np.float32)
    extra_i2t = pos_i2t.sum(1) + rng.integers(0, 3, n_img)  # some relevant items are not in the gallery
    extra_t2i = pos_t2i.sum(1) + rng.integers(0, 3, n_cap)
    results = [relevance_ranking(S, sp.csr_matrix(pos_i2t), sp.csr_matrix(pos_t2i), n_relevant_i2t=extra_i2t,
                                 n_relevant_t2i=extra_t2i, chunk_rows=c) for c in (1, 5, None)]
    ref_i2t = reference_relevance(S, pos_i2t, "pessimistic", extra_i2t)
    ref_t2i = reference_relevance(S.T, pos_t2i, "pessimistic", extra_t2i)
    for i2t, t2i in results:
        np.testing.assert_allclose(i2t.map_at_r, ref_i2t[:, 0], equal_nan=True)
        np.testing.assert_allclose(i2t.r_precision, ref_i2t[:, 1], equal_nan=True)
        np.testing.assert_allclose(t2i.map_at_r, ref_t2i[:, 0], equal_nan=True)
        np.testing.assert_allclose(t2i.r_precision, ref_t2i[:, 1], equal_nan=True)


def test_map_at_r_known_value():
    # one query, 3 positives at ranks 1, 3 and 5: mAP@R = (1/1 + 2/3 + 0) / 3, R-P = 2/3
    S = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    pos = np.array([[True, False, True, False, True]])
    i2t, _ = relevance_ranking(S, sp.csr_matrix(pos), sp.csr_matrix(pos.T))
    assert i2t.map_at_r[0] == pytest.approx((1 + 2 / 3) / 3)
    assert i2t.r_precision[0] == pytest.approx(2 / 3)
    assert i2t.r1[0] == 1.0


# ------------------------------------------------------------------------- twin accuracy
def reference_twins(S, c2i, twins, rel, policy):
    beats = (lambda x, y: x > y) if policy == "pessimistic" else (lambda x, y: x >= y)
    t2i_wins = t2i_trials = 0
    per_image = []
    for i, j in twins:
        for a, b in ((i, j), (j, i)):
            d_ab = [c for c in range(len(c2i)) if c2i[c] == a and not rel[c, b]]
            d_ba = [c for c in range(len(c2i)) if c2i[c] == b and not rel[c, a]]
            for c in d_ab:
                t2i_trials += 1
                t2i_wins += beats(S[a, c], S[b, c])
            if d_ab and d_ba:
                wins = sum(beats(S[a, c], S[a, c2]) for c in d_ab for c2 in d_ba)
                per_image.append(wins / (len(d_ab) * len(d_ba)))
    return 100 * t2i_wins / t2i_trials, 100 * np.mean(per_image)


@pytest.mark.parametrize("policy", POLICIES)
def test_twin_accuracy_matches_loop(policy):
    rng = np.random.default_rng(8)
    n_img = 16
    c2i = random_c2i(rng, n_img, 2, 6)
    n_cap = len(c2i)
    rel = rng.random((n_cap, n_img)) < 0.15
    rel[np.arange(n_cap), c2i] = True
    twins = np.array([[0, 1], [2, 3], [4, 9], [10, 5], [6, 7]])
    S = rng.integers(0, 3, size=(n_img, n_cap)).astype(np.float32)  # ties: the policy matters
    got = twin_accuracy(S, c2i, twins, sp.csr_matrix(rel), tie_policy=policy)
    ref_t2i, ref_i2t = reference_twins(S, c2i, twins, rel, policy)
    assert got["twin_acc_t2i"] == pytest.approx(ref_t2i)
    assert got["twin_acc_i2t"] == pytest.approx(ref_i2t)
    # without a relevance matrix, only the ground truth counts as relevant
    gt = np.zeros((n_cap, n_img), dtype=bool)
    gt[np.arange(n_cap), c2i] = True
    got_gt = twin_accuracy(S, c2i, twins, None, tie_policy=policy)
    assert got_gt["twin_acc_t2i"] == pytest.approx(reference_twins(S, c2i, twins, gt, policy)[0])


def test_twin_errors_and_empty():
    S = np.zeros((3, 6), dtype=np.float32)
    c2i = np.repeat(np.arange(3), 2)
    assert twin_accuracy(S, c2i, np.zeros((0, 2), dtype=int)) == {"twin_acc_t2i": None, "twin_acc_i2t": None}
    with pytest.raises(ItmatchError, match=r"twin pair\(s\) 1"):
        twin_accuracy(S, c2i, np.array([[0, 1], [2, 2]]))


# ------------------------------------------------------------------------ exact percentages
def test_recalls_are_the_printed_decimal_not_a_mean_times_100():
    """277 hits of 1,000 queries is reported as 27.7 (as `100 * count / n` prints), not 27.700000000000003."""
    import json
    from fractions import Fraction

    from itmatch.evaluation.protocols import evaluate_sims

    n, hits = 1000, 277
    sims = np.random.default_rng(0).uniform(-1, 1, (n, n)).astype(np.float32)
    diag = np.arange(n)
    sims[diag, diag] = np.where(diag < hits, 10.0, -10.0)  # first 277 rank first, the rest last
    report = evaluate_sims(sims, "plain", caption_to_image=diag)
    text = json.dumps(report["metrics"])
    assert '"i2t_r1": 27.7,' in text and '"t2i_r1": 27.7,' in text, text
    assert 100.0 * float(np.mean(diag < hits)) != 27.7  # the form that was replaced really misprints
    # every count at common test-set sizes gives the correctly rounded decimal 100 * count / n
    for size in (1000, 5000, 25000):
        for count in range(0, size + 1, 7):
            ranks = np.where(np.arange(size) < count, 0, 50)
            got = recall_metrics(Ranks(i2t=ranks, t2i=ranks))["i2t_r1"]
            assert got == float(Fraction(100 * count, size)), (count, size)


def test_collapsed_embeddings_tie_everywhere_and_score_worst_under_pessimistic_ties():
    """300 identical image embeddings: each caption ties with every image. The embedding source scores
    own pairs by an elementwise dot product and blocks by a matrix product, which differ in the last
    bit for most pairs; the evaluation must still rank from one matrix (it gave t2i R@1 44.4)."""
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import materialise

    g = torch.Generator().manual_seed(0)
    n, d = 300, 256
    images = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=-1).repeat(n, 1)
    captions = torch.nn.functional.normalize(torch.randn(5 * n, d, generator=g), dim=-1)
    c2i = np.repeat(np.arange(n), 5)
    source = embedding_scores(images, captions)
    own_block = source.rows(0, n)[torch.as_tensor(c2i), torch.arange(5 * n)]
    assert (source.pairs(c2i, np.arange(5 * n)) != own_block).any()  # the kernels do differ here
    metrics = evaluate_sims(source, "plain", caption_to_image=c2i)["metrics"]
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_r10"] == 0.0
    assert metrics["i2t_r1"] == pytest.approx(100 / n)  # only the last image: its captions come last
    dense = materialise(source)
    assert isinstance(dense, DenseScores) and torch.equal(dense.rows(0, n), source.rows(0, n))


def test_materialise_spills_large_matrices_to_a_memory_map(tmp_path, monkeypatch):
    from itmatch.evaluation.scores import materialise

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    s = np.random.default_rng(0).standard_normal((7, 11)).astype(np.float32)
    source = BlockScores(lambda a, b: torch.as_tensor(s[a:b]), s.shape, chunk_rows=3)
    spilled = materialise(source, max_bytes=16)
    assert isinstance(spilled.scores, np.memmap) and np.array_equal(np.asarray(spilled.scores), s)
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped
