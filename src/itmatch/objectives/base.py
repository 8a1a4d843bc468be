"""What every training objective shares: the lifecycle hooks the trainer calls, the progress it reads,
and the configured ranking loss as one module any objective can call on a similarity matrix.

An objective is an `nn.Module` whose `forward(out, img_batch, txt_batch, progress)` returns a dict of
named loss terms with the total under "loss". Everything that exists only for training (HREM's
relation graph, momentum encoders, queues, prototypes) lives in the objective, never in the model, so
inference never carries it; its tensors are buffers or parameters, so they are saved in the training
state and restored by `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from itmatch.config import LossConfig
from itmatch.errors import ItmatchError
from itmatch.objectives.contrastive import InfoNCE
from itmatch.objectives.ranking import DistanceWeightedTriplet, HingeLoss

LOSSES = ("hinge", "triplet", "infonce")


@dataclass
class TrainProgress:
    """What objectives may read about where training is (warm-ups, schedules of loss terms)."""

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    batch_in_epoch: int = 0


@dataclass
class StepContext:
    """What a hook sees: the model being trained and where training is. `encode_train_images` gives the
    current (N, D) embeddings of every training image, for hooks that re-cluster or re-seed on them."""

    model: nn.Module
    progress: TrainProgress
    encode_train_images: object = None  # callable () -> torch.Tensor, set by the trainer


class TrainingHooks:
    """Mix-in for objective parts (and trainer helpers) that act between steps.

    The trainer calls the hooks on every sub-module of the objective that has this mix-in, so a
    regularizer or a wrapped objective gets them too:
    - `on_epoch_start(ctx)` before the first batch of an epoch (also after a resume mid-epoch: check
      `ctx.progress` if the hook must run once per epoch);
    - `after_step(ctx)` after each optimizer step (EMA / momentum updates, prototype renormalisation,
      queue pushes).
    State that must survive `--resume` is kept in buffers, or returned by `get_extra_state`.
    """

    def on_epoch_start(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass


def call_hooks(objective: nn.Module, hook: str, ctx: StepContext) -> None:
    """Call `hook` on every part of `objective` that has the hooks, parents before children."""
    for module in objective.modules():
        if isinstance(module, TrainingHooks):
            getattr(module, hook)(ctx)


class RankingTerm(nn.Module):
    """`forward(sims, positives, progress, negatives=None)`; the hinge sums over negatives during its
    warm-up epochs, then keeps only the hardest negative (VSE++), as vse_infty's
    `vse_mean_warmup_epochs` does. `negatives` (from `data.batch.pair_masks`) leaves relevant pairs
    out of the negatives; None = every non-positive pair."""

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

    def forward(self, sims: torch.Tensor, positives: torch.Tensor, progress,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "hinge":
            return self.loss(sims, positives, max_violation=progress.epoch >= self.sum_warmup_epochs,
                             negatives=negatives)
        return self.loss(sims, positives, negatives=negatives)
