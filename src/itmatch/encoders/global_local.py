"""AAHR's multi-grained embedding: local fragments pooled under the guidance of a global feature, then
fused with it by a learned gate.

    local  l = beta * MaxK(initial fragments) + (1 - beta) * GuidedPool(enhanced fragments, c)
    gate   g = sigmoid(W [l; c] + b)          (element-wise, from the two unit vectors)
    fused  e = g * l + (1 - g) * c

c is the projected frozen global feature (`GlobalProjection`), l and c are L2-normalised before the gate.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.encoders.fragments import FragmentSelfAttention
from itmatch.encoders.pooling import MaxKPool
from itmatch.similarity.dense import l2_normalize


class GlobalProjection(nn.Module):
    """Frozen global feature -> embedding space: a linear map plus a residual two-layer MLP."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mlp(x)


class CosineAttentionPool(nn.Module):
    """Attention pooling of fragments queried by a global vector: per head, softmax over fragments of
    cos(W_q^h c, W_k^h x_n) (no temperature), a weighted sum of W_v^h x_n; the heads are averaged."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.q = nn.Linear(dim, heads * dim)  # one dim x dim map per head, stacked
        self.k = nn.Linear(dim, heads * dim)
        self.v = nn.Linear(dim, heads * dim)

    def weights(self, x: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """(B, H, L) attention of each head over the fragments; zero on padding."""
        b, n, _ = x.shape
        q = l2_normalize(self.q(guide).view(b, self.heads, self.dim))
        k = l2_normalize(self.k(x).view(b, n, self.heads, self.dim))
        logits = torch.einsum("bhd,bnhd->bhn", q, k).masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        # sum_n a_hn (W_v^h x_n + b^h) = W_v^h (sum_n a_hn x_n) + b^h, since each head's weights sum to 1:
        # pooling before the value map gives the same result at 1/L of its cost.
        pooled = torch.einsum("bhn,bnd->bhd", self.weights(x, mask, guide), x)  # (B, H, D_in)
        w = self.v.weight.view(self.heads, self.dim, -1)  # (H, D, D_in)
        values = torch.einsum("bhi,hdi->bhd", pooled, w) + self.v.bias.view(self.heads, self.dim)
        return values.mean(1)


class GlobalGuidedPool(nn.Module):
    """`beta * MaxK(x) + (1 - beta) * CosineAttentionPool(SelfAttention(x), guide)`: HREM's fragment
    level with its average pooling replaced by pooling queried by the global feature."""

    def __init__(self, dim: int, beta: float = 0.8, k: int = 2, heads: int = 16, ff_dim: int = 1024,
                 dropout: float = 0.1, layers: int = 1, pool_heads: int = 8):
        super().__init__()
        self.beta = beta
        self.attention = FragmentSelfAttention(dim, heads, ff_dim, dropout, layers)
        self.max_pool = MaxKPool(k)
        self.guided_pool = CosineAttentionPool(dim, pool_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        enhanced = self.attention(x, mask)
        return self.beta * self.max_pool(x, mask) + (1.0 - self.beta) * self.guided_pool(enhanced, mask, guide)


class GatedFusion(nn.Module):
    """e = g * local + (1 - g) * global with g = sigmoid(W [local; global] + b), element-wise."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([local, glob], dim=-1)))
        return g * local + (1.0 - g) * glob
