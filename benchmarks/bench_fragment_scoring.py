"""Scoring a fragment (`score`) model at Flickr30K test size, and the cost of HOSA's t-product fit.

Fragments: 1,000 images x 36 regions and 5,000 captions x 8-16 words (12 on average), d = 1024,
unit-normalised as TERAN's encoder outputs are, drawn around one centre per image (images in 50
groups of look-alikes) so that the first stage has signal to find and can still miss (synthetic: the
timings do not depend on the values). `--run RUN --data DIR` instead prints the shortlist table for a
trained score model on a real split (its test split, protocol plain).

Arms, alternated in rounds within one run:
  sharded    the evaluation engine's path: every block of images x captions of the model's
             score_block (64 x 512) scored by one GEMM (`fragment_scores`), each pair once;
  per-query  a per-query Python loop over the same function: each image against all captions (in
             chunks of 512), as TERAN's evaluation does for one direction; timed on --loop-images
             images and extrapolated to all 1,000;
  per-pair   the same function called on one (image, caption) pair at a time; timed on --pair-count
             pairs and extrapolated to all 5,000,000;
  shortlist  `ShortlistScores` with k = 100 per direction: first stage (mean-pooled fragments), the
             union of both directions' top-k, exact scores for those pairs only; plus the engine
             reading every row block (what evaluation does). The exact stage is TERAN's
             `candidate_scorer` (each image against its candidates' real words, gathered in
             cache-sized chunks: `similarity.fragment.candidate_fragment_scores`);
  shortlist-gather  the same with the generic exact stage (each image's candidate captions gathered
             whole, padded slots included, and passed to `similarity`).
Every arm's multiply-adds (the region-word cosines it computes) and GMAC/s are printed, so the
ratios can be checked against arithmetic.
For k in --ks it prints the shortlist's recall of the ground truth and the change of R@1/5/10 against
exhaustive scoring. The t-product part times one HOSA fit of a training batch (n = 128, l = 12,
m = 36, d = 1024: normal equations, ridge solve, projector, reconstruction, forward + backward)
against the rest of a TERAN training step at d = 1024 (encoders, MrSw over the batch, hinge, backward).
Peak memory: the peak RSS above the RSS before scoring, for 250, 500 and 1,000 images (fixed block).

    python benchmarks/bench_fragment_scoring.py [--threads N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

SPREAD, NOISE = 0.3, 4.0  # synthetic fragments: image offset within its group, fragment noise


def rss_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:  # Linux: resets VmHWM to VmRSS
        f.write("5")


def make_fragments(n_img: int, per_image: int, regions: int, words: int, dim: int, seed: int = 0):
    from itmatch.models.contract import Fragments
    from itmatch.similarity.fragment import unit_fragments

    g = torch.Generator().manual_seed(seed)
    # images in 50 groups of look-alikes, so that retrieval (and the first stage) can be wrong
    groups = torch.randn(50, dim, generator=g)
    centres = groups[torch.randint(0, 50, (n_img,), generator=g)] + SPREAD * torch.randn(n_img, dim, generator=g)
    img = centres[:, None, :] + NOISE * torch.randn(n_img, regions, dim, generator=g)
    img_mask = torch.ones(n_img, regions, dtype=torch.bool)
    n_cap = n_img * per_image
    cap = centres.repeat_interleave(per_image, 0)[:, None, :] + NOISE * torch.randn(n_cap, words + 4, dim, generator=g)
    lengths = torch.randint(words - 4, words + 5, (n_cap,), generator=g)
    cap_mask = torch.arange(words + 4)[None] < lengths[:, None]
    return (Fragments(unit_fragments(img, img_mask), img_mask), Fragments(unit_fragments(cap, cap_mask), cap_mask),
            np.repeat(np.arange(n_img), per_image))


def similarity(a, b):
    from itmatch.similarity.fragment import fragment_scores

    return fragment_scores(a.features, a.mask, b.features, b.mask, normalized=True)


def time_sharded(images, captions, block) -> float:
    from itmatch.evaluation.scores import model_scores

    source = model_scores(similarity, images, captions, block)
    t = time.perf_counter()
    for _ in source.row_blocks():
        pass
    return time.perf_counter() - t


@torch.inference_mode()
def time_per_query(images, captions, n_queries: int) -> float:
    t = time.perf_counter()
    for i in range(n_queries):
        img = images[i:i + 1]
        for c0 in range(0, len(captions), 512):
            similarity(img, captions[c0:c0 + 512])
    return (time.perf_counter() - t) * len(images) / n_queries


@torch.inference_mode()
def time_per_pair(images, captions, n_pairs: int) -> float:
    g = np.random.default_rng(0)
    rows, cols = g.integers(0, len(images), n_pairs), g.integers(0, len(captions), n_pairs)
    t = time.perf_counter()
    for i, j in zip(rows, cols):
        similarity(images[int(i):int(i) + 1], captions[int(j):int(j) + 1])
    return (time.perf_counter() - t) * len(images) * len(captions) / n_pairs


def candidate_scorer(captions):
    """TERAN's `candidate_scorer` for MrSw (models/teran.py), on the synthetic fragments."""
    from itmatch.similarity.fragment import CaptionWords, candidate_fragment_scores

    words = CaptionWords(captions.features, captions.mask)
    return lambda img, cols: candidate_fragment_scores(img.features[0], img.mask[0], words, cols)


def time_shortlist(images, captions, k: int, gather: bool = False):
    from itmatch.evaluation.shortlist import ShortlistScores, mean_pooled

    t = time.perf_counter()
    scorer = None if gather else candidate_scorer(captions)
    source = ShortlistScores(similarity, images, captions, mean_pooled(images), mean_pooled(captions), k, k,
                             candidate_scorer=scorer)
    for _ in source.row_blocks():
        pass
    return time.perf_counter() - t, source


def tproduct_step(dim: int, n: int, words: int, regions: int, rounds: int) -> dict:
    """Seconds of one HOSA fit (forward + backward) vs one TERAN step at the same sizes."""
    from itmatch.config import config_from_dict
    from itmatch.data.batch import ImageBatch, TextBatch
    from itmatch.data.text import WordVocab
    from itmatch.methods.registry import build_model, build_objective
    from itmatch.objectives.base import TrainProgress
    from itmatch.similarity.tproduct import (
        apply_projector,
        normal_equations,
        reconstruction_projector,
        solve_normal_equations,
    )

    vocab = WordVocab.build([" ".join(f"w{i}" for i in range(200))])
    cfg = config_from_dict({"model": {"method": "teran", "embed_dim": dim, "image": {"feature_dim": 2048},
                                      "text": {"word_dim": 300}}, "loss": {"name": "hinge", "sum_warmup_epochs": 0}})
    model = build_model(cfg, vocab).train()
    objective = build_objective(cfg, model)
    g = torch.Generator().manual_seed(0)
    img = ImageBatch(image_index=torch.arange(n), regions=torch.randn(n, regions, 2048, generator=g),
                     region_mask=torch.ones(n, regions, dtype=torch.bool))
    tokens = torch.randint(1, 200, (n, words), generator=g)
    txt = TextBatch(tokens=tokens, token_mask=torch.ones(n, words, dtype=torch.bool), caption_index=torch.arange(n),
                    image_index=torch.arange(n))
    v = torch.randn(n, regions, dim, generator=g, requires_grad=True)
    t = torch.randn(n, words, dim, generator=g, requires_grad=True)
    step_times, fit_times = [], []
    for _ in range(rounds + 1):  # the first round warms up
        t0 = time.perf_counter()
        terms = objective(model(img, txt), img, txt, TrainProgress(epoch=1))
        terms["loss"].backward()
        step_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gram, moment = normal_equations(t, v)
        projector = reconstruction_projector(solve_normal_equations(gram, moment, 0.1), 0.1)
        apply_projector(v, projector).sum().backward()
        fit_times.append(time.perf_counter() - t0)
    return {"teran_step_s": float(np.median(step_times[1:])), "tproduct_fit_s": float(np.median(fit_times[1:]))}


def shortlist_table(model_similarity, images, captions, c2i, ks, first_stage, block, scorer=None) -> None:
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import model_scores
    from itmatch.evaluation.shortlist import ShortlistScores

    exhaustive = model_scores(model_similarity, images, captions, block)
    base = evaluate_sims(exhaustive, "plain", caption_to_image=c2i)["metrics"]
    keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    print("\nshortlist k | pairs scored % | GT pairs in it % | images with a GT caption % | "
          + " | ".join(f"d {k}" for k in keys))
    img_emb, cap_emb = first_stage(images), first_stage(captions)
    for k in ks:
        source = ShortlistScores(model_similarity, images, captions, img_emb, cap_emb, k, k, candidate_scorer=scorer)
        rec = source.recall(c2i)
        got = evaluate_sims(source, "plain", caption_to_image=c2i)["metrics"]
        print(f"{k:11d} | {rec['pairs_scored']:14.2f} | {rec['gt_pairs']:16.2f} | {rec['i2t']:26.2f} | "
              + " | ".join(f"{got[m] - base[m]:+.2f}" for m in keys), flush=True)
    print("exhaustive metrics: " + ", ".join(f"{m} {base[m]:.2f}" for m in keys))


def real_data_table(args) -> None:
    import itmatch
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.encode import encode_captions, encode_images
    from itmatch.evaluation.shortlist import first_stage_embeddings

    model, _, tokenizer = itmatch.load(args.run)
    split = load_split(args.data, args.split)
    images = encode_images(model, split, model.cfg)
    captions = encode_captions(model, split, tokenizer, model.cfg)
    print(f"{args.run} on {args.data} {args.split}: {len(images)} images x {len(captions)} captions")
    shortlist_table(model.similarity, images, captions, split.caption_to_image,
                    [int(x) for x in args.ks.split(",")], lambda e: first_stage_embeddings(model, e), model.score_block,
                    getattr(model, "candidate_scorer", lambda _: None)(captions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the environment)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop-images", type=int, default=50)
    parser.add_argument("--pair-count", type=int, default=2000)
    parser.add_argument("--ks", default="10,50,100,200")
    parser.add_argument("--block", default="64,512")
    parser.add_argument("--run", default=None, help="a trained score model's run folder: real-data shortlist table")
    parser.add_argument("--data", default=None, help="its data folder (with --run)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        return real_data_table(args)
    block = tuple(int(x) for x in args.block.split(","))
    print(f"threads {torch.get_num_threads()} | {args.images} images x {args.images * args.captions_per_image} "
          f"captions, {args.regions} regions, ~{args.words} words, d {args.dim}, block {block}", flush=True)
    images, captions, c2i = make_fragments(args.images, args.captions_per_image, args.regions, args.words, args.dim)

    times: dict[str, list[float]] = {"sharded": [], "per-query": [], "per-pair": [], "shortlist k=100": [],
                                     "shortlist-gather k=100": []}
    shortlist = None
    for r in range(args.rounds):
        times["sharded"].append(time_sharded(images, captions, block))
        times["per-query"].append(time_per_query(images, captions, args.loop_images))
        times["per-pair"].append(time_per_pair(images, captions, args.pair_count))
        seconds, shortlist = time_shortlist(images, captions, 100)
        times["shortlist k=100"].append(seconds)
        times["shortlist-gather k=100"].append(time_shortlist(images, captions, 100, gather=True)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    # multiply-adds of the region-word cosines each arm computes: the dense arms pad every caption to the
    # split's widest (as one tensor holds them); the shortlist's exact stage reads real words only
    padded = len(images) * args.regions * len(captions) * captions.features.shape[1] * args.dim
    short = shortlist.shortlist.tocoo()
    real = int((images.mask.sum(1)[short.row] * captions.mask.sum(1)[short.col]).sum()) * args.dim
    macs = {"sharded": padded, "per-query": padded, "per-pair": padded, "shortlist k=100": real,
            "shortlist-gather k=100": short.nnz * args.regions * captions.features.shape[1] * args.dim}
    print("\nmedian seconds (per-query and per-pair extrapolated from "
          f"{args.loop_images} queries / {args.pair_count} pairs), multiply-adds, GMAC/s:")
    for k, v in med.items():
        print(f"  {k:22s} {v:9.1f} s  {macs[k]:.3e} MAC  {macs[k] / v / 1e9:5.1f} GMAC/s")
    print(f"  per-query / sharded  {med['per-query'] / med['sharded']:.1f}x")
    print(f"  per-pair / sharded   {med['per-pair'] / med['sharded']:.1f}x")
    print(f"  sharded / shortlist  {med['sharded'] / med['shortlist k=100']:.1f}x "
          f"(pairs scored {100 * short.nnz / (len(images) * len(captions)):.2f}%)")
    print(f"  sharded / shortlist-gather  {med['sharded'] / med['shortlist-gather k=100']:.1f}x", flush=True)

    from itmatch.evaluation.shortlist import mean_pooled

    shortlist_table(similarity, images, captions, c2i, [int(x) for x in args.ks.split(",")], mean_pooled, block,
                    candidate_scorer(captions))

    print("\npeak RSS above the RSS before scoring (sharded, same block):")
    for n in (args.images // 4, args.images // 2, args.images):
        sub_i, sub_c = images[:n], captions[:n * args.captions_per_image]
        before = rss_mib("VmRSS")
        reset_peak()
        time_sharded(sub_i, sub_c, block)
        print(f"  {n:5d} images: +{rss_mib('VmHWM') - before:.0f} MiB (dense matrix would be "
              f"{n * n * args.captions_per_image * 4 / 2**20:.0f} MiB; one block's cosines "
              f"{block[0] * block[1] * args.regions * (args.words + 4) * 4 / 2**20:.0f} MiB)", flush=True)

    res = tproduct_step(args.dim, 128, args.words, args.regions, max(2, args.rounds))
    print(f"\nHOSA fit of a batch (n 128, l {args.words}, m {args.regions}, d {args.dim}), forward + backward: "
          f"{res['tproduct_fit_s'] * 1000:.0f} ms; a TERAN training step at the same sizes: "
          f"{res['teran_step_s'] * 1000:.0f} ms ({100 * res['tproduct_fit_s'] / res['teran_step_s']:.0f}% of it)")


if __name__ == "__main__":
    main()
