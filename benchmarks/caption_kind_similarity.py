"""Per caption kind: where each caption's similarities lie, under trained runs (no training).

Tests the hypothesis that DIAS's L_inter pushes generic captions (partial, count, ... true of many
images) away from the other images they describe (docs/methods/dias.md, "Caption kinds"). For each
run it scores the whole test split (images x captions) and prints, per caption kind (main captions
only): the mean similarity of a caption to its own image, to the *other* images it is relevant to,
and to images it is not relevant to; the gap (relevant other - not relevant); and the mean mAP@R of
the kind's caption queries (t2i, from the run's own eval-test.npz). "position" is the gap on the
scale from not relevant (0) to the caption's own image (1), comparable across runs whose
similarities have different scales.

    python benchmarks/caption_kind_similarity.py --data /work/data/scenes-small --runs RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import itmatch
from itmatch.data.precomp import load_split
from itmatch.evaluation.encode import encode_captions, encode_images


def caption_kinds(data: Path, split: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (data / f"{split}_captions.jsonl").read_text().splitlines() if line]
    return [(r["kind"], r["role"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--runs", nargs="+", required=True, type=Path)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split(args.data, args.split)
    kinds = caption_kinds(args.data, args.split)
    assert len(kinds) == split.n_captions
    rel = split.relevance.toarray().astype(bool)  # (captions, images)
    own = np.zeros_like(rel)
    own[np.arange(split.n_captions), split.caption_to_image] = True
    other = rel & ~own
    print(f"{'run':<24}{'kind':<11}{'n':>5}{'own':>8}{'rel.other':>10}{'not rel':>9}{'gap':>8}{'position':>9}"
          f"{'mAP@R t2i':>11}")
    for run in args.runs:
        model, _, tokenizer = itmatch.load(run)
        model.eval()
        from itmatch.config import load_config

        cfg = load_config(run / "config.yaml")
        img = encode_images(model, split, cfg.model)
        txt = encode_captions(model, split, tokenizer, cfg.model)
        with torch.inference_mode():
            sims = model.similarity(img, txt).T.numpy()  # (captions, images)
        per_query = np.load(run / "eval-test.npz")["map_at_r_t2i"] if (run / "eval-test.npz").is_file() else None
        by_kind = defaultdict(list)  # kind -> (caption row, position among the main captions)
        mains = [c for c, (_, role) in enumerate(kinds) if role == "main"]
        for q, c in enumerate(mains):  # eval-test.npz holds one entry per main caption, in order
            by_kind[kinds[c][0]].append((c, q))
        for kind, rows in sorted(by_kind.items()):
            caps, queries = np.asarray([c for c, _ in rows]), np.asarray([q for _, q in rows])
            s, o, r = sims[caps], own[caps], other[caps]
            n = ~rel[caps]
            mean_own, mean_other, mean_not = s[o].mean(), (s[r].mean() if r.any() else float("nan")), s[n].mean()
            m = f"{100 * per_query[queries].mean():>11.1f}" if per_query is not None and len(per_query) == len(mains) \
                else f"{'-':>11}"
            print(f"{run.parent.parent.name + '/' + run.name:<24}{kind:<11}{len(caps):>5}{mean_own:>8.3f}"
                  f"{mean_other:>10.3f}{mean_not:>9.3f}{mean_other - mean_not:>8.3f}"
                  f"{(mean_other - mean_not) / (mean_own - mean_not):>9.2f}{m}", flush=True)


if __name__ == "__main__":
    main()
