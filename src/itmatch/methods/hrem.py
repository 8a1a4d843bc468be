"""`hrem`: HREM (Fu et al., CVPR 2023) = the VSE backbone with relation-enhanced pooling (fragment
level, kept at inference) + the training-only cross-embedding association graph (in the objective).

A trained `hrem` model encodes each side independently: its checkpoint holds no relation module.
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config, HremConfig
from itmatch.encoders.fragments import RelationEnhancedPool
from itmatch.errors import ItmatchError
from itmatch.methods.registry import register_method
from itmatch.models.backbone import VSEModel
from itmatch.objectives.hrem import HREMObjective
from itmatch.similarity.fragment import SCORES


def check_hrem_config(h: HremConfig, embed_dim: int) -> None:
    """One clear error for values the paper's equations cannot take."""
    checks = [
        ("beta", 0.0 <= h.beta <= 1.0, "in [0, 1]"),
        ("maxk", h.maxk >= 1, ">= 1"),
        ("fragment_layers", h.fragment_layers >= 0, ">= 0"),
        ("layers", h.layers >= 1, ">= 1"),
        ("tau", 0.0 < h.tau <= 1.0, "in (0, 1]"),
        ("sigma", h.sigma > 0, "> 0"),
        ("topk", h.topk >= 1, ">= 1"),
        ("reg_weight", h.reg_weight >= 0, ">= 0"),
        ("dropout", 0.0 <= h.dropout < 1.0, "in [0, 1)"),
        ("mechanism", h.mechanism in ("fusion", "standalone"), "fusion or standalone"),
        ("matching", h.matching in SCORES, " or ".join(SCORES)),
        ("heads", h.heads >= 1 and embed_dim % h.heads == 0, f"a divisor of model.embed_dim ({embed_dim})"),
        ("fragment_heads", h.fragment_heads >= 1 and embed_dim % h.fragment_heads == 0,
         f"a divisor of model.embed_dim ({embed_dim})"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise ItmatchError(f"config key 'hrem.{key}': {getattr(h, key)!r} must be {need}")


def relation_pool(cfg: Config) -> nn.Module:
    h = cfg.hrem
    return RelationEnhancedPool(cfg.model.embed_dim, h.beta, h.maxk, h.fragment_heads, h.fragment_ff, h.dropout,
                                h.fragment_layers)


@register_method("hrem")
class HREM:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        check_hrem_config(cfg.hrem, cfg.model.embed_dim)
        return VSEModel(cfg.model, tokenizer, image_pool=relation_pool(cfg), text_pool=relation_pool(cfg))

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        check_hrem_config(cfg.hrem, cfg.model.embed_dim)
        return HREMObjective(cfg, model.similarity)
