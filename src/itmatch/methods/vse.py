"""`vse`: VSE-infinity (Chen et al., CVPR 2021), the baseline every other method builds on.

Regions (or CNN grid cells) and words are encoded into fragments, each side is pooled (GPO by
default) into one vector, L2-normalised, and the two are compared by cosine similarity; trained
with the configured ranking loss (VSE++ hinge by default).
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.methods.registry import register_method
from itmatch.models.backbone import VSEModel
from itmatch.objectives.vse import VSEObjective


@register_method("vse")
class VSE:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return VSEModel(cfg.model, tokenizer)

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return VSEObjective(cfg.loss, model.similarity)
