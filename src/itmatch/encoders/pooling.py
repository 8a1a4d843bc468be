"""Pooling of a variable-length set of fragments (regions, grid cells, words) into one vector.

Every pooler takes `x: (B, L, D)` and `mask: (B, L)` bool (True = real) and returns `(B, D)`;
padded positions never influence the result.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1).clamp(min=1)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / _lengths(mask).unsqueeze(-1).to(x.dtype)


class MaxKPool(nn.Module):
    """Mean of the k largest values per dimension (HREM's "max pooling" uses k=2; k=1 is the max)."""

    def __init__(self, k: int = 1):
        super().__init__()
        if k < 1:
            raise ValueError("MaxKPool needs k >= 1")
        self.k = k

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        k = min(self.k, x.shape[1])
        top = filled.topk(k, dim=1).values  # (B, k, D), -inf where a sample has fewer than k items
        valid = torch.isfinite(top)
        top = top.masked_fill(~valid, 0.0)
        return top.sum(1) / valid.sum(1).clamp(min=1).to(x.dtype)


class MaxPool(MaxKPool):
    def __init__(self):
        super().__init__(1)


def positional_encoding(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal encoding of positions 0..length-1, (length, dim): sin on even, cos on odd channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


class GPO(nn.Module):
    """Generalized Pooling Operator (Chen et al., VSE-infinity, CVPR 2021).

    Each dimension's values are sorted in descending order; a small bidirectional GRU reads the
    positional encodings of the ranks 0..n-1 and scores each rank; the softmax of those scores
    (temperature 0.1) weights the sorted values. The weights depend only on the number of fragments,
    so GPO learns how to pool (mean, max, top-k or anything between) for each set size.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.pe_dim, self.hidden, self.temperature = pe_dim, hidden, temperature
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)

    def rank_weights(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, max_len) softmax weights over ranks; zero beyond each sample's length.

        The weights depend on the length alone, so the GRU runs once per distinct length in the
        batch (a few dozen at most) instead of once per sample.
        """
        distinct, inverse = torch.unique(lengths, return_inverse=True)
        return self._weights_for_lengths(distinct, max_len)[inverse]

    def _weights_for_lengths(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        pe = positional_encoding(max_len, self.pe_dim, lengths.device).unsqueeze(0).expand(len(lengths), -1, -1)
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        out = (out[..., : self.hidden] + out[..., self.hidden :]) / 2  # average the two directions
        scores = self.score(out).squeeze(-1)
        valid = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        scores = scores.masked_fill(~valid, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, return_weights: bool = False):
        lengths = _lengths(mask)
        max_len = int(lengths.max())
        x, mask = x[:, :max_len], mask[:, :max_len]
        # Padding sorts last (-inf), then becomes 0 so that it contributes nothing.
        sorted_x = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).sort(dim=1, descending=True).values
        sorted_x = sorted_x.masked_fill(torch.isinf(sorted_x), 0.0)
        weights = self.rank_weights(lengths, max_len).to(x.dtype)
        pooled = (sorted_x * weights.unsqueeze(-1)).sum(1)
        return (pooled, weights) if return_weights else pooled


def build_pooling(name: str, pe_dim: int = 32, hidden: int = 32, k: int = 1) -> nn.Module:
    from itmatch.errors import ItmatchError

    if name == "gpo":
        return GPO(pe_dim, hidden)
    if name == "mean":
        return MeanPool()
    if name == "max":
        return MaxKPool(k)
    raise ItmatchError(f"config key 'model.pooling': unknown pooling {name!r} (use gpo, mean, max)")
