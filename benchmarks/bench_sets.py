"""Benchmark: set similarity (similarity/sets.py) against single-vector scoring, and the top-k pairs
shortcut against the exact assignment.

    PYTHONPATH=src python benchmarks/bench_sets.py [--rounds 5] [--dim 1024] [--k 4]
        [--run RUN_FOLDER_OF_A_TRAINED_SET_MODEL --split test]

1. training: similarity + hardest-negative hinge, forward and backward, on 128 x 128 pairs; the
   single-vector step (dot products) against each set similarity at K elements per set.
2. evaluation: every score of 1,000 images x 5,000 captions read block by block through the
   engine's source (`evaluation.scores.model_scores`), single-vector against the exact maximal pair
   assignment (and smooth-Chamfer, top-k). Memory: each set tile holds at most
   `TILE_ELEMENTS` floats; the script also reports the peak RSS of each arm, each in a fresh process.
3. `--run`: on a trained model's encodings of a split, rankings of the top-k pairs inference
   (k = 1..K*K) against the exact assignment: top-1 agreement, top-10 overlap, rSum of each.
4. `--maxpair-paths` (alone): the scoring path `maxpair_table_scores` against the cosine tensor path
   it replaced and single-vector, through benchmarks/harness.py (paired per-round ratios).
Arms alternate in rounds within one run; medians are printed with their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from itmatch.objectives.ranking import HingeLoss
from itmatch.similarity.dense import dot_similarity, l2_normalize
from itmatch.similarity.sets import SetSimilarity, element_cosines


def unit(*shape, seed=0):
    return l2_normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounds(arms: dict, n: int) -> dict[str, float]:
    """Median seconds of each arm over n rounds, arms alternating within each round (after a warm-up)."""
    for fn in arms.values():
        fn()
    times = {name: [] for name in arms}
    for _ in range(n):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, med: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    print("| arm | median s | x " + base + " |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.4f} | {t / med[base]:.2f} |")


def training_step(args) -> None:
    b, d, k = 128, args.dim, args.k
    hinge = HingeLoss(0.2, max_violation=True)
    positives = torch.eye(b, dtype=torch.bool)
    g_img, g_txt = unit(b, d, seed=1), unit(b, d, seed=2)
    s_img, s_txt = unit(b, k, d, seed=3), unit(b, k, d, seed=4)

    def step(sim, img, txt):
        def run():
            a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
            hinge(sim(a, t), positives).backward()
        return run

    arms = {"single-vector": step(dot_similarity, g_img, g_txt)}
    for kind in ("maxpair", "chamfer", "max", "sinkhorn"):
        arms[f"set {kind} K={k}"] = step(SetSimilarity(kind), s_img, s_txt)
    report(f"training: similarity + hardest-negative hinge, fwd+bwd, {b} x {b} pairs, D={d}",
           rounds(arms, args.rounds), "single-vector")


def evaluation_arm(name: str, args):
    from itmatch.evaluation.scores import embedding_scores, model_scores

    n_img, n_cap, d, k = 1000, 5000, args.dim, args.k
    if name == "single-vector":
        img, txt = unit(n_img, d, seed=5), unit(n_cap, d, seed=6)
        return lambda: [b for _, _, b in embedding_scores(img, txt).row_blocks()]
    kind = {"exact maxpair": "maxpair", "exact maxpair, cosine tensor": "maxpair", "chamfer": "chamfer",
            "top-k pairs": "topk"}[name]
    sim = SetSimilarity(kind)
    img, txt = unit(n_img, k, d, seed=7), unit(n_cap, k, d, seed=8)
    score = sim
    if name == "exact maxpair, cosine tensor":  # the path before maxpair_table_scores: (N, M, K, K) cosines, reduced

        def score(i, t):
            return sim.reduce(element_cosines(i, t))

    source = model_scores(score, img, txt, sim.score_block(k, k), pair_similarity=sim.pairs)
    return lambda: [b for _, _, b in source.row_blocks()]


EVAL_ARMS = ("single-vector", "exact maxpair", "exact maxpair, cosine tensor", "chamfer", "top-k pairs")


def evaluation(args) -> None:
    arms = {name: evaluation_arm(name, args) for name in EVAL_ARMS}
    block = SetSimilarity("maxpair").score_block(args.k, args.k)
    report(f"evaluation: all scores of 1,000 x 5,000, D={args.dim}, K={args.k} (set tile {block[0]} x {block[1]})",
           rounds(arms, max(1, args.rounds // 2)), "single-vector")
    sim = SetSimilarity("maxpair")
    img, txt = unit(1000, args.k, args.dim, seed=7), unit(5000, args.k, args.dim, seed=8)
    same, worst = True, 0.0
    for start in range(0, 1000, 250):  # the two maxpair arms' scores, block by block
        new, old = sim(img[start:start + 250], txt), sim.reduce(element_cosines(img[start:start + 250], txt))
        same, worst = same and torch.equal(new, old), max(worst, float((new - old).abs().max()))
    print(f"exact maxpair vs cosine tensor path: bitwise equal {same}, max |difference| {worst:.3g}")
    print("\npeak RSS of each arm (fresh process, one pass):")
    for name in EVAL_ARMS:
        out = subprocess.run([sys.executable, __file__, "--memory-arm", name, "--dim", str(args.dim),
                              "--k", str(args.k)], capture_output=True, text=True, check=True)
        print(f"- {name}: {json.loads(out.stdout.strip().splitlines()[-1])}")


def maxpair_paths(args) -> None:
    """The exact maxpair scoring paths only, through the shared harness (arms rotate within rounds,
    paired per-round ratios): single-vector, `maxpair_table_scores`, the cosine tensor path."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import Bench

    bench = Bench("exact set scoring paths, 1,000 x 5,000", argparse.Namespace(threads=1, rounds=args.rounds,
                                                                             repeats=1, json=None))
    names = ("single-vector", "exact maxpair", "exact maxpair, cosine tensor")
    times = bench.compare({name: evaluation_arm(name, args) for name in names})
    bench.report(times, baseline="single-vector", unit="s", label=f"D={args.dim}, K={args.k}")
    bench.report({name: times[name] for name in names[1:]}, baseline=names[2], unit="s", label="the two paths")
    # a search query: one set against the items of a re-ranking tile (why TABLE_MIN_ITEMS exists)
    from itmatch.similarity.sets import maxpair_scores, maxpair_table_scores

    queries, items = unit(50, args.k, args.dim, seed=9), unit(1024, args.k, args.dim, seed=10)
    arms = {"one query x 1,024: cosine tensor path":
            lambda: [maxpair_scores(element_cosines(queries[q:q + 1], items)) for q in range(50)],
            "one query x 1,024: maxpair_table_scores":
            lambda: [maxpair_table_scores(queries[q:q + 1], items) for q in range(50)]}
    with torch.inference_mode():
        times = bench.compare(arms)
    bench.report(times, baseline="one query x 1,024: cosine tensor path", unit="ms",
                 label="50 single queries, each against 1,024 sets", rate=(50, "queries/s"))


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_arm(args) -> None:
    """Peak RSS growth over the RSS after the inputs exist (Linux: clear_refs resets the peak)."""
    fn = evaluation_arm(args.memory_arm, args)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"rss_before_MiB": round(before / 1024, 1), "peak_growth_MiB": round((peak - before) / 1024, 1)}))


def topk_agreement(args) -> None:
    """Rankings of the top-k shortcut against the exact assignment on a trained model's encodings."""
    import itmatch
    from itmatch.checkpoint import read_checkpoint_config, resolve_checkpoint
    from itmatch.data.setup import load_configured_split
    from itmatch.evaluation.encode import encode_captions, encode_images
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import model_scores

    model, _, tokenizer = itmatch.load(args.run)
    cfg = model.cfg
    run_cfg = read_checkpoint_config(resolve_checkpoint(args.run))
    split = load_configured_split(run_cfg.data, args.split)
    img = encode_images(model, split, cfg, 256)
    txt = encode_captions(model, split, tokenizer, cfg, 256)
    k = img.shape[1]
    protocol = "scenes" if split.relevance is not None else "plain"

    def scores(sim):
        return model_scores(sim, img, txt, sim.score_block(k, k)).dense()

    exact = torch.from_numpy(scores(SetSimilarity("maxpair", model.set_similarity.scaling)))
    top_exact = exact.topk(10, dim=1).indices
    base = evaluate_sims(exact.numpy(), protocol, split)["metrics"]["rsum"]
    print(f"\ntop-k pairs vs exact assignment on {args.run} ({args.split}: {img.shape[0]} x {txt.shape[0]}, K={k}); "
          f"exact rSum {base:.2f}")
    print("| k | top-1 agreement i2t % | top-10 overlap i2t % | top-1 agreement t2i % | rSum |\n|---|---|---|---|---|")
    for kk in range(1, k * k + 1):
        approx = torch.from_numpy(scores(SetSimilarity("topk", model.set_similarity.scaling, topk=kk)))
        top = approx.topk(10, dim=1).indices
        agree = (top[:, 0] == top_exact[:, 0]).double().mean() * 100
        overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top_exact)]).double()
        t2i = (approx.argmax(0) == exact.argmax(0)).double().mean() * 100
        rsum = evaluate_sims(approx.numpy(), protocol, split)["metrics"]["rsum"]
        print(f"| {kk} | {agree:.1f} | {overlap.mean() * 10:.1f} | {t2i:.1f} | {rsum:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--run", default=None, help="a trained set model's run folder or checkpoint (part 3)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--maxpair-paths", action="store_true",
                    help="only time the exact maxpair scoring paths against single-vector (harness, --rounds rounds)")
    ap.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_arm:
        memory_arm(args)
        return
    if args.maxpair_paths:
        maxpair_paths(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if not args.skip_timing:
        training_step(args)
        evaluation(args)
    if args.run:
        topk_agreement(args)


if __name__ == "__main__":
    main()
