"""`nn.TransformerEncoder` (post-norm, ReLU, batch_first) run on the real fragments only.

A padded batch of captions is mostly padding (scenes: 12 real words in a width of 34-36, so two
thirds of the slots), and `nn.TransformerEncoderLayer` runs its projections, feed-forward and norms
on every slot. Here every per-position part runs on the real rows alone (gathered once); only the
attention itself, which needs the (B, L) layout, runs padded, with padded keys masked as before.
The outputs at real positions equal the module's up to float rounding, also in training: each
dropout draws its mask for the same padded shape in the same order as the module does, so the same
random numbers land on the same elements (tests/test_packed_transformer.py checks both).
Padded positions come out as zeros. Used on CPU, where that equality is tested (on other devices
the dropout kernels differ and the padded module is cheap anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports(encoder: nn.TransformerEncoder) -> bool:
    """The layer configuration reproduced here: post-norm, ReLU, batch_first, no causal or extra norm."""
    return encoder.norm is None and all(
        isinstance(layer, nn.TransformerEncoderLayer) and not layer.norm_first and layer.activation is F.relu
        and layer.self_attn.batch_first and layer.self_attn._qkv_same_embed_dim and layer.self_attn.in_proj_bias
        is not None for layer in encoder.layers)


def _dropout(rows: torch.Tensor, p: float, training: bool, full_shape: tuple, real: torch.Tensor,
             sequence_first: bool = False) -> torch.Tensor:
    """Dropout of the real rows with the mask F.dropout would draw for the padded (B, L, C) tensor.

    The mask is drawn in memory order: `sequence_first` for a tensor that is an (L, B, C) one
    transposed, as the attention block's output is inside `nn.MultiheadAttention`."""
    if not training or p == 0.0:
        return rows
    b, length, channels = full_shape
    if sequence_first:  # the drawn mask / (1 - p), exactly as F.dropout computes it
        scale = F.dropout(rows.new_ones(length, b, channels), p, True).transpose(0, 1)
    else:
        scale = F.dropout(rows.new_ones(b, length, channels), p, True)
    return rows * scale[real]


def packed_encoder(encoder: nn.TransformerEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`encoder(x, src_key_padding_mask=~mask)` at the real positions, zeros at padding; (B, L, D)."""
    b, length, dim = x.shape
    rows = x[mask]  # (N, D), real fragments only
    key_mask = torch.zeros(b, length, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
    for layer in encoder.layers:
        rows = _layer(layer, rows, mask, key_mask, (b, length, dim))
    return rows.new_zeros(b, length, dim).index_put((mask,), rows)


def _layer(layer: nn.TransformerEncoderLayer, rows, mask, key_mask, shape):
    b, length, dim = shape
    attn = layer.self_attn
    heads = attn.num_heads
    training = layer.training
    qkv = F.linear(rows, attn.in_proj_weight, attn.in_proj_bias)
    padded = qkv.new_zeros(b, length, 3 * dim).index_put((mask,), qkv)
    q, k, v = (t.view(b, length, heads, dim // heads).transpose(1, 2) for t in padded.chunk(3, dim=-1))
    mask4 = key_mask.view(b, 1, 1, length).expand(-1, heads, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, mask4, attn.dropout if training else 0.0)
    out = out.transpose(1, 2)[mask].reshape(-1, dim)  # (N, D)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    rows = layer.norm1(rows + _dropout(out, layer.dropout1.p, training, shape, mask, sequence_first=True))
    hidden = F.relu(layer.linear1(rows))
    hidden = _dropout(hidden, layer.dropout.p, training, (b, length, hidden.shape[-1]), mask)
    out = _dropout(layer.linear2(hidden), layer.dropout2.p, training, shape, mask)
    return layer.norm2(rows + out)
