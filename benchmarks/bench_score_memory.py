"""Peak memory of evaluation: the matrix held in memory vs spilled to a memory-mapped file.

A score model (pairs scored jointly from fragments, here TERAN-style MrSw) is evaluated on 5,000
images x 25,000 captions through the metric engine, which first computes every score once from the
model's row blocks (`scores.materialise`, for exact ties). Arm "memory" holds that matrix in RAM
(the default up to `scores.DENSE_BYTES`, 1 GiB); arm "spill" forces the path of larger matrices: the
blocks are written to a temporary .npy that the metrics read memory-mapped. Each arm runs in a fresh
process, so peak RSS is its own; the memory reported is the peak RSS above the RSS just before
scoring (encodings and libraries already loaded). Peak RSS counts the mapped file's pages too, but
those are page cache that the kernel can drop, not anonymous memory; `anon_extra_mib` is the
anonymous part (RssAnon sampled every 20 ms, peak above the start).

With `--model global` the encodings are global embeddings (`--dim`, default 1024) scored through
`embedding_scores` (dot products in row blocks):

    python benchmarks/bench_score_memory.py [--images 5000] [--captions-per-image 5] [--threads 1]
    python benchmarks/bench_score_memory.py --model global --images 25000 --arms spill --threads 1

Prints each arm and the dense matrix's size (through the harness, benchmarks/harness.py: threads,
load average and versions are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402


def run_arm(arm: str, n_img: int, per_image: int, threads: int, model: str = "score", dim: int = 1024) -> dict:
    import numpy as np
    import torch

    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import embedding_scores, score_model
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
        return measure(arm, lambda: embedding_scores(img_emb, txt_emb), c2i, evaluate_sims)
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

    return measure(arm, lambda: score_model(ScoreModel(), img, txt), c2i, evaluate_sims)


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(arm: str, make_source, c2i, evaluate_sims) -> dict:
    """Peak RSS above the RSS just before scoring (encodings and libraries loaded), time, and rSum."""
    from itmatch.evaluation import scores

    if arm == "spill":
        scores.DENSE_BYTES = 0  # the path of a matrix over the in-memory bound
    reset_peak_rss()
    before, anon_before = rss_mib(), rss_anon_mib()
    anon_peak, done = [anon_before], threading.Event()

    def sample() -> None:  # RssAnon has no kernel-kept peak: sample it
        while not done.wait(0.02):
            anon_peak[0] = max(anon_peak[0], rss_anon_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    metrics = evaluate_sims(make_source(), "plain", caption_to_image=c2i)["metrics"]
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"arm": arm, "seconds": round(seconds, 2), "encodings_mib": round(before, 1),
            "peak_extra_mib": round(peak_rss_mib() - before, 1),
            "anon_extra_mib": round(anon_peak[0] - anon_before, 1), "rsum": round(metrics["rsum"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["score", "global"], default="score")
    p.add_argument("--dim", type=int, default=1024, help="embedding width of --model global")
    p.add_argument("--arms", default="memory,spill", help="comma-separated: memory, spill")
    p.add_argument("--json", default=None, help="append the record to this file as a JSON line")
    p.add_argument("--arm", choices=["memory", "spill"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.images, args.captions_per_image, args.threads, args.model, args.dim)))
        return
    bench = Bench(f"bench_score_memory: {args.model} model, matrix in memory vs spilled", args)
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
        assert results["memory"]["rsum"] == results["spill"]["rsum"], "the two arms disagree on the metrics"
    values = {"images": args.images, "captions": n_cap, "dense_matrix_mib": round(dense_mib)}
    for arm, r in results.items():
        values[f"{arm}_peak_extra_mib"] = r["peak_extra_mib"]
        values[f"{arm}_anon_extra_mib"] = r["anon_extra_mib"]
        values[f"{arm}_seconds"] = r["seconds"]
        values["rsum"] = r["rsum"]
    values["rss_before_scoring_mib"] = max(r["encodings_mib"] for r in results.values())
    if len(results) == 2:
        values["ratio_seconds_spill_memory"] = round(results["spill"]["seconds"] / results["memory"]["seconds"], 2)
    bench.record(f"{args.images} x {n_cap} {args.model} model, peak RSS above the RSS before scoring", values)


if __name__ == "__main__":
    main()
