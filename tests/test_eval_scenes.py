"""Scenes v2 metrics against plain slow loops: undetermined pairs left out, own-caption ranks,
set coverage, minimal pairs, per-kind and per-change results, old folders refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from itmatch.data.scenes.annotations import SceneAnnotations
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.evaluation.protocols import evaluate_sims
from itmatch.evaluation.ranking import pair_accuracy, ranks_without, relevance_ranking, set_coverage
from itmatch.evaluation.report import format_report


def slow_map_at_r(scores: np.ndarray, relevant: np.ndarray, skip: np.ndarray, pessimistic: bool = True):
    """mAP@R and R-Precision of one query: skipped items removed, ties ordered by the policy."""
    keep = ~skip | relevant
    s, r = scores[keep], relevant[keep]
    R = int(r.sum())
    if R == 0:
        return np.nan, np.nan
    # pessimistic: on equal scores the irrelevant item comes first
    order = sorted(range(len(s)), key=lambda k: (-s[k], r[k] if pessimistic else not r[k]))
    hits, ap = 0, 0.0
    for pos, k in enumerate(order[:R], start=1):
        if r[k]:
            hits += 1
            ap += hits / pos
    return ap / R, hits / R


def random_case(seed: int, n_img: int = 14, per: int = 3):
    rng = np.random.default_rng(seed)
    c2i = np.repeat(np.arange(n_img), per)
    n_cap = len(c2i)
    S = rng.integers(0, 6, size=(n_img, n_cap)).astype(np.float32)  # many ties
    rel = rng.random((n_cap, n_img)) < 0.15
    rel[np.arange(n_cap), c2i] = True
    und = (rng.random((n_cap, n_img)) < 0.2) & ~rel
    return S, c2i, rel, und


@pytest.mark.parametrize("tie_policy", ["pessimistic", "optimistic"])
def test_relevance_ranking_leaves_excluded_pairs_out_like_a_slow_loop(tie_policy):
    S, c2i, rel, und = random_case(1)
    i2t, t2i = relevance_ranking(S, sp.csr_matrix(rel.T), sp.csr_matrix(rel), exclude=sp.csr_matrix(und),
                                 tie_policy=tie_policy, chunk_rows=4)
    pess = tie_policy == "pessimistic"
    for i in range(S.shape[0]):
        m, rp = slow_map_at_r(S[i], rel[:, i], und[:, i], pess)
        assert i2t.map_at_r[i] == pytest.approx(m) and i2t.r_precision[i] == pytest.approx(rp)
    for c in range(S.shape[1]):
        m, rp = slow_map_at_r(S[:, c], rel[c], und[c], pess)
        assert t2i.map_at_r[c] == pytest.approx(m) and t2i.r_precision[c] == pytest.approx(rp)
    # excluding nothing changes nothing; excluding changes something here
    plain = relevance_ranking(S, sp.csr_matrix(rel.T), sp.csr_matrix(rel), tie_policy=tie_policy)
    none = relevance_ranking(S, sp.csr_matrix(rel.T), sp.csr_matrix(rel), tie_policy=tie_policy,
                             exclude=sp.csr_matrix(np.zeros_like(und)))
    np.testing.assert_array_equal(plain[0].map_at_r, none[0].map_at_r)
    assert not np.allclose(plain[1].map_at_r, t2i.map_at_r)


@pytest.mark.parametrize("tie_policy", ["pessimistic", "optimistic"])
def test_own_caption_ranks_without_excluded_pairs_match_a_slow_loop(tie_policy):
    S, c2i, _rel, und = random_case(2)
    ranks = ranks_without(S, c2i, sp.csr_matrix(und), tie_policy=tie_policy, chunk_rows=3)
    ahead = np.greater_equal if tie_policy == "pessimistic" else np.greater
    for i in range(S.shape[0]):
        best = S[i, c2i == i].max()
        others = [c for c in range(S.shape[1]) if c2i[c] != i and not und[c, i]]
        assert ranks.i2t[i] == sum(ahead(S[i, c], best) for c in others)
    for c in range(S.shape[1]):
        others = [i for i in range(S.shape[0]) if i != c2i[c] and not und[c, i]]
        assert ranks.t2i[c] == sum(ahead(S[i, c], S[c2i[c], c]) for i in others)


def test_set_coverage_matches_a_slow_loop():
    S, c2i, rel, und = random_case(3, per=4)
    targets = np.random.default_rng(3).random(len(c2i)) < 0.5
    got = set_coverage(S, c2i, targets, sp.csr_matrix(rel), sp.csr_matrix(und), chunk_rows=5)
    shares = []
    for i in range(S.shape[0]):
        mine = [c for c in range(len(c2i)) if c2i[c] == i and targets[c]]
        if not mine:
            continue
        irrelevant = [S[i, c] for c in range(len(c2i)) if not rel[c, i] and not und[c, i]]
        top = max(irrelevant) if irrelevant else -np.inf
        shares.append(np.mean([S[i, c] > top for c in mine]))
    assert got == pytest.approx(100 * np.mean(shares))
    assert set_coverage(S, c2i, np.zeros(len(c2i), bool), sp.csr_matrix(rel)) is None
    with pytest.raises(ItmatchError, match="one flag per caption"):
        set_coverage(S, c2i, targets[:-1], sp.csr_matrix(rel))


def test_scenes_protocol_reports_kinds_changes_and_minimal_pairs_like_slow_loops():
    S, c2i, rel, und = random_case(4, n_img=12, per=5)
    n_cap = len(c2i)
    kinds = np.array(["full", "relation", "count", "probe", "foil"] * 12, dtype=object)
    role = np.array(["main", "main", "main", "probe", "foil"] * 12, dtype=object)
    change = np.array(["", "", "", "count", "count"] * 12, dtype=object)
    pair = np.where(role == "foil", np.arange(n_cap) - 1, -1)
    rel[role == "foil", c2i[role == "foil"]] = False
    und[np.arange(n_cap), c2i] = False
    twins = np.array([[0, 1], [2, 3], [4, 5]])
    ann = SceneAnnotations(kinds, role, change, pair, sp.csr_matrix(und),
                           np.array(["colour", "count", "colour"], dtype=object))
    split = RetrievalSplit(name="test", root=None, captions=["c"] * n_cap, caption_to_image=c2i,
                           image_ids=[str(i) for i in range(12)], relevance=sp.csr_matrix(rel), twins=twins,
                           extra={"scenes_annotations": ann})
    m = evaluate_sims(S, "scenes", split)["metrics"]
    main = np.flatnonzero(role == "main")
    for kind in ("full", "relation", "count"):
        cols = main[kinds[main] == kind]
        maps = [slow_map_at_r(S[i, cols], rel[cols, i], und[cols, i])[0] for i in range(12)]
        assert m["by_kind"][kind]["map_at_r_i2t"] == pytest.approx(100 * np.nanmean(maps))
        maps = [slow_map_at_r(S[:, c], rel[c], und[c])[0] for c in cols]
        assert m["by_kind"][kind]["map_at_r_t2i"] == pytest.approx(100 * np.nanmean(maps))
        assert m["by_kind"][kind]["captions"] == len(cols)
    assert set(m["by_kind"]) == {"full", "relation", "count"}  # probes and foils are not ranked
    foils = np.flatnonzero(role == "foil")
    wins = [S[c2i[f], f - 1] > S[c2i[f], f] for f in foils]
    assert m["pair_acc"] == pytest.approx(100 * np.mean(wins))
    assert m["by_change"]["count"]["pair_acc"] == pytest.approx(100 * np.mean(wins))
    np.testing.assert_array_equal(pair_accuracy(S, c2i[foils], foils - 1, foils), np.array(wins, float))
    # twin accuracy per change: caption -> image over the discriminative main captions (slow loop)
    trials = []
    for a, b in twins[[0, 2]]:
        for x, y in ((a, b), (b, a)):
            trials += [S[x, c] > S[y, c] for c in main[c2i[main] == x] if not rel[c, y] and not und[c, y]]
    assert m["by_change"]["colour"]["twin_acc_t2i"] == pytest.approx(100 * np.mean(trials))
    assert m["by_change"]["colour"]["twin_pairs"] == 2 and m["by_change"]["count"]["twin_pairs"] == 1
    # own-caption recalls are over the main captions with undetermined pairs left out
    i2t = [sum(S[i, c] >= S[i, main[c2i[main] == i]].max() for c in main if c2i[c] != i and not und[c, i])
           for i in range(12)]
    assert m["i2t_r1"] == pytest.approx(100 * np.mean(np.array(i2t) < 1))
    text = format_report(evaluate_sims(S, "scenes", split))
    assert "per caption kind" in text and "relation_swap" not in text and "colour" in text


def test_an_old_scenes_folder_is_refused_with_one_clear_message(tmp_path):
    (tmp_path / "scenes.json").write_text(json.dumps({"format": "itmatch-scenes", "version": 1}))
    rel = sp.csr_matrix(np.eye(2, dtype=bool))
    split = RetrievalSplit(name="test", root=tmp_path, captions=["a", "b"], caption_to_image=np.arange(2),
                           image_ids=["0", "1"], caption_ids=["0#0", "1#0"], relevance=rel)
    with pytest.raises(ItmatchError, match="format version 1.*regenerate"):
        evaluate_sims(np.eye(2, dtype=np.float32), "scenes", split)
