"""Maximal Matching: each loss term against a hand computation on tiny sets, the config keys, the
inference option, and learning on tiny scenes."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.config import PACKAGED_CONFIGS, load_config
from itmatch.errors import ItmatchError
from itmatch.objectives import sets as L


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


# two items of K=2 elements in 2-D, their global vectors
SETS = torch.stack([unit([1.0, 0.0], [0.0, 1.0]), unit([1.0, 1.0], [1.0, 0.0])])
GLOBAL = unit([1.0, 0.0], [0.0, 1.0])
S2 = 1 / math.sqrt(2)


@pytest.mark.parametrize("form", ["exp", "hinge"])
def test_global_discriminative_by_hand(form):
    # cosines element-global: item 0: 1, 0; item 1: S2, 0
    cos = [1.0, 0.0, S2, 0.0]
    pen = (lambda c: math.exp(3.0 * (c - 0.2))) if form == "exp" else (lambda c: max(0.0, c - 0.2))
    want = sum(pen(c) for c in cos) / 4
    assert float(L.global_discriminative(SETS, GLOBAL, form, 0.2, 3.0)) == pytest.approx(want)


@pytest.mark.parametrize("form", ["exp", "hinge"])
def test_intra_set_divergence_by_hand(form):
    # within-set cosines: item 0: 0 (twice, ordered pairs); item 1: S2 (twice)
    pen = (lambda c: math.exp(2.0 * (c - 0.5))) if form == "exp" else (lambda c: max(0.0, c - 0.5))
    want = (2 * pen(0.0) + 2 * pen(S2)) / 4
    assert float(L.intra_set_divergence(SETS, form, 0.5, 2.0)) == pytest.approx(want)


def test_mmd_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # distance 5
    y = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    g = 0.5
    kxx = (1 + math.exp(-g * 5) + math.exp(-g * 5) + 1) / 4
    kxy = (1 + math.exp(-g * 5)) / 2
    kyy = 1.0
    assert float(L.mmd(x, y, g)) == pytest.approx(kxx - 2 * kxy + kyy, abs=1e-5)
    assert float(L.mmd(x, x, g)) == pytest.approx(0.0, abs=1e-5)


def test_pvse_diversity_and_uniformity_by_hand():
    # item 0 orthogonal: ||G - I|| = 0; item 1: off-diagonals S2 -> sqrt(2 * 0.5) = 1, / K^2 = 4
    assert float(L.pvse_diversity(SETS)) == pytest.approx((0.0 + 1.0 / 4) / 2, abs=1e-5)
    # ||a - b||^2 = 2 - 2 cos: item 0: 2, item 1: 2 - 2 S2 (each pair twice)
    want = math.log((2 * math.exp(-2 * 2.0) + 2 * math.exp(-2 * (2 - 2 * S2))) / 4)
    assert float(L.within_set_uniformity(SETS)) == pytest.approx(want)


def test_objective_total_is_the_weighted_sum_and_logs_every_term():
    from itmatch.config import config_from_dict
    from itmatch.data.batch import ImageBatch, TextBatch
    from itmatch.objectives.base import TrainProgress

    cfg = config_from_dict({"model": {"method": "maxmatch", "embed_dim": 8}, "loss": {"name": "hinge"},
                            "maxmatch": {"gd_weight": 0.5, "isd_weight": 2.0, "mmd_weight": 0.1, "div_weight": 0.3,
                                         "unif_weight": 0.2, "con_weight": 0.7}})
    g = torch.Generator().manual_seed(0)
    sets = {k: torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
            for k in ("img", "txt", "img_res", "txt_res")}
    out = {**sets, "img_global": torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1),
           "txt_global": torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)}
    ids = torch.arange(4)
    img_b = ImageBatch(image_index=ids, regions=torch.zeros(4, 1, 1))
    txt_b = TextBatch(tokens=torch.zeros(4, 1, dtype=torch.long), token_mask=torch.ones(4, 1, dtype=torch.bool),
                      caption_index=ids, image_index=ids)
    from itmatch.similarity.sets import SetSimilarity

    obj = L.SetObjective(cfg, SetSimilarity("maxpair"))
    terms = obj(out, img_b, txt_b, TrainProgress(epoch=5))
    weights = {"gd": 0.5, "isd": 2.0, "mmd": 0.1, "div": 0.3, "unif": 0.2, "con": 0.7}
    assert float(terms["loss"]) == pytest.approx(float(terms["hinge"]) + sum(w * float(terms[t])
                                                                               for t, w in weights.items()), rel=1e-5)
    for key in ("within_cos_img", "within_cos_txt", "circ_var_img", "circ_var_txt"):
        assert key in terms
    # a term of weight 0 is not computed (nor logged)
    cfg.maxmatch.con_weight = 0.0
    assert "con" not in obj(out, img_b, txt_b, TrainProgress(epoch=5))


def test_config_checks_and_inference_option():
    with pytest.raises(ItmatchError, match="maxmatch.heads"):
        load_config("maxmatch_scenes", ["maxmatch.heads=3"])
    with pytest.raises(ItmatchError, match="maxmatch.similarity"):
        load_config("maxmatch_scenes", ["maxmatch.similarity=hungarian"])
    from itmatch.methods.maxmatch import set_similarities

    cfg = load_config("maxmatch_scenes", ["maxmatch.inference=topk", "maxmatch.topk=2"])
    train, infer = set_similarities(cfg.maxmatch)
    assert (train.kind, infer.kind, infer.topk) == ("maxpair", "topk", 2)
    assert load_config("dive_scenes").maxmatch.similarity == "chamfer"


def test_maxmatch_learns_on_tiny_scenes(tiny_scenes, tmp_path):
    from itmatch.data.setup import load_configured_split
    from itmatch.evaluation.encode import split_scores
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.training.loop import Trainer

    cfg = load_config(PACKAGED_CONFIGS / "maxmatch_scenes.yaml", [
        f"data.root={tiny_scenes}", "model.embed_dim=64", "model.text.glove=null", "model.text.word_dim=32",
        "train.batch_size=32", "train.eval_batch_size=64", "train.log_every_steps=5", "data.max_dev_images=40",
        "train.epochs=6", "optim.decay_epochs=[5]", "optim.lr=0.002", "maxmatch.depth=2"])
    trainer = Trainer(cfg, tmp_path / "run", echo=False)
    trainer.prepare()
    split = load_configured_split(cfg.data, "dev")
    untrained = evaluate_sims(split_scores(trainer.model, split, trainer.tokenizer, cfg.model, 64),
                              "scenes", split)["metrics"]["rsum"]
    result = Trainer(cfg, tmp_path / "run", echo=False).fit()
    assert result["best_rsum"] > untrained + 100, (result["best_rsum"], untrained)
    from itmatch.training.run_log import read_metrics

    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert {"triplet", "gd", "isd", "mmd", "within_cos_img", "circ_var_txt"} <= set(train[-1])
