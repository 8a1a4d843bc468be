"""Benchmark: itmatch's chunked ranking engine vs the per-query argsort loop of the reference repos.

    python benchmarks/bench_eval.py [--images 5000] [--captions-per-image 5] [--threads 1] [--rounds 3] [--device cpu]

Builds a COCO-5K-sized random similarity matrix (5000 x 25000 by default), computes the standard
R@K / medr / meanr both ways, checks that the ranks agree exactly, then times both through the
harness (benchmarks/harness.py: alternating rounds, min / median, the ratio). Random float scores
have no ties, so both tie policies equal the argsort.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_arguments  # noqa: E402
from itmatch.evaluation.ranking import Ranks, ground_truth_ranks, recall_metrics  # noqa: E402


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
    args = add_arguments(parser, rounds=3, repeats=1).parse_args()
    bench = Bench("bench_eval: ranking engine vs per-query argsort loop", args)

    rng = np.random.default_rng(args.seed)
    n_img, k = args.images, args.captions_per_image
    caption_to_image = np.repeat(np.arange(n_img), k)
    sims = rng.standard_normal((n_img, n_img * k), dtype=np.float32)
    sims[caption_to_image, np.arange(n_img * k)] += 2.5  # a plausible model: recalls well inside (0, 100)
    engine_input = torch.as_tensor(sims, device=args.device) if args.device != "cpu" else sims

    def engine():
        ranks = ground_truth_ranks(engine_input, caption_to_image)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return ranks

    ours, reference = engine(), argsort_loop_ranks(sims, caption_to_image)
    np.testing.assert_array_equal(ours.i2t, reference.i2t)
    np.testing.assert_array_equal(ours.t2i, reference.t2i)
    m = recall_metrics(ours)
    assert m == recall_metrics(reference)
    print(f"metrics agree: rsum {m['rsum']:.2f}, i2t R@1 {m['i2t_r1']:.2f}, t2i R@1 {m['t2i_r1']:.2f}, "
          f"i2t medr {m['i2t_medr']:.0f}, t2i medr {m['t2i_medr']:.0f}")
    arms = {"itmatch engine": engine, "argsort loop": lambda: argsort_loop_ranks(sims, caption_to_image)}
    times = bench.compare(arms, warmup=0)
    record = bench.report(times, baseline="itmatch engine", unit="s",
                          label=f"{n_img} x {n_img * k} similarity matrix, engine on {args.device}")
    print(f"speed-up of the engine: {record['arms']['argsort loop']['ratio_min']:.1f}x (min), "
          f"{record['arms']['argsort loop']['ratio_paired']:.1f}x (paired)")


if __name__ == "__main__":
    main()
