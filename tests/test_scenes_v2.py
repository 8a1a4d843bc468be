"""Scenes v2 data: box encoding, no count shortcut, geometry recoverable, held-out combinations,
minimal pairs, the set track and the oracle ceilings (on the session's tiny data set)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from itmatch.data.boxes import box_features
from itmatch.errors import ItmatchError

HELD_OUT_SC = {("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("star", "green"),
               ("cross", "white"), ("hexagon", "purple")}
HELD_OUT_REL = [("circle", "left_of", "star"), ("triangle", "above", "square"), ("diamond", "left_of", "hexagon")]


def graphs(root, split):
    return [json.loads(line) for line in (root / f"{split}_scenes.jsonl").read_text().splitlines()]


def test_box_features_is_the_documented_5d_encoding():
    boxes = np.array([[[0, 0, 128, 128], [32, 16, 64, 80], [0, 0, 0, 0]]], np.float32)
    got = box_features(boxes, 128, 64)
    assert got.shape == (1, 3, 5) and got.dtype == np.float32
    for r, (x1, y1, x2, y2) in enumerate(boxes[0]):
        want = [x1 / 128, y1 / 64, x2 / 128, y2 / 64, (x2 - x1) * (y2 - y1) / (128 * 64)]
        np.testing.assert_allclose(got[0, r], want, rtol=1e-6)
    for bad, match in ((boxes[0], "N x R x 4"), (boxes[..., :3], "N x R x 4"),
                       (boxes[:, :, [2, 1, 0, 3]], "x2 >= x1"), (boxes * np.nan, "NaN")):
        with pytest.raises(ItmatchError, match=match):
            box_features(bad, 128, 128)
    with pytest.raises(ItmatchError, match="image_w"):
        box_features(boxes, 0, 128)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 100, l2: float = 1e-3):
    """Multinomial logistic regression by full-batch L-BFGS (torch); inputs are standardised."""
    torch.manual_seed(0)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((torch.tensor((z - mu) / sd) @ w + b).argmax(1)).detach().numpy()


def load(root, split):
    feats = np.asarray(np.load(root / f"{split}_ims.npy", mmap_mode="r"))
    boxes = np.load(root / f"{split}_boxes.npy")
    return feats, boxes, graphs(root, split)


def test_the_object_count_cannot_be_read_off_a_context_region(tiny_scenes):
    """Each context slot (box, and which slot it is) says nothing about how many objects there are."""
    (_f, b_tr, g_tr), (_f2, b_te, g_te) = load(tiny_scenes, "train"), load(tiny_scenes, "test")
    y_tr = np.array([len(g["objects"]) - 2 for g in g_tr])
    y_te = np.array([len(g["objects"]) - 2 for g in g_te])
    base = np.bincount(y_te, minlength=3).max() / len(y_te)
    for slot in range(4, 12):
        x_tr = box_features(b_tr, 128, 128)[:, slot].astype(np.float64)
        x_te = box_features(b_te, 128, 128)[:, slot].astype(np.float64)
        predict = fit_logistic(x_tr, y_tr, 3)
        assert (predict(x_te) == y_te).mean() <= base + 0.05, slot


def test_left_or_right_of_an_object_is_recoverable_from_features_and_boxes(tiny_scenes):
    def objects(split):
        feats, boxes, gs = load(tiny_scenes, split)
        xs, ys = [], []
        enc = box_features(boxes, 128, 128)
        for i, g in enumerate(gs):
            for slot in range(4):
                x1, y1, x2, y2 = boxes[i, slot]
                if x2 <= x1:
                    continue
                # the object of this slot: the graph's object whose centre is nearest the box centre
                o = min(g["objects"], key=lambda o: np.hypot(o["cx"] - (x1 + x2) / 2, o["cy"] - (y1 + y2) / 2))
                xs.append(np.concatenate([enc[i, slot], feats[i, slot, :64]]))
                ys.append(int(o["cx"] < 64))
        return np.array(xs, np.float64), np.array(ys)

    x_tr, y_tr = objects("train")
    x_te, y_te = np.concatenate([objects(s)[0] for s in ("dev", "test")]), \
        np.concatenate([objects(s)[1] for s in ("dev", "test")])
    predict = fit_logistic(x_tr, y_tr, 2)
    assert (predict(x_te) == y_te).mean() >= 0.9


def loosely(a, rel, b):
    d = {"left_of": b["cx"] - a["cx"], "above": b["cy"] - a["cy"]}[rel]
    gap = max(16.0, 0.6 * (a["r"] + b["r"]))
    return d > 0, d >= gap


def test_held_out_combinations_appear_only_in_test_comp(tiny_scenes):
    for split in ("train", "dev", "test", "test_set"):
        for g in graphs(tiny_scenes, split):
            objs = g["objects"]
            assert not {(o["shape"], o["colour"]) for o in objs} & HELD_OUT_SC
            for sa, rel, sb in HELD_OUT_REL:
                assert not any(a["shape"] == sa and b["shape"] == sb and loosely(a, rel, b)[0]
                               for a in objs for b in objs if a is not b), (g["id"], sa, rel, sb)
    comp = graphs(tiny_scenes, "test_comp")
    for g in comp:
        objs = g["objects"]
        shows = bool({(o["shape"], o["colour"]) for o in objs} & HELD_OUT_SC) or any(
            a["shape"] == sa and b["shape"] == sb and loosely(a, rel, b)[1]
            for sa, rel, sb in HELD_OUT_REL for a in objs for b in objs if a is not b)
        assert shows, g["id"]


@pytest.mark.parametrize("split", ["test", "test_comp"])
def test_minimal_pairs_differ_by_their_change_only(tiny_scenes, split):
    seen = Counter()
    for g in graphs(tiny_scenes, split):
        for p in g["minimal_pairs"]:
            true, foil = p["true"]["text"].split(), p["foil"]["text"].split()
            seen[p["change"]] += 1
            if p["change"] == "count":
                # the number word changes (and the noun's number with it: "one star" / "two stars")
                assert len(true) == len(foil) and true[0] != foil[0] and true[1:-1] == foil[1:-1]
                assert true[-1].startswith(foil[-1]) or foil[-1].startswith(true[-1])
            else:  # the same words, in another order
                assert Counter(true) == Counter(foil) and true != foil
    assert set(seen) == {"relation_swap", "attribute_swap", "count"}


def test_the_set_track_has_one_caption_per_object_and_subsets(tiny_scenes):
    for g in graphs(tiny_scenes, "test_set"):
        kinds = Counter(c["kind"] for c in g["captions"])
        distinct = {(o["shape"], o["colour"], o["size"]) for o in g["objects"]}
        assert kinds["object"] == len(distinct)
        named = {tuple(c["facts"][0]["desc"][k] for k in ("shape", "colour", "size"))
                 for c in g["captions"] if c["kind"] == "object"}
        assert named == distinct
        assert kinds["subset"] == min(2, len(distinct) * (len(distinct) - 1) // 2)


def test_ceilings_are_the_oracles_through_the_scenes_protocol(tiny_scenes):
    ceilings = json.loads((tiny_scenes / "ceilings.json").read_text())
    assert ceilings["oracles"] == ["exact", "no_spatial", "bag", "no_count"]
    assert set(ceilings["splits"]) == {"test", "test_comp", "test_set"}
    for split, by_oracle in ceilings["splits"].items():
        exact = by_oracle["exact"]
        assert exact["map_at_r_i2t"] == exact["map_at_r_t2i"] == 100.0
        for kind in exact["by_kind"].values():
            assert kind["map_at_r_i2t"] == kind["map_at_r_t2i"] == 100.0
        if split != "test_set":
            assert exact["pair_acc"] == 100.0 and exact["twin_acc_t2i"] == 100.0
            # without spatial relations a relation swap is a tie (a loss under pessimistic ties)
            assert by_oracle["no_spatial"]["by_change"]["relation_swap"]["pair_acc"] == 0.0
            assert by_oracle["bag"]["by_change"]["attribute_swap"]["pair_acc"] < 50.0
            assert by_oracle["no_count"]["by_change"]["count"]["pair_acc"] < 100.0
            assert by_oracle["no_spatial"]["by_kind"]["relation"]["map_at_r_t2i"] < 100.0
        else:
            assert exact["set_coverage"] == 100.0
