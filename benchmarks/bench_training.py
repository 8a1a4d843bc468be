"""Training and encoding throughput of the default scenes config on this machine.

Measures, in one run and on the same batches:
  - training samples/s of `vse` (forward, loss, backward, AdamW step) with GPO pooling,
  - the same with mean pooling, as a baseline for what GPO costs,
  - encoding items/s at inference (images and captions, eval mode, no gradients).
Ratios are printed against the mean-pooling baseline measured in the same run, because these
machines are noisy and absolute numbers drift between runs.

    python benchmarks/bench_training.py [--data DIR] [--steps 30] [--batch-size 128]

Without --data it uses the small scenes preset from the itmatch cache (generated if missing).
"""

from __future__ import annotations

import argparse
import time

import torch

from itmatch.config import PACKAGED_CONFIGS, load_config
from itmatch.data.datasets import CaptionDataset, EpochSampler, ImageDataset, PairDataset, make_loader
from itmatch.data.setup import load_configured_split, resolve_data_root
from itmatch.data.text import build_tokenizer
from itmatch.methods.registry import build_model, build_objective
from itmatch.objectives.base import TrainProgress
from itmatch.training.optim import build_optimizer


def make_stepper(cfg, tokenizer):
    """One full training step (forward, loss, backward, clipping, AdamW) of `cfg`'s method, seed 0."""
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    objective = build_objective(cfg, model)
    opt = build_optimizer(model, objective, cfg.optim)
    model.train()
    progress = TrainProgress(epoch=1)  # past the hinge warm-up: hardest negatives, as most of training runs

    def step(img, txt):
        terms = objective(model(img, txt), img, txt, progress)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    return step


def train_rate(cfg, split, tokenizer, steps: int, batches) -> float:
    step = make_stepper(cfg, tokenizer)
    for img, txt in batches[:3]:  # warm-up
        step(img, txt)
    t0 = time.perf_counter()
    n = 0
    for img, txt in batches[3 : 3 + steps]:
        step(img, txt)
        n += len(txt)
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def encode_rates(cfg, split, tokenizer, batch_size: int) -> tuple[float, float]:
    model = build_model(cfg, tokenizer).eval()
    images = list(make_loader(ImageDataset(split), batch_size, shuffle=False))
    captions = list(make_loader(CaptionDataset(split, tokenizer, max_length=cfg.model.text.max_length),
                                batch_size, shuffle=False))
    t0 = time.perf_counter()
    n_img = sum(len(model.encode_image(b)) for b in images)
    t1 = time.perf_counter()
    n_txt = sum(len(model.encode_text(b)) for b in captions)
    t2 = time.perf_counter()
    return n_img / (t1 - t0), n_txt / (t2 - t1)


def training_batches(cfg, split, tokenizer, n: int) -> list:
    """The first `n` augmented training batches of an epoch (seed 0), fixed so every timed method sees them."""
    ds = PairDataset(split, tokenizer, max_length=cfg.model.text.max_length, train=True,
                     token_noise=cfg.model.text.token_noise, region_drop=cfg.model.image.region_drop, seed=0)
    sampler = EpochSampler(len(ds), 0, cfg.train.batch_size)
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    return [b for _, b in zip(range(n), loader)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", [f"data.root={args.data}",
                                                             f"train.batch_size={args.batch_size}"])
    root = resolve_data_root(cfg.data)
    train = load_configured_split(cfg.data, "train", root)
    test = load_configured_split(cfg.data, "test", root)
    tokenizer = build_tokenizer(cfg.model.text, train.captions)
    batches = training_batches(cfg, train, tokenizer, args.steps + 3)

    mean_cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", [f"data.root={args.data}", "model.pooling=mean"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} timed steps, data {root}")
    base = train_rate(mean_cfg, train, tokenizer, args.steps, batches)
    gpo = train_rate(cfg, train, tokenizer, args.steps, batches)
    img_rate, txt_rate = encode_rates(cfg, test, tokenizer, 512)
    print(f"train vse (mean pooling, baseline): {base:8.0f} samples/s")
    print(f"train vse (GPO, default config):    {gpo:8.0f} samples/s   ratio to baseline {gpo / base:.2f}x")
    print(f"encode images (inference):          {img_rate:8.0f} images/s")
    print(f"encode captions (inference):        {txt_rate:8.0f} captions/s")
    print(f"one epoch of the default scenes set (25,000 pairs) at this rate: {25000 / gpo:.0f} s")


if __name__ == "__main__":
    main()
