"""Training-step cost of the DIAS regularizer: vse vs vse + dias, same batches, same run.

Through the harness (benchmarks/harness.py): the full step (forward, loss, backward, AdamW) of
`vse_scenes.yaml` and of `vse_dias_scenes.yaml` (the same model with `loss.regularizers: [dias]`),
alternating in rounds; then the regularizer alone (forward + backward of its terms on fixed
embeddings) at the paper's sizes, to show how it scales with batch size N (spatial terms: N x N)
and embedding size d (dimension term: d x d).

    python benchmarks/bench_dias.py [--data scenes:small] [--threads 1] [--rounds 5] [--repeats 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import cycling, make_stepper, training_batches  # noqa: E402
from harness import Bench, add_arguments  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.batch import positive_mask  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.objectives.dias import DiasConfig, DIASRegularizer  # noqa: E402


def regularizer_arm(n: int, d: int, regions: int = 36, words: int = 12):
    """Forward + backward of the DIAS terms alone on random embeddings of batch n, width d."""
    g = torch.Generator().manual_seed(0)
    reg = DIASRegularizer(DiasConfig())
    img_frag = torch.randn(n, regions, d, generator=g, requires_grad=True)
    txt_frag = torch.randn(n, words, d, generator=g, requires_grad=True)
    out = {"img_frag": img_frag, "txt_frag": txt_frag, "img_mask": torch.ones(n, regions, dtype=torch.bool),
           "txt_mask": torch.arange(words)[None, :] < torch.randint(4, words + 1, (n, 1), generator=g),
           "img": img_frag.mean(1), "txt": txt_frag.mean(1)}
    positives = positive_mask(torch.arange(n), torch.arange(n))
    return lambda: reg(out, positives)["loss"].backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches the steps cycle through")
    args = add_arguments(ap, rounds=5, repeats=5).parse_args()
    bench = Bench("bench_dias: vse vs vse + dias", args)

    common = [f"data.root={args.data}", f"train.batch_size={args.batch_size}"]
    vse_cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", common)
    dias_cfg = load_config(PACKAGED_CONFIGS / "vse_dias_scenes.yaml", common)
    root = resolve_data_root(vse_cfg.data)
    train = load_configured_split(vse_cfg.data, "train", root)
    tokenizer = build_tokenizer(vse_cfg.model.text, train.captions)
    batches = training_batches(vse_cfg, train, tokenizer, args.batches)

    arms = {"vse": cycling(make_stepper(vse_cfg, tokenizer), batches),
            "vse+dias": cycling(make_stepper(dias_cfg, tokenizer), batches)}
    bench.report(bench.compare(arms, warmup=2), baseline="vse", rate=(args.batch_size, "samples/s"),
                 label=f"training step, batch {args.batch_size}, embed {vse_cfg.model.embed_dim}, data {root}")
    terms = {f"N={n} d={d}": regularizer_arm(n, d) for n, d in ((128, 256), (128, 1024), (256, 1024))}
    bench.report(bench.compare(terms), baseline="N=128 d=256",
                 label="DIAS terms alone, forward + backward (36 regions, 12 words)")


if __name__ == "__main__":
    main()
