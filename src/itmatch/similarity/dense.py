"""Similarity of global embeddings (one vector per item): cosine, i.e. the dot product of unit vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1, eps=eps)


def cosine_similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M); inputs are normalised here, so any embedding may be passed."""
    return l2_normalize(img) @ l2_normalize(txt).T


def dot_similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) dot products: the cosine where both sides are unit vectors."""
    return img @ txt.T


def pair_dot(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(P, D) x (P, D) -> (P,) dot products of aligned rows."""
    return (img * txt).sum(-1)
