"""Hooks the trainer itself runs between steps, next to the objective's own."""

from __future__ import annotations

import torch

from itmatch.objectives.base import StepContext, TrainingHooks


class NeighbourRefresh(TrainingHooks):
    """Neighbour sampling (HREM, DIAS) re-clusters the current image embeddings at an epoch's start.

    Skipped when resuming mid-epoch: the sampler's restored state already holds that epoch's clusters.
    """

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_start(self, ctx: StepContext) -> None:
        epoch = ctx.progress.epoch
        if ctx.progress.batch_in_epoch > 0 or not self.sampler.needs_embeddings(epoch):
            return
        with torch.random.fork_rng(devices=[]):  # encoding never changes training's random numbers
            emb = ctx.encode_train_images()
        self.sampler.fit_clusters(emb.numpy(), epoch)
        self.sampler.set_epoch(epoch)
