"""Ranking losses on a batch similarity matrix.

Every loss takes `sims: (B_img, B_txt)` and `positives: (B_img, B_txt)` bool built from image ids
(`data.batch.positive_mask`), so two captions of one image in a batch are positives of that image,
never negatives. Each positive pair (r, c) is an anchor in both directions: image r against the
negatives of its row (captions of other images), caption c against the negatives of its column
(other images). Losses are summed over anchors, as VSE++ and HREM do (the learning rates of the
papers are tuned for sums).

`negatives` (optional, (B_img, B_txt) bool) narrows the candidates further: with
`loss.negatives: relevance` (`data.batch.pair_masks`) a pair that the data declares relevant but that
is not the caption's own image is neither an anchor nor a negative, it is left out. None means every
non-positive pair, the behaviour of image ids alone.
"""

from __future__ import annotations

import torch
from torch import nn


def anchor_costs(sims: torch.Tensor, positives: torch.Tensor, margin: float,
                 negatives: torch.Tensor | None = None):
    """Hinge costs of every positive pair against every candidate of its row and of its column.

    Returns `(cost_i2t, cost_t2i)`, each `(P, ·)` for the P positive pairs in `positives.nonzero()`
    order: `margin + s(negative) - s(positive)` clipped at 0, and 0 where the candidate is not a
    negative (a positive, or a pair `negatives` leaves out).
    """
    excluded = positives if negatives is None else ~negatives
    pos_r, pos_c = positives.nonzero(as_tuple=True)
    s_pos = sims[pos_r, pos_c].unsqueeze(1)
    cost_i2t = (margin + sims[pos_r] - s_pos).clamp(min=0).masked_fill(excluded[pos_r], 0.0)
    cost_t2i = (margin + sims[:, pos_c].T - s_pos).clamp(min=0).masked_fill(excluded[:, pos_c].T, 0.0)
    return cost_i2t, cost_t2i


class HingeLoss(nn.Module):
    """VSE++ triplet hinge (Faghri et al. 2018): sum over negatives, or the hardest negative only.

    `forward(sims, positives, max_violation=None)`: the call's flag, when given, overrides the
    constructor's (VSE-infinity sums over negatives during a warm-up, then takes the hardest).
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = False):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, sims: torch.Tensor, positives: torch.Tensor, max_violation: bool | None = None,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        hardest = self.max_violation if max_violation is None else max_violation
        cost_i2t, cost_t2i = anchor_costs(sims, positives, self.margin, negatives)
        if hardest:
            return cost_i2t.max(1).values.sum() + cost_t2i.max(1).values.sum()
        return cost_i2t.sum() + cost_t2i.sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}"


def distance_weighted_log_weights(dist: torch.Tensor, dim: int, cutoff: float) -> torch.Tensor:
    """log of the inverse density of pairwise distances between uniform points on S^{dim-1}.

    Wu et al. 2017: q(d) ∝ d^(dim-2) (1 - d²/4)^((dim-3)/2), so the sampling weight 1/q(d) is
    d^(2-dim) (1 - d²/4)^(-(dim-3)/2); drawing negatives with it spreads them evenly over distances
    instead of concentrating them near sqrt(2). Distances are clipped below at `cutoff` so that
    near-duplicates do not take all the mass. Computed in log space: the powers overflow for dim 512.
    """
    d = dist.clamp(min=cutoff)
    return (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log((1.0 - 0.25 * d * d).clamp(min=1e-8))


class DistanceWeightedTriplet(nn.Module):
    """Triplet hinge with distance-weighted negative sampling, as HREM and DIAS train by default.

    For each positive pair and each direction one negative is drawn with probability proportional
    to the inverse distance density (`distance_weighted_log_weights`), among the negatives closer
    than `nonzero_loss_cutoff`; the loss is `margin + s(neg) - s(pos)` clipped at 0, summed.
    Distances are `sqrt(2 - 2 s)`, those of unit vectors. The draw is the only stochastic part
    (`draw`, with an optional `torch.Generator`); `sampling_logits` and `loss_given_negatives` are
    deterministic. An anchor without any allowed negative contributes nothing (HREM's code would
    zero the whole batch's loss in that case).
    """

    def __init__(self, margin: float = 0.2, dim: int = 512, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.7):
        super().__init__()
        self.margin, self.dim, self.cutoff, self.nonzero_loss_cutoff = margin, dim, cutoff, nonzero_loss_cutoff

    def sampling_logits(self, sims: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities of drawing each candidate; -inf where not allowed."""
        dist = torch.sqrt((2.0 - 2.0 * sims).clamp(min=1e-8))
        logw = distance_weighted_log_weights(dist, self.dim, self.cutoff)
        allowed = negatives & (dist < self.nonzero_loss_cutoff)
        return logw.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One column index per row drawn from softmax(logits); -1 for rows with nothing allowed."""
        has_any = torch.isfinite(logits).any(1)
        safe = torch.where(has_any[:, None], logits, torch.zeros_like(logits))
        probs = torch.softmax(safe, dim=1)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return torch.where(has_any, idx, torch.full_like(idx, -1))

    def forward(self, sims: torch.Tensor, positives: torch.Tensor,
                generator: torch.Generator | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
        negatives = ~positives if negatives is None else negatives
        pos_r, pos_c = positives.nonzero(as_tuple=True)
        with torch.no_grad():  # sampling is not differentiated
            s = sims.detach().float()
            neg_c = self.draw(self.sampling_logits(s[pos_r], negatives[pos_r]), generator)
            neg_r = self.draw(self.sampling_logits(s[:, pos_c].T, negatives[:, pos_c].T), generator)
        return self.loss_given_negatives(sims, pos_r, pos_c, neg_c, neg_r)

    def loss_given_negatives(self, sims: torch.Tensor, pos_r: torch.Tensor, pos_c: torch.Tensor,
                             neg_c: torch.Tensor, neg_r: torch.Tensor) -> torch.Tensor:
        """Sum of hinges for anchors (pos_r[k], pos_c[k]) with caption negative neg_c[k] (image
        anchor) and image negative neg_r[k] (caption anchor); -1 means no negative."""
        s_pos = sims[pos_r, pos_c]
        ok_c, ok_r = neg_c >= 0, neg_r >= 0
        loss_i2t = (self.margin + sims[pos_r[ok_c], neg_c[ok_c]] - s_pos[ok_c]).clamp(min=0).sum()
        loss_t2i = (self.margin + sims[neg_r[ok_r], pos_c[ok_r]] - s_pos[ok_r]).clamp(min=0).sum()
        return loss_i2t + loss_t2i

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, dim={self.dim}, cutoff={self.cutoff}, "
                f"nonzero_loss_cutoff={self.nonzero_loss_cutoff}")
