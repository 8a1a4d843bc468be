"""Objective of set models (Maximal Matching, DivE): a ranking loss on the set similarity plus terms
that keep the K elements of a set apart and the two modalities' element distributions together.

Terms (each weight a key of the `maxmatch:` section; E-numbers of docs/methods/maxmatch.md):

    ranking   loss.name on the batch's set similarity (hinge = hardest-negative triplet, E5)
    gd        Global Discriminative (E6): elements pushed away from their item's global vector
    isd       Intra-Set Divergence (E7): elements of one set pushed away from each other
    mmd       MMD between all image and all text elements, kernel exp(-gamma ||x - y||) (E8)
    div       PVSE diversity ||R R^T - I||_F / K^2 on the slot residuals (E9)
    unif      DivE's uniformity log E exp(-2 ||x_a - x_b||^2) over distinct elements of a set
    con       InfoNCE on the set similarity

gd and isd have two readings: `exp` = mean exp(scale * (cos - margin)), `hinge` = mean [cos - margin]+.
The collapse diagnostic (within-set cosine, circular variance) is returned detached, for the log.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.config import Config
from itmatch.data.batch import ImageBatch, TextBatch, pair_masks
from itmatch.objectives.base import RankingTerm
from itmatch.objectives.contrastive import InfoNCE
from itmatch.similarity.sets import circular_variance, within_set_cosine

TERMS = ("gd", "isd", "mmd", "div", "unif", "con")


def penalty(cos: torch.Tensor, form: str, margin: float, scale: float) -> torch.Tensor:
    """Elementwise penalty of a cosine above `margin`: exp(scale (cos - margin)) or [cos - margin]+."""
    if form == "exp":
        return torch.exp(scale * (cos - margin))
    if form == "hinge":
        return (cos - margin).clamp_min(0)
    raise ValueError(f"unknown penalty form {form!r} (use exp, hinge)")


def _off_diagonal(k: int, device) -> torch.Tensor:
    return ~torch.eye(k, dtype=torch.bool, device=device)


def global_discriminative(sets: torch.Tensor, global_vec: torch.Tensor, form: str, margin: float,
                          scale: float) -> torch.Tensor:
    """E6: mean over items and elements of penalty(cos(v_a, phi)); sets (B, K, D) and phi (B, D) unit."""
    cos = (sets * global_vec[:, None, :]).sum(-1)
    return penalty(cos, form, margin, scale).mean()


def intra_set_divergence(sets: torch.Tensor, form: str, margin: float, scale: float) -> torch.Tensor:
    """E7: mean over items and ordered pairs a != b of penalty(cos(v_a, v_b))."""
    k = sets.shape[1]
    if k < 2:
        return sets.sum() * 0
    gram = sets @ sets.transpose(1, 2)
    return penalty(gram[:, _off_diagonal(k, sets.device)], form, margin, scale).mean()


def mmd(x: torch.Tensor, y: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """E8 (DivE's form, unsquared distance): mean k(x,x') - 2 mean k(x,y) + mean k(y,y'), over all
    pairs including x = x'; k(a, b) = exp(-gamma ||a - b||)."""
    def kernel(a, b):
        sq = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(1e-12)
        return torch.exp(-gamma * sq.sqrt())

    return kernel(x, x).mean() - 2 * kernel(x, y).mean() + kernel(y, y).mean()


def pvse_diversity(residuals: torch.Tensor) -> torch.Tensor:
    """E9: ||R R^T - I||_F / K^2 per item, averaged; residuals (B, K, D) unit rows."""
    k = residuals.shape[1]
    gram = residuals @ residuals.transpose(1, 2)
    eye = torch.eye(k, device=gram.device, dtype=gram.dtype)
    return ((gram - eye).pow(2).sum((1, 2)).clamp_min(1e-12).sqrt() / k**2).mean()


def within_set_uniformity(sets: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log of the mean over items and pairs a != b of exp(-t ||v_a - v_b||^2) (lower = more spread)."""
    k = sets.shape[1]
    if k < 2:
        return sets.sum() * 0
    gram = sets @ sets.transpose(1, 2)
    sq = (2 - 2 * gram[:, _off_diagonal(k, sets.device)]).clamp_min(0)
    return torch.log(torch.exp(-t * sq).mean())


class SetObjective(nn.Module):
    """`forward(out, img_batch, txt_batch, progress)` -> {"loss", ranking name, gd, isd, ..., diagnostics}.

    `out` holds the model's "img"/"txt" sets (B, K, D), "img_res"/"txt_res" slot residuals and
    "img_global"/"txt_global" unit global vectors. Terms of weight 0 are not computed."""

    def __init__(self, cfg: Config, similarity):
        super().__init__()
        self.m = cfg.maxmatch
        self.ranking = RankingTerm(cfg.loss)
        self.similarity = similarity
        self.con = InfoNCE(self.m.con_temperature)

    def weights(self) -> dict[str, float]:
        return {t: float(getattr(self.m, f"{t}_weight")) for t in TERMS}

    def term_values(self, out: dict, sims: torch.Tensor, positives: torch.Tensor,
                    negatives: torch.Tensor, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The unweighted auxiliary terms (those of nonzero weight, or those named in `only`)."""
        m, w = self.m, self.weights()
        wanted = [t for t in TERMS if (w[t] > 0 if only is None else t in only)]
        img, txt = out["img"].float(), out["txt"].float()
        vals: dict[str, torch.Tensor] = {}
        for t in wanted:
            if t == "gd":
                vals[t] = (global_discriminative(img, out["img_global"].float(), m.gd_form, m.gd_margin, m.gd_scale)
                           + global_discriminative(txt, out["txt_global"].float(), m.gd_form, m.gd_margin,
                                                   m.gd_scale))
            elif t == "isd":
                vals[t] = (intra_set_divergence(img, m.isd_form, m.isd_margin, m.isd_scale)
                           + intra_set_divergence(txt, m.isd_form, m.isd_margin, m.isd_scale))
            elif t == "mmd":
                vals[t] = mmd(img.flatten(0, 1), txt.flatten(0, 1), m.mmd_gamma)
            elif t == "div":
                vals[t] = pvse_diversity(out["img_res"].float()) + pvse_diversity(out["txt_res"].float())
            elif t == "unif":
                vals[t] = within_set_uniformity(img) + within_set_uniformity(txt)
            elif t == "con":
                vals[t] = self.con(sims.float(), positives, negatives)
        return vals

    def forward(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, progress) -> dict:
        positives, negatives = pair_masks(img_batch, txt_batch)
        sims = self.similarity(out["img"], out["txt"])
        rank = self.ranking(sims, positives, progress, negatives)
        terms = {self.ranking.name: rank.detach()}
        loss = rank
        w = self.weights()
        for name, value in self.term_values(out, sims, positives, negatives).items():
            loss = loss + w[name] * value
            terms[name] = value.detach()
        with torch.no_grad():  # collapse diagnostic: 1 = every element of a set equal
            for side in ("img", "txt"):
                sets = out[side].detach().float()
                terms[f"within_cos_{side}"] = within_set_cosine(sets).mean()
                terms[f"circ_var_{side}"] = circular_variance(sets).mean()
        terms["loss"] = loss
        return terms
