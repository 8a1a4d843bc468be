"""Cross-modal prototype contrast (SwAV-style, as AAHR uses it).

Learnable unit prototypes P (M x D) are shared by both modalities. Scores z = e P^T; soft cluster
codes q come from Sinkhorn-Knopp on exp(z / epsilon) without gradient (every prototype is used
equally within the batch); each modality predicts the *other* modality's codes:

    L = - mean_b sum_m q^T_bm log softmax(z^I_b / tau)_m  -  mean_b sum_m q^I_bm log softmax(z^T_b / tau)_m

so an image and its caption must fall into the same clusters, which tolerates soft positives (similar
pairs that the batch labels negative). The prototypes are renormalised after every optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.objectives.base import StepContext, TrainingHooks


@torch.no_grad()
def sinkhorn_codes(scores: torch.Tensor, epsilon: float = 0.1, iterations: int = 3) -> torch.Tensor:
    """(B, M) codes from (B, M) scores: alternately make every prototype carry 1/M of the mass and every
    sample 1/B, ending with the samples; each row of the result sums to 1."""
    q = torch.exp((scores - scores.max()) / epsilon).T.double()  # (M, B); the shift cancels in the norms
    q /= q.sum()
    m, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= m
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T.to(scores.dtype)


class PrototypeContrast(nn.Module, TrainingHooks):
    def __init__(self, dim: int, n_prototypes: int, epsilon: float = 0.1, iterations: int = 3,
                 temperature: float = 0.1):
        super().__init__()
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_prototypes, dim), dim=1))
        self.epsilon, self.iterations, self.temperature = epsilon, iterations, temperature

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Swapped prediction between aligned rows img[b], txt[b] (one pair per row)."""
        z_img, z_txt = img @ self.prototypes.T, txt @ self.prototypes.T
        q_img = sinkhorn_codes(z_img.detach().float(), self.epsilon, self.iterations)
        q_txt = sinkhorn_codes(z_txt.detach().float(), self.epsilon, self.iterations)
        img_predicts_txt = -(q_txt * F.log_softmax(z_img.float() / self.temperature, dim=1)).sum(1).mean()
        txt_predicts_img = -(q_img * F.log_softmax(z_txt.float() / self.temperature, dim=1)).sum(1).mean()
        return img_predicts_txt + txt_predicts_img

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))
