"""Peak memory of evaluation: block scoring vs the dense matrix (a `score` model, or 1024-d embeddings).

A score model (pairs scored jointly from fragments, here TERAN-style MrSw) is evaluated on 5,000
images x 25,000 captions through the metric engine. Arm "blocks" lets the engine read the model's
score source tile by tile; arm "dense" first materialises the 5,000 x 25,000 float32 matrix (what
evaluation did before the model contract) and ranks that. Each arm runs in a fresh process, so
peak RSS is its own; the memory reported is the peak RSS above the RSS just before scoring
(encodings and libraries already loaded).

With `--model global` the encodings are global embeddings (`--dim`, default 1024) scored through
`embedding_scores` (dot products in row blocks, single pairs gathered in chunks of 8,192). At
25,000 x 125,000 the dense matrix alone would be 11.6 GiB, so that size runs the blocks arm only:

    python benchmarks/bench_score_memory.py [--images 5000] [--captions-per-image 5] [--threads 1]
    python benchmarks/bench_score_memory.py --model global --images 25000 --arms blocks --threads 1

Prints each arm, the dense matrix's size, and the ratio blocks / dense of the extra peak memory
(through the harness, benchmarks/harness.py: threads, load average and versions are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402


def run_arm(arm: str, n_img: int, per_image: int, threads: int, model: str = "score", dim: int = 1024) -> dict:
    import numpy as np
    import torch

    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import DenseScores, embedding_scores, score_model
    from itmatch.models.contract import Fragments
    from itmatch.similarity.fragment import max_region_similarity

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    c2i = np.repeat(np.arange(n_img), per_image)
    if model == "global":
        n_cap = n_img * per_image
        img_emb = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
        txt_emb = torch.nn.functional.normalize(img_emb[c2i] + 1.5 * torch.randn(n_cap, dim, generator=g) / dim**0.5,
                                                dim=1)
        return measure(arm, lambda: embedding_scores(img_emb, txt_emb), c2i, DenseScores, evaluate_sims)
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

    return measure(arm, lambda: score_model(ScoreModel(), img, txt), c2i, DenseScores, evaluate_sims)


def measure(arm: str, make_source, c2i, dense_scores, evaluate_sims) -> dict:
    """Peak RSS above the RSS just before scoring (encodings and libraries loaded), time, and rSum."""
    reset_peak_rss()
    before = rss_mib()
    t0 = time.perf_counter()
    source = make_source()
    if arm == "dense":
        source = dense_scores(source.dense())
    metrics = evaluate_sims(source, "plain", caption_to_image=c2i)["metrics"]
    return {"arm": arm, "seconds": round(time.perf_counter() - t0, 2), "encodings_mib": round(before, 1),
            "peak_extra_mib": round(peak_rss_mib() - before, 1), "rsum": round(metrics["rsum"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["score", "global"], default="score")
    p.add_argument("--dim", type=int, default=1024, help="embedding width of --model global")
    p.add_argument("--arms", default="blocks,dense", help="comma-separated: blocks, dense")
    p.add_argument("--json", default=None, help="append the record to this file as a JSON line")
    p.add_argument("--arm", choices=["blocks", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.images, args.captions_per_image, args.threads, args.model, args.dim)))
        return
    bench = Bench(f"bench_score_memory: {args.model} model, blocks vs dense", args)
    n_cap = args.images * args.captions_per_image
    dense_mib = args.images * n_cap * 4 / 2**20
    results = {}
    for arm in args.arms.split(","):
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--images", str(args.images),
                              "--captions-per-image", str(args.captions_per_image), "--threads", str(args.threads),
                              "--model", args.model, "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    if len(results) == 2:
        assert results["blocks"]["rsum"] == results["dense"]["rsum"], "the two arms disagree on the metrics"
    values = {"images": args.images, "captions": n_cap, "dense_matrix_mib": round(dense_mib)}
    for arm, r in results.items():
        values[f"{arm}_peak_extra_mib"] = r["peak_extra_mib"]
        values[f"{arm}_seconds"] = r["seconds"]
        values["rsum"] = r["rsum"]
    values["rss_before_scoring_mib"] = max(r["encodings_mib"] for r in results.values())
    if len(results) == 2:
        ratio = results["blocks"]["peak_extra_mib"] / results["dense"]["peak_extra_mib"]
        values["ratio_blocks_dense"] = round(ratio, 2)
    bench.record(f"{args.images} x {n_cap} {args.model} model, peak RSS above the RSS before scoring", values)


if __name__ == "__main__":
    main()
