"""DIAS regularizer: each term against a slow loop reference, gradients, sparsity, wrapper, training."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from itmatch.config import PACKAGED_CONFIGS, load_config
from itmatch.data.batch import ImageBatch, TextBatch, positive_mask
from itmatch.errors import ItmatchError
from itmatch.objectives.base import TrainProgress
from itmatch.objectives.dias import (
    DiasConfig,
    DIASRegularizer,
    SparseSpatialLoss,
    dimension_alignment_loss,
    dimension_correlation,
)
from itmatch.similarity.dense import dot_similarity

D = 6


def make_out(seed: int = 0, n: int = 7, requires_grad: bool = False) -> tuple[dict, torch.Tensor]:
    """A batch of n aligned pairs with padded fragments; pairs 1 and 4 show the same image."""
    g = torch.Generator().manual_seed(seed)
    img_len = [3, 5, 2, 4, 5, 1, 3][:n]
    txt_len = [4, 2, 6, 3, 1, 5, 6][:n]
    img_frag = torch.randn(n, 5, D, generator=g, dtype=torch.float64)
    txt_frag = torch.randn(n, 6, D, generator=g, dtype=torch.float64)
    img_mask = torch.arange(5)[None, :] < torch.tensor(img_len)[:, None]
    txt_mask = torch.arange(6)[None, :] < torch.tensor(txt_len)[:, None]
    img_frag[~img_mask] = 1e3  # padding holds garbage: it must not leak into any term
    txt_frag[~txt_mask] = -1e3
    image_index = torch.tensor([10, 11, 12, 13, 11, 15, 16][:n])
    img_frag[4], img_mask[4] = img_frag[1], img_mask[1]  # the repeated image has the same regions
    img = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    img[4] = img[1]
    txt = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    out = {"img": img, "txt": txt, "img_frag": img_frag, "img_mask": img_mask,
           "txt_frag": txt_frag, "txt_mask": txt_mask}
    if requires_grad:
        for k in ("img", "txt", "img_frag", "txt_frag"):
            out[k] = out[k].clone().requires_grad_(True)
    return out, positive_mask(image_index, image_index)


# ---- slow references ---------------------------------------------------------------------------

def real_rows(frag, mask, b):
    return [frag[b, r].tolist() for r in range(frag.shape[1]) if mask[b, r]]


def ref_corr(out, positives, samples="pairs", center=False):
    """C of Eq. 4 with explicit sample vectors: one entry per (region, word) of each matched pair."""
    n = out["img"].shape[0]
    cells = [(a, b) for a in range(n) for b in range(n) if positives[a, b]]
    mv, mt = [[] for _ in range(D)], [[] for _ in range(D)]
    for a, b in cells:
        regions = real_rows(out["img_frag"], out["img_mask"], a)
        words = real_rows(out["txt_frag"], out["txt_mask"], b)
        if samples == "pooled":
            regions = [[sum(r[k] for r in regions) / len(regions) for k in range(D)]]
            words = [[sum(w[k] for w in words) / len(words) for k in range(D)]]
        for r in regions:
            for w in words:
                for k in range(D):
                    mv[k].append(r[k])
                    mt[k].append(w[k])

    def cos(u, v):
        if center:
            u = [x - sum(u) / len(u) for x in u]
            v = [y - sum(v) / len(v) for y in v]
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    return [[cos(mv[i], mt[j]) for j in range(D)] for i in range(D)]


def ref_dim(c) -> float:
    """Eq. 6 with |c| in the denominators, averaged over the D dimensions."""
    return -1 / D * sum(c[i][i] / sum(abs(c[i][j]) for j in range(D)) + c[i][i] / sum(abs(c[j][i]) for j in range(D))
                for i in range(D))


def ref_dist(u, v, kind):
    if kind == "cosine":
        return 1 - sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(u, v)))


def ref_mask(gap, valid, mode, beta, temperature, topk):
    n = len(gap)
    p = [[1 / (1 + math.exp(gap[i][j])) for j in range(n)] for i in range(n)]
    keep = [[0.0] * n for _ in range(n)]

    def stats(values):
        mu = sum(values) / len(values)
        return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))

    for i in range(n):
        for j in range(n):
            if not valid[i][j]:
                continue
            if mode in ("none", "l1"):
                keep[i][j] = 1.0
            elif mode == "topk":
                row = sorted((p[i][k] for k in range(n) if valid[i][k]), reverse=True)
                col = sorted((p[k][j] for k in range(n) if valid[k][j]), reverse=True)
                keep[i][j] = float(p[i][j] >= row[min(topk, len(row)) - 1] and p[i][j] >= col[min(topk, len(col)) - 1])
            else:
                mr, sr = stats([p[i][k] for k in range(n) if valid[i][k]])
                mc, sc = stats([p[k][j] for k in range(n) if valid[k][j]])
                if mode == "hard":  # Eq. 14 in p space: p > max(kappa_row, kappa_col)
                    keep[i][j] = float(p[i][j] > max(mr + beta * sr, mc + beta * sc))
                else:  # relaxed AND of the two threshold tests, in units of each std
                    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
                    keep[i][j] = sig(((p[i][j] - mr) / sr - beta) / temperature) * sig(
                        ((p[i][j] - mc) / sc - beta) / temperature)
    return keep


def ref_spatial(out, positives, cfg: DiasConfig) -> dict[str, float]:
    """Eq. 7-16 by loops: the two sparse spatial terms, their kept fractions and extra terms."""
    img, txt = out["img"].tolist(), out["txt"].tolist()
    n = len(img)
    valid = [[not bool(positives[i, j]) for j in range(n)] for i in range(n)]
    x = [[ref_dist(img[i], txt[j], cfg.distance) for j in range(n)] for i in range(n)]
    y = [[ref_dist(img[i], img[j], cfg.distance) for j in range(n)] for i in range(n)]
    z = [[ref_dist(txt[i], txt[j], cfg.distance) for j in range(n)] for i in range(n)]
    n_valid = sum(map(sum, valid))
    res = {}
    for name, diff in (("inter", [[x[i][j] - x[j][i] for j in range(n)] for i in range(n)]),
                       ("intra", [[y[i][j] - z[i][j] for j in range(n)] for i in range(n)])):
        gap = [[abs(v) for v in row] for row in diff]
        m = ref_mask(gap, valid, cfg.sparsity, cfg.beta_init, cfg.mask_temperature, cfg.topk)
        cells = [(i, j) for i in range(n) for j in range(n) if valid[i][j]]
        res[name] = sum(m[i][j] * diff[i][j] ** 2 for i, j in cells)
        res[name + "_kept"] = sum(m[i][j] for i, j in cells) / n_valid
        if cfg.sparsity == "l1":
            res[name + "_l1"] = cfg.l1_weight * sum(gap[i][j] for i, j in cells)
        if cfg.sparsity == "soft":
            price = sum(diff[i][j] ** 2 for i, j in cells) / n_valid
            res[name + "_drop"] = sum((1 - m[i][j]) * price for i, j in cells)
    return res


# ---- terms against references ------------------------------------------------------------------

@pytest.mark.parametrize("samples,center", [("pairs", False), ("pairs", True), ("pooled", False),
                                            ("pooled", True)])
def test_dimension_correlation_matches_explicit_sample_vectors(samples, center):
    out, positives = make_out(seed=8)
    got = dimension_correlation(out["img_frag"], out["img_mask"], out["txt_frag"], out["txt_mask"], positives,
                                samples, center)
    np.testing.assert_allclose(got.numpy(), np.array(ref_corr(out, positives, samples, center)), rtol=1e-9)


@pytest.mark.parametrize("sparsity,distance,beta", [
    ("soft", "cosine", 0.0), ("hard", "cosine", 0.3), ("hard", "euclidean", -0.5), ("none", "cosine", 0.0),
    ("topk", "euclidean", 0.0), ("l1", "cosine", 0.0), ("soft", "euclidean", 0.7),
])
def test_terms_match_loop_reference(sparsity, distance, beta):
    cfg = DiasConfig(w_dim=2.0, w_inter=0.5, w_intra=3.0, distance=distance, sparsity=sparsity, beta_init=beta,
                     mask_temperature=0.3, topk=2, l1_weight=0.3)
    out, positives = make_out(seed=1)
    terms = DIASRegularizer(cfg).double()(out, positives)
    ref = ref_spatial(out, positives, cfg)
    ref["dim"] = ref_dim(ref_corr(out, positives))
    extras = [k for k in ref if k.endswith(("_l1", "_drop"))]
    assert set(terms) == {"dim", "inter", "intra", "inter_kept", "intra_kept", "loss", *extras}
    for key, value in ref.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-6, abs=1e-12), key
    weights = {"dim": 2.0, "inter": 0.5, "intra": 3.0}
    total = sum(weights[k.split("_")[0]] * ref[k] for k in ref if not k.endswith("_kept"))
    assert terms["loss"].item() == pytest.approx(total, rel=1e-6)
    assert ref["inter"] > 0 and ref["intra"] > 0
    if sparsity in ("hard", "topk", "soft"):
        assert 0 < ref["inter_kept"] < 1 and 0 < ref["intra_kept"] < 1  # the mask really drops relations


def test_soft_mask_tends_to_the_binary_mask():
    out, positives = make_out(seed=9)
    hard = DIASRegularizer(DiasConfig(sparsity="hard", beta_init=0.4)).double()(out, positives)
    soft = DIASRegularizer(DiasConfig(sparsity="soft", beta_init=0.4, mask_temperature=1e-4)).double()(out, positives)
    for key in ("inter", "intra", "inter_kept", "intra_kept"):
        assert soft[key].item() == pytest.approx(hard[key].item(), rel=1e-6), key


def test_dimension_alignment_rewards_a_dominant_positive_diagonal():
    eye = torch.eye(D, dtype=torch.float64)
    assert dimension_alignment_loss(eye).item() == pytest.approx(-2)  # the minimum of Eq. 6 (per dimension)
    flipped = dimension_alignment_loss(-eye).item()
    assert flipped == pytest.approx(2)  # a negative diagonal is the worst case, not a reward
    noisy = eye + 0.3 * torch.ones(D, D, dtype=torch.float64)
    signed = eye - 0.3 * torch.ones(D, D, dtype=torch.float64)  # row sums near zero: no blow-up
    assert -2 < dimension_alignment_loss(noisy).item() < 0
    assert math.isfinite(dimension_alignment_loss(signed).item())
    assert dimension_alignment_loss(signed).item() > dimension_alignment_loss(eye).item()


def test_padding_and_matched_relations_do_not_count():
    cfg = DiasConfig(sparsity="none")
    out, positives = make_out(seed=2)
    base = DIASRegularizer(cfg).double()(out, positives)
    changed = {k: v.clone() for k, v in out.items()}
    changed["img_frag"][~out["img_mask"]] = 7.0  # other padding garbage
    changed["txt_frag"][~out["txt_mask"]] = 0.0
    again = DIASRegularizer(cfg).double()(changed, positives)
    for k in ("dim", "inter", "intra"):
        assert again[k].item() == pytest.approx(base[k].item(), rel=1e-12)
    # pairs 1 and 4 share an image: they are matched both ways, so 7 * 6 - 2 relations are unmatched
    assert int((~positives).sum()) == 7 * 6 - 2


def test_dimension_correlation_follows_the_positive_cells_not_row_order():
    out, _ = make_out(seed=3)
    image_index = torch.tensor([10, 11, 12, 13, 11, 15, 16])
    args = (out["img_frag"], out["img_mask"])
    aligned = dimension_correlation(*args, out["txt_frag"], out["txt_mask"], positive_mask(image_index, image_index))
    perm = torch.tensor([3, 0, 4, 1, 6, 2, 5])  # the same captions in another order
    shuffled = dimension_correlation(*args, out["txt_frag"][perm], out["txt_mask"][perm],
                                     positive_mask(image_index, image_index[perm]))
    np.testing.assert_allclose(shuffled.numpy(), aligned.numpy(), rtol=1e-10)


# ---- gradients and sparsity --------------------------------------------------------------------

def test_gradients_reach_fragments_globals_and_beta():
    out, positives = make_out(seed=4, requires_grad=True)
    reg = DIASRegularizer(DiasConfig(sparsity="soft", beta_init=0.2, mask_temperature=0.3)).double()
    reg(out, positives)["loss"].backward()
    for key in ("img", "txt", "img_frag", "txt_frag"):
        grad = out[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    # padded fragments get no gradient, real ones do
    assert out["img_frag"].grad[~out["img_mask"]].abs().max() == 0
    assert out["txt_frag"].grad[~out["txt_mask"]].abs().max() == 0
    for sparse in (reg.inter, reg.intra):
        assert sparse.beta.grad is not None and sparse.beta.grad.abs().min() > 0


def test_beta_is_learnable_only_with_the_soft_mask():
    assert DIASRegularizer(DiasConfig(sparsity="soft")).inter.beta.requires_grad
    assert not any(p.requires_grad for p in DIASRegularizer(DiasConfig(sparsity="hard")).parameters())


def test_beta_learns_a_finite_threshold_from_either_side():
    """With the drop price, beta neither runs to +inf (drop everything) nor to -inf: it settles."""
    g = torch.Generator().manual_seed(0)
    gap = torch.rand(40, 40, generator=g, dtype=torch.float64) ** 2
    gap = (gap + gap.T) / 2
    valid = ~torch.eye(40, dtype=torch.bool)
    finals = []
    for start in (-1.5, 1.5):
        sparse = SparseSpatialLoss("soft", beta_init=start, temperature=0.3).double()
        opt = torch.optim.Adam(sparse.parameters(), lr=0.05)
        for _ in range(300):
            loss, extras = sparse(gap, valid)
            opt.zero_grad()
            (loss + extras["drop"]).backward()
            opt.step()
        finals.append(sparse.beta.detach().clone())
    assert torch.allclose(finals[0], finals[1], atol=0.1), finals
    assert finals[0].abs().max() < 1.5
    # at the learnt threshold, the relations near it cost about the mean squared discrepancy
    p = torch.sigmoid(-gap)
    z = (p - p[valid].mean()) / p[valid].std(unbiased=False)
    near = valid & ((z - finals[0].mean()).abs() < 0.15)
    assert (gap[near] ** 2).mean().item() == pytest.approx((gap[valid] ** 2).mean().item(), rel=0.35)


@pytest.mark.parametrize("sparsity", ["hard", "soft"])
def test_larger_beta_keeps_fewer_relations(sparsity):
    out, positives = make_out(seed=5)
    betas = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    for key in ("inter_kept", "intra_kept"):
        kept = [DIASRegularizer(DiasConfig(sparsity=sparsity, beta_init=b)).double()(out, positives)[key].item()
                for b in betas]
        assert all(a >= b for a, b in zip(kept, kept[1:])), (key, kept)
        assert kept[0] > kept[-1] + 0.3, (key, kept)


@pytest.mark.parametrize("key, value", [("sparsity", "dense"), ("distance", "manhattan"), ("w_inter", -1.0),
                                        ("mask_temperature", 0.0), ("dim_samples", "words"), ("topk", 0),
                                        ("dim_reduction", "max"), ("terms", "[dim, spatial]"), ("terms", "[]"),
                                        ("terms", "[dim, dim]"), ("spatial_warmup_steps", -1)])
def test_bad_options_are_one_clear_error_when_the_config_loads(key, value):
    with pytest.raises(ItmatchError, match=f"dias.{key}"):
        load_config(None, ["loss.regularizers=[dias]", f"dias.{key}={value}"])


def test_a_regularizer_without_fragments_is_a_clear_error():
    out, positives = make_out()
    with pytest.raises(ItmatchError, match="loss.regularizers"):
        DIASRegularizer(DiasConfig())({"img": out["img"], "txt": out["txt"]}, positives)
    # without the fragment term, global embeddings are enough
    terms = DIASRegularizer(DiasConfig(w_dim=0.0)).double()({"img": out["img"], "txt": out["txt"]}, positives)
    assert "dim" not in terms and torch.isfinite(terms["loss"])


# ---- wrapper and method ------------------------------------------------------------------------

# Objectives score batches with their model's similarity; these tests feed hand-made embeddings.
DOT_MODEL = types.SimpleNamespace(similarity=dot_similarity)

def _batches(out) -> tuple[ImageBatch, TextBatch]:
    idx = torch.tensor([10, 11, 12, 13, 11, 15, 16])
    return ImageBatch(image_index=idx), TextBatch(tokens=torch.zeros(7, 1, dtype=torch.long),
                                                  token_mask=torch.ones(7, 1, dtype=torch.bool),
                                                  caption_index=torch.arange(7), image_index=idx)


def test_with_regularizers_adds_terms_to_the_base_loss():
    from itmatch.methods.registry import build_objective

    cfg = load_config(None, ["loss.name=hinge", "loss.regularizers=[dias]", "dias.sparsity=hard"])
    objective = build_objective(cfg, DOT_MODEL).double()
    plain = build_objective(load_config(None, ["loss.name=hinge"]), DOT_MODEL)
    out, positives = make_out(seed=6, requires_grad=True)
    img_b, txt_b = _batches(out)
    progress = TrainProgress(epoch=1)
    terms = objective(out, img_b, txt_b, progress)
    base = plain(out, img_b, txt_b, progress)["loss"]
    reg = DIASRegularizer(cfg.dias).double()(out, positives)
    assert set(terms) == {"loss", "hinge", "dias", "dias_dim", "dias_inter", "dias_intra", "dias_inter_kept",
                          "dias_intra_kept"}
    expected = base + 100.0 * reg["dim"] + 0.05 * reg["inter"] + 0.1 * reg["intra"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-9)
    # every summand keeps its gradient (training.grad_norms reads it); the logged mask share does not
    assert terms["loss"].requires_grad and terms["dias_inter"].requires_grad
    assert not terms["dias_inter_kept"].requires_grad
    terms["loss"].backward()
    assert out["img_frag"].grad.abs().sum() > 0


def test_unknown_regularizer_names_the_config_key():
    # both are refused when the config is loaded, before any model or objective is built
    with pytest.raises(ItmatchError, match="loss.regularizers.*'dais'"):
        load_config(None, ["loss.regularizers=[dais]"])
    with pytest.raises(ItmatchError, match="loss.regularizers"):
        load_config(None, ["model.method=dias", "loss.regularizers=[dias]"])


def test_method_dias_is_vse_plus_the_regularizer():
    from itmatch.methods.registry import available_methods, build_objective

    assert "dias" in available_methods()
    cfg = load_config(PACKAGED_CONFIGS / "dias_f30k_precomp_bigru.yaml")
    assert cfg.loss.name == "triplet" and cfg.sampler.kind == "neighbour" and cfg.optim.decay_factor == 0.9
    assert cfg.optim.decay_epochs == list(range(1, 30)) and cfg.train.epochs == 30
    objective = build_objective(cfg, DOT_MODEL)
    assert {n for n, _ in objective.named_parameters()} == {"regularizers.dias.inter.beta",
                                                            "regularizers.dias.intra.beta"}
    out, _ = make_out(seed=7)
    img_b, txt_b = _batches(out)
    terms = objective.double()(out, img_b, txt_b, TrainProgress())
    assert {"triplet", "dias", "dias_dim", "dias_inter", "dias_intra", "dias_inter_drop",
            "dias_intra_kept"} <= set(terms)


# ---- training --------------------------------------------------------------------------------

def test_vse_with_dias_trains_end_to_end_and_keeps_the_model_clean(tiny_scenes, tmp_path):
    """The trainer runs vse + [dias]: terms logged, L_dim falls, beta learns, checkpoint has no beta.

    (How much DIAS helps is for full runs: vse vs vse_dias_scenes, see docs/methods/dias.md.)
    """
    from safetensors.torch import load_file

    from itmatch import checkpoint as ckpt
    from itmatch.training.loop import Trainer
    from itmatch.training.run_log import read_metrics

    base = [f"data.root={tiny_scenes}", "model.embed_dim=64", "model.text.glove=null", "model.text.word_dim=32",
            "train.batch_size=32", "train.eval_batch_size=64", "train.log_every_steps=1",
            "data.max_dev_images=40", "train.epochs=1", "train.max_steps=10", "optim.lr=0.002",
            "train.grad_norm_every_steps=5", "dias.spatial_warmup_steps=0"]
    cfg = load_config(PACKAGED_CONFIGS / "vse_dias_scenes.yaml", base)
    assert cfg.loss.regularizers == ["dias"] and cfg.model.method == "vse"
    trainer = Trainer(cfg, tmp_path / "run", echo=False)
    result = trainer.fit()
    assert result["steps"] == 10 and np.isfinite(result["best_rsum"])
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(train) == 10
    for key in ("triplet", "dias", "dias_dim", "dias_inter", "dias_intra", "dias_inter_kept", "dias_inter_drop"):
        assert all(np.isfinite(r[key]) for r in train), key
    for r in train:  # the logged loss is the base loss plus the regularizer's weighted total
        assert r["loss"] == pytest.approx(r["triplet"] + r["dias"], rel=1e-4, abs=1e-4)
    # per-term gradient norms (training.grad_norms) every 5 steps, with the share of each term vs the first
    for r in train:
        assert ("gradnorm_dias_dim" in r) is (r["step"] % 5 == 0), r["step"]
        if r["step"] % 5 == 0:
            assert min(r["gradnorm_triplet"], r["gradnorm_dias"], r["gradnorm_dias_intra"]) > 0
            assert r["gradshare_dias"] == pytest.approx(r["gradnorm_dias"] / r["gradnorm_triplet"])
    # dimension alignment improves: the diagonal's share of C grows while training
    assert np.mean([r["dias_dim"] for r in train[-3:]]) < np.mean([r["dias_dim"] for r in train[:3]])
    dias = trainer.objective.regularizers["dias"]
    assert dias.inter.beta.detach().abs().min() > 0 and dias.intra.beta.detach().abs().min() > 0  # beta moved
    weights = load_file(str(tmp_path / "run" / "best" / ckpt.WEIGHTS))
    assert weights and not any("beta" in k or "dias" in k for k in weights)


@pytest.mark.parametrize("samples,center", [("pooled", True), ("pairs", True)])
def test_config_chooses_the_dimension_samples(samples, center):
    out, positives = make_out(seed=6)
    cfg = DiasConfig(dim_samples=samples, dim_center=center)
    got = DIASRegularizer(cfg).double()(out, positives)["dim"].item()
    assert got == pytest.approx(ref_dim(ref_corr(out, positives, samples, center)), rel=1e-9)
    assert got != pytest.approx(ref_dim(ref_corr(out, positives)), rel=1e-6)  # differs from the default


# ---- scale, subsets, ramp, calibration ----------------------------------------------------------

def test_dim_reduction_sum_is_d_times_the_mean():
    out, positives = make_out()
    corr = dimension_correlation(out["img_frag"], out["img_mask"], out["txt_frag"], out["txt_mask"], positives)
    mean, total = dimension_alignment_loss(corr, "mean"), dimension_alignment_loss(corr, "sum")
    assert float(total) == pytest.approx(D * float(mean), rel=1e-12)
    assert float(mean) == pytest.approx(ref_dim(corr.tolist()), rel=1e-9)


@pytest.mark.parametrize("terms", [["dim"], ["inter"], ["intra"], ["dim", "intra"], ["inter", "intra"]])
def test_terms_trains_exactly_the_listed_subset(terms):
    out, positives = make_out()
    cfg = DiasConfig(terms=terms, sparsity="hard")
    got = DIASRegularizer(cfg).double()(out, positives)
    assert {t for t in ("dim", "inter", "intra") if t in got} == set(terms)
    full = DIASRegularizer(DiasConfig(sparsity="hard")).double()(out, positives)  # every term, for the values
    weights = {"dim": cfg.w_dim, "inter": cfg.w_inter, "intra": cfg.w_intra}
    expected = sum(weights[t] * float(full[t]) for t in terms)
    assert float(got["loss"]) == pytest.approx(expected, rel=1e-9)
    if "dim" not in terms:  # no fragment term, no fragments needed
        plain = DIASRegularizer(cfg).double()({"img": out["img"], "txt": out["txt"]}, positives)
        assert float(plain["loss"]) == pytest.approx(expected, rel=1e-9)


def test_spatial_terms_ramp_in_linearly_and_dim_does_not():
    out, positives = make_out()
    reg = DIASRegularizer(DiasConfig(sparsity="hard", spatial_warmup_steps=10)).double()
    cfg = DiasConfig()
    full = reg(out, positives)  # no progress: no ramp
    for step, factor in ((0, 0.0), (3, 0.3), (10, 1.0), (25, 1.0)):
        got = reg(out, positives, progress=TrainProgress(step=step))
        expected = cfg.w_dim * float(full["dim"]) + factor * (cfg.w_inter * float(full["inter"])
                                                              + cfg.w_intra * float(full["intra"]))
        assert float(got["loss"]) == pytest.approx(expected, rel=1e-9), step
        assert float(got["intra"]) == pytest.approx(float(full["intra"]), rel=1e-12)  # logged unweighted
    # the ramp reaches the regularizer through the wrapper's progress
    from itmatch.methods.registry import build_objective

    wrapped = build_objective(load_config(None, ["loss.regularizers=[dias]", "dias.sparsity=hard",
                                                 "dias.spatial_warmup_steps=10", "dias.terms=[intra]"]), DOT_MODEL)
    img_b, txt_b = _batches(out)
    early = wrapped.double()(out, img_b, txt_b, TrainProgress(step=0))
    late = wrapped(out, img_b, txt_b, TrainProgress(step=10))
    assert float(early["dias"]) == 0.0 and float(late["dias"]) == pytest.approx(0.1 * float(full["intra"]))


def test_calibrated_dim_weight_gives_a_gradient_share_inside_the_documented_band(tiny_scenes):
    """docs/methods/dias.md "Calibration": w_dim * ||grad L_dim|| / ||grad triplet|| at initialisation lies in
    [2%, 30%] with the scenes default (mean, w_dim 100); the old default (mean, w_dim 10) is below the
    band (inert) and the paper's (sum, w_dim 10) above it (drowns the ranking loss)."""
    from itmatch.data.batch import pair_masks
    from itmatch.data.datasets import PairDataset
    from itmatch.data.setup import load_configured_split, resolve_data_root
    from itmatch.data.text import build_tokenizer
    from itmatch.methods.registry import build_model
    from itmatch.objectives.vse import VSEObjective
    from itmatch.training.grad_norms import term_grad_norms

    cfg = load_config(PACKAGED_CONFIGS / "vse_dias_scenes.yaml", [f"data.root={tiny_scenes}"])
    assert (cfg.dias.w_dim, cfg.dias.dim_reduction) == (DiasConfig().w_dim, DiasConfig().dim_reduction)
    split = load_configured_split(cfg.data, "train", resolve_data_root(cfg.data))
    tokenizer = build_tokenizer(cfg.model.text, split.captions)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).train()
    ds = PairDataset(split, tokenizer, max_length=cfg.model.text.max_length, train=True, seed=0)
    img, txt = ds.collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 128))][:128])  # fixed batch
    out = model(img, txt)
    positives, _ = pair_masks(img, txt)
    corr = dimension_correlation(out["img_frag"], out["img_mask"], out["txt_frag"], out["txt_mask"], positives)
    terms = {"triplet": VSEObjective(cfg, model.similarity)(out, img, txt, TrainProgress(epoch=1))["loss"],
             "dim_mean": dimension_alignment_loss(corr, "mean"), "dim_sum": dimension_alignment_loss(corr, "sum")}
    norms = term_grad_norms(terms, list(model.parameters()))
    share = cfg.dias.w_dim * norms["dim_mean"] / norms["triplet"]
    assert 0.02 <= share <= 0.30
    assert 10.0 * norms["dim_mean"] / norms["triplet"] < 0.02  # the old default: inert
    assert 10.0 * norms["dim_sum"] / norms["triplet"] > 0.30  # the paper's scale at this d: dominates
