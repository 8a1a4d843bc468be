"""Optimizer and learning-rate schedule.

AdamW over the parameter groups a model declares (pretrained parts at a lower rate) plus the
objective's own parameters; the schedule is a multiplier set before every step: linear warm-up,
then step decay at epoch boundaries (the reference repos' `lr_update`) or cosine to zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from itmatch.config import OptimConfig
from itmatch.errors import ItmatchError

SCHEDULES = ("step", "cosine", "constant")


def build_optimizer(model: nn.Module, objective: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = model.param_groups(cfg) if hasattr(model, "param_groups") else [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}
    ]
    seen = {id(p) for g in groups for p in g["params"]}
    extra = [p for p in objective.parameters() if p.requires_grad and id(p) not in seen]
    if extra:
        groups = list(groups) + [{"params": extra, "lr": cfg.lr, "name": "objective"}]
    groups = [g for g in groups if len(g["params"])]
    if not groups:
        raise ItmatchError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales from here
    return optimizer


def lr_multiplier(step: int, epoch_progress: float, cfg: OptimConfig, total_epochs: float) -> float:
    """Multiplier of every group's base learning rate for optimizer step number `step` (0-based).

    `epoch_progress` is the fractional epoch (epoch + batch / batches_in_that_epoch): schedules are
    defined in epochs, as in the papers, so they hold when batches per epoch change (for example when
    neighbour sampling switches on and draws one caption per image).
    """
    warm = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        warm = (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "step":
        n_decays = sum(1 for e in cfg.decay_epochs if int(epoch_progress) >= e)
        return warm * cfg.decay_factor**n_decays
    if cfg.schedule == "cosine":
        progress = min(1.0, max(0.0, epoch_progress / max(1e-9, total_epochs)))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ItmatchError(f"config key 'optim.schedule': unknown schedule {cfg.schedule!r} (use {', '.join(SCHEDULES)})")


def set_learning_rates(optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
