"""`hrem`: HREM (Fu et al., CVPR 2023) = the VSE backbone with relation-enhanced pooling (fragment
level, kept at inference) + the training-only cross-embedding association graph (in the objective).

A trained `hrem` model encodes each side independently: its checkpoint holds no relation module.
HREM pools with its own relation-enhanced poolers, so `model.pooling` and the GPO sizes are not read:
setting them in an hrem config is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from itmatch.config import Config, check_values
from itmatch.encoders.fragments import RelationEnhancedPool
from itmatch.methods.registry import register_method
from itmatch.models.backbone import VSEModel
from itmatch.objectives.hrem import HREMObjective


@dataclass
class HremConfig:
    """The `hrem:` config section. Fragment level lives in the model, instance level in the objective."""

    beta: float = 0.8  # global = beta * MaxPool(initial) + (1 - beta) * AvgPool(enhanced), Eq. 2-3
    maxk: int = 2  # "max" pooling = mean of the top-k values per dimension (public code: 2; paper: 1)
    fragment_layers: int = 1
    fragment_heads: int = 16
    fragment_ff: int = 1024
    dropout: float = 0.1
    mechanism: Literal["fusion", "standalone"] = "fusion"  # Sec. 3.3.2
    layers: int = 1  # L interaction layers
    heads: int = 16
    tau: float = 0.5  # each row of the connection matrix keeps its first tau * N neighbours
    relevance_weight: float = 1.0  # lambda of Eq. 12 (paper: 1.5; public README commands: 1.0 F30K, 1.5 COCO)
    sigma: float = 1.0  # intra-modal relevance exp(-||a-b||^2 / sigma), Eq. 10
    topk: int = 10  # K of Eq. 8
    reg_weight: float = 10.0  # weight of L_reg (Eq. 11)
    instance_warmup_steps: int = 8000  # instance-level terms switch on after this many steps
    detach_fragments: bool = True  # fragment matching p on detached fragments, as the public code does
    # region-word scores behind p and q (Eq. 7-8): scan = LeakyReLU(0.1) + SCAN l2 norm (public code),
    # cosine = Eq. 7 literally on cosines (the choices of itmatch.similarity.fragment.SCORES)
    matching: Literal["scan", "cosine"] = "scan"

    def check(self, cfg: Config) -> None:
        """One clear error for values the paper's equations cannot take."""
        embed_dim = cfg.model.embed_dim
        check_values(self, "hrem", [
            ("beta", 0.0 <= self.beta <= 1.0, "in [0, 1]"),
            ("maxk", self.maxk >= 1, ">= 1"),
            ("fragment_layers", self.fragment_layers >= 0, ">= 0"),
            ("fragment_ff", self.fragment_ff >= 1, ">= 1"),
            ("layers", self.layers >= 1, ">= 1"),
            ("tau", 0.0 < self.tau <= 1.0, "in (0, 1]"),
            ("sigma", self.sigma > 0, "> 0"),
            ("topk", self.topk >= 1, ">= 1"),
            ("reg_weight", self.reg_weight >= 0, ">= 0"),
            ("relevance_weight", self.relevance_weight >= 0, ">= 0"),
            ("instance_warmup_steps", self.instance_warmup_steps >= 0, ">= 0"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("heads", self.heads >= 1 and embed_dim % self.heads == 0, f"a divisor of model.embed_dim ({embed_dim})"),
            ("fragment_heads", self.fragment_heads >= 1 and embed_dim % self.fragment_heads == 0,
             f"a divisor of model.embed_dim ({embed_dim})"),
        ])


def relation_pool(cfg: Config) -> nn.Module:
    h = cfg.hrem
    return RelationEnhancedPool(cfg.model.embed_dim, h.beta, h.maxk, h.fragment_heads, h.fragment_ff, h.dropout,
                                h.fragment_layers)


@register_method("hrem", config=HremConfig, ignores=("model.pooling", "model.gpo_pe_dim", "model.gpo_hidden"))
class HREM:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return VSEModel(cfg.model, tokenizer, image_pool=relation_pool(cfg), text_pool=relation_pool(cfg))

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return HREMObjective(cfg, model.similarity)
