"""Searching the scenes test split with a trained model: encoding throughput and how often a full
caption finds its own image.

    /work/bin/heavy python benchmarks/bench_scenes_search.py RUN_OR_CKPT --data /work/data/scenes-small

1. Encoding throughput (images/s from region features, captions/s), images and captions batches
   alternating in rounds, batch 256, best and median of the rounds.
2. An index of the test split (`itmatch index build`), then every caption of kind `full` (the full
   description of its scene, `{split}_captions.jsonl`) is searched as text: the fraction whose own
   image is in the top 1 / 5 / 10, and the fraction with any image the relevance marks as matching
   (the scenes' three-valued relevance: another scene can fit a description too) in the top 5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import torch

    from itmatch.data.precomp import load_split
    from itmatch.retrieval.collection import read_collection
    from itmatch.retrieval.encoder import ModelHandle
    from itmatch.retrieval.index import build

    data = Path(args.data)
    model = ModelHandle(args.model)
    split = load_split(data, args.split)
    collection = read_collection(data, args.split)
    print(f"model {model.checkpoint} ({model.cfg.model.method}, {model.kind}), {split.n_images} images, "
          f"{split.n_captions} captions, {torch.get_num_threads()} torch thread(s)")

    # 1. throughput: the same row dicts the index build encodes
    images = [{"key": it.key, "feature_row": it.feature_row, "feature_source": it.feature_source, "path": it.path}
              for it in collection.items if it.side == "image"]
    captions = [{"caption": it.caption} for it in collection.items if it.side == "caption"]
    b = args.batch_size

    def run(rows, encode):
        t0 = time.perf_counter()
        for start in range(0, len(rows), b):
            encode(rows[start:start + b])
        return len(rows) / (time.perf_counter() - t0)

    rates = {"images/s": [], "captions/s": []}
    for _ in range(args.rounds):
        rates["images/s"].append(run(images, model.encode_image_rows))
        rates["captions/s"].append(run(captions, model.encode_caption_rows))
    for name, r in rates.items():
        print(f"encoding: {max(r):8.0f} {name} best, {statistics.median(r):8.0f} median of {args.rounds} rounds")

    # 2. search quality for full captions
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = build(model, collection, Path(tmp) / "ix", batch_size=b, progress=False)
        print(f"index build: {time.perf_counter() - t0:.1f}s")
        meta = [json.loads(line) for line in (data / f"{args.split}_captions.jsonl").read_text().splitlines()]
        full = [c for c, m in enumerate(meta) if m["kind"] == "full"]
        rel = split.relevance.tocsr() if split.relevance is not None else None
        ranks, any5 = [], []
        t0 = time.perf_counter()
        for c in full:
            hits = index.search_text(split.captions[c], 10)
            keys = [h.key for h in hits]
            own = split.image_ids[int(split.caption_to_image[c])]
            ranks.append(keys.index(own) + 1 if own in keys else 11)
            if rel is not None:
                relevant = {split.image_ids[i] for i in rel[c].indices}
                any5.append(bool(relevant & set(keys[:5])))
        dt = time.perf_counter() - t0
        ranks = np.asarray(ranks)
        print(f"{len(full)} full captions searched in {dt:.1f}s ({len(full) / dt:.0f} queries/s, k=10, exact)")
        for k in (1, 5, 10):
            print(f"  own image in top {k:2d}: {np.mean(ranks <= k):.3f}")
        if any5:
            print(f"  a relevant image in top  5: {np.mean(any5):.3f}")
        index.close()


if __name__ == "__main__":
    main()
