"""Fragment-level relation modelling (HREM Sec. 3.2): self-attention among the fragments of one item.

`RelationEnhancedPool` is a pooler like GPO: fragments in, one vector out. It enhances the fragments
with a masked Transformer layer and mixes `beta * MaxK(initial) + (1 - beta) * Mean(enhanced)`
(HREM Eq. 2); so any method becomes "HREM at the fragment level" by swapping its poolers.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.encoders import packed_transformer
from itmatch.encoders.packed_transformer import packed_encoder
from itmatch.encoders.pooling import MaxKPool, MeanPool


class FragmentSelfAttention(nn.Module):
    """Multi-head self-attention + feed-forward (post-norm, residual) over fragments; padding masked."""

    def __init__(self, dim: int, heads: int = 16, ff_dim: int = 1024, dropout: float = 0.1, layers: int = 1):
        super().__init__()
        # layers=0 is the ablation without fragment-level relations (Tab. 3a): fragments pass unchanged.
        self.encoder = None
        if layers > 0:
            layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout, batch_first=True)
            # No nested-tensor fast path: it would make padded outputs depend on the execution mode.
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # On CPU, run the layers on the real fragments only (equal up to float rounding, in training too;
        # captions are mostly padding); False runs the module on the padded batch, for comparisons.
        self.packed = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if (self.encoder is not None and self.packed and x.device.type == "cpu"
                and packed_transformer.supports(self.encoder)):
            return packed_encoder(self.encoder, x, mask)  # the same layers on the real fragments only
        out = x if self.encoder is None else self.encoder(x, src_key_padding_mask=~mask)
        return out.masked_fill(~mask.unsqueeze(-1), 0.0)


class RelationEnhancedPool(nn.Module):
    """HREM Eq. 2-3: `beta * MaxK(initial fragments) + (1 - beta) * Mean(enhanced fragments)`."""

    def __init__(self, dim: int, beta: float = 0.8, k: int = 2, heads: int = 16, ff_dim: int = 1024,
                 dropout: float = 0.1, layers: int = 1):
        super().__init__()
        self.beta = beta
        self.attention = FragmentSelfAttention(dim, heads, ff_dim, dropout, layers)
        self.max_pool = MaxKPool(k)
        self.avg_pool = MeanPool()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enhanced = self.attention(x, mask)
        return self.beta * self.max_pool(x, mask) + (1.0 - self.beta) * self.avg_pool(enhanced, mask)
