"""Shortlist re-ranking of `score` models: a cheap global first stage, exact scores only where it matters.

A fragment model's exact similarity costs a (regions x words) block of cosines per pair. The first stage
gives every item one vector (`first_stage_embeddings`: the model's own global head where it has one,
`first_stage(enc)`, else the L2-normalised mean of its unit fragments), and keeps for each image its
top `k_i2t` captions and for each caption its top `k_t2i` images (`topk_indices`, `shortlist_pairs`). Only
the union of those pairs is scored exactly (`score_shortlist`), image by image, each pair once: by the
model's `candidate_scorer` where it has one (fragment models: one image against its candidates' real
words), else by `similarity` on the gathered candidates.

`ShortlistScores` is a `ScoreSource` for the metric engine: a shortlisted pair holds its exact score; any
other pair holds `floor + first-stage score`, with `floor` below every exact score by more than the
first stage's range, so within every query's ranking the shortlisted candidates come first, in exact
order, and the rest follow in first-stage order. With k equal to the number of candidates every pair is
exact and the metrics are those of exhaustive scoring.

These are plain functions on encodings, so the search layer (`retrieval/`) can call them directly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from itmatch.evaluation.scores import ScoreSource
from itmatch.models.contract import Encoding, Fragments

TOPK_CHUNK = 1024  # queries per first-stage block

# A model's exact scorer of one image (an encoding of length 1) against candidate captions (indices into
# the caption set it was made for): `model.candidate_scorer(captions)` where the model defines it.
CandidateScorer = Callable[[Encoding, torch.Tensor], torch.Tensor]


def mean_pooled(enc: Fragments) -> torch.Tensor:
    """(N, D) L2-normalised mean of each item's real fragments: the default first stage."""
    mask = enc.mask.to(enc.features.dtype).unsqueeze(-1)
    mean = (enc.features * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def first_stage_embeddings(model, enc: Encoding) -> torch.Tensor:
    """(N, D) first-stage vectors: `model.first_stage(enc)` where defined, else `mean_pooled`.
    The one first stage of score models, for the shortlist here and the vector index (retrieval/)."""
    head = getattr(model, "first_stage", None)
    if callable(head):
        return head(enc)
    if isinstance(enc, Fragments):
        return mean_pooled(enc)
    return torch.nn.functional.normalize(enc.flatten(1) if enc.ndim == 3 else enc, dim=-1)


def topk_indices(queries: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """(Nq, min(k, Nc)) candidate indices of the highest dot products per query, best first."""
    k = min(int(k), candidates.shape[0])
    out = torch.empty(queries.shape[0], k, dtype=torch.long)
    for start in range(0, queries.shape[0], TOPK_CHUNK):
        block = queries[start:start + TOPK_CHUNK] @ candidates.T
        out[start:start + TOPK_CHUNK] = block.topk(k, dim=1).indices.cpu()
    return out


def shortlist_pairs(img_emb: torch.Tensor, cap_emb: torch.Tensor, k_i2t: int, k_t2i: int) -> sp.csr_matrix:
    """(n_img, n_cap) boolean CSR of the pairs to score exactly: each image's top-k_i2t captions and each
    caption's top-k_t2i images, the union (a pair in both lists appears once)."""
    n_img, n_cap = img_emb.shape[0], cap_emb.shape[0]
    i2t = topk_indices(img_emb, cap_emb, k_i2t).numpy()
    t2i = topk_indices(cap_emb, img_emb, k_t2i).numpy()
    rows = np.concatenate([np.repeat(np.arange(n_img), i2t.shape[1]), t2i.ravel()])
    cols = np.concatenate([i2t.ravel(), np.repeat(np.arange(n_cap), t2i.shape[1])])
    pairs = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n_img, n_cap))
    pairs.sum_duplicates()
    pairs.sort_indices()
    return pairs


@torch.inference_mode()
def score_shortlist(similarity: Callable[[Encoding, Encoding], torch.Tensor], images: Encoding, captions: Encoding,
                    pairs: sp.csr_matrix, max_cols: int = 4096, device: torch.device | str = "cpu",
                    candidate_scorer: CandidateScorer | None = None) -> np.ndarray:
    """Exact scores of the shortlisted pairs, aligned with `pairs.indices` (float32), one image at a time,
    so no pair is scored twice. With `candidate_scorer` (a model's `candidate_scorer(captions)`, e.g. TERAN's:
    real words only, gathered in cache-sized chunks) each image is scored against its candidates by it;
    otherwise its candidate captions are gathered (at most `max_cols` per call) and passed to `similarity`."""
    out = np.empty(pairs.nnz, dtype=np.float32)
    for i in range(pairs.shape[0]):
        lo, hi = pairs.indptr[i], pairs.indptr[i + 1]
        if lo == hi:
            continue
        img = images[i:i + 1].to(device)
        if candidate_scorer is not None:
            cols = torch.from_numpy(pairs.indices[lo:hi].astype(np.int64))
            out[lo:hi] = candidate_scorer(img, cols).float().cpu().numpy()
            continue
        for c0 in range(lo, hi, max_cols):
            c1 = min(c0 + max_cols, hi)
            cols = torch.as_tensor(pairs.indices[c0:c1])
            out[c0:c1] = similarity(img, captions[cols].to(device)).float().cpu().numpy()[0]
    return out


class ShortlistScores(ScoreSource):
    """Exact scores on the shortlist, first-stage scores below them elsewhere (see the module doc)."""

    def __init__(self, similarity, images: Encoding, captions: Encoding, img_emb: torch.Tensor,
                 cap_emb: torch.Tensor, k_i2t: int, k_t2i: int, name: str = "shortlist scores",
                 candidate_scorer: CandidateScorer | None = None):
        self.shape = (len(images), len(captions))
        self.name = name
        self.img_emb, self.cap_emb = img_emb.float().cpu(), cap_emb.float().cpu()
        self.shortlist = shortlist_pairs(self.img_emb, self.cap_emb, k_i2t, k_t2i)
        self.exact = score_shortlist(similarity, images, captions, self.shortlist, candidate_scorer=candidate_scorer)
        # first-stage scores are cosines in [-1, 1]: 3 below the lowest exact score keeps them all below
        low = float(self.exact.min()) if self.exact.size else 0.0
        self.floor = low - 3.0
        short = self.shortlist
        self._lookup = sp.csr_matrix((np.arange(1, short.nnz + 1), short.indices, short.indptr), shape=self.shape)

    @classmethod
    def for_model(cls, model, images: Encoding, captions: Encoding, k: int, k_t2i: int | None = None):
        """The shortlist source of a model on encoded items, first stage from `first_stage_embeddings`, exact
        stage by the model's `candidate_scorer` where it has one."""
        make_scorer = getattr(model, "candidate_scorer", None)
        return cls(model.similarity, images, captions, first_stage_embeddings(model, images),
                   first_stage_embeddings(model, captions), k, k if k_t2i is None else k_t2i,
                   name=f"{type(model).__name__} shortlist scores (k={k})",
                   candidate_scorer=make_scorer(captions) if callable(make_scorer) else None)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        block = self.img_emb[start:stop] @ self.cap_emb.T + self.floor
        sub = self.shortlist[start:stop]
        local_rows = np.repeat(np.arange(stop - start), np.diff(sub.indptr))
        values = self.exact[self.shortlist.indptr[start]:self.shortlist.indptr[stop]]
        block[torch.as_tensor(local_rows), torch.as_tensor(sub.indices.astype(np.int64))] = torch.from_numpy(values)
        return block

    def _pairs(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        values = (self.img_emb[torch.as_tensor(rows)] * self.cap_emb[torch.as_tensor(cols)]).sum(-1) + self.floor
        slot = np.asarray(self._lookup[rows, cols]).ravel()
        hit = slot > 0
        values[torch.as_tensor(hit)] = torch.from_numpy(self.exact[slot[hit] - 1])
        return values

    def recall(self, caption_to_image: np.ndarray, captions: np.ndarray | None = None,
               relevance: sp.spmatrix | None = None) -> dict[str, float]:
        """How much of the ground truth the shortlist holds (percentages): `gt_pairs`, the share of (own
        image, caption) pairs scored exactly (= captions whose image is among their exact candidates);
        `i2t`, images with one of their captions among theirs; `pairs_scored`. `captions` restricts the
        ground truth to those captions (scenes: the main ones, not the foils, which are false of their
        image); with `relevance` (captions x images) also `relevant_pairs`, the share of all relevant
        pairs of those captions that are scored exactly (what mAP@R ranks)."""
        c2i = np.asarray(caption_to_image, dtype=np.int64)
        cols = np.arange(len(c2i)) if captions is None else np.asarray(captions, dtype=np.int64)
        inside = np.asarray(self.shortlist[c2i[cols], cols]).ravel().astype(bool)
        per_image = np.zeros(self.shape[0], dtype=bool)
        per_image[c2i[cols][inside]] = True
        has_caption = np.bincount(c2i[cols], minlength=self.shape[0]) > 0
        out = {"gt_pairs": 100.0 * inside.mean(), "i2t": 100.0 * per_image[has_caption].mean(),
               "pairs_scored": 100.0 * self.shortlist.nnz / max(1, self.shape[0] * self.shape[1])}
        if relevance is not None:
            rel = sp.csr_matrix(relevance, dtype=bool)[cols].tocoo()
            hits = np.asarray(self.shortlist[rel.col, cols[rel.row]]).ravel().astype(bool)
            out["relevant_pairs"] = 100.0 * hits.mean() if hits.size else float("nan")
        return out
