"""Cost of HREM relative to VSE-infinity, measured in one run on the same batches.

  - training step: vse (GPO) vs hrem with the instance-level graph on (fusion and standalone), and
    hrem's fragment level alone (graph off), on the scenes shapes (batch 128, 12 regions x 1280-d);
  - the paper's shapes (batch 128, 36 regions x 2048-d, 32 words, d=1024) on synthetic features, for
    the instance-level objective alone (fragment matching + graph + interaction + loss);
  - encoding at inference: hrem's model has no relation module, so it costs what its encoders and
    fragment attention cost, with or without the training objective around.

    python benchmarks/bench_hrem.py [--data scenes:small] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import encode_rates, train_rate  # noqa: E402

from itmatch.config import load_config  # noqa: E402
from itmatch.data.batch import ImageBatch, TextBatch  # noqa: E402
from itmatch.data.datasets import EpochSampler, PairDataset  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_objective  # noqa: E402
from itmatch.training.commands import PACKAGED_CONFIGS  # noqa: E402
from itmatch.training.data_setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.training.loop import TrainProgress  # noqa: E402


def paper_shape_objective_ms(mechanism: str, repeats: int = 5) -> float:
    cfg = load_config(PACKAGED_CONFIGS / "hrem_f30k_precomp_bigru.yaml",
                      [f"hrem.mechanism={mechanism}", "hrem.instance_warmup_steps=0"])
    objective = build_objective(cfg)
    g = torch.Generator().manual_seed(0)
    n, d = 128, 1024
    out = {
        "img": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(),
        "txt": torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(),
        "img_frag": torch.randn(n, 36, d, generator=g), "img_mask": torch.ones(n, 36, dtype=torch.bool),
        "txt_frag": torch.randn(n, 32, d, generator=g), "txt_mask": torch.ones(n, 32, dtype=torch.bool),
    }
    idx = torch.arange(n)
    img_b, txt_b = ImageBatch(idx), TextBatch(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool), idx, idx)
    progress = TrainProgress(epoch=1, step=10**6)
    objective(out, img_b, txt_b, progress)["loss"].backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        objective(out, img_b, txt_b, progress)["loss"].backward()
    return 1000 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    def cfg(name, *extra):
        return load_config(PACKAGED_CONFIGS / name, [f"data.root={args.data}", "sampler.kind=random", *extra])

    vse = cfg("vse_scenes.yaml")
    root = resolve_data_root(vse.data)
    train = load_configured_split(vse.data, "train", root)
    test = load_configured_split(vse.data, "test", root)
    tok = build_tokenizer(vse.model.text, train.captions)
    ds = PairDataset(train, tok, max_length=40, train=True, token_noise=0.2, region_drop=0.2, seed=0)
    sampler = EpochSampler(len(ds), 0, 128)
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    batches = [b for _, b in zip(range(args.steps + 3), loader)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, scenes batch 128, {args.steps} timed steps")

    rates = {
        "vse (GPO)": train_rate(vse, train, tok, args.steps, batches),
        "hrem fragment level only": train_rate(cfg("hrem_scenes.yaml", "hrem.instance_warmup_steps=1000000000"),
                                               train, tok, args.steps, batches),
        "hrem fusion (full)": train_rate(cfg("hrem_scenes.yaml", "hrem.instance_warmup_steps=0"),
                                         train, tok, args.steps, batches),
        "hrem standalone (full)": train_rate(cfg("hrem_scenes_standalone.yaml", "hrem.instance_warmup_steps=0"),
                                             train, tok, args.steps, batches),
    }
    base = rates["vse (GPO)"]
    for name, rate in rates.items():
        print(f"train {name:28s} {rate:7.0f} samples/s   step cost vs vse {base / rate:5.2f}x")
    for name, c in (("vse", vse), ("hrem", cfg("hrem_scenes.yaml"))):
        img, txt = encode_rates(c, test, tok, 512)
        print(f"encode {name:5s} (inference)            {img:7.0f} images/s {txt:7.0f} captions/s")
    for mech in ("fusion", "standalone"):
        print(f"paper shapes, instance-level objective ({mech}): {paper_shape_objective_ms(mech):7.0f} ms "
              "forward+backward per batch of 128")


if __name__ == "__main__":
    main()
