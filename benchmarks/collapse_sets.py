"""Collapse diagnostic of set models, per arm of an `itmatch compare` folder (mean ± 95% t interval
over seeds): on the test split's encodings of each run's best checkpoint, the mean within-set cosine
(1 = collapsed), the circular variance 1 - ||mean element|| (0 = collapsed) and its log.

    PYTHONPATH=src python benchmarks/collapse_sets.py /work/runs-maxmatch/cmp [--split test]

Arms whose model is not a set model (kind global) are listed as K = 1 (a single vector: nothing to spread).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare_dir")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    import itmatch
    from itmatch.checkpoint import read_checkpoint_config
    from itmatch.compare.stats import t_interval
    from itmatch.data.setup import load_configured_split
    from itmatch.evaluation.encode import encode_captions, encode_images
    from itmatch.similarity.sets import collapse_diagnostics

    runs = sorted(p for p in (Path(args.compare_dir) / "runs").iterdir() if (p / "best").is_dir())
    per_arm: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        arm = run.name.rsplit("-s", 1)[0]
        model, _, tokenizer = itmatch.load(run)
        if model.kind != "set":
            per_arm[arm]["K"].append(1)
            continue
        cfg = read_checkpoint_config(run / "best")
        split = load_configured_split(cfg.data, args.split)
        with torch.inference_mode():
            img = encode_images(model, split, cfg.model, 256)
            txt = encode_captions(model, split, tokenizer, cfg.model, 256)
        per_arm[arm]["K"].append(img.shape[1])
        for side, sets in (("img", img), ("txt", txt)):
            for key, value in collapse_diagnostics(sets).items():
                per_arm[arm][f"{key}_{side}"].append(value)
    keys = ["within_cos_img", "within_cos_txt", "circ_var_img", "circ_var_txt", "log_circ_var_img",
            "log_circ_var_txt"]
    print(f"collapse diagnostic on {args.split}, {args.compare_dir} (mean ± 95% t interval over seeds)")
    print("| arm | K | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    out = {}
    for arm, vals in per_arm.items():
        cells = []
        for k in keys:
            if k in vals:
                ci = t_interval(vals[k], 0.95).to_dict()
                half = ci["half_width"] if ci["half_width"] is not None else float("nan")
                cells.append(f"{ci['mean']:.3f} ± {half:.3f}")
            else:
                cells.append("-")
        out[arm] = dict(vals)
        print(f"| {arm} | {vals['K'][0]} | " + " | ".join(cells) + " |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
