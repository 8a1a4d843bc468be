"""Symmetric InfoNCE with positives from image ids.

Each positive pair (i, c) is a classification of c among the row's captions and of i among the
column's images. Other positives of the same row or column are removed from the denominator, so a
second caption of the same image is never pushed away from its image (the mistake of plain
diagonal InfoNCE on batches with repeated images).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class InfoNCE(nn.Module):
    def __init__(self, temperature: float = 0.05, learnable: bool = False):
        super().__init__()
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, sims: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        logits = sims * self.log_scale.exp().clamp(max=100.0)
        pos_r, pos_c = positives.nonzero(as_tuple=True)
        target = logits[pos_r, pos_c]
        # row of image pos_r, with the other positives of that row masked out
        row = logits[pos_r].masked_fill(positives[pos_r], float("-inf"))
        row = torch.cat([row, target[:, None]], 1)
        col = logits[:, pos_c].T.masked_fill(positives[:, pos_c].T, float("-inf"))
        col = torch.cat([col, target[:, None]], 1)
        loss_i2t = torch.logsumexp(row, 1) - target
        loss_t2i = torch.logsumexp(col, 1) - target
        return (loss_i2t.mean() + loss_t2i.mean()) / 2
