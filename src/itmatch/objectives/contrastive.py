"""Symmetric InfoNCE with positives from image ids.

Each positive pair (r, c) is one classification in each direction: caption c among the captions of
row r, and image r among the images of column c, with logits `sims / temperature`. The *other*
positives of that row or column are removed from the denominator, so a second caption of the same
image is neither pushed away from its image nor counted as a competitor (the mistake of diagonal
InfoNCE on batches with repeated images). The loss is the mean over positive pairs of each
direction, averaged over the two directions; with one positive per row and column it is exactly
CLIP's loss.

With `negatives` given (`loss.negatives: relevance`), pairs that are neither positives nor
negatives (relevant by the data, another image) leave the denominator the same way: they are not
competitors, and not extra targets either.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_SCALE = 100.0  # CLIP's clamp on a learnable logit scale (temperature >= 0.01)


class InfoNCE(nn.Module):
    def __init__(self, temperature: float = 0.05, learnable: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError("InfoNCE temperature must be > 0")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        self.learnable = learnable
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, sims: torch.Tensor, positives: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        excluded = positives if negatives is None else ~negatives
        logits = sims * self.scale()
        pos_r, pos_c = positives.nonzero(as_tuple=True)
        target = logits[pos_r, pos_c].unsqueeze(1)
        # Row of image pos_r (column of caption pos_c) without any non-negative, then the anchor's own logit.
        row = torch.cat([logits[pos_r].masked_fill(excluded[pos_r], float("-inf")), target], 1)
        col = torch.cat([logits[:, pos_c].T.masked_fill(excluded[:, pos_c].T, float("-inf")), target], 1)
        loss_i2t = torch.logsumexp(row, 1) - target.squeeze(1)
        loss_t2i = torch.logsumexp(col, 1) - target.squeeze(1)
        return (loss_i2t.mean() + loss_t2i.mean()) / 2

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, learnable={self.learnable}"
