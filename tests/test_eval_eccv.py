"""ECCV Caption through eccv-caption, on the real COCO 5K test ids shipped with the package.

The package's numbers are checked against our own count-based mAP@R / R-Precision / R@1 engine fed
with ECCV's positives read straight from the package's json files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import itmatch.evaluation.eccv as eccv
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.evaluation.protocols import evaluate_sims
from itmatch.evaluation.ranking import relevance_ranking, retrieval_metrics
from itmatch.evaluation.scores import embedding_scores

ECCV_KEYS = ("eccv_map_at_r_i2t", "eccv_map_at_r_t2i", "eccv_rprecision_i2t", "eccv_rprecision_t2i",
             "eccv_r1_i2t", "eccv_r1_t2i")


@pytest.fixture(scope="module")
def coco():
    """COCO 5K test ids straight from the package's data folder (not through itmatch code)."""
    import importlib.util

    data = Path(importlib.util.find_spec("eccv_caption").origin).parent / "data"
    caption_ids = np.load(data / "coco_test_ids.npy").astype(np.int64)
    owner_of = {int(k): int(v[0]) for k, v in json.loads((data / "original_caption_to_image.json").read_text()).items()}
    owner = np.array([owner_of[int(c)] for c in caption_ids])
    _, first = np.unique(owner, return_index=True)
    image_ids = owner[np.sort(first)]
    row = {int(i): r for r, i in enumerate(image_ids)}
    c2i = np.array([row[int(o)] for o in owner])
    gts = {d: {int(k): [int(x) for x in v] for k, v in json.loads((data / f"eccv_{d}.json").read_text()).items()}
           for d in ("image_to_caption", "caption_to_image")}
    return image_ids, caption_ids, c2i, gts


def make_split(image_ids, caption_ids, c2i) -> RetrievalSplit:
    return RetrievalSplit(name="test", root=Path("."), captions=[""] * len(caption_ids), caption_to_image=c2i,
                          image_ids=[str(i) for i in image_ids], caption_ids=[str(c) for c in caption_ids])


def low_rank_scores(c2i, n_img, seed=0):
    """Integer embeddings: exact dot products with many ties, whatever the row/column order."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-2, 3, (n_img, 12), generator=g).float()
    cap = img[torch.as_tensor(c2i)] + torch.randint(-2, 3, (len(c2i), 12), generator=g).float()
    return img, cap


def engine_eccv(img, cap, image_ids, caption_ids, gts, policy):
    """Our own mAP@R / R-P / R@1 with ECCV's positives; R counts positives missing from the gallery."""
    row = {int(i): r for r, i in enumerate(image_ids)}
    col = {int(c): k for k, c in enumerate(caption_ids)}
    n_img, n_cap = len(image_ids), len(caption_ids)

    def positives(queries, to_query, to_item, n_query, n_item):
        pos = sp.lil_matrix((n_query, n_item), dtype=bool)
        n_rel = np.zeros(n_query, dtype=np.int64)
        for q, items in queries.items():
            n_rel[to_query[q]] = len(set(items))
            for x in items:
                if x in to_item:
                    pos[to_query[q], to_item[x]] = True
        return pos.tocsr(), n_rel

    pos_i2t, rel_i2t = positives(gts["image_to_caption"], row, col, n_img, n_cap)
    pos_t2i, rel_t2i = positives(gts["caption_to_image"], col, row, n_cap, n_img)
    i2t, t2i = relevance_ranking(embedding_scores(img, cap), pos_i2t, pos_t2i, n_relevant_i2t=rel_i2t,
                                 n_relevant_t2i=rel_t2i, tie_policy=policy)
    out = {}
    for d, q in (("i2t", i2t.summary()), ("t2i", t2i.summary())):
        out[f"eccv_map_at_r_{d}"], out[f"eccv_rprecision_{d}"], out[f"eccv_r1_{d}"] = (
            q["map_at_r"], q["rprecision"], q["r1"])
    return out


@pytest.mark.parametrize("policy", ["pessimistic", "optimistic"])
def test_eccv_package_matches_our_engine(coco, policy):
    image_ids, caption_ids, c2i, gts = coco
    img, cap = low_rank_scores(c2i, len(image_ids))
    report = evaluate_sims(embedding_scores(img, cap), "eccv", make_split(image_ids, caption_ids, c2i),
                           tie_policy=policy)
    m = report["metrics"]
    ours = engine_eccv(img, cap, image_ids, caption_ids, gts, policy)
    for key in ECCV_KEYS:
        assert m[key] == pytest.approx(ours[key], abs=1e-9), key
    assert 0 < m["eccv_map_at_r_i2t"] < 100 and 0 < m["eccv_r1_t2i"] < 100
    # the standard COCO 5K metrics come with it
    assert m["rsum"] == retrieval_metrics(embedding_scores(img, cap), c2i, tie_policy=policy)["rsum"]


def test_eccv_maps_ids_not_positions(coco):
    image_ids, caption_ids, c2i, _ = coco
    img, cap = low_rank_scores(c2i, len(image_ids), seed=1)
    base = evaluate_sims(embedding_scores(img, cap), "eccv", make_split(image_ids, caption_ids, c2i))["metrics"]
    rng = np.random.default_rng(0)
    perm_img, perm_cap = rng.permutation(len(image_ids)), rng.permutation(len(caption_ids))
    new_row = np.argsort(perm_img)  # old row -> new row
    shuffled = make_split(image_ids[perm_img], caption_ids[perm_cap], new_row[c2i[perm_cap]])
    moved = evaluate_sims(embedding_scores(img[perm_img], cap[perm_cap]), "eccv", shuffled)["metrics"]
    for key in ECCV_KEYS:
        assert moved[key] == pytest.approx(base[key], abs=1e-9)
    assert moved["rsum"] == pytest.approx(base["rsum"])


def test_eccv_id_errors(coco):
    image_ids, caption_ids, c2i, _ = coco
    with pytest.raises(ItmatchError, match="needs the split's caption ids"):
        eccv.map_coco_ids(image_ids, None, c2i)
    bad = image_ids.copy()
    bad[7] = 1
    with pytest.raises(ItmatchError, match=r"image row\(s\) 7 have ids 1 that are not COCO 5K test images"):
        eccv.map_coco_ids(bad, caption_ids, c2i)
    bad_caps = [str(c) for c in caption_ids]
    bad_caps[3] = "x12"
    with pytest.raises(ItmatchError, match="caption id 'x12' at position 3 is not an integer"):
        eccv.map_coco_ids(image_ids, bad_caps, c2i)
    first = np.isin(c2i, np.arange(1000))
    with pytest.raises(ItmatchError, match="needs all 5000 COCO 5K test images; 4000 are missing"):
        eccv.map_coco_ids(image_ids[:1000], caption_ids[first], c2i[first])
    swapped = caption_ids.copy()
    a, b = np.flatnonzero(c2i == 0)[0], np.flatnonzero(c2i == 1)[0]
    swapped[[a, b]] = swapped[[b, a]]  # caption ids on the wrong images: caught, not silently scored
    with pytest.raises(ItmatchError, match="mapped to the wrong image"):
        eccv.map_coco_ids(image_ids, swapped, c2i)
    dup = caption_ids.copy()
    dup[1] = dup[0]
    with pytest.raises(ItmatchError, match="duplicate caption id"):
        eccv.map_coco_ids(image_ids, dup, c2i)
    split = make_split(image_ids, caption_ids, c2i)
    split.caption_ids = None
    with pytest.raises(ItmatchError, match="caption ids"):
        evaluate_sims(np.zeros((5000, 25000), dtype=np.float16), "eccv", split)


@pytest.mark.parametrize("policy", ["pessimistic", "optimistic"])
def test_ranked_lists_follow_the_tie_policy(policy):
    rng = np.random.default_rng(2)
    scores = torch.as_tensor(rng.integers(0, 3, size=(6, 40)), dtype=torch.float32)
    positives = torch.as_tensor(rng.random((6, 40)) < 0.3)
    got = eccv.ranked_lists(scores, positives, 12, policy == "pessimistic").numpy()
    for q in range(6):
        s, p = scores[q].numpy(), positives[q].numpy()
        tie = p if policy == "pessimistic" else ~p
        expected = sorted(range(40), key=lambda j: (-s[j], tie[j]))[:12]
        # positions are exact up to the order inside a (score, class) group
        assert [(s[j], p[j]) for j in got[q]] == [(s[j], p[j]) for j in expected]
        assert len(set(got[q].tolist())) == 12
