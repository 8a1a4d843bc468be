"""Poolers (GPO, mean, max, max-k) against slow per-sample references written here."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.encoders.pooling import GPO, MaxKPool, MaxPool, MeanPool, build_pooling, positional_encoding
from itmatch.errors import ItmatchError


def ragged(b=6, max_len=9, d=5, seed=0):
    """Random fragments with variable set sizes (1..max_len, one row full, one of size 1)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_len + 1, (b,), generator=g)
    sizes[0], sizes[1] = max_len, 1
    x = torch.randn(b, max_len, d, generator=g)
    mask = torch.arange(max_len)[None] < sizes[:, None]
    return x, mask, sizes


def scatter_padding(x, mask, extra=4, seed=1):
    """The same sets with `extra` more padded rows per sample, every padded row holding a large value
    (it would win any max or sort it took part in), and real and padded rows shuffled together."""
    g = torch.Generator().manual_seed(seed)
    b, length, d = x.shape
    big_x = torch.cat([x, torch.zeros(b, extra, d)], 1)
    big_mask = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
    big_x[~big_mask] = 7e3
    perm = torch.stack([torch.randperm(length + extra, generator=g) for _ in range(b)])
    return torch.gather(big_x, 1, perm[..., None].expand(-1, -1, d)), torch.gather(big_mask, 1, perm)


# ------------------------------------------------------------------- independent references
def reference_pe(n, dim):
    """sin/cos encoding, written out per position and channel."""
    pe = torch.zeros(n, dim, dtype=torch.float64)
    for pos in range(n):
        for i in range(0, dim, 2):
            angle = pos / (10000 ** (i / dim))
            pe[pos, i] = math.sin(angle)
            if i + 1 < dim:
                pe[pos, i + 1] = math.cos(angle)
    return pe


def reference_gru_direction(gru, seq, suffix):
    """GRU equations step by step for one direction of layer 0 (float64)."""
    w_ih = getattr(gru, f"weight_ih_l0{suffix}").double()
    w_hh = getattr(gru, f"weight_hh_l0{suffix}").double()
    b_ih = getattr(gru, f"bias_ih_l0{suffix}").double()
    b_hh = getattr(gru, f"bias_hh_l0{suffix}").double()
    hidden = w_hh.shape[1]
    h = torch.zeros(hidden, dtype=torch.float64)
    outs = []
    for x in seq:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:hidden] + gh[:hidden])
        z = torch.sigmoid(gi[hidden:2 * hidden] + gh[hidden:2 * hidden])
        n = torch.tanh(gi[2 * hidden:] + r * gh[2 * hidden:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def gpo_reference(gpo: GPO, x, mask):
    """Per sample: its real rows only, each dimension sorted, GRU run on exactly n ranks."""
    out, weights = [], []
    for b in range(x.shape[0]):
        items = x[b][mask[b]].double()
        n, d = items.shape
        sorted_items = torch.stack([items[:, j].sort(descending=True).values for j in range(d)], 1)
        pe = reference_pe(n, gpo.pe_dim)
        fwd = reference_gru_direction(gpo.gru, pe, "")
        bwd = reference_gru_direction(gpo.gru, pe.flip(0), "_reverse").flip(0)
        scores = ((fwd + bwd) / 2) @ gpo.score.weight.double()[0]
        w = torch.softmax(scores / 0.1, 0)
        out.append((sorted_items * w[:, None]).sum(0))
        weights.append(w)
    return torch.stack(out).float(), weights


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dim", [8, 7])
def test_positional_encoding_matches_formula(dim):
    torch.testing.assert_close(positional_encoding(11, dim), reference_pe(11, dim).float())


def test_gpo_matches_slow_reference_with_variable_lengths():
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6)
    x, mask, sizes = ragged()
    with torch.no_grad():
        got, weights = gpo(x, mask, return_weights=True)
    ref, ref_weights = gpo_reference(gpo, x, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert weights.shape == (len(x), int(sizes.max()))
    for b, w in enumerate(ref_weights):
        n = int(sizes[b])
        torch.testing.assert_close(weights[b, :n], w.float(), rtol=1e-5, atol=1e-6)
        assert (weights[b, n:] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(len(x)))
    # A set of one fragment pools to that fragment.
    torch.testing.assert_close(got[1], x[1, 0])


def test_gpo_ignores_padding_and_the_order_of_fragments():
    torch.manual_seed(1)
    gpo = GPO(pe_dim=8, hidden=6)
    x, mask, _ = ragged(seed=3)
    with torch.no_grad():
        base = gpo(x, mask)
        big_x, big_mask = scatter_padding(x, mask)
        torch.testing.assert_close(gpo(big_x, big_mask), base, rtol=1e-5, atol=1e-5)
        # Each sample alone, unpadded, gives the same vector as inside the padded batch.
        for b in range(len(x)):
            alone = gpo(x[b:b + 1, mask[b]], torch.ones(1, int(mask[b].sum()), dtype=torch.bool))
            torch.testing.assert_close(alone[0], base[b], rtol=1e-5, atol=1e-5)


def test_gpo_gradients_reach_fragments_and_gru():
    torch.manual_seed(2)
    gpo = GPO(pe_dim=8, hidden=6)
    x, mask, _ = ragged()
    x.requires_grad_(True)
    gpo(x, mask).sum().backward()
    assert x.grad[mask].abs().sum() > 0
    assert (x.grad[~mask] == 0).all()  # padding gets no gradient
    assert gpo.gru.weight_ih_l0.grad.abs().sum() > 0
    assert gpo.score.weight.grad.abs().sum() > 0


def test_gpo_with_all_sizes_equal_runs_one_sequence_and_matches_reference():
    gpo = GPO(pe_dim=4, hidden=3)
    x = torch.randn(3, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        got, w = gpo(x, mask, return_weights=True)
    torch.testing.assert_close(w[0], w[2])
    torch.testing.assert_close(got, gpo_reference(gpo, x, mask)[0], rtol=1e-5, atol=1e-5)


def loop_maxk(x, mask, k):
    out = []
    for b in range(x.shape[0]):
        items = x[b][mask[b]]
        cols = []
        for j in range(x.shape[2]):
            vals = sorted(items[:, j].tolist(), reverse=True)[:k]
            cols.append(sum(vals) / len(vals))
        out.append(cols)
    return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_maxk_pool_matches_loop_and_ignores_padding(k):
    x, mask, _ = ragged(seed=4)
    got = MaxKPool(k)(x, mask)
    torch.testing.assert_close(got, loop_maxk(x, mask, k))
    big_x, big_mask = scatter_padding(x, mask)
    torch.testing.assert_close(MaxKPool(k)(big_x, big_mask), got)


def test_max_and_mean_pool_match_loops():
    x, mask, _ = ragged(seed=5)
    torch.testing.assert_close(MaxPool()(x, mask), loop_maxk(x, mask, 1))
    mean = torch.stack([x[b][mask[b]].mean(0) for b in range(len(x))])
    torch.testing.assert_close(MeanPool()(x, mask), mean)
    big_x, big_mask = scatter_padding(x, mask)
    torch.testing.assert_close(MeanPool()(big_x, big_mask), mean)


def test_empty_rows_pool_to_zero_without_nan():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    for pool in (GPO(4, 3), MeanPool(), MaxKPool(2)):
        out = pool(x, mask)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all()


def test_build_pooling_names():
    assert isinstance(build_pooling("gpo", 8, 4), GPO)
    assert isinstance(build_pooling("mean"), MeanPool)
    assert build_pooling("max", k=2).k == 2
    with pytest.raises(ItmatchError, match="model.pooling"):
        build_pooling("attention")


# ------------------------------------------------------------------- the implementation before the numpy order
def sort_based_gpo(gpo: GPO, x, mask):
    """GPO as it was implemented before (torch.sort along L, values masked by rank), kept as a reference."""
    sizes = mask.sum(1)
    width = max(int(sizes.max()), 1)
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    sorted_x = filled.sort(dim=1, descending=True).values[:, :width]
    rank_mask = torch.arange(width)[None] < sizes[:, None]
    sorted_x = sorted_x.masked_fill(~rank_mask.unsqueeze(-1), 0.0)
    weights = gpo.rank_weights(sizes.clamp(min=1), width).to(x.dtype)
    return (sorted_x * weights.unsqueeze(-1)).sum(1)


def test_gpo_equals_the_sort_based_implementation_in_values_and_gradients():
    torch.manual_seed(0)
    dtype = torch.float32
    gpo = GPO()
    x, mask, _ = ragged(b=16, max_len=12, d=24, seed=5)
    x, mask = scatter_padding(x, mask)  # garbage padding shuffled among the real fragments
    x = x.to(dtype)
    x[3, :, :4] = 0.5  # ties within a set
    x[4][mask[4]] = torch.tensor(-1.0, dtype=dtype)
    mask[5] = False  # one empty set
    grads = []
    for fn in (lambda a: gpo(a, mask), lambda a: sort_based_gpo(gpo, a, mask)):
        leaf = x.clone().requires_grad_(True)
        gpo.zero_grad()
        out = fn(leaf)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), leaf.grad, [p.grad.clone() for p in gpo.parameters()]))
    (new, new_gx, new_gp), (old, old_gx, old_gp) = grads
    tol = {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(new, old, **tol)
    assert new[5].abs().max() == 0
    # ties may send a tied value's gradient to another of the tied positions; the sum over them is the same
    torch.testing.assert_close(new_gx.sum(1), old_gx.sum(1), **tol)
    torch.testing.assert_close(new_gx[~mask.unsqueeze(-1).expand_as(x)].abs().sum(), torch.tensor(0.0, dtype=dtype))
    untied = torch.ones_like(mask)
    untied[3:5] = False
    torch.testing.assert_close(new_gx[untied], old_gx[untied], **tol)
    for a, b in zip(new_gp, old_gp, strict=True):  # sums over B x D in another order, x 10 by the temperature
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------- the CPU kernels against the generic path
def packed_nn_gru(gru, pe, lengths):
    """The generic path's GRU call: nn.GRU on packed copies of the encodings, padded back."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    seqs = pe.unsqueeze(0).expand(len(lengths), -1, -1)
    out, _ = gru(pack_padded_sequence(seqs, lengths, batch_first=True, enforce_sorted=False))
    return pad_packed_sequence(out, batch_first=True, total_length=pe.shape[0])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_bigru_equals_packed_nn_gru_in_values_and_gradients(dtype):
    """Float rounding only: to 1e-12 in float64 (so the written-out gradient is the exact one), a few
    float32 ulps in float32 (numpy and torch evaluate sigmoid/tanh and sum in different orders)."""
    from itmatch.encoders.rank_gru import rank_bigru, supports

    torch.manual_seed(3)
    gpo = GPO(pe_dim=8, hidden=6).to(dtype)
    lengths = torch.tensor([1, 2, 3, 7, 8, 13])  # distinct, ascending, as torch.unique gives them
    pe = positional_encoding(15, 8).to(dtype)  # wider than the longest: zero rows beyond, as padded
    assert supports(gpo.gru, pe)
    upstream = torch.randn(len(lengths), 15, 12, dtype=dtype)
    results = []
    for fn in (rank_bigru, packed_nn_gru):
        out = fn(gpo.gru, pe, lengths)
        results.append((out, torch.autograd.grad((out * upstream).sum(), list(gpo.gru.parameters()))))
    (new, new_grads), (ref, ref_grads) = results
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 1e-5}
    torch.testing.assert_close(new, ref, **tol)
    assert (new[0, 1:] == 0).all()  # beyond a set's size: zeros, as pad_packed_sequence gives
    for a, b in zip(new_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_rank_keys_give_exact_values_in_descending_order_with_ties_and_extremes():
    from itmatch.encoders.pooling import order_of_keys, rank_keys, values_of_keys

    x = torch.tensor([[[3.0], [-0.0], [1e-45], [3.0], [-3.4e38], [0.0], [3.4e38], [2.5]]])  # (1, 8, 1)
    x = torch.cat([x, x.flip(1)], 2)  # a second dimension: the same values in reverse positions
    mask = torch.tensor([[True, True, True, True, True, True, True, False]])  # position 7 is padding
    keys = rank_keys(x, mask)
    order = order_of_keys(keys, 7)
    values = values_of_keys(keys, mask, 7)
    # 3.0 is tied (positions 0 and 3), and so are -0.0 and 0.0 (1 and 5): either order of a tie is right
    assert order[0, 0].tolist() in ([6, 0, 3, 2, 1, 5, 4], [6, 3, 0, 2, 1, 5, 4], [6, 0, 3, 2, 5, 1, 4],
                                    [6, 3, 0, 2, 5, 1, 4])
    assert sorted(order[0, 1].tolist()) == [0, 1, 2, 3, 4, 5, 6]  # the real positions, each once
    expected = x[0].gather(0, order[0].T).T  # the values at those positions, bit for bit
    assert (expected[:, :-1] >= expected[:, 1:]).all()
    assert torch.equal(values[0].view(torch.int32), expected.view(torch.int32))
    # ranks beyond the size hold zeros; a row can be wider than the largest set
    wide = values_of_keys(keys, mask, 8)
    assert (wide[..., 7] == 0).all() and torch.equal(wide[..., :7], values)


@pytest.mark.parametrize("seed", [0, 1])
def test_gpo_cpu_kernels_equal_the_generic_path_in_values_and_gradients(seed):
    """The CPU kernels (value sort of keys, written-out gradients, numpy GRU) against the generic torch
    path (argsort + gather, nn.GRU packed) at the shapes of a scenes batch: equal to float rounding.
    Not bitwise: the weighted sum and the GRU add in another order; the weights carry that x 10 (the
    temperature), hence 1e-5 on the parameter gradients."""
    torch.manual_seed(seed)
    new, generic = GPO(), GPO()
    generic.load_state_dict(new.state_dict())
    generic.cpu_kernels = False
    x, mask, _ = ragged(b=32, max_len=20, d=64, seed=seed)
    x, mask = scatter_padding(x, mask, extra=3)  # padding among the real fragments, wider than any set
    x[2, :, :8] = 0.25  # ties within a set
    mask[4] = False  # an empty set
    upstream = torch.randn(32, 64)
    results = []
    for module in (new, generic):
        leaf = x.clone().requires_grad_(True)
        out, weights = module(leaf, mask, return_weights=True)
        (out * upstream).sum().backward()
        results.append((out.detach(), weights.detach(), leaf.grad, [p.grad for p in module.parameters()]))
    (out, w, gx, gp), (ref_out, ref_w, ref_gx, ref_gp) = results
    tol = {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(w, ref_w, **tol)
    torch.testing.assert_close(out, ref_out, **tol)
    assert (out[4] == 0).all() and (gx[4] == 0).all()
    assert (gx[~mask] == 0).all()  # no gradient reaches padding
    untied = torch.ones_like(mask)
    untied[2] = False  # a tied value's gradient may go to another of the tied positions
    torch.testing.assert_close(gx[untied], ref_gx[untied], **tol)
    torch.testing.assert_close(gx.sum(1), ref_gx.sum(1), **tol)
    for a, b in zip(gp, ref_gp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gpo_backward_can_run_twice_on_a_retained_graph():
    """Per-term gradient norms (training.grad_norms) run backward several times through one graph."""
    torch.manual_seed(4)
    gpo = GPO(pe_dim=8, hidden=6)
    x, mask, _ = ragged(seed=7)
    x.requires_grad_(True)
    out = gpo(x, mask).sum()
    first = torch.autograd.grad(out, [x, *gpo.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *gpo.parameters()])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
