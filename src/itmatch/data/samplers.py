"""Neighbour batch sampling (HREM Sec. 3.4, also used by DIAS): batches of similar images.

Image embeddings are clustered with k-means; a batch takes K images from each of P clusters and one
caption of each image, so the batch holds close neighbours whose relations the instance-level
objectives can learn from. Before `start_epoch` (or before any clustering) batches are random, as in
the papers, which switch neighbour sampling on later in training. Cluster labels are part of the
sampler's state, so a resumed run replays the same batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from itmatch.data.datasets import EpochSampler, mix_seed


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 20, chunk: int = 4096) -> torch.Tensor:
    """Cluster labels (N,) of the rows of `x` by cosine k-means with k-means++ seeding."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    n = len(x)
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)]
    closest = (1 - x @ centres.T).squeeze(1).clamp(min=0)
    for _ in range(1, k):  # k-means++: next centre with probability ∝ squared distance
        probs = closest.pow(2)
        probs = probs / probs.sum() if probs.sum() > 0 else torch.full_like(probs, 1.0 / n)
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        centres = torch.cat([centres, nxt])
        closest = torch.minimum(closest, (1 - x @ nxt.T).squeeze(1).clamp(min=0))
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        for s in range(0, n, chunk):
            labels[s : s + chunk] = (x[s : s + chunk] @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, torch.nn.functional.normalize(sums, dim=1))
    return labels


class NeighbourBatchSampler(Sampler[list[int]]):
    def __init__(self, caption_to_image: np.ndarray, seed: int, clusters_per_batch: int, images_per_cluster: int,
                 n_clusters: int = 0, start_epoch: int = 0, refresh_epochs: int = 1):
        self.caption_to_image = np.asarray(caption_to_image)
        self.n_images = int(self.caption_to_image.max()) + 1
        self.captions_of = np.split(np.argsort(self.caption_to_image, kind="stable"),
                                    np.cumsum(np.bincount(self.caption_to_image, minlength=self.n_images))[:-1])
        self.seed, self.P, self.K = seed, clusters_per_batch, images_per_cluster
        self.n_clusters = n_clusters or max(1, self.n_images // self.K)
        self.start_epoch, self.refresh_epochs = start_epoch, max(1, refresh_epochs)
        self.random = EpochSampler(len(self.caption_to_image), seed, self.P * self.K)
        self.labels: torch.Tensor | None = None
        self.fitted_epoch = -1
        self.epoch, self.skip = 0, 0

    # -- clustering ----------------------------------------------------------------------------
    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and self.labels is not None

    def needs_embeddings(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.labels is None or epoch - self.fitted_epoch >= self.refresh_epochs)

    def fit_clusters(self, image_embeddings: np.ndarray, epoch: int) -> None:
        emb = torch.as_tensor(np.asarray(image_embeddings))
        self.labels = kmeans(emb, self.n_clusters, mix_seed(self.seed, epoch, 7))
        self.fitted_epoch = epoch

    def state_dict(self) -> dict:
        return {"labels": self.labels if self.labels is not None else torch.empty(0, dtype=torch.long),
                "fitted_epoch": self.fitted_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.labels = state["labels"] if len(state["labels"]) else None
        self.fitted_epoch = int(state["fitted_epoch"])

    # -- batches -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0
        self.random.set_epoch(epoch)

    def skip_batches(self, k: int) -> None:
        if self.active(self.epoch):
            self.skip = k
        else:
            self.random.skip_batches(k)

    def _neighbour_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 11))
        labels = self.labels.numpy()
        chunks = []
        for c in range(self.n_clusters):
            members = np.flatnonzero(labels == c)
            members = members[torch.randperm(len(members), generator=g).numpy()]
            chunks += [members[i : i + self.K] for i in range(0, len(members) - self.K + 1, self.K)]
        order = torch.randperm(len(chunks), generator=g).numpy()
        batches = []
        for b in range(len(chunks) // self.P):
            images = np.concatenate([chunks[i] for i in order[b * self.P : (b + 1) * self.P]])
            picks = torch.randint(1 << 30, (len(images),), generator=g).numpy()
            batches.append([int(self.captions_of[i][p % len(self.captions_of[i])]) for i, p in zip(images, picks)])
        return batches

    def __len__(self) -> int:
        if not self.active(self.epoch):
            return len(self.random)
        counts = np.bincount(self.labels.numpy(), minlength=self.n_clusters)
        return int((counts // self.K).sum()) // self.P

    def __iter__(self):
        if not self.active(self.epoch):
            yield from self.random
            return
        yield from self._neighbour_batches()[self.skip :]
