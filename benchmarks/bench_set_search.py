"""Set-aware search against exhaustive set scoring, on a trained set model (`kind: set`).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_set_search.py RUN --data DATA \
        [--split test] [--candidates 10,20,50,100,200,all] [--timing-queries 300] [--rounds 3]
        [--backend flat] [--skip-timing]

The library's own path, nothing re-implemented: `retrieval.index.build` makes a flat FAISS index of
the split (every element of every set is a vector), and `SearchIndex.search(query, side, 10,
candidates=n)` finds the items owning the n nearest elements of each query element and re-ranks
them with the model's exact set similarity. The queries are the split's own items, read from the
index's stored encodings (so encoding is outside every timing): captions search the images (t2i),
images search the captions (i2t).

Reference: exhaustive set scoring of each query against every item of the other side, with the
same re-ranking code (`SearchIndex.rerank` over all ids, ties by id as `search` breaks them). It is
checked once against the evaluation engine's dense score matrix (`model.similarity` on the whole
split): the same top-10 for every query.

Per candidate count n and direction:
  - R@1: share of queries whose set-search top-1 is the exhaustive top-1;
  - R@10: mean |set-search top-10 ∩ exhaustive top-10| / 10;
  - top-1 found: share of queries whose exhaustive top-1 is among the set search's candidates
    (re-ranking is exact, so this equals R@1 up to ties);
  - items re-ranked: mean size of the shortlist (`SearchIndex.shortlist`): at most K x n items,
    fewer where several of the n nearest elements belong to one item; where they hold fewer than k
    items the search widens to k x K elements per query element;
  - widened: share of queries whose n nearest elements per query element held fewer than k items;
  - speed: `--timing-queries` queries (the first ones), set search against exhaustive scoring,
    arms alternating in rounds through benchmarks/harness.py; queries/s and the ratio of times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import Bench, add_arguments  # noqa: E402

DIRECTIONS = {"t2i": ("caption", "image"), "i2t": ("image", "caption")}  # name: (query side, searched side)


def parse_candidates(text: str) -> list[int | None]:
    """'10,20,all' -> [10, 20, None]; None = every element of the searched side."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        out.append(None if part == "all" else int(part))
    return out


def top_ids(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The k best ids, best first, ties by id (as `SearchIndex.search` orders its hits)."""
    return ids[np.lexsort((ids, -scores))[:k]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="run folder or checkpoint of a set model")
    ap.add_argument("--data", required=True, help="precomp / scenes folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--candidates", default="10,20,50,100,200,all",
                    help="nearest elements per query element (`itmatch search --candidates`); all = every element")
    ap.add_argument("--k", type=int, default=10, help="hits per query")
    ap.add_argument("--timing-queries", type=int, default=300, help="queries per timed arm call, per direction")
    ap.add_argument("--backend", default="flat", help="vector index (`itmatch index build --backend`); default flat")
    ap.add_argument("--skip-timing", action="store_true", help="recall only")
    add_arguments(ap, rounds=3, repeats=1)
    args = ap.parse_args()
    bench = Bench("set-aware search vs exhaustive set scoring", args)

    from itmatch.evaluation.scores import score_model
    from itmatch.retrieval.collection import read_collection
    from itmatch.retrieval.encoder import ModelHandle
    from itmatch.retrieval.index import build

    model = ModelHandle(args.model)
    if model.kind != "set":
        raise SystemExit(f"{args.model} is a {model.kind} model; this benchmark needs kind set")
    counts = parse_candidates(args.candidates)
    k = args.k
    with tempfile.TemporaryDirectory() as tmp:
        index = build(model, read_collection(args.data, args.split), Path(tmp) / "ix", backend=args.backend,
                      batch_size=256, progress=False)
        enc = {side: index.store.load_encodings(side) for side in ("image", "caption")}
        n_img, set_k, dim = enc["image"][1].shape
        print(f"# {model.checkpoint} ({model.cfg.model.method}), split {args.split}: {n_img} images, "
              f"{len(enc['caption'][0])} captions, sets of {set_k} x {dim}, {args.backend} index of "
              f"{len(index._vector_index('image'))} + {len(index._vector_index('caption'))} element vectors")

        # exhaustive top-k of every query, checked against the engine's dense matrix
        with torch.inference_mode():
            dense = score_model(model.model, enc["image"][1], enc["caption"][1]).dense()
        exhaustive: dict[str, np.ndarray] = {}
        for name, (qside, side) in DIRECTIONS.items():
            q_ids, q_enc = enc[qside]
            all_ids = enc[side][0]
            tops = np.stack([top_ids(all_ids, index.rerank(side, q_enc[r:r + 1], all_ids), k)
                             for r in range(len(q_ids))])
            engine = dense.T if name == "t2i" else dense  # rows: queries
            engine_top = np.stack([top_ids(all_ids, engine[r], k) for r in range(len(q_ids))])
            agree = float((tops == engine_top).all(1).mean())
            print(f"# {name}: exhaustive re-rank top-{k} = engine dense top-{k} for {100 * agree:.1f}% of "
                  f"{len(q_ids)} queries")
            exhaustive[name] = tops

        # recall of the set search against the exhaustive ranking
        print(f"\n| direction | candidates per query element | widened to k x K % | items re-ranked (mean) | R@1 | "
              f"R@{k} | exhaustive top-1 among candidates |\n|---|---|---|---|---|---|---|")
        recall_rows = {}
        for name, (qside, side) in DIRECTIONS.items():
            q_ids, q_enc = enc[qside]
            n_vectors = len(index._vector_index(side))
            for n in counts:
                cand = n_vectors if n is None else n
                hits = [[h.id for h in index.search(q_enc[r:r + 1], side, k, candidates=cand)]
                        for r in range(len(q_ids))]
                shortlists = [index.shortlist(side, q_enc[r:r + 1], k, cand) for r in range(len(q_ids))]
                ref = exhaustive[name]
                r1 = np.mean([len(h) > 0 and h[0] == ref[r, 0] for r, h in enumerate(hits)])
                r10 = np.mean([len(set(h) & set(ref[r].tolist())) / k for r, h in enumerate(hits)])
                found = np.mean([ref[r, 0] in set(s.tolist()) for r, s in enumerate(shortlists)])
                mean_cands = np.mean([len(s) for s in shortlists])
                widened = np.mean([len(index.candidates(side, q_enc[r:r + 1], max(cand, k))) < k
                                   for r in range(len(q_ids))])
                label = "all" if n is None else str(n)
                recall_rows[f"{name} n={label}"] = {"r1": float(r1), f"r{k}": float(r10), "top1_found": float(found),
                                                    "items_reranked": float(mean_cands), "widened": float(widened)}
                print(f"| {name} | {label} | {100 * widened:.1f} | {mean_cands:.1f} | {100 * r1:.1f} | "
                      f"{100 * r10:.1f} | {100 * found:.1f} |", flush=True)
        bench.record("recall against exhaustive set scoring", {"k": k, "rows": recall_rows})

        # speed: the same queries, set search at each candidate count against exhaustive scoring
        for name, (qside, side) in ({} if args.skip_timing else DIRECTIONS).items():
            q_ids, q_enc = enc[qside]
            queries = [q_enc[r:r + 1] for r in range(min(args.timing_queries, len(q_ids)))]
            all_ids = enc[side][0]
            n_vectors = len(index._vector_index(side))

            def exhaustive_arm(queries=queries, side=side, all_ids=all_ids):
                for q in queries:
                    top_ids(all_ids, index.rerank(side, q, all_ids), k)

            arms = {"exhaustive": exhaustive_arm}
            for n in counts:
                cand = n_vectors if n is None else n

                def search_arm(queries=queries, side=side, cand=cand):
                    for q in queries:
                        index.search(q, side, k, candidates=cand)

                arms[f"search n={'all' if n is None else n}"] = search_arm
            times = bench.compare(arms)
            bench.report(times, baseline="exhaustive", unit="ms",
                         label=f"{name}: {len(queries)} queries per call ({qside} queries over {len(all_ids)} "
                               f"{side}s)", rate=(len(queries), "queries/s"))
        index.close()


if __name__ == "__main__":
    main()
