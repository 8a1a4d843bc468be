"""The configured ranking loss as one module every method's objective can call on a sims matrix."""

from __future__ import annotations

import torch
from torch import nn

from itmatch.config import LossConfig
from itmatch.errors import ItmatchError
from itmatch.objectives.contrastive import InfoNCE
from itmatch.objectives.ranking import DistanceWeightedTriplet, HingeLoss

LOSSES = ("hinge", "triplet", "infonce")


class RankingTerm(nn.Module):
    """`forward(sims, positives, progress)`; the hinge sums over negatives during its warm-up epochs,
    then keeps only the hardest negative (VSE++), as vse_infty's `vse_mean_warmup_epochs` does."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.name = cfg.name
        self.sum_warmup_epochs = cfg.sum_warmup_epochs
        if cfg.name == "hinge":
            self.loss = HingeLoss(cfg.margin)
        elif cfg.name == "triplet":
            self.loss = DistanceWeightedTriplet(cfg.margin, cfg.triplet_dim, cfg.triplet_cutoff,
                                                cfg.triplet_nonzero_cutoff)
        elif cfg.name == "infonce":
            self.loss = InfoNCE(cfg.temperature, cfg.learn_temperature)
        else:
            raise ItmatchError(f"config key 'loss.name': unknown loss {cfg.name!r} (use {', '.join(LOSSES)})")

    def forward(self, sims: torch.Tensor, positives: torch.Tensor, progress) -> torch.Tensor:
        if self.name == "hinge":
            return self.loss(sims, positives, max_violation=progress.epoch >= self.sum_warmup_epochs)
        return self.loss(sims, positives)
