"""`hosa`: HOSA (Gao et al., LREC-COLING 2024) = TERAN + cross-modal reconstruction by the t-product.

The model (`models/hosa.py`) fits the coefficient tensor H of Eq. 1 per batch in the Fourier domain,
reconstructs fragments through it, scores them by the cosine MrSw of Eq. 5-6, and keeps a running
estimate of H's normal equations for inference; the objective is Eq. 7, the hinge on the hardest
negative (`loss.name: hinge`). The `hosa:` section holds TERAN's encoder settings too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from itmatch.config import Config, check_values
from itmatch.methods.registry import register_method
from itmatch.methods.teran import POOLING_KEYS, TeranConfig
from itmatch.models.hosa import HosaModel
from itmatch.objectives.vse import FragmentRankingObjective


@dataclass
class HosaConfig(TeranConfig):
    """TERAN's settings plus the reconstruction (Table 4's options)."""

    direction: Literal["image", "text", "both"] = "image"  # Image_rec (best in the paper) | Text_rec | both
    op: Literal["tproduct", "hadamard"] = "tproduct"  # t-product (Fourier domain) | Hadamard ablation
    ridge: float = 0.1  # relative ridge of every least-squares solve (x mean diagonal of the Gram)
    momentum: float = 0.99  # EMA of the per-pair normal equations: the H used at inference
    regions: int = 36  # m, region slots of H (BUTD: 36)
    words: int = 0  # l, word slots of H; 0 = model.text.max_length

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        check_values(self, "hosa", [
            ("ridge", self.ridge > 0, "> 0 (the solves need it where a batch leaves slots empty)"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("regions", self.regions >= 1, ">= 1"),
            ("words", self.words >= 0, ">= 0"),
        ])


@register_method("hosa", config=HosaConfig, ignores=POOLING_KEYS)
class HOSA:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return HosaModel(cfg, tokenizer)

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return FragmentRankingObjective(cfg.loss, model.similarity)
