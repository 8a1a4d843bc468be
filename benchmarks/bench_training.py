"""Training and encoding throughput of the default scenes config, GPO against mean pooling.

Through the harness (benchmarks/harness.py), on the same batches, alternating in rounds:
  - a training step of `vse` (forward, loss, backward, clipping, AdamW) with GPO pooling against the
    same step with mean pooling (the baseline for what GPO costs);
  - the pooling alone (forward + backward of GPO and of mean pooling on the image and caption
    fragments of one batch), to show where the step's difference comes from;
  - encoding items/s at inference (images and captions, eval mode, no gradients).

    python benchmarks/bench_training.py [--data DIR] [--threads 1] [--rounds 5] [--repeats 5] [--batch-size 128]

Without --data it uses the small scenes preset from the itmatch cache (generated if missing).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_arguments  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.datasets import CaptionDataset, EpochSampler, ImageDataset, PairDataset, make_loader  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model, build_objective  # noqa: E402
from itmatch.objectives.base import TrainProgress  # noqa: E402
from itmatch.training.optim import build_optimizer  # noqa: E402


def make_stepper(cfg, tokenizer, cpu_kernels: bool = True):
    """One full training step (forward, loss, backward, clipping, AdamW) of `cfg`'s method, seed 0.

    `cpu_kernels=False` runs the implementation before the CPU fast paths, for a before/after in one
    run: GPO through its generic torch path (numpy argsort + gather, `nn.GRU` on packed sequences)
    and the fragment self-attention (HREM, TERAN) on the padded batch."""
    from itmatch.encoders.fragments import FragmentSelfAttention
    from itmatch.encoders.pooling import GPO

    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    for module in model.modules():
        if isinstance(module, GPO):
            module.cpu_kernels = cpu_kernels
        if isinstance(module, FragmentSelfAttention):
            module.packed = cpu_kernels
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


def cycling(step, batches):
    """A no-argument arm for the harness: each call runs `step` on the next batch, cycling."""
    it = itertools.cycle(batches)
    return lambda: step(*next(it))


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


def pooling_arms(cfg, tokenizer, batch) -> dict:
    """Forward + backward of each pooler alone on one batch's image and caption fragments, and GPO's parts,
    each with its CPU kernel and through the generic torch path."""
    from itmatch.encoders.pooling import GPO, MeanPool, descending_order, rank_keys, set_sizes

    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).train()
    with torch.no_grad():
        out = model(*batch)
    frags = [(out["img_frag"].detach().requires_grad_(True), out["img_mask"]),
             (out["txt_frag"].detach().requires_grad_(True), out["txt_mask"])]
    gpo, generic = GPO(), GPO()
    generic.load_state_dict(gpo.state_dict())
    generic.cpu_kernels = False

    def arm(pool):
        def run():
            for x, mask in frags:
                pool(x, mask).sum().backward()
        return run

    def weights_only(module):
        return lambda x, mask: module.rank_weights(set_sizes(mask), int(mask.sum(1).max()))

    def order_only(fn):
        def run():
            for x, mask in frags:
                fn(x, mask)
        return run

    return {"mean pooling": arm(MeanPool()), "GPO": arm(gpo), "GPO, generic torch path": arm(generic),
            "GPO part: rank weights (numpy GRU)": arm(weights_only(gpo)),
            "GPO part: rank weights (nn.GRU packed)": arm(weights_only(generic)),
            "GPO part: order (value sort of keys)": order_only(rank_keys),
            "GPO part: order (numpy argsort)": order_only(lambda x, m: descending_order(x, m, x.shape[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches the steps cycle through")
    args = add_arguments(ap, rounds=5, repeats=5).parse_args()
    bench = Bench("bench_training: vse step, GPO vs mean pooling", args)

    overrides = [f"data.root={args.data}", f"train.batch_size={args.batch_size}"]
    cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", overrides)
    mean_cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", [*overrides, "model.pooling=mean"])
    root = resolve_data_root(cfg.data)
    train = load_configured_split(cfg.data, "train", root)
    test = load_configured_split(cfg.data, "test", root)
    tokenizer = build_tokenizer(cfg.model.text, train.captions)
    batches = training_batches(cfg, train, tokenizer, args.batches)

    arms = {"vse, mean pooling": cycling(make_stepper(mean_cfg, tokenizer), batches),
            "vse, GPO (default)": cycling(make_stepper(cfg, tokenizer), batches),
            "vse, GPO generic torch path": cycling(make_stepper(cfg, tokenizer, cpu_kernels=False), batches)}
    step = bench.report(bench.compare(arms, warmup=2), baseline="vse, mean pooling",
                        label=f"training step, batch {args.batch_size}, data {root}",
                        rate=(args.batch_size, "samples/s"))
    bench.report(bench.compare(pooling_arms(cfg, tokenizer, batches[0])), baseline="mean pooling",
                 label="pooling alone (image + caption fragments of one batch), forward + backward")
    img_rate, txt_rate = encode_rates(cfg, test, tokenizer, 512)
    gpo_min = step["arms"]["vse, GPO (default)"]["min"]
    bench.record("encoding at inference (GPO)", {"images_per_s": round(img_rate), "captions_per_s": round(txt_rate),
                                                 "epoch_25000_pairs_s": round(25000 / args.batch_size * gpo_min)})


if __name__ == "__main__":
    main()
