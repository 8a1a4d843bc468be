"""GPO's bidirectional GRU over rank encodings, for every set size of a batch at once, on CPU.

GPO reads the positional encodings of ranks 0..n-1 with a one-layer bidirectional GRU, once per
distinct set size n. Through `nn.GRU` with packed sequences this is 2 x n_max steps of a dozen tiny
ops each, and autograd's backward over them was about a third of GPO's training cost on CPU
(12 of 15 ms per batch at the scenes shapes). Here the recurrence and its gradient are written out
on numpy arrays, where a tiny op costs about a microsecond instead of several, and the structure is
used: the forward direction does not depend on n (it starts at rank 0 for every size), so it runs
once, on one sequence; only the backward direction, which starts at rank n-1, runs per size.

The result equals `nn.GRU(pack_padded_sequence(...))` followed by `pad_packed_sequence` up to
float rounding (tests/test_pooling.py compares values and gradients); the parameters stay those of
the `nn.GRU` module, so checkpoints are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _sigmoid(a: np.ndarray) -> np.ndarray:
    np.negative(a, out=a)
    np.exp(a, out=a)
    a += 1.0
    return np.reciprocal(a, out=a)


def _cell(gi: np.ndarray, h: np.ndarray, w_hh_t: np.ndarray, b_hh: np.ndarray, hidden: int):
    """One GRU step (PyTorch's gate order r, z, n); returns the new state and what the gradient needs."""
    gh = h @ w_hh_t
    gh += b_hh
    rz = _sigmoid(gi[:, : 2 * hidden] + gh[:, : 2 * hidden])
    r, z = rz[:, :hidden], rz[:, hidden:]
    gh_n = gh[:, 2 * hidden:]
    n = np.tanh(gi[:, 2 * hidden:] + r * gh_n)
    h_new = h - n
    h_new *= z
    h_new += n  # (1 - z) * n + z * h
    return h_new, (h, r, z, n, gh_n)


def _cell_backward(dh: np.ndarray, saved, w_hh: np.ndarray):
    """Gradients of one step: (d gates from the input, d gates from the state, d previous state)."""
    h, r, z, n, gh_n = saved
    dz = dh * (h - n)
    dn = dh * (1.0 - z)
    dan = dn * (1.0 - n * n)
    dar = dan * gh_n * r * (1.0 - r)
    daz = dz * z * (1.0 - z)
    d_gi = np.concatenate([dar, daz, dan], axis=1)
    d_gh = np.concatenate([dar, daz, dan * r], axis=1)
    dh_prev = dh * z + d_gh @ w_hh
    return d_gi, d_gh, dh_prev


class _RankBiGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pe, lengths, *weights):
        w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r = (w.detach().numpy() for w in weights)
        x = pe.numpy()
        lens = lengths.numpy()
        m, width, hidden = len(lens), x.shape[0], w_hh.shape[1]
        steps = int(lens.max())
        out = np.zeros((m, width, 2 * hidden), dtype=x.dtype)

        # forward direction: the same for every size, so one sequence of `steps` ranks
        gi = x[:steps] @ w_ih.T + b_ih
        h = np.zeros((1, hidden), dtype=x.dtype)
        fwd_saved = []
        for t in range(steps):
            h, saved = _cell(gi[t: t + 1], h, w_hh.T, b_hh, hidden)
            fwd_saved.append(saved)
            out[:, t, :hidden] = h
        out[:, :, :hidden] *= (np.arange(width)[None] < lens[:, None])[..., None]

        # backward direction: size n starts at rank n-1; at step s the sizes above s are still running
        # (the sizes are ascending, so those are a suffix), each at rank n-1-s
        gi_r = x @ w_ih_r.T + b_ih_r
        h_r = np.zeros((m, hidden), dtype=x.dtype)
        rev_saved = []
        for s in range(steps):
            first = int(np.searchsorted(lens, s, side="right"))
            rows = np.arange(first, m)
            ranks = lens[first:] - 1 - s
            h_new, saved = _cell(gi_r[ranks], h_r[first:].copy(), w_hh_r.T, b_hh_r, hidden)
            h_r[first:] = h_new
            out[rows, ranks, hidden:] = h_new
            rev_saved.append((first, rows, ranks, saved))

        ctx.numpy_state = (x, lens, fwd_saved, rev_saved, w_hh, w_hh_r)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, lens, fwd_saved, rev_saved, w_hh, w_hh_r = ctx.numpy_state
        g = grad_out.contiguous().numpy()
        hidden = w_hh.shape[1]
        steps = len(fwd_saved)

        # forward direction: every size reads the same states, so their gradients add up
        valid = (np.arange(steps)[None] < lens[:, None])[..., None]
        g_fwd = (g[:, :steps, :hidden] * valid).sum(0)
        dh = np.zeros((1, hidden), dtype=g.dtype)
        d_gi_all, d_gh_all, h_all = [], [], []
        for t in reversed(range(steps)):
            dh = dh + g_fwd[t: t + 1]
            d_gi, d_gh, dh = _cell_backward(dh, fwd_saved[t], w_hh)
            d_gi_all.append(d_gi)
            d_gh_all.append(d_gh)
            h_all.append(fwd_saved[t][0])
        d_gi, d_gh, hs = (np.concatenate(a) for a in (d_gi_all, d_gh_all, h_all))
        grads = [d_gi.T @ x[steps - 1:: -1], d_gh.T @ hs, d_gi.sum(0), d_gh.sum(0)]

        dh_r = np.zeros((len(lens), hidden), dtype=g.dtype)
        d_gi_all, d_gh_all, h_all, x_all = [], [], [], []
        for first, rows, ranks, saved in reversed(rev_saved):
            dh_active = dh_r[first:] + g[rows, ranks, hidden:]
            d_gi, d_gh, dh_r[first:] = _cell_backward(dh_active, saved, w_hh_r)
            d_gi_all.append(d_gi)
            d_gh_all.append(d_gh)
            h_all.append(saved[0])
            x_all.append(x[ranks])
        d_gi, d_gh, hs, xs = (np.concatenate(a) for a in (d_gi_all, d_gh_all, h_all, x_all))
        grads += [d_gi.T @ xs, d_gh.T @ hs, d_gi.sum(0), d_gh.sum(0)]
        return (None, None, *(torch.from_numpy(np.ascontiguousarray(a)) for a in grads))


def rank_bigru(gru: nn.GRU, pe: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(m, width, 2 * hidden) outputs of `gru` on `pe[:n]` for each n in `lengths` (distinct, ascending),
    zero beyond n: what `pad_packed_sequence(gru(pack_padded_sequence(...)))` gives, on CPU."""
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0, gru.weight_ih_l0_reverse,
               gru.weight_hh_l0_reverse, gru.bias_ih_l0_reverse, gru.bias_hh_l0_reverse)
    pe = pe.to(weights[0].dtype).contiguous()
    return _RankBiGRU.apply(pe, lengths.contiguous(), *weights)


def supports(gru: nn.GRU, pe: torch.Tensor) -> bool:
    """Whether `rank_bigru` applies: CPU float parameters of a one-layer bidirectional GRU with biases."""
    w = gru.weight_ih_l0
    return (gru.num_layers == 1 and gru.bidirectional and gru.bias and w.device.type == "cpu"
            and pe.device.type == "cpu" and w.dtype in (torch.float32, torch.float64))
