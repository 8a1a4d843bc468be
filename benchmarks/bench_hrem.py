"""Cost of HREM relative to VSE-infinity, measured in one run on the same batches.

  - training step (forward, loss, backward, AdamW) on the scenes shapes (batch 128, 12 regions x
    1280-d, d=256): vse (GPO), hrem's fragment level alone (instance level not yet on), hrem with the
    instance-level graph (fusion, standalone);
  - the same on the paper's shapes (batch 128, 36 regions x 2048-d, 32 words, d=1024, BiGRU) on
    synthetic features: vse vs hrem fusion, plus the instance-level objective alone;
  - encoding at inference: a trained hrem model holds no relation module, so encoding with the
    instance level trained on or off is the same model and costs the same; vse for reference.

    python benchmarks/bench_hrem.py [--data scenes:small] [--steps 20] [--paper-steps 3] [--no-paper]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import encode_rates, train_rate, training_batches  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.batch import ImageBatch, TextBatch  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import WordVocab, build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model, build_objective  # noqa: E402
from itmatch.objectives.base import TrainProgress  # noqa: E402

INSTANCE_ON = "hrem.instance_warmup_steps=0"
INSTANCE_OFF = "hrem.instance_warmup_steps=1000000000"


def paper_batches(n_batches: int, vocab: WordVocab, n: int = 128, regions: int = 36, words: int = 32):
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        idx = torch.arange(b * n, (b + 1) * n)
        feats = torch.randn(n, regions, 2048, generator=g).relu()
        tokens = torch.randint(2, vocab.vocab_size, (n, words), generator=g)
        ones = torch.ones(n, words, dtype=torch.bool)
        img = ImageBatch(idx, feats, torch.ones(n, regions, dtype=torch.bool))
        out.append((img, TextBatch(tokens, ones, idx, idx)))
    return out


def objective_ms(cfg, batches, repeats: int) -> float:
    """Forward + backward of the instance-level objective alone, on embeddings and fragments of a batch."""
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    objective = build_objective(cfg, model)
    with torch.no_grad():
        out = model(*batches[0])
    out = {k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v) for k, v in out.items()}
    progress = TrainProgress(epoch=1, step=10**6)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        objective(out, *batches[0], progress)["loss"].backward()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times[1:])


VOCAB = WordVocab.build([" ".join(f"w{i}" for i in range(2000))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--paper-steps", type=int, default=3)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-shape measurements (slow on CPU)")
    args = ap.parse_args()

    def cfg(name, *extra):
        return load_config(PACKAGED_CONFIGS / name, [f"data.root={args.data}", "sampler.kind=random", *extra])

    vse = cfg("vse_scenes.yaml")
    root = resolve_data_root(vse.data)
    train = load_configured_split(vse.data, "train", root)
    test = load_configured_split(vse.data, "test", root)
    tok = build_tokenizer(vse.model.text, train.captions)
    batches = training_batches(vse, train, tok, args.steps + 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"-- scenes shapes ({root}): batch 128, 12 regions x 1280-d, d=256, {args.steps} timed steps")
    variants = {
        "vse (GPO)": vse,
        "hrem fragment level only": cfg("hrem_scenes.yaml", INSTANCE_OFF),
        "hrem fusion (full)": cfg("hrem_scenes.yaml", INSTANCE_ON),
        "hrem standalone (full)": cfg("hrem_scenes_standalone.yaml", INSTANCE_ON),
    }
    base = None
    for name, c in variants.items():
        rate = train_rate(c, train, tok, args.steps, batches)
        base = base or rate
        print(f"train {name:26s} {rate:7.0f} samples/s   step cost vs vse {base / rate:5.2f}x", flush=True)
    enc = {"vse": vse, "hrem (instance level on)": cfg("hrem_scenes.yaml", INSTANCE_ON),
           "hrem (no relation module)": cfg("hrem_scenes.yaml", INSTANCE_OFF)}
    for name, c in enc.items():
        img, txt = encode_rates(c, test, tok, 512)
        n_params = sum(p.numel() for p in build_model(c, tok).parameters())
        print(f"encode {name:26s} {img:7.0f} images/s {txt:7.0f} captions/s   model {n_params / 1e6:.3f}M params",
              flush=True)

    if args.no_paper:
        return
    print(f"-- paper shapes (synthetic): batch 128, 36 regions x 2048-d, 32 words, d=1024, BiGRU, "
          f"{args.paper_steps} timed steps")

    def paper_cfg(name, *extra):
        return load_config(PACKAGED_CONFIGS / name, ["sampler.kind=random", *extra])

    pb = paper_batches(args.paper_steps + 3, VOCAB)
    base = None
    for name, c in (("vse (GPO)", paper_cfg("vse_f30k_precomp_bigru.yaml")),
                    ("hrem fragment level only", paper_cfg("hrem_f30k_precomp_bigru.yaml", INSTANCE_OFF)),
                    ("hrem fusion (full)", paper_cfg("hrem_f30k_precomp_bigru.yaml", INSTANCE_ON))):
        rate = train_rate(c, None, VOCAB, args.paper_steps, pb)
        base = base or rate
        print(f"train {name:26s} {rate:7.1f} samples/s   step cost vs vse {base / rate:5.2f}x", flush=True)
    for mech in ("fusion", "standalone"):
        ms = objective_ms(paper_cfg("hrem_f30k_precomp_bigru.yaml", f"hrem.mechanism={mech}"), pb, 3)
        print(f"instance-level objective alone ({mech}): {ms:7.0f} ms forward+backward per batch of 128", flush=True)


if __name__ == "__main__":
    main()
