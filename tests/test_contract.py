"""The model contract, for every registered method and for a toy `set` and a toy `score` model.

Every method must: build from a tiny config; train (a forward pass gives a "loss" term, backward
reaches the model); round-trip through a checkpoint with identical encodings; be scored by the
engine's tiled path exactly as a per-pair computation of its own `similarity`; and evaluate.
A new method registered in `itmatch.methods` is picked up here without editing this file (give it
overrides in METHOD_OVERRIDES only if the tiny base config does not suit it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itmatch.checkpoint import from_pretrained, save_pretrained
from itmatch.config import config_from_dict
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.data.text import WordVocab
from itmatch.evaluation.scores import score_model
from itmatch.methods.registry import available_methods, build_model, build_objective, register_method, unregister_method
from itmatch.models.contract import MODEL_KINDS, Fragments, MatchingModel, cat_encodings, check_model
from itmatch.objectives.base import TrainProgress
from toy_methods import TOY_METHODS

FEATURES = 12
CAPTIONS = ["a red circle", "a blue square left of a large star", "two stars", "a red star above a cross",
            "one blue circle", "a small green hexagon", "three shapes", "a white cross"]
METHOD_OVERRIDES = {
    "teran": {"teran": {"heads": 4, "ff": 32}},
    "hosa": {"hosa": {"heads": 4, "ff": 32, "regions": 12, "words": 64}},
    # fragment and instance-level attention widths that divide the tiny embedding; instance level on
    "hrem": {"hrem": {"fragment_heads": 4, "heads": 4, "fragment_ff": 32, "topk": 3, "instance_warmup_steps": 0}},
    # every training-only part on from the first step (queue of one batch)
    "aahr": {"aahr": {"fragment_heads": 4, "heads": 4, "fragment_ff": 32, "topk": 3, "prototypes": 4,
                      "proto_start_steps": 0, "graph_warmup_steps": 0, "queue_size": 6}},
}
METHODS = sorted(set(available_methods()) | set(TOY_METHODS))


@pytest.fixture(scope="module", autouse=True)
def _toys_registered():
    for name, builder in TOY_METHODS.items():
        register_method(name)(builder)
    yield
    for name in TOY_METHODS:
        unregister_method(name)


def tiny_cfg(method: str, feature_dim: int = FEATURES, **extra):
    data = {"model": {"method": method, "embed_dim": 16, "image": {"feature_dim": feature_dim},
                      "text": {"word_dim": 8}}}
    for section, values in {**METHOD_OVERRIDES.get(method, {}), **extra}.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def batches(vocab, n_img: int, n_txt: int, seed: int = 0):
    """Images with 1-5 real regions of 5, captions of different lengths (both sides padded)."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_img, 5, FEATURES, generator=g)
    mask = torch.arange(5)[None] < torch.randint(1, 6, (n_img,), generator=g)[:, None]
    img_index = torch.arange(n_img)
    cap_image = torch.arange(n_txt) % n_img
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_txt)]
    tokens, tmask = vocab.encode_batch(texts, 16)
    return (ImageBatch(image_index=img_index, regions=regions, region_mask=mask),
            TextBatch(tokens=tokens, token_mask=tmask, caption_index=torch.arange(n_txt), image_index=cap_image,
                      texts=texts))


def pair_batches(img: ImageBatch, txt: TextBatch) -> tuple[ImageBatch, ImageBatch]:
    """Training rows: caption k with its own image."""
    rows = txt.image_index
    return ImageBatch(image_index=rows, regions=img.regions[rows], region_mask=img.region_mask[rows]), txt


def same(a, b) -> bool:
    if isinstance(a, Fragments):
        return torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def vocab():
    return WordVocab.build(CAPTIONS)


@pytest.mark.parametrize("method", METHODS)
def test_builds_and_declares_the_contract(method, vocab):
    model = build_model(tiny_cfg(method), vocab)
    check_model(model)
    assert isinstance(model, MatchingModel)
    assert model.kind in MODEL_KINDS


@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_gives_a_loss_that_reaches_the_model(method, vocab):
    torch.manual_seed(0)
    cfg = tiny_cfg(method)
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    img, txt = pair_batches(*batches(vocab, 6, 6))
    terms = objective(model(img, txt), img, txt, TrainProgress(epoch=1, step=1))
    assert "loss" in terms and terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip_gives_identical_encodings(method, vocab, tmp_path):
    torch.manual_seed(1)
    cfg = tiny_cfg(method)
    model = build_model(cfg, vocab).eval()
    save_pretrained(model, vocab, cfg, tmp_path / "ckpt")
    loaded, tokenizer, cfg2 = from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and cfg2.to_dict() == cfg.to_dict()
    img, txt = batches(vocab, 4, 5)
    with torch.inference_mode():
        assert same(model.encode_image(img), loaded.encode_image(img))
        assert same(model.encode_text(txt), loaded.encode_text(txt))


@pytest.mark.parametrize("method", METHODS)
def test_tiled_scores_equal_a_per_pair_computation(method, vocab):
    """The engine's source, tiled in the model's blocks (and in small blocks), equals similarity()
    called on one pair at a time; its single-pair reads equal the same entries."""
    torch.manual_seed(2)
    model = build_model(tiny_cfg(method), vocab).eval()
    img_b, txt_b = batches(vocab, 9, 14, seed=3)
    with torch.inference_mode():
        # encode in two chunks, as evaluation does, so fragments of different lengths are padded
        img = cat_encodings([model.encode_image(img_b), model.encode_image(img_b)])[:9]
        txt = cat_encodings([model.encode_text(TextBatch(txt_b.tokens[:5, :6], txt_b.token_mask[:5, :6],
                                                         txt_b.caption_index[:5], txt_b.image_index[:5],
                                                         texts=txt_b.texts[:5])),
                             model.encode_text(TextBatch(txt_b.tokens[5:], txt_b.token_mask[5:],
                                                         txt_b.caption_index[5:], txt_b.image_index[5:],
                                                         texts=txt_b.texts[5:]))])
        slow = torch.tensor([[float(model.similarity(img[i:i + 1], txt[j:j + 1])) for j in range(14)]
                             for i in range(9)])
    source = score_model(model, img, txt)
    torch.testing.assert_close(torch.from_numpy(source.dense()), slow, rtol=1e-5, atol=1e-5)
    rows, cols = np.array([0, 8, 3, 3, 5, 0]), np.array([13, 0, 7, 2, 5, 0])
    torch.testing.assert_close(source.pairs(rows, cols), slow[rows, cols], rtol=1e-5, atol=1e-5)
    # another tiling of the same model gives the same matrix
    tiny_blocks = type("Tiled", (), {"similarity": staticmethod(model.similarity), "score_block": (2, 3)})()
    torch.testing.assert_close(torch.from_numpy(score_model(tiny_blocks, img, txt).dense()), slow,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_runs_on_scenes(method, tiny_scenes):
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.encode import split_scores
    from itmatch.evaluation.protocols import evaluate_sims

    split = load_split(tiny_scenes, "test")
    vocab = WordVocab.build(split.captions)
    cfg = tiny_cfg(method, feature_dim=int(split.features.shape[-1]))
    model = build_model(cfg, vocab)
    scores = split_scores(model, split, vocab, cfg.model, batch_size=16)
    assert scores.shape == (split.n_images, split.n_captions)
    metrics = evaluate_sims(scores, "scenes", split)["metrics"]
    dense = evaluate_sims(scores.dense(), "scenes", split)["metrics"]
    assert 0.0 <= metrics["rsum"] <= 600.0
    assert metrics == dense  # the block path and the materialised matrix agree on every metric
