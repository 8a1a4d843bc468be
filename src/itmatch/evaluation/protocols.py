"""Evaluation protocols: which metrics, on which part of a similarity matrix.

plain     the recall metrics on the whole matrix
f30k-1k   plain, on a 1000-image test split (Flickr30K)
coco-5k   plain, on the 5000-image COCO test split
coco-1k   the five 1K folds of ONE 5K matrix (rows i*1000:(i+1)*1000 and those images' captions),
          every metric averaged over the folds (so rSum is the sum of the averaged recalls)
scenes    R@K on each image's own captions, mAP@R / R-Precision on the full relevance matrix,
          twin accuracy; on a scenes folder (format 2) also: undetermined pairs left out of every
          ranking, only the main captions ranked, per caption kind and per change results,
          minimal-pair accuracy and set coverage (see docs/evaluation.md)
eccv      coco-5k plus ECCV Caption's mAP@R, R-Precision and R@1 (eccv-caption package)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.evaluation.ranking import (
    QueryScores,
    Ranks,
    check_caption_to_image,
    ground_truth_ranks,
    is_pessimistic,
    pair_accuracy,
    percent,
    ranks_without,
    recall_metrics,
    relevance_ranking,
    retrieval_metrics,
    set_coverage,
    twin_accuracy,
)
from itmatch.evaluation.report import build_report
from itmatch.evaluation.scores import ArrayLike, ScoreSource, SubScores, as_score_source, materialise

PROTOCOLS = ("plain", "f30k-1k", "coco-1k", "coco-5k", "scenes", "eccv")
EXPECTED_IMAGES = {"f30k-1k": 1000, "coco-5k": 5000, "coco-1k": 5000, "eccv": 5000}
COCO_FOLDS = 5
COCO_FOLD_IMAGES = 1000


def resolve_caption_to_image(n_images: int, n_captions: int, split: RetrievalSplit | None,
                             caption_to_image: np.ndarray | None) -> np.ndarray:
    """The caption -> image row map: from the split, given explicitly, or k consecutive captions per image."""
    if split is not None:
        if split.n_images != n_images or len(split.caption_to_image) != n_captions:
            raise ItmatchError(f"the similarity matrix is {n_images} x {n_captions} but split {split.name!r} has "
                               f"{split.n_images} images and {len(split.caption_to_image)} captions")
        if caption_to_image is not None and not np.array_equal(np.asarray(caption_to_image), split.caption_to_image):
            raise ItmatchError(f"caption_to_image disagrees with split {split.name!r}: pass only one of them")
        caption_to_image = split.caption_to_image
    if caption_to_image is None:
        if n_images == 0 or n_captions % n_images:
            raise ItmatchError(f"cannot tell which captions belong to which image in a {n_images} x {n_captions} "
                               f"matrix: pass caption_to_image or a split")
        caption_to_image = np.repeat(np.arange(n_images), n_captions // n_images)
    return check_caption_to_image(caption_to_image, n_images, n_captions)


def coco_1k_folds(caption_to_image: np.ndarray, n_images: int) -> list[tuple[int, int, np.ndarray]]:
    """(row_start, row_stop, caption columns) of the five 1K folds of a 5K split."""
    folds = []
    for f in range(COCO_FOLDS):
        start, stop = f * COCO_FOLD_IMAGES, (f + 1) * COCO_FOLD_IMAGES
        cols = np.flatnonzero((caption_to_image >= start) & (caption_to_image < stop))
        folds.append((start, stop, cols))
    return folds


def evaluate_sims(sims: ArrayLike | ScoreSource, protocol: str, split: RetrievalSplit | None = None, *,
                  caption_to_image: np.ndarray | None = None, tie_policy: str = "pessimistic",
                  dataset: str = "", split_name: str = "", chunk_rows: int | None = None) -> dict:
    """Evaluate an images x captions similarity matrix under a protocol; return the report dict."""
    t0 = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ItmatchError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    is_pessimistic(tie_policy)
    source = materialise(as_score_source(sims))  # every score from one matrix: exact ties
    n_img, n_cap = source.shape
    c2i = resolve_caption_to_image(n_img, n_cap, split, caption_to_image)
    expected = EXPECTED_IMAGES.get(protocol)
    if expected is not None and n_img != expected:
        raise ItmatchError(f"protocol {protocol} expects {expected} test images but the similarity matrix has "
                           f"{n_img} image rows: use --protocol plain for other sizes")
    # fail on missing inputs before any scoring work
    if protocol == "eccv":
        from itmatch.evaluation.eccv import map_coco_ids

        if split is None:
            raise ItmatchError("protocol eccv needs the split's COCO image and caption ids: pass --data")
        map_coco_ids(split.image_ids, split.caption_ids, c2i)
    if protocol == "scenes" and (split is None or split.relevance is None):
        raise ItmatchError("protocol scenes needs the split's relevance matrix: pass --data with a scenes folder")
    kwargs = {"tie_policy": tie_policy, "chunk_rows": chunk_rows}

    folds = None
    if protocol == "coco-1k":
        folds = []
        for start, stop, cols in coco_1k_folds(c2i, n_img):
            fold = SubScores(source, start, stop, cols)
            folds.append(retrieval_metrics(fold, c2i[cols] - start, **kwargs))
        metrics = {key: float(np.mean([f[key] for f in folds])) for key in folds[0]}
    elif protocol == "scenes":
        metrics = scenes_metrics(source, c2i, split, **kwargs)
    else:
        metrics = retrieval_metrics(source, c2i, **kwargs)
    if protocol == "eccv":
        from itmatch.evaluation.eccv import eccv_metrics

        metrics.update(eccv_metrics(source, split.image_ids, split.caption_ids, c2i, **kwargs))

    counts = np.bincount(c2i, minlength=n_img)
    return build_report(
        dataset=dataset, split=split_name or (split.name if split is not None else ""), protocol=protocol,
        n_images=n_img, n_captions=n_cap,
        captions_per_image=int(counts[0]) if (counts == counts[0]).all() else None,
        tie_policy=tie_policy, elapsed_s=time.perf_counter() - t0, metrics=metrics, folds=folds)


SCENES_KINDS = ("full", "relation", "attribute", "count", "partial", "object", "subset")
TWIN_CHANGES = ("colour", "size", "position", "count")
PAIR_CHANGES = ("relation_swap", "attribute_swap", "count")


@dataclass
class ScenesQueries:
    """The per-query results behind the scenes totals (what `itmatch compare` bootstraps over)."""

    caption_to_image: np.ndarray  # image row of each ranked (main) caption query
    ranks: Ranks  # 0-based ranks of the own image / best own caption, undetermined pairs left out
    i2t: QueryScores  # mAP@R, R-Precision per image query (NaN where R = 0)
    t2i: QueryScores


def _scenes_setup(source: ScoreSource, caption_to_image: np.ndarray, split: RetrievalSplit | None):
    """(main caption columns, full relevance of the main captions, undetermined pairs, annotations)."""
    from itmatch.data.scenes.annotations import load_annotations

    if split is None or split.relevance is None:
        raise ItmatchError("protocol scenes needs the split's relevance matrix: pass --data with a scenes folder")
    n_img, n_cap = source.shape
    relevance = split.relevance
    if not sp.issparse(relevance):
        relevance = sp.csr_matrix(np.asarray(relevance))
    if relevance.shape != (n_cap, n_img):
        raise ItmatchError(f"split {split.name!r}: the relevance matrix is {relevance.shape[0]} x "
                           f"{relevance.shape[1]}, expected captions x images = {n_cap} x {n_img}")
    ann = load_annotations(split)
    if ann is not None and (len(ann.role) != n_cap or ann.undetermined.shape != (n_cap, n_img)):
        raise ItmatchError(f"split {split.name!r}: the scenes annotations describe {len(ann.role)} captions x "
                           f"{ann.undetermined.shape[1]} images, the matrix is {n_cap} x {n_img}")
    # A caption is always relevant to its own image, whatever the stored matrix says (foils excepted:
    # they are false of their image by construction and never ranked among the main captions).
    main = np.arange(n_cap) if ann is None else np.flatnonzero(ann.role == "main")
    own = sp.csr_matrix((np.ones(len(main), dtype=bool), (main, caption_to_image[main])), shape=(n_cap, n_img))
    relevance = (sp.csr_matrix(relevance, dtype=bool) + own).tocsr().astype(bool)
    und = None if ann is None else ann.undetermined[main]
    return main, relevance, und, ann


def scenes_queries(scores: ArrayLike | ScoreSource, split: RetrievalSplit, *, tie_policy: str = "pessimistic",
                   chunk_rows: int | None = None) -> ScenesQueries:
    """Per-query ranks, mAP@R and R-Precision of the scenes protocol (main captions only)."""
    source = materialise(as_score_source(scores))
    c2i_all = resolve_caption_to_image(*source.shape, split, None)
    main, relevance, und, _ = _scenes_setup(source, c2i_all, split)
    return _main_queries(source, c2i_all, main, relevance, und, tie_policy, chunk_rows)


def _main_queries(source, c2i_all, main, relevance, und, tie_policy, chunk_rows) -> ScenesQueries:
    kwargs = {"tie_policy": tie_policy, "chunk_rows": chunk_rows}
    # Only the main captions are ranked: probes and foils serve the minimal-pair accuracy alone.
    n_img, n_cap = source.shape
    sub = source if len(main) == n_cap else SubScores(source, 0, n_img, main)
    c2i, rel = c2i_all[main], relevance[main]
    ranks = (ground_truth_ranks(sub, c2i, **kwargs) if und is None or und.nnz == 0
             else ranks_without(sub, c2i, und, **kwargs))
    i2t, t2i = relevance_ranking(sub, rel.T.tocsr(), rel, exclude=und, **kwargs)
    return ScenesQueries(c2i, ranks, i2t, t2i)


def scenes_metrics(source: ScoreSource, caption_to_image: np.ndarray, split: RetrievalSplit | None, *,
                   tie_policy: str, chunk_rows: int | None) -> dict:
    """Recalls, mAP@R and R-Precision on the relevance matrix (both directions), twin accuracy, and
    for a scenes folder the per-kind, per-change, minimal-pair and coverage results."""
    n_img, n_cap = source.shape
    main, relevance, und, ann = _scenes_setup(source, caption_to_image, split)
    kwargs = {"tie_policy": tie_policy, "chunk_rows": chunk_rows}
    q = _main_queries(source, caption_to_image, main, relevance, und, tie_policy, chunk_rows)
    sub = source if len(main) == n_cap else SubScores(source, 0, n_img, main)
    c2i, rel = q.caption_to_image, relevance[main]
    out = recall_metrics(q.ranks)
    s_i2t, s_t2i = q.i2t.summary(), q.t2i.summary()
    out.update({"map_at_r_i2t": s_i2t["map_at_r"], "map_at_r_t2i": s_t2i["map_at_r"],
                "rprecision_i2t": s_i2t["rprecision"], "rprecision_t2i": s_t2i["rprecision"]})
    twins = split.twins if split.twins is not None else np.zeros((0, 2), dtype=np.int64)
    out.update(twin_accuracy(sub, c2i, twins, rel, tie_policy=tie_policy, undetermined=und))
    if ann is None:
        return out

    kinds = ann.kind[main]
    out["by_kind"] = {}
    for kind in [k for k in SCENES_KINDS if k in set(kinds)] + sorted(set(kinds) - set(SCENES_KINDS)):
        cols = np.flatnonzero(kinds == kind)
        part = SubScores(source, 0, n_img, main[cols])
        k_i2t, k_t2i = relevance_ranking(part, rel[cols].T.tocsr(), rel[cols], exclude=und[cols], **kwargs)
        a, b = k_i2t.summary(), k_t2i.summary()
        out["by_kind"][kind] = {"captions": int(len(cols)), "map_at_r_i2t": a["map_at_r"],
                                "map_at_r_t2i": b["map_at_r"], "rprecision_i2t": a["rprecision"],
                                "rprecision_t2i": b["rprecision"]}

    by_change: dict[str, dict] = {}
    for change in TWIN_CHANGES:
        pick = ann.twin_change == change
        if pick.any():
            acc = twin_accuracy(sub, c2i, twins[pick], rel, tie_policy=tie_policy, undetermined=und)
            by_change[change] = {"twin_pairs": int(pick.sum()), **acc}
    foils = np.flatnonzero(ann.role == "foil")
    wins = pair_accuracy(source, caption_to_image[foils], ann.pair[foils], foils, tie_policy=tie_policy)
    out["pair_acc"] = percent(int(wins.sum()), len(wins)) if len(foils) else None
    for change in PAIR_CHANGES:
        pick = ann.change[foils] == change
        if pick.any():
            by_change.setdefault(change, {}).update(
                {"minimal_pairs": int(pick.sum()), "pair_acc": percent(int(wins[pick].sum()), int(pick.sum()))})
    out["by_change"] = by_change
    out["set_coverage"] = set_coverage(sub, c2i, kinds == "object", rel, und, **kwargs)
    out["undetermined_pairs"] = int(und.nnz)
    return out


__all__ = ["PROTOCOLS", "evaluate_sims", "coco_1k_folds", "resolve_caption_to_image", "scenes_metrics"]
