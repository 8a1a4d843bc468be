"""`hrem`: HREM (Fu et al., CVPR 2023) = the VSE backbone with relation-enhanced pooling (fragment
level, kept at inference) + the training-only cross-embedding association graph (in the objective).

A trained `hrem` model encodes each side independently: its checkpoint holds no relation module.
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.encoders.fragments import RelationEnhancedPool
from itmatch.methods.registry import register_method
from itmatch.methods.vse import VSEModel
from itmatch.objectives.hrem import HREMObjective


def relation_pool(cfg: Config) -> nn.Module:
    h = cfg.hrem
    return RelationEnhancedPool(cfg.model.embed_dim, h.beta, h.maxk, h.fragment_heads, h.fragment_ff, h.dropout,
                                h.fragment_layers)


@register_method("hrem")
class HREM:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return VSEModel(cfg.model, tokenizer, image_pool=relation_pool(cfg), text_pool=relation_pool(cfg))

    @staticmethod
    def build_objective(cfg: Config) -> nn.Module:
        return HREMObjective(cfg)
