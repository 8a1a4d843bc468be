"""Neighbour batch sampling: k-means, batch composition, determinism and exact resume."""

from __future__ import annotations

import numpy as np
import torch

from itmatch.data.samplers import NeighbourBatchSampler, kmeans


def clustered_embeddings(n_clusters=6, per=20, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    points = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, dim, generator=g)
    return points, torch.arange(n_clusters).repeat_interleave(per)


def test_kmeans_recovers_well_separated_clusters():
    x, truth = clustered_embeddings()
    labels = kmeans(x, 6, seed=0)
    # Same partition up to renaming: every true cluster maps to one label and vice versa.
    pairs = {(int(a), int(b)) for a, b in zip(truth, labels)}
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6 and len({b for _, b in pairs}) == 6
    torch.testing.assert_close(labels, kmeans(x, 6, seed=0))


def make_sampler(start_epoch=1):
    caption_to_image = np.repeat(np.arange(120), 5)
    return NeighbourBatchSampler(caption_to_image, seed=3, clusters_per_batch=2, images_per_cluster=4,
                                 n_clusters=6, start_epoch=start_epoch), caption_to_image


def test_batches_come_from_few_clusters_one_caption_per_image():
    sampler, c2i = make_sampler()
    x, truth = clustered_embeddings()
    sampler.set_epoch(0)
    assert not sampler.needs_embeddings(0)
    random_batches = list(sampler)
    assert len(random_batches) == len(c2i) // 8  # random phase: batches of P*K captions
    sampler.set_epoch(1)
    assert sampler.needs_embeddings(1)
    sampler.fit_clusters(x.numpy(), 1)
    sampler.set_epoch(1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    seen = []
    for batch in batches:
        images = c2i[batch]
        assert len(batch) == 8 and len(set(images)) == 8  # no image twice in a batch
        assert len({int(truth[i]) for i in images}) <= 2  # P = 2 clusters
        seen += images.tolist()
    assert len(seen) == len(set(seen))  # each image at most once per epoch


def test_neighbour_sampler_is_deterministic_and_resumable():
    x, _ = clustered_embeddings()
    a, _ = make_sampler()
    a.set_epoch(1)
    a.fit_clusters(x.numpy(), 1)
    a.set_epoch(1)
    full = list(a)
    b, _ = make_sampler()
    b.load_state_dict(a.state_dict())
    b.set_epoch(1)
    b.skip_batches(3)
    assert list(b) == full[3:]
    a.set_epoch(2)
    assert list(a) != full  # a new epoch draws new batches
