"""Region boxes into the model: the 5-d code, batches that carry it, the encoder options, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itmatch.config import PACKAGED_CONFIGS, config_from_dict, load_config
from itmatch.data.batch import ImageBatch
from itmatch.data.boxes import box_features
from itmatch.data.datasets import ImageDataset, PairDataset, make_loader
from itmatch.data.precomp import load_split
from itmatch.data.text import WordVocab
from itmatch.encoders.image import RegionEncoder
from itmatch.errors import ItmatchError
from itmatch.models.backbone import VSEModel


def test_box_features_is_the_teran_code():
    boxes = np.array([[[10, 20, 50, 60], [0, 0, 200, 100]]], dtype=np.float32)
    got = box_features(boxes, 200, 100)
    assert got.dtype == np.float32 and got.shape == (1, 2, 5)
    np.testing.assert_allclose(got[0, 0], [0.05, 0.2, 0.25, 0.6, 40 * 40 / (200 * 100)], rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], [0, 0, 1, 1, 1])
    # one size per image
    two = np.concatenate([boxes, boxes * 2])
    per_image = box_features(two, np.array([200, 400]), np.array([100, 200]))
    np.testing.assert_allclose(per_image[0], per_image[1], rtol=1e-6)
    with pytest.raises(ItmatchError, match="N x R x 4"):
        box_features(boxes[0], 1, 1)


def boxes_split(tmp_path, n=6, k=2, r=5, f=4):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_ims.npy", rng.standard_normal((n, r, f)).astype(np.float32))
    x = np.sort(rng.uniform(0, 640, (n, r, 2)), -1)
    y = np.sort(rng.uniform(0, 480, (n, r, 2)), -1)
    boxes = np.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1).astype(np.float32)
    np.save(tmp_path / "train_boxes.npy", boxes)
    np.save(tmp_path / "train_image_sizes.npy", np.array([[640, 480]] * n))
    (tmp_path / "train_caps.txt").write_text("".join(f"a thing {c} near item {c % 3}\n" for c in range(n * k)))
    return load_split(tmp_path, "train"), box_features(boxes, 640, 480)


def test_batches_carry_box_codes_aligned_with_regions(tmp_path):
    split, codes = boxes_split(tmp_path)
    vocab = WordVocab.build(split.captions)
    ds = PairDataset(split, vocab, max_length=16, train=False)
    img, _ = ds.collate([ds[c] for c in (3, 0, 7)])
    torch.testing.assert_close(img.boxes, torch.from_numpy(codes[[1, 0, 3]]))
    (batch,) = list(make_loader(ImageDataset(split), batch_size=6))
    torch.testing.assert_close(batch.boxes, torch.from_numpy(codes))


def test_region_drop_drops_the_same_regions_boxes(tmp_path):
    split, codes = boxes_split(tmp_path, n=20, k=2, r=10, f=3)
    feats = np.asarray(split.features)
    vocab = WordVocab.build(split.captions)
    ds = PairDataset(split, vocab, max_length=16, train=True, region_drop=0.5, seed=4)
    caps = list(range(0, 40, 2))
    img, _ = ds.collate([ds[c] for c in caps])
    assert img.region_mask.sum() < 20 * 10  # regions were dropped
    assert img.boxes.shape[:2] == img.regions.shape[:2] == img.region_mask.shape
    for b, c in enumerate(caps):
        row = c // 2
        for slot in range(img.regions.shape[1]):
            if not img.region_mask[b, slot]:
                assert not img.boxes[b, slot].any() and not img.regions[b, slot].any()
                continue
            # the region in this slot is the source region whose feature it holds; its box must follow it
            src = int(np.flatnonzero((feats[row] == img.regions[b, slot].numpy()).all(1))[0])
            torch.testing.assert_close(img.boxes[b, slot], torch.from_numpy(codes[row, src]))
    # the features drop exactly as without boxes (same draws)
    (tmp_path / "plain").mkdir()
    np.save(tmp_path / "plain" / "train_ims.npy", feats)
    (tmp_path / "plain" / "train_caps.txt").write_text((tmp_path / "train_caps.txt").read_text())
    plain = load_split(tmp_path / "plain", "train")
    ds2 = PairDataset(plain, vocab, max_length=16, train=True, region_drop=0.5, seed=4)
    img2, _ = ds2.collate([ds2[c] for c in caps])
    assert img2.boxes is None
    assert torch.equal(img2.regions, img.regions) and torch.equal(img2.region_mask, img.region_mask)


@pytest.mark.parametrize("mode", ["none", "concat", "add"])
def test_region_encoder_box_modes(mode):
    torch.manual_seed(0)
    enc = RegionEncoder(10, 8, boxes=mode).eval()
    regions, mask = torch.randn(3, 4, 10), torch.arange(4)[None] < torch.tensor([[4], [2], [3]])
    boxes = torch.rand(3, 4, 5)
    out = enc(regions, mask, boxes)
    assert out.shape == (3, 4, 8) and not out[~mask].any()
    assert enc.fc.in_features == (15 if mode == "concat" else 10)
    assert hasattr(enc, "box_proj") == (mode == "add")
    moved = enc(regions, mask, boxes + 0.1)
    if mode == "none":
        assert torch.equal(out, moved)
        assert torch.equal(out, enc(regions, mask))  # boxes ignored altogether
    else:
        assert not torch.allclose(out[mask], moved[mask])
        with pytest.raises(ItmatchError, match=f"model.image.boxes is {mode} but the image batch holds no"):
            enc(regions, mask)
        with pytest.raises(ItmatchError, match="do not fit regions"):
            enc(regions, mask, boxes[:, :3])


def test_box_modes_are_checked_in_the_model_config():
    vocab = WordVocab.build(["a b"])
    base = {"embed_dim": 16, "gpo_pe_dim": 8, "gpo_hidden": 8, "text": {"word_dim": 8}}
    # both are refused when the config is loaded, before any model or data
    with pytest.raises(ItmatchError, match="model.image.boxes': 'sum' is not one of none, concat, add"):
        config_from_dict({"model": {**base, "image": {"boxes": "sum"}}})
    with pytest.raises(ItmatchError, match="model.image.boxes.*grid"):
        config_from_dict({"model": {**base, "image": {"kind": "grid", "boxes": "add"}}})
    # the default changes nothing: no new parameters, same input width
    model = VSEModel(config_from_dict({"model": {**base, "image": {"feature_dim": 10}}}).model, vocab)
    assert model.image_encoder.fc.in_features == 10 and not hasattr(model.image_encoder, "box_proj")


def test_model_encodes_boxes_from_the_batch():
    vocab = WordVocab.build(["a b"])
    cfg = config_from_dict({"model": {"embed_dim": 16, "gpo_pe_dim": 8, "gpo_hidden": 8, "text": {"word_dim": 8},
                                      "image": {"feature_dim": 10, "boxes": "add"}}})
    model = VSEModel(cfg.model, vocab).eval()
    regions = torch.randn(2, 3, 10)
    batch = ImageBatch(torch.arange(2), regions, torch.ones(2, 3, dtype=torch.bool), boxes=torch.rand(2, 3, 5))
    a = model.encode_image(batch)
    batch.boxes = batch.boxes.flip(1)
    assert not torch.allclose(a, model.encode_image(batch))


def small_config(data_root, *overrides):
    base = [f"data.root={data_root}", "model.embed_dim=32", "model.text.glove=null", "model.text.word_dim=16",
            "train.batch_size=32", "train.eval_batch_size=64", "train.log_every_steps=1", "data.max_dev_images=40"]
    return load_config(PACKAGED_CONFIGS / "vse_scenes_boxes.yaml", base + list(overrides))


def test_training_with_boxes_and_relevance_negatives_round_trips(tiny_scenes, tmp_path):
    from itmatch.checkpoint import from_pretrained
    from itmatch.data.setup import load_configured_split
    from itmatch.evaluation.encode import split_scores
    from itmatch.training.loop import Trainer

    cfg = small_config(tiny_scenes, "train.max_steps=3", "loss.negatives=relevance")
    assert cfg.model.image.boxes != "none"
    trainer = Trainer(cfg, tmp_path / "run", echo=False)
    result = trainer.fit()
    assert result["steps"] == 3
    split = load_configured_split(cfg.data, "test")
    before = split_scores(trainer.model, split, trainer.tokenizer, cfg.model, 64).dense()
    model, tokenizer, cfg2 = from_pretrained(tmp_path / "run" / "best")
    assert cfg2.model.image.boxes == cfg.model.image.boxes and cfg2.loss.negatives == "relevance"
    np.testing.assert_array_equal(before, split_scores(model, split, tokenizer, cfg2.model, 64).dense())


def test_boxes_or_relevance_missing_from_the_data_fail_before_training(tiny_scenes, tmp_path):
    from itmatch.training.loop import Trainer

    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_scenes.iterdir():
        if f.is_file() and not f.name.endswith(("_boxes.npy", "_image_sizes.npy", "_relevance.npz")):
            (data / f.name).symlink_to(f)
    with pytest.raises(ItmatchError, match="model.image.boxes' is (concat|add) but split 'train'.*train_boxes.npy"):
        Trainer(small_config(data, "train.max_steps=1"), tmp_path / "run", echo=False).fit()
    with pytest.raises(ItmatchError, match="loss.negatives' is relevance but split 'train'"):
        Trainer(small_config(data, "train.max_steps=1", "model.image.boxes=none", "loss.negatives=relevance"),
                tmp_path / "run2", echo=False).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
