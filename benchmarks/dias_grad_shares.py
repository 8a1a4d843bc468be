"""Calibrate the DIAS weights from measured gradient shares (docs/methods/dias.md, "Calibration").

On fixed training batches of scenes, for the vse model at initialisation and (with --run) trained,
prints the gradient norm (over all model parameters) of the distance-weighted triplet loss and of each
*unweighted* DIAS term: L_dim with the paper's sum and with the mean over d, uncentred and centred
(`dim_center`), L_inter and L_intra (soft mask, its training form). The share of a weighted term is
w * ||g_term|| / ||g_triplet||, so the weight for a target share is target * ||g_triplet|| / ||g_term||;
the script prints those weights (median over batches) for --target.

    python benchmarks/dias_grad_shares.py --data /work/data/scenes-small \
        --run /work/shared-runs/vse-small/runs/vse_scenes-s0 [--batches 4] [--target 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import training_batches  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.batch import pair_masks  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model  # noqa: E402
from itmatch.objectives.base import TrainProgress  # noqa: E402
from itmatch.objectives.dias import (  # noqa: E402
    DiasConfig,
    DIASRegularizer,
    dimension_alignment_loss,
    dimension_correlation,
)
from itmatch.objectives.vse import VSEObjective  # noqa: E402
from itmatch.training.grad_norms import term_grad_norms  # noqa: E402


def batch_norms(cfg, model, img, txt) -> dict[str, float]:
    model.train()
    torch.manual_seed(0)  # the triplet's negative sampling is random
    out = model(img, txt)
    positives, negatives = pair_masks(img, txt)
    terms = {"triplet": VSEObjective(cfg, model.similarity)(out, img, txt, TrainProgress(epoch=1))["loss"]}
    for center in (False, True):
        corr = dimension_correlation(out["img_frag"], out["img_mask"], out["txt_frag"], out["txt_mask"], positives,
                                     "pairs", center)
        tag = "_centred" if center else ""
        terms[f"dim_sum{tag}"] = dimension_alignment_loss(corr, "sum")
        terms[f"dim_mean{tag}"] = dimension_alignment_loss(corr, "mean")
    reg = DIASRegularizer(DiasConfig(terms=["inter", "intra"]))(out, positives, negatives)
    terms["inter"], terms["intra"] = reg["inter"], reg["intra"]
    return term_grad_norms(terms, list(model.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--run", default=None, help="a trained vse run folder (its best/ weights), optional")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.25)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(PACKAGED_CONFIGS / "vse_dias_scenes.yaml", [f"data.root={args.data}"])
    split = load_configured_split(cfg.data, cfg.data.train_split, resolve_data_root(cfg.data))
    states = [("init", None)]
    if args.run:
        import itmatch

        states.append(("trained", args.run))
    for name, run in states:
        if run is None:
            tokenizer = build_tokenizer(cfg.model.text, split.captions)
            torch.manual_seed(0)
            model = build_model(cfg, tokenizer)
        else:
            model, _, tokenizer = itmatch.load(run)
        batches = training_batches(cfg, split, tokenizer, args.batches)
        rows = [batch_norms(cfg, model, img, txt) for img, txt in batches]
        print(f"\n== {name} ({len(rows)} batches of {cfg.train.batch_size}, d = {cfg.model.embed_dim}) ==")
        print(f"{'term':<18}{'||g|| median':>14}{'ratio to triplet':>18}{f'w for share {args.target}':>20}")
        for term in rows[0]:
            norms = [r[term] for r in rows]
            ratios = [r[term] / r["triplet"] for r in rows]
            med, ratio = statistics.median(norms), statistics.median(ratios)
            weight = args.target / ratio if term != "triplet" and ratio > 0 else float("nan")
            print(f"{term:<18}{med:>14.4g}{ratio:>18.4g}{weight:>20.4g}")


if __name__ == "__main__":
    main()
