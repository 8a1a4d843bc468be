"""Ranking losses on a batch similarity matrix.

Every loss takes `sims: (B_img, B_txt)` and `positives: (B_img, B_txt)` bool, built from image ids,
so two captions of one image in a batch are positives of each other's image, never negatives.
Each positive pair is an anchor in both directions: image -> its negatives among captions (its row),
caption -> its negatives among images (its column).
"""

from __future__ import annotations

import torch
from torch import nn


class HingeLoss(nn.Module):
    """VSE++ triplet hinge (Faghri et al. 2018): sum over negatives, or the hardest negative only."""

    def __init__(self, margin: float = 0.2, max_violation: bool = False):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, sims: torch.Tensor, positives: torch.Tensor, max_violation: bool | None = None) -> torch.Tensor:
        hardest = self.max_violation if max_violation is None else max_violation
        pos_r, pos_c = positives.nonzero(as_tuple=True)
        s_pos = sims[pos_r, pos_c]  # (P,)
        # image anchor (row r): negatives are the captions of other images in that row
        cost_i2t = (self.margin + sims[pos_r] - s_pos[:, None]).clamp(min=0).masked_fill(positives[pos_r], 0.0)
        # caption anchor (column c): negatives are the other images in that column
        cost_t2i = (self.margin + sims[:, pos_c].T - s_pos[:, None]).clamp(min=0).masked_fill(positives[:, pos_c].T, 0.0)
        if hardest:
            return cost_i2t.max(1).values.sum() + cost_t2i.max(1).values.sum()
        return cost_i2t.sum() + cost_t2i.sum()


def distance_weighted_log_weights(dist: torch.Tensor, dim: int, cutoff: float) -> torch.Tensor:
    """log of the inverse density of pairwise distances on the unit sphere S^{dim-1} (Wu et al. 2017).

    q(d) ∝ d^(dim-2) (1 - d²/4)^((dim-3)/2); sampling with weight 1/q(d) spreads negatives evenly over
    distances instead of concentrating them near sqrt(2). Distances are clipped below at `cutoff`.
    """
    d = dist.clamp(min=cutoff)
    return -((dim - 2) * torch.log(d) + ((dim - 3) / 2) * torch.log((1.0 - 0.25 * d * d).clamp(min=1e-8)))


class DistanceWeightedTriplet(nn.Module):
    """Triplet hinge with distance-weighted negative sampling, as HREM and DIAS train by default.

    For each positive pair and each direction one negative is drawn with probability proportional to
    the inverse distance density, restricted to negatives closer than `nonzero_loss_cutoff` (farther
    ones give no loss anyway); the loss is the hinge `margin + s(neg) - s(pos)` on that negative.
    """

    def __init__(self, margin: float = 0.2, dim: int = 512, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.7):
        super().__init__()
        self.margin, self.dim, self.cutoff, self.nonzero_loss_cutoff = margin, dim, cutoff, nonzero_loss_cutoff

    def sampling_logits(self, sims: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities of drawing each candidate negative; -inf where not allowed."""
        dist = torch.sqrt((2.0 - 2.0 * sims).clamp(min=1e-8))
        logw = distance_weighted_log_weights(dist, self.dim, self.cutoff)
        allowed = negatives & (dist < self.nonzero_loss_cutoff)
        return logw.masked_fill(~allowed, float("-inf"))

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One index per row from softmax(logits); rows with no allowed candidate return -1."""
        has_any = torch.isfinite(logits).any(1)
        safe = torch.where(has_any[:, None], logits, torch.zeros_like(logits))
        probs = torch.softmax(safe - safe.max(1, keepdim=True).values, dim=1)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return torch.where(has_any, idx, torch.full_like(idx, -1))

    def forward(self, sims: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None):
        pos_r, pos_c = positives.nonzero(as_tuple=True)
        s_pos = sims[pos_r, pos_c]
        with torch.no_grad():
            row_logits = self.sampling_logits(sims[pos_r].detach(), ~positives[pos_r])
            col_logits = self.sampling_logits(sims[:, pos_c].T.detach(), ~positives[:, pos_c].T)
            neg_c = self.draw(row_logits, generator)
            neg_r = self.draw(col_logits, generator)
        return self.loss_given_negatives(sims, pos_r, pos_c, s_pos, neg_c, neg_r)

    def loss_given_negatives(self, sims, pos_r, pos_c, s_pos, neg_c, neg_r) -> torch.Tensor:
        ok_c, ok_r = neg_c >= 0, neg_r >= 0
        loss_i2t = (self.margin + sims[pos_r[ok_c], neg_c[ok_c]] - s_pos[ok_c]).clamp(min=0).sum()
        loss_t2i = (self.margin + sims[neg_r[ok_r], pos_c[ok_r]] - s_pos[ok_r]).clamp(min=0).sum()
        return loss_i2t + loss_t2i
