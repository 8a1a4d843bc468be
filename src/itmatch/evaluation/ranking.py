"""Ranking metrics from image x caption similarity scores, computed block by block.

`S[i, c]` scores image row i against caption column c. Every metric here is defined through counts
("how many negatives score at least as high as this positive?") instead of a sort, so one
sequential pass over blocks of image rows gives both directions with memory bounded by the block
size: a 100k x 500k evaluation never holds the whole matrix. Scores come from a `ScoreSource`
(`scores.py`: a dense array, a memory-mapped .npy, an average of several, or a model's similarity
computed block by block on its encodings).

Tie policy (see docs/evaluation.md): "pessimistic" (default) ranks a positive after every negative
with an equal score; "optimistic" ranks it before them. Positives tied with each other never hurt.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from itmatch.errors import ItmatchError
from itmatch.evaluation.scores import ArrayLike, ScoreSource, _few, as_score_source

TIE_POLICIES = ("pessimistic", "optimistic")
RECALL_KS = (1, 5, 10)


def is_pessimistic(tie_policy: str) -> bool:
    if tie_policy not in TIE_POLICIES:
        raise ItmatchError(f"unknown tie policy {tie_policy!r}: choose one of {', '.join(TIE_POLICIES)}")
    return tie_policy == "pessimistic"


def _row_blocks(n_rows: int, chunk_rows: int, desc: str) -> Iterator[tuple[int, int]]:
    starts = range(0, n_rows, chunk_rows)
    for start in tqdm(starts, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        yield start, min(start + chunk_rows, n_rows)


# ---------------------------------------------------------------------- ground-truth recalls
def check_caption_to_image(caption_to_image: np.ndarray, n_images: int, n_captions: int) -> np.ndarray:
    """Validate the caption -> image row map against a matrix shape; return it as int64."""
    c2i = np.asarray(caption_to_image)
    if c2i.ndim != 1 or (c2i.size and c2i.dtype.kind not in "iu"):
        raise ItmatchError(f"caption_to_image must be a 1-D integer array, got dtype {c2i.dtype} "
                           f"and shape {c2i.shape}")
    if len(c2i) != n_captions:
        raise ItmatchError(f"the similarity matrix has {n_captions} caption columns but caption_to_image "
                           f"maps {len(c2i)} captions")
    c2i = c2i.astype(np.int64)
    bad = np.flatnonzero((c2i < 0) | (c2i >= n_images))
    if len(bad):
        raise ItmatchError(f"caption_to_image points outside the {n_images} image rows at caption(s) {_few(bad)}")
    orphans = np.flatnonzero(np.bincount(c2i, minlength=n_images) == 0)
    if len(orphans):
        raise ItmatchError(f"image row(s) {_few(orphans)} have no caption: image-to-text ranks are undefined")
    return c2i


@dataclass
class Ranks:
    """0-based ranks of the ground truth: i2t[i] of image i's best caption, t2i[c] of caption c's image."""

    i2t: np.ndarray
    t2i: np.ndarray


def ground_truth_ranks(scores: ArrayLike | ScoreSource, caption_to_image: np.ndarray, *,
                       tie_policy: str = "pessimistic", chunk_rows: int | None = None) -> Ranks:
    """Ranks of the ground truth in both directions, in one pass over blocks of image rows.

    i2t: rank of image i = number of negative captions scoring >= (pessimistic) or > (optimistic)
    the best of its captions. t2i: rank of caption c = number of other images scoring >= / > its own.
    Each block costs one comparison and one count per direction; the few positives of the block
    are then taken back out of the counts, using their values read from the block itself.
    """
    source = as_score_source(scores)
    pessimistic = is_pessimistic(tie_policy)
    ahead = torch.ge if pessimistic else torch.gt
    n_img, n_cap = source.shape
    c2i = check_caption_to_image(caption_to_image, n_img, n_cap)
    dev = source.device
    by_image = np.argsort(c2i, kind="stable")  # captions grouped by image row
    first = np.concatenate([[0], np.cumsum(np.bincount(c2i, minlength=n_img))])
    own_score = source.pairs(c2i, np.arange(n_cap))  # each caption's score with its own image
    i2t = torch.empty(n_img, dtype=torch.int64, device=dev)
    t2i = torch.zeros(n_cap, dtype=torch.int64, device=dev)
    chunk = chunk_rows or source.chunk_rows
    for start, stop in _row_blocks(n_img, chunk, "ranking"):
        block = source.rows(start, stop)
        caps = torch.as_tensor(by_image[first[start]:first[stop]], device=dev)  # this block's positives
        local = torch.as_tensor(c2i[by_image[first[start]:first[stop]]] - start, device=dev)
        pos_values = block[local, caps]
        best = torch.full((stop - start,), float("-inf"), dtype=block.dtype, device=dev)
        best = best.scatter_reduce(0, local, pos_values, reduce="amax")
        # i2t: items at or above the best positive, minus the positives among them
        count = ahead(block, best[:, None]).sum(1, dtype=torch.int32).long()
        count -= torch.zeros_like(count).index_add_(0, local, ahead(pos_values, best[local]).long())
        i2t[start:stop] = count
        # t2i: images at or above each caption's own score, minus its own image when in this block
        own = own_score.to(block.dtype)
        t2i += ahead(block, own[None, :]).sum(0, dtype=torch.int32).long()
        t2i[caps] -= ahead(pos_values, own[caps]).long()
    return Ranks(i2t=i2t.cpu().numpy(), t2i=t2i.cpu().numpy())


def recall_metrics(ranks: Ranks, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@K in percent, 1-based median and mean rank, and rSum (the sum of the six recalls).

    medr = floor(median(0-based ranks)) + 1 and meanr = mean(0-based ranks) + 1, as the reference
    repositories report them.
    """
    out: dict[str, float] = {}
    rsum = 0.0
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        for k in ks:
            value = percent(int(np.count_nonzero(r < k)), len(r))
            out[f"{direction}_r{k}"] = value
            rsum += value
    out["rsum"] = rsum
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        out[f"{direction}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{direction}_meanr"] = float(np.mean(r) + 1)
    return out


def retrieval_metrics(scores: ArrayLike | ScoreSource, caption_to_image: np.ndarray, *,
                      tie_policy: str = "pessimistic", chunk_rows: int | None = None) -> dict[str, float]:
    """The standard recall metrics of a similarity matrix (see `recall_metrics`)."""
    return recall_metrics(ground_truth_ranks(scores, caption_to_image, tie_policy=tie_policy,
                                             chunk_rows=chunk_rows))


# -------------------------------------------------------- mAP@R and R-Precision (many positives)
@dataclass
class QueryScores:
    """Per-query results for one direction; NaN where a query has no relevant item (R = 0)."""

    map_at_r: np.ndarray
    r_precision: np.ndarray
    r1: np.ndarray  # 1.0 where the top-ranked item is relevant

    def summary(self) -> dict[str, float]:
        """Means over the queries with R > 0, in percent."""
        return {"map_at_r": _pct_nanmean(self.map_at_r), "rprecision": _pct_nanmean(self.r_precision),
                "r1": _pct_nanmean(self.r1)}


def percent(part: float, whole: int) -> float:
    """100 * part / whole, multiplied before dividing as the reference code does: 277 of 1000 is 27.7,
    where 100 * mean(...) would give 27.700000000000003."""
    return 100.0 * float(part) / whole


def _pct_nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return percent(float(x.sum()), len(x)) if len(x) else float("nan")


def _positive_hits(pos_sorted: torch.Tensor, n_pos: torch.Tensor, neg_top: torch.Tensor,
                   n_rel: torch.Tensor, pessimistic: bool) -> tuple[torch.Tensor, ...]:
    """mAP@R, R-Precision and R@1 of a batch of queries from counts, without sorting the gallery.

    pos_sorted (Q x P): each query's positive scores, descending, -inf padded; neg_top (Q x L): its
    L highest negative scores with L >= R. In the tie-policy order, the k-th positive sits at rank
    k + (number of negatives scoring >= it, or > it when optimistic). A count that reaches L means
    a rank beyond R, which mAP@R and R-Precision ignore anyway.
    """
    q, p = pos_sorted.shape
    dev = pos_sorted.device
    if neg_top.shape[1] > 0:
        ascending = neg_top.flip(1).contiguous()
        below = torch.searchsorted(ascending, pos_sorted.contiguous(), right=not pessimistic)
        ahead = ascending.shape[1] - below
    else:
        ahead = torch.zeros((q, p), dtype=torch.int64, device=dev)
    k = torch.arange(1, p + 1, device=dev, dtype=torch.float64)[None, :]
    rank = k + ahead.double()
    n_rel_f = n_rel.double()
    hit = (k <= n_pos[:, None]) & (rank <= n_rel_f[:, None])
    map_at_r = (hit * k / rank).sum(1) / n_rel_f
    r_precision = hit.sum(1) / n_rel_f
    r1 = ((rank[:, 0] == 1) & (n_pos > 0)).double() if p > 0 else torch.zeros(q, dtype=torch.float64, device=dev)
    nan = torch.full_like(map_at_r, float("nan"))
    empty = n_rel == 0
    return (torch.where(empty, nan, map_at_r), torch.where(empty, nan, r_precision),
            torch.where(empty, nan, r1))


def _as_bool_csr(matrix, shape: tuple[int, int], what: str) -> sp.csr_matrix:
    if not sp.issparse(matrix):
        matrix = sp.csr_matrix(np.asarray(matrix))
    if tuple(matrix.shape) != tuple(shape):
        raise ItmatchError(f"{what} has shape {matrix.shape[0]} x {matrix.shape[1]}, expected {shape[0]} x {shape[1]}")
    m = sp.csr_matrix(matrix, dtype=bool)
    m.eliminate_zeros()
    return m


def relevance_ranking(scores: ArrayLike | ScoreSource, i2t_positives, t2i_positives, *,
                      n_relevant_i2t: np.ndarray | None = None, n_relevant_t2i: np.ndarray | None = None,
                      tie_policy: str = "pessimistic", chunk_rows: int | None = None,
                      exclude=None) -> tuple[QueryScores, QueryScores]:
    """mAP@R, R-Precision and R@1 for every image query and every caption query, in one pass.

    i2t_positives: images x captions (sparse bool): the relevant captions of each image.
    t2i_positives: captions x images (sparse bool): the relevant images of each caption.
    R is the number of positives of a query, or n_relevant_* where some relevant items are not in
    the gallery (they then can never be retrieved). mAP@R (Musgrave et al. 2020) is the mean over
    r = 1..R of precision@r where the r-th item is relevant, 0 elsewhere; R-Precision is precision@R.
    exclude: captions x images (sparse bool) pairs left out of both rankings, e.g. the undetermined
    pairs of the scenes benchmark: such an item is neither a hit nor a miss for that query.
    """
    source = as_score_source(scores)
    pessimistic = is_pessimistic(tie_policy)
    n_img, n_cap = source.shape
    dev = source.device
    i2t_pos = _as_bool_csr(i2t_positives, (n_img, n_cap), "the image-to-text positives")
    t2i_pos = _as_bool_csr(t2i_positives, (n_cap, n_img), "the text-to-image positives")
    t2i_pos_by_image = t2i_pos.T.tocsr()  # images x captions, to mask row blocks
    skip = None if exclude is None else _as_bool_csr(exclude, (n_cap, n_img), "the excluded pairs").T.tocsr()
    if skip is not None:
        # positives win over exclusions; what is left is removed from every gallery it sits in
        skip = (skip > i2t_pos.maximum(t2i_pos_by_image)).tocsr()
        skip.eliminate_zeros()
    n_pos_i2t = np.diff(i2t_pos.indptr).astype(np.int64)
    n_pos_t2i = np.diff(t2i_pos.indptr).astype(np.int64)
    n_rel_i2t = _relevant_counts(n_relevant_i2t, n_pos_i2t, "image")
    n_rel_t2i = _relevant_counts(n_relevant_t2i, n_pos_t2i, "caption")

    # Caption queries: their positive scores, gathered once and sorted descending per caption.
    cap_of_pos = np.repeat(np.arange(n_cap), n_pos_t2i)
    pos_t2i = _sorted_padded(source.pairs(t2i_pos.indices, cap_of_pos), t2i_pos.indptr)
    # ...and a running list of their L highest negative scores over all row blocks.
    l_t2i = min(int(n_rel_t2i.max()) if n_cap else 0, n_img)
    running = None

    i2t_out = [np.full(n_img, np.nan) for _ in range(3)]
    chunk = chunk_rows or source.chunk_rows
    for start, stop in _row_blocks(n_img, chunk, "mAP@R"):
        block = source.rows(start, stop)
        ninf = torch.tensor(float("-inf"), dtype=block.dtype, device=dev)
        # image queries of this block
        rows_pos = i2t_pos[start:stop]
        local = np.repeat(np.arange(stop - start), np.diff(rows_pos.indptr))
        pos_sorted = _sorted_padded(block[torch.as_tensor(local, device=dev),
                                          torch.as_tensor(rows_pos.indices, device=dev)], rows_pos.indptr)
        pos = torch.as_tensor(rows_pos.toarray(), device=dev)
        if skip is not None:
            pos = pos | torch.as_tensor(skip[start:stop].toarray(), device=dev)
        n_pos = torch.as_tensor(n_pos_i2t[start:stop], device=dev)
        n_rel = torch.as_tensor(n_rel_i2t[start:stop], device=dev)
        l_i2t = min(int(n_rel.max()) if len(n_rel) else 0, n_cap)
        neg_top = torch.where(pos, ninf, block).topk(l_i2t, dim=1).values
        for out, value in zip(i2t_out, _positive_hits(pos_sorted, n_pos, neg_top, n_rel, pessimistic)):
            out[start:stop] = value.cpu().numpy()
        # caption queries: merge this block's best negatives into the running top L
        if l_t2i > 0:
            mask = torch.as_tensor(t2i_pos_by_image[start:stop].toarray(), device=dev)
            if skip is not None:
                mask = mask | torch.as_tensor(skip[start:stop].toarray(), device=dev)
            cand = torch.where(mask, ninf, block).topk(min(l_t2i, stop - start), dim=0).values.T
            running = cand if running is None else torch.cat([running, cand.to(running.dtype)], 1)
            if running.shape[1] > l_t2i:
                running = running.topk(l_t2i, dim=1).values
    if running is None:
        running = torch.empty((n_cap, 0), dtype=torch.float64, device=dev)
    running = running.sort(dim=1, descending=True).values
    t2i_out = _positive_hits(pos_t2i.to(running.dtype),
                             torch.as_tensor(n_pos_t2i, device=dev), running,
                             torch.as_tensor(n_rel_t2i, device=dev), pessimistic)
    return (QueryScores(*i2t_out), QueryScores(*(v.cpu().numpy() for v in t2i_out)))


def _sorted_padded(values: torch.Tensor, indptr: np.ndarray) -> torch.Tensor:
    """CSR-grouped values -> (groups x largest group) tensor, each row sorted descending, -inf padded."""
    counts = np.diff(indptr)
    group = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-values.cpu().double().numpy(), group))  # by group, then score descending
    slot = np.arange(len(order)) - np.repeat(indptr[:-1], counts)
    out = torch.full((len(counts), int(counts.max()) if len(counts) else 0), float("-inf"),
                     dtype=values.dtype, device=values.device)
    out[torch.as_tensor(group[order], device=values.device), torch.as_tensor(slot, device=values.device)] = \
        values[torch.as_tensor(order, device=values.device)]
    return out


def _relevant_counts(n_relevant: np.ndarray | None, n_pos: np.ndarray, what: str) -> np.ndarray:
    if n_relevant is None:
        return n_pos
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if n_relevant.shape != n_pos.shape or (n_relevant < n_pos).any():
        raise ItmatchError(f"n_relevant for {what} queries must have one count per query, "
                           f"each at least the number of positives in the gallery")
    return n_relevant


# --------------------------------------------------------------------------- twin accuracy
def captions_by_image(caption_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """(n_images, max captions) table of caption columns per image, -1 padded, in column order."""
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    counts = np.bincount(c2i, minlength=n_images)
    order = np.argsort(c2i, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.full((n_images, int(counts.max()) if len(counts) else 0), -1, dtype=np.int64)
    table[c2i[order], slot] = order
    return table


def twin_accuracy(scores: ArrayLike | ScoreSource, caption_to_image: np.ndarray, twins: np.ndarray,
                  relevance=None, *, tie_policy: str = "pessimistic", undetermined=None) -> dict[str, float | None]:
    """Accuracy (percent) at telling hard-negative twin images apart; see docs/evaluation.md.

    For a twin pair seen from image a against its twin b, D(a|b) are a's own captions that are not
    relevant to b. twin_acc_t2i pools every caption c in D(a|b) over both orientations of every pair
    and counts S[a, c] > S[b, c]. twin_acc_i2t averages, over orientations with both sets
    non-empty, the fraction of (c, c') in D(a|b) x D(b|a) with S[a, c] > S[a, c']. Under the
    optimistic policy the comparisons are >=. None where no trial exists. With `undetermined`
    (captions x images), a caption undetermined of the other twin is not in D either.
    """
    source = as_score_source(scores)
    pessimistic = is_pessimistic(tie_policy)
    n_img, n_cap = source.shape
    c2i = check_caption_to_image(caption_to_image, n_img, n_cap)
    twins = check_twins(twins, n_img)
    if len(twins) == 0:
        return {"twin_acc_t2i": None, "twin_acc_i2t": None}
    rel = None if relevance is None else _as_bool_csr(relevance, (n_cap, n_img), "the relevance matrix")
    und = None if undetermined is None else _as_bool_csr(undetermined, (n_cap, n_img), "the undetermined pairs")
    table = captions_by_image(c2i, n_img)
    a = np.concatenate([twins[:, 0], twins[:, 1]])
    b = np.concatenate([twins[:, 1], twins[:, 0]])

    def discriminative(caps: np.ndarray, against: np.ndarray) -> np.ndarray:
        """Which table entries are real captions not relevant to image `against` (row-wise)."""
        real = caps >= 0
        safe = np.where(real, caps, 0)
        rows = np.broadcast_to(against[:, None], caps.shape)
        if rel is None:
            relevant = c2i[safe] == rows
        else:
            relevant = np.asarray(rel[safe.ravel(), rows.ravel()]).reshape(caps.shape).astype(bool)
        if und is not None:
            relevant |= np.asarray(und[safe.ravel(), rows.ravel()]).reshape(caps.shape).astype(bool)
        return real & ~relevant

    own, other = table[a], table[b]
    own_ok, other_ok = discriminative(own, b), discriminative(other, a)

    def gather(img: np.ndarray, caps: np.ndarray) -> torch.Tensor:
        rows = np.broadcast_to(img[:, None], caps.shape).ravel()
        return source.pairs(rows, np.where(caps >= 0, caps, 0).ravel()).reshape(caps.shape)

    s_own = gather(a, own)  # S[a, c], c in a's captions
    s_twin = gather(b, own)  # S[b, c]
    s_other = gather(a, other)  # S[a, c'], c' in b's captions
    beats = torch.gt if pessimistic else torch.ge
    own_ok_t = torch.as_tensor(own_ok, device=s_own.device)
    other_ok_t = torch.as_tensor(other_ok, device=s_own.device)

    n_t2i = int(own_ok.sum())
    t2i = percent(int((beats(s_own, s_twin) & own_ok_t).sum()), n_t2i) if n_t2i else None

    valid = own_ok_t[:, :, None] & other_ok_t[:, None, :]
    wins = (beats(s_own[:, :, None], s_other[:, None, :]) & valid).sum((1, 2)).double()
    trials = valid.sum((1, 2)).double()
    has = trials > 0
    i2t = percent(float((wins[has] / trials[has]).sum()), int(has.sum())) if bool(has.any()) else None
    return {"twin_acc_t2i": t2i, "twin_acc_i2t": i2t}


def ranks_without(scores: ArrayLike | ScoreSource, caption_to_image: np.ndarray, exclude, *,
                  tie_policy: str = "pessimistic", chunk_rows: int | None = None) -> Ranks:
    """`ground_truth_ranks` with some (caption, image) pairs taken out of both galleries.

    exclude: captions x images (sparse bool). An excluded caption no longer counts among the items
    ahead of an image's best own caption, an excluded image no longer among those ahead of a
    caption's own image. A caption's own image is never excluded.
    """
    source = as_score_source(scores)
    n_img, n_cap = source.shape
    c2i = check_caption_to_image(caption_to_image, n_img, n_cap)
    ranks = ground_truth_ranks(source, c2i, tie_policy=tie_policy, chunk_rows=chunk_rows)
    ex = _as_bool_csr(exclude, (n_cap, n_img), "the excluded pairs").tocoo()
    keep = ex.col != c2i[ex.row]
    caps, imgs = ex.row[keep].astype(np.int64), ex.col[keep].astype(np.int64)
    if len(caps) == 0:
        return ranks
    ahead = torch.ge if is_pessimistic(tie_policy) else torch.gt
    own = source.pairs(c2i, np.arange(n_cap)).double()
    best = torch.full((n_img,), float("-inf"), dtype=torch.float64, device=own.device)
    best = best.scatter_reduce(0, torch.as_tensor(c2i, device=own.device), own, reduce="amax")
    value = source.pairs(imgs, caps).double()
    # an image query loses the excluded captions that were ahead of its best own caption
    i2t = ahead(value, best[torch.as_tensor(imgs, device=own.device)]).cpu().numpy()
    # a caption query loses the excluded images that were ahead of its own image
    t2i = ahead(value, own[torch.as_tensor(caps, device=own.device)]).cpu().numpy()
    return Ranks(i2t=ranks.i2t - np.bincount(imgs[i2t], minlength=n_img),
                 t2i=ranks.t2i - np.bincount(caps[t2i], minlength=n_cap))


def pair_accuracy(scores: ArrayLike | ScoreSource, images: np.ndarray, true_cols: np.ndarray,
                  foil_cols: np.ndarray, *, tie_policy: str = "pessimistic") -> np.ndarray:
    """Per minimal pair k: 1.0 where image images[k] scores true_cols[k] above foil_cols[k], else 0.0.

    Pessimistic: strictly above (a tie is a loss); optimistic: at least as high.
    """
    source = as_score_source(scores)
    beats = torch.gt if is_pessimistic(tie_policy) else torch.ge
    images = np.asarray(images, dtype=np.int64)
    if len(images) == 0:
        return np.zeros(0)
    s_true = source.pairs(images, np.asarray(true_cols, dtype=np.int64))
    s_foil = source.pairs(images, np.asarray(foil_cols, dtype=np.int64))
    return beats(s_true, s_foil).double().cpu().numpy()


def set_coverage(scores: ArrayLike | ScoreSource, caption_to_image: np.ndarray, targets: np.ndarray,
                 relevance, undetermined=None, *, tie_policy: str = "pessimistic",
                 chunk_rows: int | None = None) -> float | None:
    """Mean over images of the share of their own target captions ranked above every irrelevant caption.

    targets: boolean per caption column (e.g. the single-object captions of the set track). A
    caption is irrelevant to an image where `relevance` (captions x images) is False and, given
    `undetermined`, the pair is not undetermined. Pessimistic: strictly above the best irrelevant
    caption; optimistic: at least as high. Images without a target caption are skipped; an image
    with no irrelevant caption covers all of its targets. None when no image has a target.
    """
    source = as_score_source(scores)
    n_img, n_cap = source.shape
    c2i = check_caption_to_image(caption_to_image, n_img, n_cap)
    targets = np.asarray(targets, dtype=bool)
    if targets.shape != (n_cap,):
        raise ItmatchError(f"targets must have one flag per caption column ({n_cap}), got shape {targets.shape}")
    if not targets.any():
        return None
    rel = _as_bool_csr(relevance, (n_cap, n_img), "the relevance matrix")
    if undetermined is not None:
        rel = rel.maximum(_as_bool_csr(undetermined, (n_cap, n_img), "the undetermined pairs"))
    not_irrelevant = rel.T.tocsr()  # images x captions
    beats = torch.gt if is_pessimistic(tie_policy) else torch.ge
    worst = np.empty(n_img)  # best score among each image's irrelevant captions
    for start, stop in _row_blocks(n_img, chunk_rows or source.chunk_rows, "coverage"):
        block = source.rows(start, stop)
        mask = torch.as_tensor(not_irrelevant[start:stop].toarray(), device=block.device)
        worst[start:stop] = torch.where(mask, float("-inf"), block.double()).max(1).values.cpu().numpy()
    cols = np.flatnonzero(targets)
    imgs = c2i[cols]
    won = beats(source.pairs(imgs, cols).double().cpu(), torch.as_tensor(worst[imgs])).double().numpy()
    per_image = np.bincount(imgs, weights=won, minlength=n_img) / np.maximum(np.bincount(imgs, minlength=n_img), 1)
    covered = per_image[np.unique(imgs)]
    return percent(float(covered.sum()), len(covered))


def check_twins(twins: np.ndarray, n_images: int) -> np.ndarray:
    t = np.asarray(twins)
    if t.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if t.ndim != 2 or t.shape[1] != 2 or t.dtype.kind not in "iu":
        raise ItmatchError(f"twins must be a K x 2 integer array of image rows, got dtype {t.dtype} "
                           f"and shape {t.shape}")
    t = t.astype(np.int64)
    bad = np.flatnonzero(((t < 0) | (t >= n_images)).any(1) | (t[:, 0] == t[:, 1]))
    if len(bad):
        raise ItmatchError(f"twin pair(s) {_few(bad)} name an image row outside 0..{n_images - 1} "
                           f"or the same image twice")
    return t
