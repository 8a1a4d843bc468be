"""Where the time of `itmatch data scenes` goes, stage by stage, on this machine.

    python benchmarks/bench_scenes.py [--images 1000] [--crop-batches 20]

Stages, measured on one split of --images images (nothing is written to disk):
  - scene graphs, twins and captions (pure Python),
  - the full relevance matrix (vectorised fact evaluation),
  - rendering + region crops,
  - CNN region encoding (crops/s of the folded EfficientNet-Lite0, 12 regions per image),
and the estimate for the default preset (6500 images) that follows from them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--crop-batches", type=int, default=20, help="batches of 48 crops to time the CNN on")
    args = p.parse_args()

    from itmatch.data.scenes.facts import relevance_matrix
    from itmatch.data.scenes.features import REGIONS, RegionEncoder, crop_regions, region_boxes
    from itmatch.data.scenes.generate import build_split
    from itmatch.data.scenes.render import render

    n = args.images
    t = time.perf_counter()
    scenes, captions, twins = build_split(0, "train", n)
    t_build = time.perf_counter() - t

    t = time.perf_counter()
    rel = relevance_matrix(scenes, [c.facts for caps in captions for c in caps])
    t_rel = time.perf_counter() - t

    t = time.perf_counter()
    crops = [crop_regions(render(s), region_boxes(s, np.random.default_rng(i))) for i, s in enumerate(scenes)]
    t_render = time.perf_counter() - t

    encoder = RegionEncoder()
    batch = np.concatenate(crops)[: 48 * args.crop_batches]
    encoder.encode(batch[:48])  # warm-up
    t = time.perf_counter()
    encoder.encode(batch)
    crops_per_s = len(batch) / (time.perf_counter() - t)

    per_image = (t_build + t_rel + t_render) / n + REGIONS / crops_per_s
    print(f"{n} images: {len(twins)} twin pairs, relevance {rel.shape} with {rel.nnz} positives")
    print(f"scene graphs + captions  {t_build:6.2f} s  ({1e3 * t_build / n:.2f} ms/image)")
    print(f"relevance matrix         {t_rel:6.2f} s")
    print(f"render + crops           {t_render:6.2f} s  ({1e3 * t_render / n:.2f} ms/image)")
    print(f"CNN regions              {crops_per_s:6.0f} crops/s ({REGIONS / crops_per_s * 1e3:.1f} ms/image)")
    print(f"estimate for the default preset (6500 images, PNG writing excluded): {6500 * per_image:.0f} s")


if __name__ == "__main__":
    main()
