"""Pooling of a variable-length set of fragments (regions, grid cells, words) into one vector.

Every pooler is an `nn.Module` with `forward(x: (B, L, D), mask: (B, L) bool) -> (B, D)`, where
True marks a real fragment. Padded positions never influence the result, and the real fragments
need not come first: all poolers here treat a row as a *set*.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.encoders import rank_gru
from itmatch.errors import ItmatchError

POOLINGS = ("gpo", "mean", "max")


def set_sizes(mask: torch.Tensor) -> torch.Tensor:
    """(B,) number of real fragments per row (at least 1, so an empty row pools to zeros)."""
    return mask.sum(1).clamp(min=1)


def descending_order(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, D, width) positions along L of each row's and dimension's `width` largest real values, largest first.

    Padding sorts after every real value; ranks beyond a row's size point at padding. Only the
    order is computed here, without gradients; the values are gathered by the caller."""
    with torch.no_grad():
        # keys ascending = values descending; padding is +inf, so it sorts last
        keys = torch.neg(x.detach()).masked_fill_(~mask.unsqueeze(-1), float("inf")).transpose(1, 2).contiguous()
        if x.device.type == "cpu":
            # numpy's argsort (sorting networks on short rows) is 4-25x faster on CPU than torch.sort
            # along L, which was most of GPO's cost over mean pooling.
            keys = keys.float() if keys.dtype == torch.bfloat16 else keys
            return torch.from_numpy(np.argsort(keys.numpy(), axis=-1)[..., :width])
        return keys.argsort(dim=-1)[..., :width]


_RANK_BITS = 28  # position bits: under half of the 29 mantissa bits a float32 gains when widened to float64
_PAD_KEY = 2.0 ** 1000  # larger than any float32, so padding sorts after every real value


def rank_keys(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(B, D, L) float64 keys of float32 `x` (B, L, D), sorted along L: largest real value first, then padding.

    A key is -x widened to float64 (exact), with the position along L written into the low mantissa
    bits that the widening leaves zero. That moves a key by less than half the gap to the next
    float32, so one numpy value sort (SIMD; about 3x faster than numpy's argsort on these short
    rows, which was most of GPO's ordering cost) gives the order of distinct values (tied values come
    out in an order fixed by their positions) and keeps each value recoverable by rounding the key
    back to float32. For finite x (an infinite value's tagged key would read as NaN)."""
    b, length, d = x.shape
    if length >= 2 ** _RANK_BITS:
        raise ValueError("rank_keys: too many fragments per row")
    keys = np.empty((b, d, length))
    np.negative(x.detach().numpy().transpose(0, 2, 1), out=keys)
    np.copyto(keys, _PAD_KEY, where=~mask.numpy()[:, None, :])
    torch.from_numpy(keys).view(torch.int64).bitwise_or_(torch.arange(length))
    keys.sort(axis=-1)
    return keys


def order_of_keys(keys: np.ndarray, width: int) -> torch.Tensor:
    """(B, D, width) positions along L of the first `width` sorted keys (the low mantissa bits)."""
    return torch.from_numpy(np.bitwise_and(keys[..., :width].view(np.int64), 2 ** _RANK_BITS - 1))


def values_of_keys(keys: np.ndarray, mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, D, width) float32 values of the first `width` sorted keys, zero at ranks beyond each row's size."""
    values = np.negative(keys[..., :width], dtype=np.float32)  # rounding to float32 drops the position bits
    values = torch.from_numpy(values)
    real = torch.arange(width) < mask.sum(1, keepdim=True)
    return values.masked_fill_(~real.unsqueeze(1), 0.0)


class _RankWeightedSum(torch.autograd.Function):
    """sum_k weights[b, k] * (k-th largest real value of x[b, :, d]) for float32 x on CPU, with the
    gradient written out: to x, each value's rank weight times the output gradient (scattered through
    the order); to the weights, the sorted values against the output gradient."""

    @staticmethod
    def forward(ctx, x, mask, weights):
        width = weights.shape[1]
        keys = rank_keys(x, mask)
        values = values_of_keys(keys, mask, width)
        weights = weights.detach()
        real = torch.arange(width) < mask.sum(1, keepdim=True)
        ctx.save_for_backward(values, weights.masked_fill(~real, 0.0))
        ctx.keys, ctx.length = keys, x.shape[1]  # the order is read from the keys only in backward
        return (values * weights.unsqueeze(1)).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        values, real_weights = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            b, d, width = values.shape
            grad_t = grad.new_zeros(b, d, ctx.length)
            # the first `width` positions of a row's order are distinct, so a plain scatter is exact
            grad_t.scatter_(-1, order_of_keys(ctx.keys, width), grad.unsqueeze(-1) * real_weights.unsqueeze(1))
            grad_x = grad_t.transpose(1, 2)
        if ctx.needs_input_grad[2]:
            grad_w = (grad.unsqueeze(-1) * values).sum(1)
        return grad_x, None, grad_w  # ctx.keys stays: a graph kept with retain_graph may run backward again


class MeanPool(nn.Module):
    """Average of the real fragments."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / set_sizes(mask).unsqueeze(-1).to(x.dtype)


class MaxKPool(nn.Module):
    """Mean of the k largest values per dimension (HREM's "max pooling" uses k=2; k=1 is the max).

    A row with fewer than k fragments averages the values it has.
    """

    def __init__(self, k: int = 1):
        super().__init__()
        if k < 1:
            raise ValueError("MaxKPool needs k >= 1")
        self.k = k

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        k = min(self.k, x.shape[1])
        top = filled.topk(k, dim=1).values  # (B, k, D)
        counts = mask.sum(1).clamp(max=k)
        valid = torch.arange(k, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
        top = top.masked_fill(~valid.unsqueeze(-1), 0.0)
        return top.sum(1) / counts.clamp(min=1).unsqueeze(-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class MaxPool(MaxKPool):
    """Per-dimension maximum of the real fragments."""

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
    positional encodings of the ranks 0..n-1 and a linear layer scores each rank; the softmax of
    the scores (temperature 0.1) weights the sorted values. The weights depend only on the set size
    n, so GPO learns how to pool (mean, max, top-k or anything between) for each size.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.pe_dim, self.hidden, self.temperature = pe_dim, hidden, temperature
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)
        # CPU float32: the ordering as one value sort and the GRU with its gradient written out (the
        # generic torch path below them, used elsewhere, gives the same output up to float rounding;
        # False forces it, for comparisons)
        self.cpu_kernels = True

    def rank_weights(self, sizes: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) softmax weights over ranks for sets of the given sizes; zero beyond each size.

        The weights depend on the size alone, so the GRU runs once per distinct size in the batch
        (a few dozen at most), each size seeing exactly its own n ranks: on CPU through
        `rank_gru.rank_bigru`, elsewhere packed through `nn.GRU`.
        """
        distinct, inverse = torch.unique(sizes, return_inverse=True)
        pe = positional_encoding(width, self.pe_dim, sizes.device)
        if self.cpu_kernels and rank_gru.supports(self.gru, pe):
            out = rank_gru.rank_bigru(self.gru, pe, distinct)
        else:
            pe = pe.unsqueeze(0).expand(len(distinct), -1, -1)
            packed = pack_padded_sequence(pe, distinct.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=width)
        out = (out[..., : self.hidden] + out[..., self.hidden:]) / 2  # average the two directions
        scores = self.score(out).squeeze(-1)
        real = torch.arange(width, device=sizes.device).unsqueeze(0) < distinct.unsqueeze(1)
        scores = scores.masked_fill(~real, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)[inverse]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, return_weights: bool = False):
        """Pooled `(B, D)`; with `return_weights`, also the `(B, n_max)` weights over ranks."""
        if x.shape[1] == 0:  # no fragment slots at all: one padded slot, so every row pools to zeros
            x, mask = x.new_zeros(x.shape[0], 1, x.shape[2]), mask.new_zeros(mask.shape[0], 1)
        width = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
        weights = self.rank_weights(set_sizes(mask), width).to(x.dtype)
        if self.cpu_kernels and x.device.type == "cpu" and x.dtype == torch.float32:
            pooled = _RankWeightedSum.apply(x, mask, weights)
        else:
            order = descending_order(x, mask, width)
            # Rank k of each dimension; padding holds zeros (never NaN * 0), and ranks beyond a row's
            # size point at padding, where the weight is 0 anyway.
            values = x.masked_fill(~mask.unsqueeze(-1), 0.0).transpose(1, 2).contiguous()  # (B, D, L)
            sorted_x = values.gather(-1, order)  # (B, D, width)
            pooled = (sorted_x * weights.unsqueeze(1)).sum(-1)
        return (pooled, weights) if return_weights else pooled

    def extra_repr(self) -> str:
        return f"pe_dim={self.pe_dim}, hidden={self.hidden}, temperature={self.temperature}"


def build_pooling(name: str, pe_dim: int = 32, hidden: int = 32, k: int = 1) -> nn.Module:
    """The pooler named by `model.pooling`."""
    if name == "gpo":
        return GPO(pe_dim, hidden)
    if name == "mean":
        return MeanPool()
    if name == "max":
        return MaxKPool(k)
    raise ItmatchError(f"config key 'model.pooling': unknown pooling {name!r} (use {', '.join(POOLINGS)})")
