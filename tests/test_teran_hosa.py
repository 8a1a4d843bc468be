"""`teran` and `hosa`: configs, the running estimate of H, order-independent evaluation, and learning on tiny
scenes."""

from __future__ import annotations

import pytest
import torch

from itmatch.checkpoint import from_pretrained, save_pretrained
from itmatch.config import PACKAGED_CONFIGS, config_from_dict, load_config
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.data.text import WordVocab
from itmatch.errors import ItmatchError
from itmatch.methods.registry import build_model, build_objective
from itmatch.objectives.base import TrainProgress
from itmatch.training.loop import Trainer

CAPTIONS = ["a red circle", "a blue square left of a large star", "two stars", "a red star above a cross",
            "one blue circle", "a small green hexagon"]


def tiny_hosa(**hosa):
    section = {"heads": 2, "ff": 16, "regions": 6, "words": 10, "dropout": 0.0, **hosa}
    return config_from_dict({"model": {"method": "hosa", "embed_dim": 8, "image": {"feature_dim": 5},
                                       "text": {"word_dim": 4}}, "hosa": section})


def pairs(vocab, n, seed):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, 6, 5, generator=g)
    mask = torch.arange(6)[None] < torch.randint(2, 7, (n,), generator=g)[:, None]
    tokens, tmask = vocab.encode_batch([CAPTIONS[i % len(CAPTIONS)] for i in range(n)], 10)
    idx = torch.arange(n)
    return (ImageBatch(image_index=idx, regions=regions, region_mask=mask),
            TextBatch(tokens=tokens, token_mask=tmask, caption_index=idx, image_index=idx))


@pytest.mark.parametrize("direction", ["image", "text", "both"])
@pytest.mark.parametrize("op", ["tproduct", "hadamard"])
def test_hosa_inference_uses_the_saved_running_estimate_and_ignores_batch_order(direction, op, tmp_path):
    torch.manual_seed(0)
    vocab = WordVocab.build(CAPTIONS)
    cfg = tiny_hosa(direction=direction, op=op, momentum=0.5)
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    model.train()
    for step in range(3):  # three fits move the running normal equations
        img, txt = pairs(vocab, 12, seed=step)
        objective(model(img, txt), img, txt, TrainProgress(epoch=1))["loss"].backward()
    assert int(model.fits_seen) == 3
    model.eval()
    img, txt = pairs(vocab, 9, seed=7)
    with torch.inference_mode():
        enc_i, enc_t = model.encode_image(img), model.encode_text(txt)
        perm = torch.randperm(9)
        enc_ip = model.encode_image(ImageBatch(image_index=perm, regions=img.regions[perm],
                                               region_mask=img.region_mask[perm]))
        torch.testing.assert_close(enc_ip.features, enc_i.features[perm], rtol=1e-5, atol=1e-6)
        alone = model.encode_text(TextBatch(txt.tokens[:1], txt.token_mask[:1], txt.caption_index[:1],
                                            txt.image_index[:1]))
        torch.testing.assert_close(alone.features[0, :alone.features.shape[1]],
                                   enc_t.features[0, :alone.features.shape[1]], rtol=1e-5, atol=1e-6)
        # the reconstruction changes the fragments of the side(s) the direction reconstructs
        raw_i = model.image_fragments(img)[0]
        changed = not torch.allclose(torch.nn.functional.normalize(raw_i, dim=-1).masked_fill(
            ~img.region_mask[..., None], 0), enc_i.features, atol=1e-4)
        assert changed == (direction in ("image", "both"))
    save_pretrained(model, vocab, cfg, tmp_path / "ckpt")
    loaded, _, _ = from_pretrained(tmp_path / "ckpt")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.similarity(loaded.encode_image(img), loaded.encode_text(txt)),
                                   model.similarity(enc_i, enc_t))


def test_hosa_training_step_sends_gradients_through_h_to_both_encoders():
    torch.manual_seed(1)
    vocab = WordVocab.build(CAPTIONS)
    cfg = tiny_hosa(direction="image")
    model = build_model(cfg, vocab).train()
    img, txt = pairs(vocab, 8, seed=3)
    out = model(img, txt)
    # the image side is reconstructed; scoring only the image side still reaches the text encoder: via H
    out["img"].features.sum().backward()
    grads = [p.grad for p in model.backbone.text_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_hosa_refuses_more_regions_than_its_slots():
    vocab = WordVocab.build(CAPTIONS)
    model = build_model(tiny_hosa(regions=4), vocab)
    img, txt = pairs(vocab, 4, seed=0)
    with pytest.raises(ItmatchError, match="hosa.regions"):
        model.train()(img, txt)


@pytest.mark.parametrize("key,value", [("hosa.ridge", 0), ("hosa.momentum", 1.0), ("hosa.direction", "sideways"),
                                       ("hosa.heads", 3), ("model.pooling", "gpo")])
def test_bad_hosa_values_are_one_clear_error(key, value):
    with pytest.raises(ItmatchError, match=key.split(".")[-1]):
        load_config(PACKAGED_CONFIGS / "hosa_scenes.yaml", [f"{key}={value}"])


def test_packaged_configs_hold_the_paper_settings():
    for name in ("teran", "hosa"):
        for data in ("f30k", "coco"):
            cfg = load_config(PACKAGED_CONFIGS / f"{name}_{data}_precomp.yaml")
            section = getattr(cfg, name)
            assert cfg.model.embed_dim == 1024 and section.layers == 2 and cfg.model.text.freeze
            assert cfg.optim.lr == 1e-5 and cfg.optim.decay_epochs == [20] and cfg.train.epochs == 30
            assert cfg.train.batch_size == (30 if data == "f30k" else 40)
            assert cfg.loss.name == "hinge" and cfg.loss.sum_warmup_epochs == 0
    assert load_config(PACKAGED_CONFIGS / "hosa_scenes.yaml").hosa.regions == 12


@pytest.mark.parametrize("method", ["teran", "hosa"])
def test_method_learns_on_tiny_scenes(method, tiny_scenes, tmp_path):
    from test_training import chance_rsum

    cfg = load_config(PACKAGED_CONFIGS / f"{method}_scenes.yaml", [
        f"data.root={tiny_scenes}", "model.embed_dim=64", "model.text.glove=null", "model.text.word_dim=32",
        "train.batch_size=32", "train.eval_batch_size=64", "train.log_every_steps=1", "data.max_dev_images=40",
        "train.epochs=8", "optim.decay_epochs=[6]", "optim.lr=0.002", f"{method}.ff=64", f"{method}.layers=1"])
    result = Trainer(cfg, tmp_path / "run", echo=False).fit()
    assert result["best_rsum"] > chance_rsum(40, 5) + 100, result["best_rsum"]  # chance ~77; teran ~264, hosa ~210
