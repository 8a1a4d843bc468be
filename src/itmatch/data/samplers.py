"""Neighbour batch sampling (HREM Sec. 3.4, usable by any method): batches of similar images.

Image embeddings are clustered with k-means; a batch takes K images from each of P *distinct*
clusters (Sec. 3.4: "randomly choose P clusters and select K images from each cluster") and one
caption of each image, so a batch holds close neighbours whose relations instance-level objectives
can learn from, spread over P neighbourhoods. Before `start_epoch` (and before any clustering)
batches are random, as in the paper, which switches neighbour sampling on "at the later training".

An epoch stays an epoch: it is made of `captions_per_image` rounds, each giving every image its next
caption (in a per-epoch random order), so every caption is seen once per epoch as with random batches
and epoch-based schedules keep their meaning. Within a round each image appears at most once, so no
image is ever twice in a batch. Each round cuts every cluster's shuffled members into chunks of K
(dropping the last `size % K`, a different random few each round), then draws batches of P chunks
from P distinct clusters, each cluster with probability proportional to the chunks it has left, until
fewer than P clusters have chunks left; those last chunks are dropped (on scenes-small with the
default 2P clusters, measured in docs/methods/hrem.md).

Clusters smaller than K are merged into their nearest cluster (by centroid), so every image belongs to
a cluster that can fill its K slots. Cluster labels are the sampler's state: a resumed run reloads
them and replays the same batches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from itmatch.data.datasets import EpochSampler, mix_seed
from itmatch.errors import ItmatchError


def _kmeans_pp_init(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on unit rows, distance 1 - cosine."""
    first = torch.randint(len(x), (1,), generator=g).item()
    centres = [x[first]]
    closest = (1.0 - x @ x[first]).clamp(min=0)
    for _ in range(1, k):
        weights = closest.pow(2).double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than clusters: any point will do
            weights = torch.ones_like(weights)
        nxt = torch.multinomial(weights, 1, generator=g).item()
        centres.append(x[nxt])
        closest = torch.minimum(closest, (1.0 - x @ x[nxt]).clamp(min=0))
    return torch.stack(centres)


def _assign(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([(x[s : s + chunk] @ centres.T).argmax(1) for s in range(0, len(x), chunk)])


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25, init_sample: int = 20000) -> torch.Tensor:
    """Cluster labels (N,) of the rows of `x`: spherical (cosine) k-means, k-means++ seeded, deterministic
    for a seed on a given device. Seeding runs on at most `init_sample` rows, a random subset."""
    x = F.normalize(x.float(), dim=1)
    n = len(x)
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    pool = x if n <= init_sample else x[torch.randperm(n, generator=g)[:init_sample].to(x.device)]
    centres = _kmeans_pp_init(pool, k, g)
    labels = _assign(x, centres)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        centres = torch.where((counts == 0)[:, None], centres, F.normalize(sums, dim=1))  # empty: keep
        new = _assign(x, centres)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def merge_small_clusters(x: torch.Tensor, labels: torch.Tensor, min_size: int) -> torch.Tensor:
    """Move the members of clusters with fewer than `min_size` rows to the nearest (by centroid cosine)
    cluster that has enough; return labels renumbered 0..C-1. All in one cluster if none is big enough."""
    x = F.normalize(x.float(), dim=1)
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k)
    big = counts >= min_size
    if not bool(big.any()):
        return torch.zeros_like(labels)
    centres = F.normalize(torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x), dim=1)
    small = ~big[labels]
    if bool(small.any()):
        scores = x[small] @ centres.T
        labels = labels.clone()
        labels[small] = scores.masked_fill(~big[None, :], float("-inf")).argmax(1)
    return torch.unique(labels, return_inverse=True)[1]


class NeighbourBatchSampler(Sampler[list[int]]):
    """Batch sampler of caption indices: random batches until clustered, then P clusters x K images.

    The training loop calls `needs_embeddings(epoch)` at the start of each epoch and, when True, encodes
    the training images (rows in `caption_to_image` numbering) and passes them to `fit_clusters`.
    """

    def __init__(self, caption_to_image: np.ndarray, seed: int, clusters_per_batch: int, images_per_cluster: int,
                 n_clusters: int = 0, start_epoch: int = 0, refresh_epochs: int = 1):
        c2i = np.asarray(caption_to_image)
        if c2i.ndim != 1 or len(c2i) == 0 or not np.issubdtype(c2i.dtype, np.integer) or c2i.min() < 0:
            raise ItmatchError("neighbour sampling needs a non-empty 1-D array of image rows per caption")
        if clusters_per_batch < 1 or images_per_cluster < 1:
            raise ItmatchError("config keys 'sampler.clusters_per_batch' and 'sampler.images_per_cluster' must be >= 1")
        if n_clusters < 0 or refresh_epochs < 1 or start_epoch < 0:
            raise ItmatchError("config keys 'sampler.clusters' (>= 0), 'sampler.refresh_epochs' (>= 1) and "
                               "'sampler.start_epoch' (>= 0) are out of range")
        self.caption_to_image = c2i.astype(np.int64)
        self.n_images = int(c2i.max()) + 1
        self.caption_counts = np.bincount(self.caption_to_image, minlength=self.n_images)
        self.captions_by_image = np.argsort(self.caption_to_image, kind="stable")
        self.caption_start = np.concatenate([[0], np.cumsum(self.caption_counts)[:-1]])
        self.rounds = int(self.caption_counts.max())
        self.seed, self.P, self.K = seed, clusters_per_batch, images_per_cluster
        self.batch_size = self.P * self.K
        # Default: about one batch worth of images per cluster, so a cluster is a real neighbourhood
        # and the `size % K` images a round drops stay a small fraction; but at least 2P clusters, so
        # that a batch can take P distinct ones until late in each round (with exactly P, every batch
        # needs every cluster and the round ends when the smallest runs out).
        self.n_clusters = n_clusters or max(2 * self.P, self.n_images // self.batch_size)
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, batches): __len__ = len(batches)
        self.start_epoch, self.refresh_epochs = start_epoch, refresh_epochs
        self.random = EpochSampler(len(c2i), seed, self.batch_size)
        self.labels: torch.Tensor | None = None  # (n_images,) cluster of each image, -1 for no caption
        self.fitted_epoch = -1
        self.epoch, self.skip = 0, 0

    # -- clustering ----------------------------------------------------------------------------
    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and self.labels is not None

    def needs_embeddings(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.labels is None or epoch - self.fitted_epoch >= self.refresh_epochs)

    def fit_clusters(self, image_embeddings: np.ndarray, epoch: int) -> None:
        emb = torch.as_tensor(np.asarray(image_embeddings, dtype=np.float32))
        if emb.ndim != 2 or len(emb) != self.n_images:
            raise ItmatchError(f"neighbour sampling got {tuple(emb.shape)} image embeddings for "
                               f"{self.n_images} training images")
        if not bool(torch.isfinite(emb).all()):
            raise ItmatchError("neighbour sampling got NaN or inf image embeddings: training has diverged")
        if torch.cuda.is_available():  # k-means is a few big matmuls; labels are saved, so resumes match
            emb = emb.cuda()
        has_caption = torch.as_tensor(self.caption_counts > 0, device=emb.device)
        labels = torch.full((self.n_images,), -1, dtype=torch.long)
        sub = emb[has_caption]
        fitted = kmeans(sub, self.n_clusters, mix_seed(self.seed, epoch, 7))
        labels[has_caption.cpu()] = merge_small_clusters(sub, fitted, self.K).cpu()
        found = int(labels.max()) + 1
        if found < self.P:
            raise ItmatchError(f"neighbour sampling found {found} clusters of at least {self.K} images, fewer than "
                               f"sampler.clusters_per_batch = {self.P}: lower it (or sampler.images_per_cluster)")
        self.labels = labels
        self.fitted_epoch = epoch
        self._cache = None

    def state_dict(self) -> dict:
        labels = self.labels if self.labels is not None else torch.empty(0, dtype=torch.long)
        return {"labels": labels.clone(), "fitted_epoch": self.fitted_epoch}

    def load_state_dict(self, state: dict) -> None:
        labels = torch.as_tensor(state["labels"], dtype=torch.long)
        if len(labels) not in (0, self.n_images):
            raise ItmatchError(f"the checkpoint's neighbour sampler has {len(labels)} images, the training "
                               f"split {self.n_images}: resume with the same data")
        self.labels = labels if len(labels) else None
        self.fitted_epoch = int(state["fitted_epoch"])
        self._cache = None

    # -- batches -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0
        self.random.set_epoch(epoch)

    def skip_batches(self, k: int) -> None:
        if not self.active(self.epoch):
            self.random.skip_batches(k)
            return
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot skip {k} of {len(self)} batches")
        self.skip = k

    def __len__(self) -> int:
        if not self.active(self.epoch):
            return len(self.random)
        return len(self._neighbour_batches())

    def _round(self, g: torch.Generator, caption_slot: np.ndarray, labels: np.ndarray) -> list[list[int]]:
        """One round: shuffled members of each cluster cut into chunks of K, then batches of P chunks of
        P distinct clusters, drawn in proportion to the chunks each cluster has left."""
        images = np.flatnonzero(labels >= 0)
        noise = torch.rand(len(images), generator=g, dtype=torch.float64).numpy()
        images = images[np.lexsort((noise, labels[images]))]  # by cluster, random within a cluster
        lab = labels[images]
        first = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]  # start of each cluster's run
        sizes = np.diff(np.r_[first, len(images)])
        left = sizes // self.K  # chunks each cluster still has; chunk j of cluster c = images[first[c] + jK ...]
        used = np.zeros_like(left)
        picked = []
        while int((left > 0).sum()) >= self.P:
            weights = torch.as_tensor(left, dtype=torch.float64)
            clusters = torch.multinomial(weights, self.P, replacement=False, generator=g).numpy()
            starts = first[clusters] + used[clusters] * self.K
            picked.append(images[starts[:, None] + np.arange(self.K)[None, :]].reshape(-1))
            used[clusters] += 1
            left[clusters] -= 1
        if not picked:
            return []
        batch_images = np.stack(picked)
        slot = caption_slot[batch_images] % self.caption_counts[batch_images]
        captions = self.captions_by_image[self.caption_start[batch_images] + slot]
        return captions.tolist()

    def _neighbour_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 11))
        labels = self.labels.numpy()
        # Each image's captions in a random order for this epoch; round r uses the r-th.
        offset = torch.randint(0, 1 << 30, (self.n_images,), generator=g).numpy()
        batches = []
        for r in range(self.rounds):
            batches += self._round(g, offset + r, labels)
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self):
        if not self.active(self.epoch):
            yield from self.random
            return
        yield from self._neighbour_batches()[self.skip :]


class RankSlices(Sampler[list[int]]):
    """One rank's share of a batch sampler that yields *global* batches (training on several processes).

    Rank r of `world` takes the r-th contiguous slice of every global batch, so the slices of all ranks
    concatenated in rank order are the global batch itself: each example is seen once per epoch across
    ranks (what the wrapped sampler drops, it drops for all), and a neighbour batch keeps its clusters
    as one batch of the whole run. Global batches must split evenly; the remainder of a short batch
    (`len % world` examples) is left out. Every other attribute (set_epoch, skip_batches, the neighbour
    sampler's clustering and state) is the wrapped sampler's: a checkpoint's sampler state and its
    batch counts are those of the global batches, whatever the number of ranks.
    """

    def __init__(self, batches, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.batches, self.rank, self.world = batches, rank, world

    def __getattr__(self, name):  # only for names not found on this object
        if name == "batches":  # not yet set (copying, unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.batches, name)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world
            if share == 0:
                raise ItmatchError(f"a batch of {len(batch)} cannot be split over {self.world} processes: "
                                   "make train.batch_size a multiple of the number of processes")
            yield batch[self.rank * share : (self.rank + 1) * share]
