"""AAHR's high-order relations over a batch: graph convolutions on HREM's relevance graph, then HREM's
masked attention (training only).

Nodes are the N image and N caption local embeddings. Relevance S (2N x 2N, HREM's block layout):
within a modality exp(-||a-b||^2 / sigma); across modalities the learned relevance of the fragment
matching vector (HREM Eq. 9: MLP(q) + p), or, as the public AAHR code does (`relevance: mean`), the
plain matching value p, which leaves the relevance MLPs and the regulariser without gradient.

    H_I = GCN_I(v, S_II), H_T = GCN_T(u, S_TT), H = GCN_joint([H_I; H_T], S), Z = n(H) + [v; u]
    [v~; u~] = n(masked attention over Z with bias lambda * S on HREM's connection A)
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.objectives.relations.graph import (
    AssociationGraph,
    RelevanceMLP,
    connection_matrix,
    gaussian_relevance,
)
from itmatch.objectives.relations.interaction import RelationInteraction
from itmatch.similarity.dense import l2_normalize
from itmatch.similarity.fragment import FragmentMatching

RELEVANCES = ("learned", "mean")


class GraphConvolution(nn.Module):
    """H' = LeakyReLU(A Dropout(H) W + b): no degree normalisation, no self-loops (the public code's layer)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.6, slope: float = 0.2):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.slope = slope

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        # A (H W) + b: the bias is added once per node, after aggregation.
        agg = adjacency.to(h.dtype) @ (self.drop(h) @ self.linear.weight.T)
        return nn.functional.leaky_relu(agg + self.linear.bias, self.slope)


def block(ii: torch.Tensor, it: torch.Tensor, ti: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cat([ii, it], 1), torch.cat([ti, tt], 1)], 0)


class HighOrderRelations(nn.Module):
    def __init__(self, dim: int, topk: int, tau: float = 0.5, sigma: float = 1.0, relevance: str = "learned",
                 heads: int = 16, dropout: float = 0.1, gcn_dropout: float = 0.6, gcn_slope: float = 0.2):
        super().__init__()
        if relevance not in RELEVANCES:
            raise ValueError(f"relevance must be one of {RELEVANCES}")
        self.tau, self.sigma, self.relevance = tau, sigma, relevance
        self.mlp_i2t = RelevanceMLP(topk)
        self.mlp_t2i = RelevanceMLP(topk)
        self.gcn_img = GraphConvolution(dim, dim, gcn_dropout, gcn_slope)
        self.gcn_txt = GraphConvolution(dim, dim, gcn_dropout, gcn_slope)
        self.gcn_joint = GraphConvolution(dim, dim, gcn_dropout, gcn_slope)
        # Feed-forward width = embedding width, as HREM's (and AAHR's) instance-level Transformer.
        self.interaction = RelationInteraction("fusion", dim, heads, dim, dropout, 1)

    def graph(self, v: torch.Tensor, u: torch.Tensor, m: FragmentMatching) -> AssociationGraph:
        if self.relevance == "learned":
            s_i2t, s_t2i = self.mlp_i2t(m.q_i2t, m.p_i2t), self.mlp_t2i(m.q_t2i, m.p_t2i)
        else:  # the public code: the MLPs' output is overwritten by the mean matching score
            s_i2t, s_t2i = m.p_i2t, m.p_t2i
        relevance = block(gaussian_relevance(v, v, self.sigma), s_i2t, s_t2i, gaussian_relevance(u, u, self.sigma))
        return AssociationGraph(connection_matrix(v, u, m, self.tau), relevance, s_i2t, s_t2i)

    def forward(self, v: torch.Tensor, u: torch.Tensor, m: FragmentMatching, weight: float):
        """(v~, u~, graph): enhanced unit embeddings of the batch's images and captions."""
        n = len(v)
        graph = self.graph(v, u, m)
        s = graph.relevance
        h = torch.cat([self.gcn_img(v, s[:n, :n]), self.gcn_txt(u, s[n:, n:])], 0)
        z = l2_normalize(self.gcn_joint(h, s)) + torch.cat([v, u], 0)
        v_new, u_new = self.interaction(z[:n], z[n:], graph, weight)
        return l2_normalize(v_new), l2_normalize(u_new), graph
