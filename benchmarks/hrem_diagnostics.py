"""Two no-training diagnostics of HREM on scenes (docs/methods/hrem.md, "Diagnostics").

1. Precision of the instance graph's cross-modal edges: on batches of test pairs (N images, one
   caption each), each image keeps its first tau*N captions by the fragment matching value p (Eq. 6-7),
   as HREM's connection matrix A does; the precision is the share of kept (image, caption) edges that
   the relevance matrix marks relevant, against the batch's base rate (any edge) and against edges
   chosen by the global cosine instead of p. Batches are random, or neighbour batches (P clusters x K
   images by k-means on the run's own test image embeddings, as the sampler builds them).
2. Mean cosine between hard-negative twin images (same objects, one swap) under each run, against the
   mean cosine of random image pairs: HREM's instance interaction mixes neighbours, which could pull
   twins together.

    python benchmarks/hrem_diagnostics.py --data /work/data/scenes-small \
        --runs RUN [RUN ...] [--batches 8] [--tau 0.5]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

import itmatch
from itmatch.data.datasets import PairDataset
from itmatch.data.precomp import load_split
from itmatch.data.samplers import kmeans
from itmatch.evaluation.encode import encode_images
from itmatch.objectives.relations.graph import keep_first, neighbour_count
from itmatch.similarity.fragment import fragment_matching


def run_config(run: Path):
    from itmatch.config import load_config

    return load_config(run / "config.yaml")


def image_globals(model, split, cfg) -> torch.Tensor:
    emb = encode_images(model, split, cfg.model, 256)  # vse and hrem are `global` models: (N, d)
    return torch.nn.functional.normalize(emb.float(), dim=1)


def batches(split, emb: torch.Tensor, n: int, count: int, kind: str, seed: int) -> list[np.ndarray]:
    """`count` lists of n image rows: random, or P = n/8 distinct k-means clusters x K = 8 images."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return [rng.choice(split.n_images, n, replace=False) for _ in range(count)]
    labels = kmeans(emb, max(2 * n // 8, split.n_images // n), seed).numpy()
    members = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    big = [m for m in members if len(m) >= 8]
    out = []
    for _ in range(count):
        chosen = rng.choice(len(big), min(n // 8, len(big)), replace=False)
        out.append(np.concatenate([rng.choice(big[c], 8, replace=False) for c in chosen]))
    return out


@torch.inference_mode()
def edge_precision(model, tokenizer, split, cfg, rows: np.ndarray, tau: float, seed: int,
                   matching: str | None = None) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    by_image = {}
    for c, i in enumerate(split.caption_to_image):
        by_image.setdefault(int(i), []).append(c)
    caps = [int(rng.choice(by_image[int(i)])) for i in rows]
    ds = PairDataset(split, tokenizer, max_length=cfg.model.text.max_length, train=False)
    img_b, txt_b = ds.collate([ds[c] for c in caps])
    out = model(img_b, txt_b)
    m = fragment_matching(out["img_frag"].float(), out["img_mask"], out["txt_frag"].float(), out["txt_mask"],
                          cfg.hrem.topk, matching or cfg.hrem.matching)
    rel = torch.as_tensor(split.relevance[caps][:, rows].toarray().T, dtype=torch.bool)  # (N_img, N_txt)
    k = neighbour_count(tau, len(rows))
    by_p = keep_first(m.p_i2t, k)
    by_cos = keep_first(out["img"].float() @ out["txt"].float().T, k)
    lengths = txt_b.token_mask.sum(1).float()
    return {"base_rate": float(rel.float().mean()), "precision_p": float(rel[by_p].float().mean()),
            "precision_cos": float(rel[by_cos].float().mean()), "own_p": float(by_p.diagonal().float().mean()),
            # words per caption among the edges p keeps, against the batch mean: does p favour long captions?
            "len_kept_p": float((by_p.float() @ lengths).sum() / by_p.sum()), "len_mean": float(lengths.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", nargs="+", required=True, type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--matching", default=None, help="scan | cosine (default: the run's hrem.matching)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split(args.data, args.split)
    twins = np.asarray(split.twins)
    rng = np.random.default_rng(0)
    rand_pairs = rng.choice(split.n_images, (2000, 2))
    rand_pairs = rand_pairs[rand_pairs[:, 0] != rand_pairs[:, 1]]
    print(f"{args.split}: {split.n_images} images, {len(twins)} twin pairs")
    print(f"{'run':<28}{'twin cos':>10}{'random cos':>12}{'twin rel':>10}  edges (tau {args.tau}): "
          "kind: base prec(p) prec(cos) own-caption-kept words(kept by p / all)")
    for run in args.runs:
        model, _, tokenizer = itmatch.load(run)
        model.eval()
        cfg = run_config(run)
        emb = image_globals(model, split, cfg)
        twin_cos = float((emb[twins[:, 0]] * emb[twins[:, 1]]).sum(1).mean())
        rand_cos = float((emb[rand_pairs[:, 0]] * emb[rand_pairs[:, 1]]).sum(1).mean())
        # twins' cosine on the scale from a random pair (0) to identical (1): the embeddings are concentrated
        rel_twin = (twin_cos - rand_cos) / (1 - rand_cos)
        line = f"{run.name:<28}{twin_cos:>10.4f}{rand_cos:>12.4f}{rel_twin:>10.3f}"
        if cfg.model.method == "hrem":
            for kind in ("random", "neighbour"):
                rows = batches(split, emb, args.batch_size, args.batches, kind, seed=1)
                res = [edge_precision(model, tokenizer, split, cfg, r, args.tau, seed=i, matching=args.matching)
                       for i, r in enumerate(rows)]
                mean = {k: statistics.mean(r[k] for r in res) for k in res[0]}
                line += (f"  {kind}: {mean['base_rate']:.3f} {mean['precision_p']:.3f} "
                         f"{mean['precision_cos']:.3f} own {mean['own_p']:.2f} "
                         f"len {mean['len_kept_p']:.1f}/{mean['len_mean']:.1f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
