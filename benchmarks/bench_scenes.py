"""Where the time of `itmatch data scenes` goes, stage by stage, on this machine.

    python benchmarks/bench_scenes.py [--images 1000] [--crop-batches 20] [--threads 1] [--rounds 3]

Stages, measured on one split of --images images (nothing is written to disk), each an arm of the
harness (benchmarks/harness.py: the stages alternate in rounds; min and median are reported):
  - scene graphs, twins and captions (pure Python),
  - the full relevance matrix (vectorised fact evaluation),
  - rendering + region crops,
  - CNN region encoding (crops/s of the folded EfficientNet-Lite0, 12 regions per image),
and the estimate for the default preset (6500 images) that follows from the minima.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_arguments  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--crop-batches", type=int, default=20, help="batches of 48 crops to time the CNN on")
    args = add_arguments(p, rounds=3, repeats=1).parse_args()
    bench = Bench("bench_scenes: stages of itmatch data scenes", args)

    from itmatch.data.scenes.facts import relevance_matrix
    from itmatch.data.scenes.features import REGIONS, RegionEncoder, crop_regions, region_boxes
    from itmatch.data.scenes.generate import build_split
    from itmatch.data.scenes.render import render

    n = args.images
    scenes, captions, twins = build_split(0, "train", n)
    facts = [c.facts for caps in captions for c in caps]
    rel = relevance_matrix(scenes, facts)
    crops = [crop_regions(render(s), region_boxes(s, np.random.default_rng(i))) for i, s in enumerate(scenes)]
    encoder = RegionEncoder()
    batch = np.concatenate(crops)[: 48 * args.crop_batches]
    print(f"{n} images: {len(twins)} twin pairs, relevance {rel.shape} with {rel.nnz} positives")

    arms = {
        "scene graphs + captions": lambda: build_split(0, "train", n),
        "relevance matrix": lambda: relevance_matrix(scenes, facts),
        "render + crops": lambda: [crop_regions(render(s), region_boxes(s, np.random.default_rng(i)))
                                   for i, s in enumerate(scenes)],
        f"CNN regions ({len(batch)} crops)": lambda: encoder.encode(batch),
    }
    record = bench.report(bench.compare(arms, warmup=0), unit="s", label=f"stages on {n} images")
    t = {name: row["min"] for name, row in record["arms"].items()}
    cnn = t[f"CNN regions ({len(batch)} crops)"] / len(batch)  # s per crop
    per_image = (t["scene graphs + captions"] + t["relevance matrix"] + t["render + crops"]) / n + REGIONS * cnn
    bench.record("per image", {"scene_graphs_ms": round(1e3 * t["scene graphs + captions"] / n, 2),
                               "render_crops_ms": round(1e3 * t["render + crops"] / n, 2),
                               "cnn_crops_per_s": round(1 / cnn), "cnn_ms_per_image": round(1e3 * REGIONS * cnn, 1),
                               "estimate_default_preset_s": round(6500 * per_image)})


if __name__ == "__main__":
    main()
