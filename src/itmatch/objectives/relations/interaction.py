"""HREM's relation interaction mechanisms (Sec. 3.3.2): attention among the embeddings of a batch.

Attention logits are `QK^T / sqrt(d) + lambda * S`, and pairs not connected in A get -inf
(Eq. 12). Fusion attends over all 2N nodes at once; standalone first attends across modalities
(the I->T / T->I blocks), then within each (the I->I / T->T blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.objectives.relations.graph import AssociationGraph


def attention_bias(connection: torch.Tensor, relevance: torch.Tensor, weight: float) -> torch.Tensor:
    """Additive float mask: lambda * S where connected, -inf elsewhere."""
    return (weight * relevance).masked_fill(~connection, float("-inf"))


class BiasedAttentionBlock(nn.Module):
    """Multi-head attention with an additive (N_q, N_k) bias, then residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # The batch of embeddings is one sequence: (1, N, d).
        out, _ = self.attn(query[None], key[None], key[None], attn_mask=bias.to(query.dtype), need_weights=False)
        return self.norm(query + self.drop(out[0]))


class FeedForwardBlock(nn.Module):
    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.net(x)))


class FusionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attention = BiasedAttentionBlock(dim, heads, dropout)
        self.ff = FeedForwardBlock(dim, ff_dim, dropout)

    def forward(self, v, u, graph: AssociationGraph, weight: float):
        nodes = torch.cat([v, u], 0)
        nodes = self.ff(self.attention(nodes, nodes, attention_bias(graph.connection, graph.relevance, weight)))
        return nodes[: len(v)], nodes[len(v) :]


class StandaloneLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.cross_img = BiasedAttentionBlock(dim, heads, dropout)
        self.cross_txt = BiasedAttentionBlock(dim, heads, dropout)
        self.self_img = BiasedAttentionBlock(dim, heads, dropout)
        self.self_txt = BiasedAttentionBlock(dim, heads, dropout)
        self.ff_img = FeedForwardBlock(dim, ff_dim, dropout)
        self.ff_txt = FeedForwardBlock(dim, ff_dim, dropout)

    def forward(self, v, u, graph: AssociationGraph, weight: float):
        n = len(v)
        a, s = graph.connection, graph.relevance
        block = lambda rows, cols: attention_bias(a[rows, cols], s[rows, cols], weight)  # noqa: E731
        img, txt = slice(0, n), slice(n, None)
        v_cross = self.cross_img(v, u, block(img, txt))  # images attend to captions (I->T block)
        u_cross = self.cross_txt(u, v, block(txt, img))
        v_new = self.ff_img(self.self_img(v_cross, v_cross, block(img, img)))
        u_new = self.ff_txt(self.self_txt(u_cross, u_cross, block(txt, txt)))
        return v_new, u_new


class RelationInteraction(nn.Module):
    def __init__(self, mechanism: str, dim: int, heads: int, ff_dim: int, dropout: float, layers: int):
        super().__init__()
        from itmatch.errors import ItmatchError

        layer_cls = {"fusion": FusionLayer, "standalone": StandaloneLayer}.get(mechanism)
        if layer_cls is None:
            raise ItmatchError(f"config key 'hrem.mechanism': unknown {mechanism!r} (use fusion, standalone)")
        self.layers = nn.ModuleList(layer_cls(dim, heads, ff_dim, dropout) for _ in range(layers))

    def forward(self, v, u, graph: AssociationGraph, weight: float):
        for layer in self.layers:
            v, u = layer(v, u, graph, weight)
        return v, u
