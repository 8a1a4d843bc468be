"""Neighbour batch sampling (HREM Sec. 3.4): k-means, batch composition, coverage, determinism, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from itmatch.data.datasets import EpochSampler
from itmatch.data.samplers import NeighbourBatchSampler, kmeans, merge_small_clusters
from itmatch.errors import ItmatchError


def clustered_embeddings(n_clusters=6, per=20, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, dim, generator=g), dim=1)
    points = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, dim, generator=g)
    order = torch.randperm(len(points), generator=g)  # clusters interleaved, not in blocks of rows
    return points[order], torch.arange(n_clusters).repeat_interleave(per)[order]


def same_partition(a, b) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def test_kmeans_recovers_well_separated_clusters_deterministically():
    x, truth = clustered_embeddings()
    labels = kmeans(x, 6, seed=0)
    assert same_partition(truth, labels)
    torch.testing.assert_close(labels, kmeans(x, 6, seed=0))


def test_small_clusters_merge_into_their_nearest_neighbour():
    x, truth = clustered_embeddings(n_clusters=3, per=10)
    labels = truth.clone()
    tiny = int(torch.nonzero(truth == 2)[0])  # cut one point of cluster 2 off as a cluster of its own
    labels[tiny] = 3
    merged = merge_small_clusters(x, labels, min_size=4)
    assert same_partition(truth, merged)  # the lone point went back to its true cluster
    assert int(merged.max()) == 2  # renumbered 0..C-1
    assert (merge_small_clusters(x, labels, min_size=100) == 0).all()  # none big enough: one cluster


C2I = np.repeat(np.arange(120), 5)  # 120 images, 5 captions each


def make_sampler(start_epoch=1, seed=3):
    return NeighbourBatchSampler(C2I, seed=seed, clusters_per_batch=2, images_per_cluster=4, n_clusters=6,
                                 start_epoch=start_epoch)


def fitted(start_epoch=1):
    x, truth = clustered_embeddings()
    sampler = make_sampler(start_epoch)
    sampler.set_epoch(start_epoch)
    assert sampler.needs_embeddings(start_epoch)
    sampler.fit_clusters(x.numpy(), start_epoch)
    sampler.set_epoch(start_epoch)
    return sampler, truth


def test_random_epochs_before_start_epoch_and_before_clustering():
    sampler = make_sampler(start_epoch=1)
    sampler.set_epoch(0)
    assert not sampler.needs_embeddings(0)
    reference = EpochSampler(len(C2I), 3, 8)
    reference.set_epoch(0)
    assert list(sampler) == list(reference)  # exactly the random epoch sampler, batch P*K
    sampler.set_epoch(1)
    assert sampler.needs_embeddings(1) and list(sampler) != []  # still random until clusters exist


def test_batches_hold_p_distinct_clusters_of_k_images_one_caption_per_image():
    sampler, truth = fitted()
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    used = []
    for batch in batches:
        images = C2I[batch]
        assert len(batch) == 8 and len(set(images.tolist())) == 8  # P*K pairs, no image twice
        clusters = [int(truth[i]) for i in images]
        assert len(set(clusters)) == 2  # P = 2 distinct clusters (Sec. 3.4) ...
        assert all(clusters.count(c) == 4 for c in set(clusters))  # ... of K = 4 images each
        used += batch
    assert len(used) == len(set(used))  # each caption at most once per epoch
    # 6 clusters of 5 chunks each round; a round ends when fewer than P = 2 clusters have chunks
    # left, so at most 5 - 1 chunks of one cluster per round are dropped: >= 26 of 30 chunks used.
    assert len(used) >= len(C2I) * 26 // 30


def test_batches_never_repeat_a_cluster_with_many_small_clusters():
    # 120 images in 30 clusters of 4 (= K): every chunk is a whole cluster; P = 5 distinct per batch
    x, truth = clustered_embeddings(n_clusters=30, per=4, dim=64)
    sampler = NeighbourBatchSampler(C2I, seed=1, clusters_per_batch=5, images_per_cluster=4, n_clusters=30)
    sampler.set_epoch(0)
    sampler.fit_clusters(x.numpy(), 0)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        labels = sampler.labels[C2I[batch]].tolist()
        assert len(set(labels)) == 5 and all(labels.count(c) == 4 for c in set(labels))
    with pytest.raises(ItmatchError, match="fewer than sampler.clusters_per_batch"):
        NeighbourBatchSampler(C2I, 0, clusters_per_batch=31, images_per_cluster=4, n_clusters=30).fit_clusters(
            x.numpy(), 0)


def test_neighbour_sampler_is_deterministic_and_resumes_from_its_state():
    a, _ = fitted()
    full = list(a)
    again, _ = fitted()
    assert list(again) == full  # same seed, same embeddings: same clusters and batches
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # the loop saves sampler state in a weights_only checkpoint
    buffer.seek(0)
    b = make_sampler()
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert not b.needs_embeddings(1)  # labels restored: no re-clustering on resume
    b.set_epoch(1)
    b.skip_batches(3)
    assert list(b) == full[3:]
    a.set_epoch(2)
    assert a.needs_embeddings(2)  # refresh_epochs=1: re-cluster every epoch
    assert list(a) != full  # a new epoch draws new batches
    other = make_sampler(seed=4)
    other.load_state_dict(a.state_dict())
    other.set_epoch(1)
    assert list(other) != full  # and so does another seed


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ItmatchError):
        NeighbourBatchSampler(np.array([], dtype=np.int64), 0, 2, 4)
    with pytest.raises(ItmatchError):
        NeighbourBatchSampler(C2I, 0, 0, 4)
    sampler = make_sampler()
    with pytest.raises(ItmatchError, match="120 training images"):
        sampler.fit_clusters(np.zeros((7, 16), np.float32), 1)
    with pytest.raises(ItmatchError, match="NaN"):
        sampler.fit_clusters(np.full((120, 16), np.nan, np.float32), 1)
    with pytest.raises(ItmatchError, match="same data"):
        sampler.load_state_dict({"labels": torch.zeros(5, dtype=torch.long), "fitted_epoch": 1})
