"""Benchmark: itmatch's chunked ranking engine vs the per-query argsort loop of the reference repos.

    python benchmarks/bench_eval.py [--images 5000] [--captions-per-image 5] [--device cpu|cuda]

Builds a COCO-5K-sized random similarity matrix (5000 x 25000 by default), computes the standard
R@K / medr / meanr both ways in the same run, checks that the ranks agree exactly, and prints both
times and their ratio. Random float scores have no ties, so both tie policies equal the argsort.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from itmatch.evaluation.ranking import Ranks, ground_truth_ranks, recall_metrics


def argsort_loop_ranks(sims: np.ndarray, caption_to_image: np.ndarray) -> Ranks:
    """The reference repositories' evaluation: one full argsort per query, in a Python loop."""
    n_img, n_cap = sims.shape
    captions_of = [np.flatnonzero(caption_to_image == i) for i in range(n_img)]
    i2t = np.zeros(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == c)[0][0] for c in captions_of[i])
    by_caption = sims.T
    t2i = np.zeros(n_cap, dtype=np.int64)
    for c in range(n_cap):
        order = np.argsort(by_caption[c])[::-1]
        t2i[c] = np.where(order == caption_to_image[c])[0][0]
    return Ranks(i2t=i2t, t2i=t2i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the engine runs (the loop is numpy)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n_img, k = args.images, args.captions_per_image
    caption_to_image = np.repeat(np.arange(n_img), k)
    sims = rng.standard_normal((n_img, n_img * k), dtype=np.float32)
    sims[caption_to_image, np.arange(n_img * k)] += 2.5  # a plausible model: recalls well inside (0, 100)
    print(f"{n_img} x {n_img * k} similarity matrix, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, engine on {args.device}")

    engine_input = torch.as_tensor(sims, device=args.device) if args.device != "cpu" else sims
    ground_truth_ranks(engine_input[:50, :250], caption_to_image[:250] % 50)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = ground_truth_ranks(engine_input, caption_to_image)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_engine = time.perf_counter() - t0

    t0 = time.perf_counter()
    reference = argsort_loop_ranks(sims, caption_to_image)
    t_loop = time.perf_counter() - t0

    np.testing.assert_array_equal(ours.i2t, reference.i2t)
    np.testing.assert_array_equal(ours.t2i, reference.t2i)
    m = recall_metrics(ours)
    assert m == recall_metrics(reference)
    print(f"metrics agree: rsum {m['rsum']:.2f}, i2t R@1 {m['i2t_r1']:.2f}, t2i R@1 {m['t2i_r1']:.2f}, "
          f"i2t medr {m['i2t_medr']:.0f}, t2i medr {m['t2i_medr']:.0f}")
    print(f"itmatch engine : {t_engine:8.3f} s")
    print(f"argsort loop   : {t_loop:8.3f} s")
    print(f"speed-up       : {t_loop / t_engine:8.1f} x")


if __name__ == "__main__":
    main()
