"""Per-term gradient shares of the set objective (maxmatch / dive), to choose the loss weights.

For a few training batches of a config, at initialisation and after `--train-steps` optimizer steps
of the config's own objective, the gradient of each term w.r.t. every model parameter is computed
separately; the table gives ||grad(term)|| unweighted and ||weight * grad(term)|| / ||grad(ranking)||
(the share of the weighted term relative to the ranking loss).

    PYTHONPATH=src python benchmarks/grad_shares_sets.py --config maxmatch_scenes \
        --set data.root=/work/data/scenes-small --batches 4 --train-steps 150
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch


def grad_norm(value: torch.Tensor, params: list) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measure(trainer, batches, progress) -> dict[str, tuple[float, float]]:
    from itmatch.data.batch import pair_masks
    from itmatch.objectives.sets import TERMS

    model, obj = trainer.model, trainer.objective
    params = [p for p in model.parameters() if p.requires_grad]
    w = obj.weights()
    acc: dict[str, list[float]] = {}
    for img_b, txt_b in batches:
        out = model(img_b, txt_b)
        positives, negatives = pair_masks(img_b, txt_b)
        sims = obj.similarity(out["img"], out["txt"])
        rank = obj.ranking(sims, positives, progress, negatives)
        vals = obj.term_values(out, sims, positives, negatives, only=TERMS)
        g_rank = grad_norm(rank, params)
        acc.setdefault("ranking", []).append(g_rank)
        for t, v in vals.items():
            g = grad_norm(v, params)
            acc.setdefault(t, []).append(g)
            acc.setdefault(t + "_share", []).append(w[t] * g / max(g_rank, 1e-12))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="maxmatch_scenes")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from itmatch.config import load_config
    from itmatch.objectives.base import TrainProgress
    from itmatch.objectives.sets import TERMS
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import first_epoch_trainer

    cfg = load_config(args.config, [*args.overrides, f"train.max_steps={max(1, args.train_steps)}",
                                    "train.eval_every_epochs=1000"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer, loader = first_epoch_trainer(cfg, tmp)
        it = iter(loader)
        probe = [next(it) for _ in range(args.batches)]
        progress = TrainProgress(epoch=1, step=0)
        trainer.model.train()
        rows = [("init", measure(trainer, probe, progress))]
        for _step in range(args.train_steps):
            try:
                img_b, txt_b = next(it)
            except StopIteration:
                it = iter(loader)
                img_b, txt_b = next(it)
            trainer._train_step(img_b, txt_b, progress)
        rows.append((f"after {args.train_steps} steps", measure(trainer, probe, progress)))
    w = trainer.objective.weights()
    print(f"config {args.config} {' '.join(args.overrides)}; weights {w}")
    print("| when | ranking grad | " + " | ".join(f"{t} grad (share at w={w[t]:g})" for t in TERMS) + " |")
    print("|---" * (len(TERMS) + 2) + "|")
    for when, r in rows:
        cells = " | ".join(f"{r[t]:.3g} ({100 * r[t + '_share']:.1f}%)" for t in TERMS)
        print(f"| {when} | {r['ranking']:.3g} | {cells} |")


if __name__ == "__main__":
    main()
