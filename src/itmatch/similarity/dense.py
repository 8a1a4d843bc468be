"""Similarity of global embeddings: cosine, i.e. the dot product of L2-normalised vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1, eps=eps)


def cosine_similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M); inputs are normalised here, so any embedding may be passed."""
    return l2_normalize(img) @ l2_normalize(txt).T


@torch.no_grad()
def cosine_similarity_chunked(img: torch.Tensor, txt: torch.Tensor, chunk: int = 4096,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """`cosine_similarity` for large sets, without gradients: image rows are scored `chunk` at a
    time on `device` (default: where `txt` lives) and gathered into one float32 (N, M) CPU tensor."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    device = torch.device(device) if device is not None else txt.device
    txt_n = l2_normalize(txt.to(device))
    out = torch.empty(img.shape[0], txt.shape[0], dtype=torch.float32)
    for start in range(0, img.shape[0], chunk):
        block = l2_normalize(img[start:start + chunk].to(device))
        out[start:start + chunk] = (block @ txt_n.T).float().cpu()
    return out
