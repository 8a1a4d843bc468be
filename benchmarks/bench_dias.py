"""Training-step cost of the DIAS regularizer: vse vs vse + dias, same batches, same run.

Times the full step (forward, loss, backward, AdamW) of `vse_scenes.yaml` and of
`vse_dias_scenes.yaml` (the same model with `loss.regularizers: [dias]`), alternating the two in
rounds so machine noise hits both alike, and prints the ratio; then the regularizer alone (forward +
backward of its terms on fixed embeddings) at the paper's sizes, to show how it scales with batch
size N (spatial terms: N x N) and embedding size d (dimension term: d x d).

    python benchmarks/bench_dias.py [--data scenes:small] [--steps 20] [--rounds 3] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import make_stepper, training_batches  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.batch import positive_mask  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.objectives.dias import DiasConfig, DIASRegularizer  # noqa: E402


def timed(step, batches) -> float:
    t0 = time.perf_counter()
    for img, txt in batches:
        step(img, txt)
    return (time.perf_counter() - t0) / len(batches)


def regularizer_only(n: int, d: int, regions: int = 36, words: int = 12, repeats: int = 5) -> float:
    """ms per forward + backward of the DIAS terms alone on random embeddings."""
    g = torch.Generator().manual_seed(0)
    reg = DIASRegularizer(DiasConfig())
    img_frag = torch.randn(n, regions, d, generator=g, requires_grad=True)
    txt_frag = torch.randn(n, words, d, generator=g, requires_grad=True)
    out = {"img_frag": img_frag, "txt_frag": txt_frag, "img_mask": torch.ones(n, regions, dtype=torch.bool),
           "txt_mask": torch.arange(words)[None, :] < torch.randint(4, words + 1, (n, 1), generator=g),
           "img": img_frag.mean(1), "txt": txt_frag.mean(1)}
    positives = positive_mask(torch.arange(n), torch.arange(n))
    reg(out, positives)["loss"].backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        reg(out, positives)["loss"].backward()
    return 1000 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and method")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    common = [f"data.root={args.data}", f"train.batch_size={args.batch_size}"]
    vse_cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", common)
    dias_cfg = load_config(PACKAGED_CONFIGS / "vse_dias_scenes.yaml", common)
    root = resolve_data_root(vse_cfg.data)
    train = load_configured_split(vse_cfg.data, "train", root)
    tokenizer = build_tokenizer(vse_cfg.model.text, train.captions)
    batches = training_batches(vse_cfg, train, tokenizer, args.steps + 2)
    warm, timed_batches = batches[:2], batches[2:]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"embed {vse_cfg.model.embed_dim}, {len(timed_batches)} steps x {args.rounds} rounds, data {root}")
    steppers = {"vse": make_stepper(vse_cfg, tokenizer), "vse+dias": make_stepper(dias_cfg, tokenizer)}
    for step in steppers.values():
        timed(step, warm)
    best = {name: float("inf") for name in steppers}
    for _ in range(args.rounds):  # alternate, keep each method's best round
        for name, step in steppers.items():
            best[name] = min(best[name], timed(step, timed_batches))
    for name, sec in best.items():
        print(f"train step {name:9s} {1000 * sec:8.1f} ms   {args.batch_size / sec:7.0f} samples/s")
    print(f"vse+dias / vse step time: {best['vse+dias'] / best['vse']:.3f}x")
    for n, d in ((128, 256), (128, 1024), (256, 1024)):
        print(f"DIAS terms alone, N={n:3d} d={d:4d}: {regularizer_only(n, d):7.1f} ms forward+backward")


if __name__ == "__main__":
    main()
