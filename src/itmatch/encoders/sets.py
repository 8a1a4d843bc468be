"""Set prediction (DivE, CVPR 2023; kept by Maximal Matching, ACL 2025): K learnable slots refined by
L aggregation blocks that attend to an item's local fragments, then offset from the item's global
vector.

    block l:  E' = E + Attn(LN(E), LN(Psi))         cross-attention, slots -> fragments
              E  = LN(E' + FFN(LN(E')))              FFN: D -> 4D -> D, GELU, dropout
    set:      S  = l2norm(LN(E_L) + LN(phi) repeated K times)        (E1)

`attention="slot"` takes the softmax over the slot axis (slots compete for each fragment) and then
renormalises each slot's weights over the fragments, as DivE's code does; "standard" is the usual
softmax over fragments. Padding fragments never receive weight. `share=True` applies one block L
times (DivE's weight sharing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("slot", "standard")


class SlotCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str = "slot"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r} (use {', '.join(ATTENTIONS)})")
        self.heads, self.attention = heads, attention
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, slots: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, k, d = slots.shape
        n, h = ctx.shape[1], self.heads
        q = self.q(slots).view(b, k, h, d // h).transpose(1, 2)  # (B, h, K, dh)
        key = self.k(ctx).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, dh)
        val = self.v(ctx).view(b, n, h, d // h).transpose(1, 2)
        logits = (q @ key.transpose(-1, -2)) * (d // h) ** -0.5  # (B, h, K, N)
        valid = mask[:, None, None, :]
        if self.attention == "slot":
            weights = logits.softmax(dim=-2) * valid  # slots compete for each fragment
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-8)
        else:
            weights = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        out = (weights @ val).transpose(1, 2).reshape(b, k, d)
        return self.out(out)


class AggregationBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.1, attention: str = "slot"):
        super().__init__()
        self.norm_slots, self.norm_ctx = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SlotCrossAttention(dim, heads, attention)
        self.norm_attn, self.norm_ff, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, slots: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mid = slots + self.drop(self.attn(self.norm_slots(slots), self.norm_ctx(ctx), mask))
        return self.norm_out(mid + self.drop(self.ff(self.norm_ff(mid))))


class SetPrediction(nn.Module):
    """Fragments (B, N, D) + mask + global (B, D) -> (set (B, K, D), residuals (B, K, D)); both unit rows.

    The residuals are the normalised slot outputs before the global is added (PVSE's diversity
    loss reads them)."""

    def __init__(self, dim: int, k: int = 4, depth: int = 4, heads: int = 4, share: bool = True,
                 dropout: float = 0.1, attention: str = "slot"):
        super().__init__()
        self.k, self.depth, self.share = k, depth, share
        self.slots = nn.Parameter(torch.randn(k, dim) * dim ** -0.5)
        n_blocks = 1 if share else depth
        self.blocks = nn.ModuleList(AggregationBlock(dim, heads, dropout, attention) for _ in range(n_blocks))
        self.norm_set, self.norm_global = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, frag: torch.Tensor, mask: torch.Tensor, global_vec: torch.Tensor):
        slots = self.slots.unsqueeze(0).expand(frag.shape[0], -1, -1)
        for i in range(self.depth):
            slots = self.blocks[0 if self.share else i](slots, frag, mask)
        offsets = self.norm_set(slots)
        elements = offsets + self.norm_global(global_vec).unsqueeze(1)
        return F.normalize(elements, dim=-1), F.normalize(offsets, dim=-1)
