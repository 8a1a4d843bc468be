"""The fragment self-attention on real fragments only, against `nn.TransformerEncoder` on the padded batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from itmatch.encoders import packed_transformer
from itmatch.encoders.fragments import FragmentSelfAttention
from itmatch.encoders.packed_transformer import packed_encoder


def batch(seed=0):
    """Sets of sizes 9, 1, 4, 7, 0 (an empty item) and 3, their real slots shuffled among the padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 9, 32, generator=g)
    sizes = torch.tensor([9, 1, 4, 7, 0, 3])
    mask = torch.arange(9)[None] < sizes[:, None]
    perm = torch.stack([torch.randperm(9, generator=g) for _ in range(6)])
    return x, torch.gather(mask, 1, perm)


@pytest.mark.parametrize("training", [False, True])
def test_packed_encoder_equals_the_module_on_the_padded_batch(training):
    """Values, input gradients and parameter gradients to float rounding; in training with every dropout
    on (attention, both residual branches, feed-forward), since each mask is drawn as the module draws it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 48, 0.3, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(training)
    assert packed_transformer.supports(encoder)
    x, mask = batch()
    upstream = torch.randn(6, 9, 32)
    results = []
    for fn in (lambda a: encoder(a, src_key_padding_mask=~mask).masked_fill(~mask.unsqueeze(-1), 0.0),
               lambda a: packed_encoder(encoder, a, mask)):
        torch.manual_seed(5)  # the same random numbers for both runs' dropout
        leaf = x.clone().requires_grad_(True)
        encoder.zero_grad()
        out = fn(leaf)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in encoder.parameters()]))
    (new, new_gx, new_gp), (ref, ref_gx, ref_gp) = results
    if training:  # dropout is on: the outputs differ from the eval-mode ones, so the masks were used
        with torch.no_grad():
            assert (new - packed_encoder(encoder.eval(), x, mask)).abs().max() > 0.1
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(new, ref, **tol)
    assert (new[~mask] == 0).all()
    torch.testing.assert_close(new_gx, ref_gx, **tol)
    assert (new_gx[~mask] == 0).all()
    for a, b in zip(new_gp, ref_gp, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fragment_attention_uses_the_packed_path_and_falls_back_for_other_layers():
    torch.manual_seed(1)
    attention = FragmentSelfAttention(32, 4, 48, 0.1, 1).eval()
    x, mask = batch(1)
    with torch.no_grad():
        packed = attention(x, mask)
        attention.packed = False
        padded = attention(x, mask)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    gelu = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 48, activation="gelu", batch_first=True), 1,
                                 enable_nested_tensor=False)
    assert not packed_transformer.supports(gelu)  # a layer this path does not reproduce runs the module
