"""Peak memory of evaluating a `score` model at COCO-5K size: block scoring vs the dense matrix.

A score model (pairs scored jointly from fragments, here TERAN-style MrSw) is evaluated on 5,000
images x 25,000 captions through the metric engine. Arm "blocks" lets the engine read the model's
score source tile by tile; arm "dense" first materialises the 5,000 x 25,000 float32 matrix (what
evaluation did before the model contract) and ranks that. Each arm runs in a fresh process, so
peak RSS is its own; the memory reported is the peak RSS above the RSS just before scoring
(encodings and libraries already loaded).

    python benchmarks/bench_score_memory.py [--images 5000] [--captions-per-image 5] [--threads 2]

Prints both arms, the dense matrix's size, and the ratio blocks / dense of the extra peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def run_arm(arm: str, n_img: int, per_image: int, threads: int) -> dict:
    import numpy as np
    import torch

    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import DenseScores, score_model
    from itmatch.models.contract import Fragments
    from itmatch.similarity.fragment import max_region_similarity

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    n_cap, regions, words, dim = n_img * per_image, 8, 6, 16
    img = Fragments(torch.randn(n_img, regions, dim, generator=g), torch.ones(n_img, regions, dtype=torch.bool))
    word_mask = torch.arange(words)[None] < torch.randint(2, words + 1, (n_cap,), generator=g)[:, None]
    txt = Fragments(torch.randn(n_cap, words, dim, generator=g), word_mask)

    class ScoreModel:
        kind = "score"
        score_block = (64, 4096)  # 64 x 4096 pairs x 8 x 6 scores: 48 MiB of intermediates

        @staticmethod
        def similarity(a: Fragments, b: Fragments) -> torch.Tensor:
            return max_region_similarity(a.features, a.mask, b.features, b.mask, word_reduce="mean")

    c2i = np.repeat(np.arange(n_img), per_image)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = rss_mib("VmRSS")
    t0 = time.perf_counter()
    source = score_model(ScoreModel(), img, txt)
    if arm == "dense":
        source = DenseScores(source.dense())
    metrics = evaluate_sims(source, "plain", caption_to_image=c2i)["metrics"]
    return {"arm": arm, "seconds": round(time.perf_counter() - t0, 2),
            "peak_extra_mib": round(rss_mib("VmHWM") - before, 1), "rsum": round(metrics["rsum"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arm", choices=["blocks", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.images, args.captions_per_image, args.threads)))
        return
    dense_mib = args.images * args.images * args.captions_per_image * 4 / 2**20
    with open("/proc/loadavg", encoding="ascii") as f:
        load_before = f.read().split()[0]
    results = {}
    for arm in ("blocks", "dense"):
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--images", str(args.images),
                              "--captions-per-image", str(args.captions_per_image), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[arm]))
    with open("/proc/loadavg", encoding="ascii") as f:
        load_after = f.read().split()[0]
    assert results["blocks"]["rsum"] == results["dense"]["rsum"], "the two arms disagree on the metrics"
    print(f"{args.images} x {args.images * args.captions_per_image} score model, {args.threads} threads, "
          f"load {load_before} -> {load_after}")
    print(f"dense matrix: {dense_mib:.0f} MiB | peak extra memory: "
          f"blocks {results['blocks']['peak_extra_mib']:.0f} MiB, "
          f"dense {results['dense']['peak_extra_mib']:.0f} MiB | ratio blocks/dense "
          f"{results['blocks']['peak_extra_mib'] / results['dense']['peak_extra_mib']:.2f} | time blocks "
          f"{results['blocks']['seconds']:.1f} s, dense {results['dense']['seconds']:.1f} s")


if __name__ == "__main__":
    main()
