"""ECCV Caption metrics (Chun et al. 2022) through the `eccv-caption` package.

The package ranks by COCO ids: image queries are COCO 2014 image ids, caption queries are caption
annotation ids. Rows and columns are mapped to those ids explicitly (`split.image_ids`,
`split.caption_ids`), never by position, and the mapping is checked against the package's own COCO
5K test files. The package reads only the first R items of each ranked list (R <= 48), so each
query gets its top max(50, R) items, ordered by score with ties broken by our tie policy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from itmatch.errors import ItmatchError
from itmatch.evaluation.ranking import _row_blocks, is_pessimistic
from itmatch.evaluation.scores import ScoreSource, _few, as_score_source

ECCV_TARGETS = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision")
MIN_LIST_LENGTH = 50


@functools.lru_cache(maxsize=1)
def eccv_package():
    """The package's `Metrics` object (loads its packaged json files once, ~0.1 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson": harmless, json is used instead
        from eccv_caption import Metrics

        return Metrics()


@functools.lru_cache(maxsize=1)
def _coco_test_set() -> tuple[dict[int, int], np.ndarray]:
    """COCO 5K test: caption annotation id -> its COCO image id, and the 25,000 caption ids in order."""
    m = eccv_package()
    caption_ids = np.asarray(m.coco_ids, dtype=np.int64)
    return {int(c): int(m.coco_gts["t2i"][int(c)][0]) for c in caption_ids}, caption_ids


def _int_ids(ids: Sequence | None, what: str) -> np.ndarray:
    if ids is None:
        raise ItmatchError(f"protocol eccv needs the split's {what} ids (COCO ids), but the split has none")
    out = np.empty(len(ids), dtype=np.int64)
    for k, value in enumerate(ids):
        try:
            out[k] = int(value)
        except (TypeError, ValueError):
            raise ItmatchError(f"{what} id {value!r} at position {k} is not an integer COCO id") from None
    uniq, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        raise ItmatchError(f"duplicate {what} id(s) {_few(uniq[counts > 1])}: each row/column needs its own id")
    return out


def map_coco_ids(image_ids: Sequence, caption_ids: Sequence | None, caption_to_image: np.ndarray
                 ) -> tuple[dict[int, int], dict[int, int]]:
    """COCO image id -> row and caption annotation id -> column, checked against ECCV's COCO 5K test set."""
    img = _int_ids(image_ids, "image")
    cap = _int_ids(caption_ids, "caption")
    image_of_caption, coco_captions = _coco_test_set()
    coco_images = set(image_of_caption.values())

    unknown_rows = np.flatnonzero([i not in coco_images for i in img])
    if len(unknown_rows):
        raise ItmatchError(f"image row(s) {_few(unknown_rows)} have ids {_few(img[unknown_rows])} that are not "
                           f"COCO 5K test images known to eccv-caption")
    unknown_cols = np.flatnonzero([c not in image_of_caption for c in cap])
    if len(unknown_cols):
        raise ItmatchError(f"caption column(s) {_few(unknown_cols)} have ids {_few(cap[unknown_cols])} that are "
                           f"not COCO 5K test caption annotation ids known to eccv-caption")
    missing_img = sorted(coco_images - set(img.tolist()))
    if missing_img:
        raise ItmatchError(f"eccv needs all 5000 COCO 5K test images; {len(missing_img)} are missing "
                           f"(e.g. image id {missing_img[0]})")
    missing_cap = sorted(set(coco_captions.tolist()) - set(cap.tolist()))
    if missing_cap:
        raise ItmatchError(f"eccv needs all 25000 COCO 5K test captions; {len(missing_cap)} are missing "
                           f"(e.g. caption id {missing_cap[0]})")
    owner = np.array([image_of_caption[c] for c in cap], dtype=np.int64)
    wrong = np.flatnonzero(owner != img[caption_to_image])
    if len(wrong):
        c = int(wrong[0])
        raise ItmatchError(f"caption column(s) {_few(wrong)} are mapped to the wrong image: caption id {cap[c]} "
                           f"belongs to COCO image {owner[c]} but caption_to_image puts it on row "
                           f"{caption_to_image[c]} (image id {img[caption_to_image[c]]})")
    return ({int(i): r for r, i in enumerate(img)}, {int(c): k for k, c in enumerate(cap)})


def eccv_positives(row_of_image: dict[int, int], col_of_caption: dict[int, int]):
    """ECCV's positives as index structures over our rows/columns.

    Returns (i2t query rows, i2t positives (queries x captions csr), i2t R,
             t2i query cols, t2i positives (queries x images csr), t2i R); R counts every positive
    ECCV lists, including the two caption ids that are not among the 25,000 test captions.
    """
    gts = eccv_package().eccv_gts
    n_img, n_cap = len(row_of_image), len(col_of_caption)

    def build(queries: dict, to_query: dict, to_item: dict, n_items: int):
        q_index = np.array([to_query[int(q)] for q in queries], dtype=np.int64)
        rows, cols, n_rel = [], [], []
        for k, positives in enumerate(queries.values()):
            items = {to_item[int(p)] for p in positives if int(p) in to_item}
            rows.extend([k] * len(items))
            cols.extend(sorted(items))
            n_rel.append(len(set(positives)))
        mat = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(len(queries), n_items))
        return q_index, mat, np.asarray(n_rel, dtype=np.int64)

    return (*build(gts["i2t"], row_of_image, col_of_caption, n_cap),
            *build(gts["t2i"], col_of_caption, row_of_image, n_img))


def ranked_lists(scores: torch.Tensor, positives: torch.Tensor, length: int, pessimistic: bool) -> torch.Tensor:
    """Top `length` item indices per query row, by score descending; ties put negatives first
    (pessimistic) or positives first (optimistic).

    Only candidates scoring at least the length-th best score can enter the list (all of them, so
    ties at the cut are complete); they are ordered by two stable sorts: tie class, then score.
    """
    length = min(length, scores.shape[1])
    cut = scores.topk(length, dim=1).values[:, -1:]
    n_cand = int((scores >= cut).sum(1, dtype=torch.int32).max())
    cand = scores.topk(n_cand, dim=1).indices
    tie_class = positives.gather(1, cand)
    pre = torch.argsort((tie_class if pessimistic else ~tie_class).to(torch.uint8), dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, cand.gather(1, pre)), dim=1, descending=True, stable=True)
    return cand.gather(1, pre.gather(1, by_score[:, :length]))


def eccv_rankings(scores, image_ids: Sequence, caption_ids: Sequence | None, caption_to_image: np.ndarray, *,
                  tie_policy: str = "pessimistic", chunk_rows: int | None = None
                  ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The ranked id lists eccv-caption expects, for ECCV's query images and query captions."""
    source: ScoreSource = as_score_source(scores)
    pessimistic = is_pessimistic(tie_policy)
    n_img, n_cap = source.shape
    row_of_image, col_of_caption = map_coco_ids(image_ids, caption_ids, caption_to_image)
    image_id = np.array(list(row_of_image), dtype=np.int64)  # row -> COCO image id
    caption_id = np.array(list(col_of_caption), dtype=np.int64)  # column -> caption annotation id
    q_rows, pos_i2t, rel_i2t, q_cols, pos_t2i, rel_t2i = eccv_positives(row_of_image, col_of_caption)
    len_i2t = min(n_cap, max(MIN_LIST_LENGTH, int(rel_i2t.max())))
    len_t2i = min(n_img, max(MIN_LIST_LENGTH, int(rel_t2i.max())))
    dev = source.device

    query_of_row = np.full(n_img, -1, dtype=np.int64)
    query_of_row[q_rows] = np.arange(len(q_rows))
    i2t_top = np.zeros((len(q_rows), len_i2t), dtype=np.int64)
    t2i_parts = []
    q_cols_t = torch.as_tensor(q_cols, device=dev)
    for start, stop in _row_blocks(n_img, chunk_rows or source.chunk_rows, "eccv"):
        block = source.rows(start, stop)
        local = np.flatnonzero(query_of_row[start:stop] >= 0)
        if len(local):
            queries = query_of_row[start + local]
            pos = torch.as_tensor(pos_i2t[queries].toarray(), device=dev)
            top = ranked_lists(block[torch.as_tensor(local, device=dev)], pos, len_i2t, pessimistic)
            i2t_top[queries] = top.cpu().numpy()
        t2i_parts.append(block[:, q_cols_t])
    t2i_pos = torch.as_tensor(pos_t2i.toarray(), device=dev)
    t2i_top = ranked_lists(torch.cat(t2i_parts, 0).T.contiguous(), t2i_pos, len_t2i, pessimistic).cpu().numpy()

    i2t = {int(image_id[r]): caption_id[i2t_top[k]].tolist() for k, r in enumerate(q_rows)}
    t2i = {int(caption_id[c]): image_id[t2i_top[k]].tolist() for k, c in enumerate(q_cols)}
    return i2t, t2i


def eccv_metrics(scores, image_ids: Sequence, caption_ids: Sequence | None, caption_to_image: np.ndarray, *,
                 tie_policy: str = "pessimistic", chunk_rows: int | None = None) -> dict[str, float]:
    """ECCV Caption mAP@R, R-Precision and R@1 in both directions, in percent, from eccv-caption."""
    i2t, t2i = eccv_rankings(scores, image_ids, caption_ids, caption_to_image, tie_policy=tie_policy,
                             chunk_rows=chunk_rows)
    # The package always draws a tqdm bar on stderr; keep logs clean.
    with contextlib.redirect_stderr(io.StringIO()):
        result = eccv_package().compute_all_metrics(i2t, t2i, target_metrics=ECCV_TARGETS)
    out = {}
    for name in ("map_at_r", "rprecision", "r1"):
        for direction in ("i2t", "t2i"):
            out[f"eccv_{name}_{direction}"] = 100.0 * float(result[f"eccv_{name}"][direction])
    return out
