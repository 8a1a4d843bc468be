"""HREM's cross-embedding association graph over the 2N embeddings of a batch (Sec. 3.3.1).

Nodes are N image and N caption embeddings. Two 2N x 2N matrices in the block layout of Eq. 4,
[[I->I, I->T], [T->I, T->T]]:
  - the connection matrix A (which nodes may attend to which): each row keeps its first tau*N
    neighbours, by global similarity within a modality (Eq. 5) and by the fragment matching value p
    across modalities (Eq. 6-7);
  - the relevance matrix S (how strongly): exp(-||a-b||^2 / sigma) within a modality (Eq. 10), a
    learned MLP of the matching vector q plus p across modalities (Eq. 8-9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.similarity.fragment import FragmentMatching


@dataclass
class AssociationGraph:
    connection: torch.Tensor  # (2N, 2N) bool
    relevance: torch.Tensor  # (2N, 2N) float
    s_i2t: torch.Tensor  # learned inter-modal relevance, (N_img, N_txt)
    s_t2i: torch.Tensor  # (N_txt, N_img)


def keep_first(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Row-wise bool mask of the `n_keep` highest scores (ties broken by position)."""
    idx = scores.topk(min(n_keep, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def neighbour_count(tau: float, n: int) -> int:
    return max(1, int(math.floor(tau * n)))


def connection_matrix(v: torch.Tensor, u: torch.Tensor, m: FragmentMatching, tau: float) -> torch.Tensor:
    n_img, n_txt = len(v), len(u)
    with torch.no_grad():
        a_ii = keep_first(v @ v.T, neighbour_count(tau, n_img))
        a_tt = keep_first(u @ u.T, neighbour_count(tau, n_txt))
        a_it = keep_first(m.p_i2t, neighbour_count(tau, n_txt))
        a_ti = keep_first(m.p_t2i, neighbour_count(tau, n_img))
    return torch.cat([torch.cat([a_ii, a_it], 1), torch.cat([a_ti, a_tt], 1)], 0)


def gaussian_relevance(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-||a_i - b_j||^2 / sigma) (Eq. 10). Squared distances from dot products: unlike `cdist`,
    their gradient is defined where a_i == b_j (the diagonal of S_I->I)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return torch.exp(-sq.clamp(min=0.0) / sigma)


class RelevanceMLP(nn.Module):
    """q (K top matches) -> a scalar relevance, added to the overall matching value p (Eq. 9)."""

    def __init__(self, k: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Linear(k, 1))

    def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.net(q).squeeze(-1) + p


class AssociationGraphBuilder(nn.Module):
    def __init__(self, k: int, tau: float, sigma: float):
        super().__init__()
        self.tau, self.sigma = tau, sigma
        self.mlp_i2t = RelevanceMLP(k)  # one MLP per direction
        self.mlp_t2i = RelevanceMLP(k)

    def forward(self, v: torch.Tensor, u: torch.Tensor, m: FragmentMatching) -> AssociationGraph:
        s_i2t = self.mlp_i2t(m.q_i2t, m.p_i2t)
        s_t2i = self.mlp_t2i(m.q_t2i, m.p_t2i)
        s_ii = gaussian_relevance(v, v, self.sigma)
        s_tt = gaussian_relevance(u, u, self.sigma)
        relevance = torch.cat([torch.cat([s_ii, s_i2t], 1), torch.cat([s_t2i, s_tt], 1)], 0)
        return AssociationGraph(connection_matrix(v, u, m, self.tau), relevance, s_i2t, s_t2i)


def relevance_regularizer(v: torch.Tensor, u: torch.Tensor, graph: AssociationGraph, sigma: float) -> torch.Tensor:
    """Eq. 11: L_kl(S, S^g) = KL(softmax(S) || softmax(S^g)) per row, averaged over rows, both directions.

    S^g, the relevance of the global embeddings (Eq. 10 across modalities), is a detached guide: this
    term trains the relevance MLPs (and, without `detach_fragments`, the fragments behind p); it never
    pulls the global embeddings towards the learned relation. The argument order is the paper's and
    also what the public code computes (`F.kl_div(log softmax(S^g), softmax(S))`).
    """
    loss = v.new_zeros(())
    pairs = ((graph.s_i2t, gaussian_relevance(v, u, sigma)), (graph.s_t2i, gaussian_relevance(u, v, sigma)))
    for learned, guide in pairs:
        log_p = F.log_softmax(learned, dim=1)
        log_g = F.log_softmax(guide.detach(), dim=1)
        loss = loss + (log_p.exp() * (log_p - log_g)).sum(1).mean()
    return loss
