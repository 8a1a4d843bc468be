"""Fine-grained matching of every image with every caption of a batch, from their fragments.

For all N_img x N_txt pairs at once (no loop over pairs): the region-word cosine similarities,
each fragment's best match on the other side, their mean (HREM Eq. 7, the matching value p) and
their top-K (Eq. 8, the matching vector q). Padding never matches and never counts.

`scores="scan"` (default, as HREM's public code) passes the cosines through LeakyReLU(0.1) and an
l2 normalisation across the fragments being matched *to* (SCAN's attention normalisation) before
taking maxima; `scores="cosine"` takes Eq. 7 literally on the cosines.

`fragment_scores` (MrSw and its variants) is the pair-joint score of fragment models (TERAN): the similarity
a `score` model evaluates with, in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from itmatch.errors import ItmatchError

SCORES = ("scan", "cosine")


@dataclass
class FragmentMatching:
    p_i2t: torch.Tensor  # (N_img, N_txt): mean over regions of the best word
    p_t2i: torch.Tensor  # (N_txt, N_img): mean over words of the best region
    q_i2t: torch.Tensor  # (N_img, N_txt, K): top-K region maxima (0 where an image has fewer than K)
    q_t2i: torch.Tensor  # (N_txt, N_img, K)


def _topk_padded(values: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k along the last axis among valid entries; missing slots (fewer than k) are 0."""
    filled = values.masked_fill(~valid, float("-inf"))
    if filled.shape[-1] < k:
        pad = filled.new_full((*filled.shape[:-1], k - filled.shape[-1]), float("-inf"))
        filled = torch.cat([filled, pad], -1)
    top = filled.topk(k, dim=-1).values
    return top.masked_fill(torch.isinf(top), 0.0)


def _masked_max(sim: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    return sim.masked_fill(~valid, float("-inf")).amax(dim=dim)


# Elements of one image chunk's (n, R, N_words) score block on the no-grad path: 4M floats = 16 MiB,
# small enough to stay near the cache and to bound memory at any batch size.
CHUNK_ELEMENTS = 1 << 22


def fragment_matching(img_frag: torch.Tensor, img_mask: torch.Tensor, txt_frag: torch.Tensor,
                      txt_mask: torch.Tensor, k: int, scores: str = "scan") -> FragmentMatching:
    """p and q of Eq. 7-8 for every (image, caption) pair of two fragment batches.

    With detached inputs (HREM's default, `detach_fragments`) or grad off, this runs chunk by chunk
    over images in place (`_matching_maxima_nograd`); otherwise through autograd on the full tensor."""
    if scores not in SCORES:
        raise ItmatchError(f"config key 'hrem.matching': unknown {scores!r} (use {', '.join(SCORES)})")
    needs_grad = torch.is_grad_enabled() and (img_frag.requires_grad or txt_frag.requires_grad)
    maxima = _matching_maxima_autograd if needs_grad else _matching_maxima_nograd
    region_best, word_best = maxima(img_frag, img_mask, txt_frag, txt_mask, scores)
    ni, nr = img_mask.shape
    nt, nw = txt_mask.shape
    rmask = img_mask[:, None, :].expand(ni, nt, nr)
    wmask = txt_mask[:, None, :].expand(nt, ni, nw)
    region_best = region_best.masked_fill(~rmask, 0.0)
    word_best = word_best.masked_fill(~wmask, 0.0)
    p_i2t = region_best.sum(-1) / img_mask.sum(1).clamp(min=1)[:, None]
    p_t2i = word_best.sum(-1) / txt_mask.sum(1).clamp(min=1)[:, None]
    return FragmentMatching(p_i2t, p_t2i, _topk_padded(region_best, rmask, k), _topk_padded(word_best, wmask, k))


def _matching_maxima_autograd(img_frag, img_mask, txt_frag, txt_mask, scores):
    """(region_best (Ni, Nt, R), word_best (Nt, Ni, T)) through out-of-place ops that autograd can follow."""
    r = F.normalize(img_frag, dim=-1)  # (Ni, R, d)
    c = F.normalize(txt_frag, dim=-1)  # (Nt, T, d)
    ni, nr = r.shape[:2]
    nt, nw = c.shape[:2]
    # One matmul: (Ni*R, d) x (d, Nt*T) -> (Ni, R, Nt, T); memory Ni*R*Nt*T, never times d.
    sim = (r.reshape(ni * nr, -1) @ c.reshape(nt * nw, -1).T).view(ni, nr, nt, nw)
    valid = img_mask[:, :, None, None] & txt_mask[None, None, :, :]
    if scores == "scan":
        sim = F.leaky_relu(sim, 0.1).masked_fill(~valid, 0.0)
        # Best word of each region: the scores of a word are normalised across the image's regions.
        to_regions = F.normalize(sim, dim=1)
        # Best region of each word: the scores of a region are normalised across the caption's words.
        to_words = F.normalize(sim, dim=3)
    else:
        to_regions = to_words = sim
    region_best = _masked_max(to_regions, valid, dim=3).permute(0, 2, 1)  # (Ni, Nt, R)
    word_best = _masked_max(to_words, valid, dim=1).permute(1, 0, 2)  # (Nt, Ni, T)
    return region_best, word_best


@torch.no_grad()
def _matching_maxima_nograd(img_frag, img_mask, txt_frag, txt_mask, scores, eps: float = 1e-12):
    """The same maxima without autograd, on the real words only: one (n, R, N_words) block of images at
    a time, where N_words counts the batch's real words (a padded batch of captions is mostly padding;
    scenes: a third of the slots are words).

    The real words are packed caption after caption, so each caption's words are one contiguous
    run of columns: the norm across a caption's words is a sum per run (`index_add_`) and a region's
    best word in a caption is a maximum per run (numpy's `maximum.reduceat`). Padded regions are
    zeroed before the matmul, so their scores are 0 exactly as the masked_fill of the autograd path
    leaves them; they are set to -inf (once, by row index) before the maxima over regions."""
    r = F.normalize(img_frag, dim=-1) * img_mask[..., None]
    ni, nr = r.shape[:2]
    nt, nw = txt_mask.shape
    words = F.normalize(txt_frag[txt_mask], dim=-1)  # (N_words, d), caption by caption
    lengths = txt_mask.sum(1)
    caption = torch.arange(nt, device=txt_mask.device).repeat_interleave(lengths)  # caption of each packed word
    position = txt_mask.nonzero()[:, 1]  # its slot in the padded caption
    has_words = lengths > 0
    starts = (torch.cumsum(lengths, 0) - lengths)[has_words]  # where each caption's run begins
    region_best = r.new_full((ni, nt, nr), float("-inf"))  # a caption without words matches nothing
    word_best = r.new_full((nt, ni, nw), float("-inf"))  # padded words: masked by the caller
    pad_regions = torch.nonzero(~img_mask.reshape(-1)).squeeze(1)
    step = max(1, CHUNK_ELEMENTS // max(1, nr * len(words)))
    for start in range(0, ni, step):
        stop = min(ni, start + step)
        n = stop - start
        sim = r[start:stop].reshape(n * nr, -1) @ words.T  # (n*R, N_words)
        if scores == "scan":
            F.leaky_relu_(sim, 0.1)
            squares = sim.square()
            # the norms F.normalize divides by: across the regions of each image, across each caption's words
            to_regions = squares.view(n, nr, -1).sum(1, keepdim=True).sqrt_().clamp_min_(eps)
            to_words = squares.new_zeros(n * nr, nt).index_add_(1, caption, squares).sqrt_().clamp_min_(eps)
            del squares
            by_region = torch.div(sim.view(n, nr, -1), to_regions).view(n * nr, -1)
            by_word = torch.div(sim, to_words[:, caption])
        else:
            by_region = by_word = sim
        if len(words):
            best = _run_maxima(by_region, starts)  # (n*R, captions with words)
            region_best[start:stop, has_words] = best.view(n, nr, -1).transpose(1, 2)
        rows = pad_regions[(pad_regions >= start * nr) & (pad_regions < stop * nr)] - start * nr
        if len(rows):
            by_word.index_fill_(0, rows, float("-inf"))
        word_best[caption, start:stop, position] = by_word.view(n, nr, -1).amax(1).T
    return region_best, word_best


def _run_maxima(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(rows, len(starts)) maximum of each run of columns; the runs are non-empty, contiguous, in order,
    begin at `starts` (ascending) and together cover every column."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.maximum.reduceat(values.numpy(), starts.cpu().numpy(), axis=1))
    # elsewhere (GPU, half precision): a scatter of every column into its run's slot
    slot = torch.searchsorted(starts, torch.arange(values.shape[1], device=values.device), right=True) - 1
    out = values.new_full((values.shape[0], len(starts)), float("-inf"))
    return out.scatter_reduce_(1, slot.expand_as(values), values, "amax")


REGION_REDUCE = ("max", "sum")
WORD_REDUCE = ("sum", "mean")


def unit_fragments(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised fragments with padded slots exactly zero (what `fragment_scores` reads when
    `normalized=True`: score models normalise once at encoding, not once per block)."""
    return F.normalize(features, dim=-1).masked_fill(~mask.unsqueeze(-1), 0.0)


def fragment_scores(img_frag: torch.Tensor, img_mask: torch.Tensor, txt_frag: torch.Tensor, txt_mask: torch.Tensor,
                    region_reduce: str = "max", word_reduce: str = "sum", normalized: bool = False) -> torch.Tensor:
    """(Ni, Nt) region-word cosine scores of every image with every caption of a block (TERAN's alignment).

    `region_reduce="max"`, `word_reduce="sum"` is MrSw: each word's best region cosine, summed over the
    words; `region_reduce="sum"` sums over regions instead (TERAN's "SrSw"); `word_reduce="mean"` divides by
    the caption's word count. One GEMM (Ni*R, d) x (d, Nt*T) scores the whole block, so every pair of the
    block is computed once, with no loop; memory is Ni*R*Nt*T scores (the caller bounds Ni x Nt through the
    model's score_block). Padding never counts: padded regions never win the max (an image without any
    real region scores 0), padded words add 0.
    """
    if region_reduce not in REGION_REDUCE:
        raise ValueError(f"region_reduce must be one of {REGION_REDUCE}, got {region_reduce!r}")
    if word_reduce not in WORD_REDUCE:
        raise ValueError(f"word_reduce must be one of {WORD_REDUCE}, got {word_reduce!r}")
    r = img_frag if normalized else unit_fragments(img_frag, img_mask)
    c = txt_frag if normalized else unit_fragments(txt_frag, txt_mask)
    ni, nr, d = r.shape
    nt, nw = c.shape[:2]
    sim = (r.reshape(ni * nr, d) @ c.reshape(nt * nw, d).T).view(ni, nr, nt * nw)
    if region_reduce == "max":
        if not bool(img_mask.all()):
            sim = sim.masked_fill(~img_mask[:, :, None], float("-inf"))
        best = sim.amax(1)
        if not bool(img_mask.any(1).all()):  # an image without regions: -inf everywhere, score 0
            best = best.masked_fill(~img_mask.any(1)[:, None], 0.0)
    else:
        best = sim.sum(1)  # padded regions are zero vectors: they add 0
    # padded words are zero vectors, so every region scores 0 with them: they add 0 to the sum
    out = best.view(ni, nt, nw).sum(-1)
    if word_reduce == "mean":
        out = out / txt_mask.sum(1).clamp(min=1)[None, :]
    return out


def max_region_similarity(img_frag: torch.Tensor, img_mask: torch.Tensor, txt_frag: torch.Tensor,
                          txt_mask: torch.Tensor, word_reduce: str = "sum") -> torch.Tensor:
    """(Ni, Nt) TERAN-style MrSw scores: each word's best region cosine, summed (or averaged) over words."""
    return fragment_scores(img_frag, img_mask, txt_frag, txt_mask, "max", word_reduce)


def pair_fragment_scores(img_frag: torch.Tensor, img_mask: torch.Tensor, txt_frag: torch.Tensor,
                         txt_mask: torch.Tensor, region_reduce: str = "max", word_reduce: str = "sum",
                         normalized: bool = False) -> torch.Tensor:
    """(P,) scores of aligned pairs img[p], txt[p] (the diagonal of `fragment_scores`), by one bmm."""
    r = img_frag if normalized else unit_fragments(img_frag, img_mask)
    c = txt_frag if normalized else unit_fragments(txt_frag, txt_mask)
    sim = torch.bmm(r, c.transpose(1, 2))  # (P, R, T)
    if region_reduce == "max":
        best = sim.masked_fill(~img_mask[:, :, None], float("-inf")).amax(1)
        best = best.masked_fill(~img_mask.any(1)[:, None], 0.0)
    else:
        best = sim.sum(1)
    out = best.masked_fill(~txt_mask, 0.0).sum(-1)
    if word_reduce == "mean":
        out = out / txt_mask.sum(1).clamp(min=1)
    return out


# Word rows gathered per GEMM on the candidate path: 2 MiB of float32 at d 1024, about one core's L2,
# so the gathered words are still in cache when the GEMM reads them (a one-off prototype at Flickr30K
# test size, k = 100, 1 thread: 512 rows 7.2 ms per image, the whole candidate list at once 15-17 ms;
# benchmarks/bench_fragment_scoring.py times the whole stage against the sharded path).
CANDIDATE_CHUNK_BYTES = 2 << 20


class CaptionWords:
    """Where each caption's real words sit in the flat (N*T, d) view of a caption set's fragments, so that
    any subset of captions can be read as its real words only: no padded slot, no copy of the set."""

    def __init__(self, txt_frag: torch.Tensor, txt_mask: torch.Tensor):
        self.table = txt_frag.reshape(-1, txt_frag.shape[-1])  # a view of contiguous (stored) fragments
        self.rows = torch.nonzero(txt_mask.reshape(-1)).squeeze(1)  # caption-major: caption c's words together
        self.lengths = txt_mask.sum(1)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths

    def gather_index(self, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows into `table`, position in `captions` of each row) of the real words of `captions`, in order."""
        lengths = self.lengths[captions]
        total = int(lengths.sum())
        owner = torch.repeat_interleave(torch.arange(len(captions)), lengths, output_size=total)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = self.offsets[captions][owner] + torch.arange(total) - starts[owner]
        return self.rows[slot], owner


@torch.no_grad()
def candidate_fragment_scores(img_frag: torch.Tensor, img_mask: torch.Tensor, words: CaptionWords,
                              captions: torch.Tensor, region_reduce: str = "max", word_reduce: str = "sum",
                              chunk_rows: int | None = None) -> torch.Tensor:
    """(len(captions),) scores of ONE image (unit fragments (R, d), mask (R,)) against the listed captions:
    the same values as `fragment_scores(..., normalized=True)` on those captions, to float rounding.

    The shortlist's exact stage: it reads the candidates' real words only (the GEMM skips padded slots),
    gathers them chunk by chunk into a buffer that stays in cache for the GEMM (`CANDIDATE_CHUNK_BYTES`),
    reduces each chunk over the regions at once (max, or sum), and adds the words into their caption's
    score (`index_add_`); `word_reduce="mean"` then divides by the caption's word count."""
    if region_reduce not in REGION_REDUCE:
        raise ValueError(f"region_reduce must be one of {REGION_REDUCE}, got {region_reduce!r}")
    if word_reduce not in WORD_REDUCE:
        raise ValueError(f"word_reduce must be one of {WORD_REDUCE}, got {word_reduce!r}")
    captions = torch.as_tensor(captions, dtype=torch.long)
    regions = img_frag[img_mask]  # real regions only: padded ones never win the max and add 0 to the sum
    device, dtype = regions.device, words.table.dtype
    out = torch.zeros(len(captions), dtype=dtype, device=device)
    if len(regions) == 0:  # an image without regions scores 0, as in fragment_scores
        return out
    rows, owner = words.gather_index(captions)
    owner = owner.to(device)
    step = chunk_rows or max(1, CANDIDATE_CHUNK_BYTES // (words.table.shape[1] * words.table.element_size()))
    buffer = words.table.new_empty(min(step, len(rows)), words.table.shape[1])
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        chunk = torch.index_select(words.table, 0, rows[start:stop], out=buffer[:stop - start]).to(device)
        sim = regions @ chunk.T  # (R_real, chunk)
        best = sim.amax(0) if region_reduce == "max" else sim.sum(0)
        out.index_add_(0, owner[start:stop], best)
    if word_reduce == "mean":
        out = out / words.lengths[captions].to(device).clamp(min=1)
    return out
