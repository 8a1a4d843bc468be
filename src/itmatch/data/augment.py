"""Training-time augmentation of captions and region sets, as VSE-infinity, HREM and AAHR do it.

Captions: each word (a word-piece group for word-piece tokenizers: a token plus the "##"
continuation pieces after it) is altered with probability p; an altered word becomes the mask
token (50%), random tokens (10%, one per piece) or is deleted (40%); deleted words are removed
and the batch is re-padded. Special tokens (padding, start/end, [CLS]/[SEP], ...) are never touched.

Regions: each real region is dropped with probability p, keeping at least one per image; the
batch is compacted so kept regions come first and the mask marks them.

All randomness comes from the `torch.Generator` passed in, so a batch is reproducible from a seed.
"""

from __future__ import annotations

import torch

KEEP, MASK, RANDOM, DELETE = 0, 1, 2, 3
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1  # of altered words; the remaining 0.4 are deleted


def plan_token_noise(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    p: float,
    special_ids,
    generator: torch.Generator,
    continuation: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) int8 actions (KEEP, MASK, RANDOM, DELETE) for every position.

    `continuation` is a (vocab,) bool table of word pieces that continue a word: such a piece
    follows the decision drawn for the head of its word.
    """
    b, t = tokens.shape
    special = torch.as_tensor(list(special_ids), dtype=tokens.dtype)
    eligible = mask & ~torch.isin(tokens, special)
    u = torch.rand(b, t, generator=generator)
    which = torch.rand(b, t, generator=generator)
    if continuation is not None and t > 0:
        is_cont = continuation[tokens] & eligible
        # Index of each position's word head: the last non-continuation position at or before it.
        pos = torch.arange(t).expand(b, t)
        head = torch.cummax(torch.where(is_cont, torch.zeros_like(pos), pos), dim=1).values
        u, which = u.gather(1, head), which.gather(1, head)
    altered = eligible & (u < p)
    actions = torch.where(which < MASK_SHARE, MASK, torch.where(which < MASK_SHARE + RANDOM_SHARE, RANDOM, DELETE))
    return torch.where(altered, actions, KEEP).to(torch.int8)


def apply_token_noise(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    actions: torch.Tensor,
    *,
    mask_id: int,
    pad_id: int,
    random_ids: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry out `actions`; deleted positions are removed and rows re-padded to the new batch max."""
    out = tokens.masked_fill(actions == MASK, mask_id)
    replace = actions == RANDOM
    n_random = int(replace.sum())
    if n_random:
        pick = torch.randint(len(random_ids), (n_random,), generator=generator)
        out[replace] = random_ids[pick].to(out.dtype)
    keep = mask & (actions != DELETE)
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if len(lengths) else 0
    # Kept tokens move left: a token's new column is the number of kept tokens before it.
    columns = keep.cumsum(dim=1) - 1
    rows = torch.arange(tokens.shape[0])[:, None].expand_as(keep)
    compact = torch.full((tokens.shape[0], width), pad_id, dtype=tokens.dtype)
    compact[rows[keep], columns[keep]] = out[keep]
    return compact, torch.arange(width)[None, :] < lengths[:, None]


def augment_tokens(
    tokens: torch.Tensor, mask: torch.Tensor, tokenizer, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token noise for a padded batch from `tokenizer.encode_batch`."""
    if p <= 0 or tokens.numel() == 0:
        return tokens, mask
    continuation = tokenizer.continuation_table()
    actions = plan_token_noise(tokens, mask, p, tokenizer.special_ids, generator, continuation)
    vocab = torch.arange(tokenizer.vocab_size)
    random_ids = vocab[~torch.isin(vocab, torch.as_tensor(tokenizer.special_ids, dtype=torch.long))]
    return apply_token_noise(
        tokens, mask, actions, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id,
        random_ids=random_ids, generator=generator,
    )


def plan_region_drop(
    region_mask: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which regions survive: `(order, out_mask)`, the (B, R') source column of each kept slot and the
    (B, R') mask of the compacted batch. Apply it to any per-region tensor with `take_regions`, so
    features and boxes lose the same regions."""
    b, r = region_mask.shape
    u = torch.rand(b, r, generator=generator)
    keep = region_mask & (u >= p)
    # A row that lost everything keeps its real region with the largest draw.
    empty = ~keep.any(dim=1) & region_mask.any(dim=1)
    if empty.any():
        best = torch.where(region_mask, u, torch.full_like(u, -1.0)).argmax(dim=1)
        keep[empty, best[empty]] = True
    counts = keep.sum(dim=1)
    width = int(counts.max())
    # Stable sort on "dropped" puts kept regions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width)[None, :] < counts[:, None]


def take_regions(x: torch.Tensor, order: torch.Tensor, out_mask: torch.Tensor) -> torch.Tensor:
    """(B, R, ...) -> (B, R', ...): the slots `plan_region_drop` kept, padding slots zeroed."""
    b, r = x.shape[:2]
    # index_select on flattened rows: several times faster than gather with an expanded index.
    flat = x.reshape(b * r, -1).index_select(0, (order + r * torch.arange(b)[:, None]).reshape(-1))
    flat.index_fill_(0, torch.nonzero(~out_mask.reshape(-1)).flatten(), 0)  # padding slots hold zeros
    return flat.view(b, order.shape[1], *x.shape[2:])


def drop_regions(
    regions: torch.Tensor, region_mask: torch.Tensor, p: float, generator: torch.Generator,
    boxes: torch.Tensor | None = None,
):
    """Drop each real region with probability p (at least one survives per row) and compact.

    Returns (B, R', F) regions and (B, R') mask with R' <= R the largest number kept in a row; with
    `boxes` (B, R, K) also the same regions' boxes, (B, R', K), as a third value.
    """
    if p <= 0 or regions.shape[1] == 0:
        return (regions, region_mask) if boxes is None else (regions, region_mask, boxes)
    order, out_mask = plan_region_drop(region_mask, p, generator)
    if boxes is None:
        return take_regions(regions, order, out_mask), out_mask
    return take_regions(regions, order, out_mask), out_mask, take_regions(boxes, order, out_mask)
