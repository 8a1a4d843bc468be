"""`dias`: DIAS (Ma et al., ACM MM 2024) with the paper's setting.

The VSE-infinity model (fragments pooled into global embeddings), trained with the distance-weighted
triplet loss (Eq. 3) plus the DIAS regularizer (Eq. 17). `loss.regularizers: [dias]` adds the same
regularizer to any other method instead; listing it here as well would apply it twice, so it is refused.
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.errors import ItmatchError
from itmatch.methods.registry import register_method
from itmatch.methods.vse import VSE
from itmatch.objectives.vse import VSEObjective
from itmatch.objectives.regularizers import RegularizedObjective, build_regularizer


@register_method("dias")
class DIAS(VSE):
    """The VSE model (`VSE.build_model`); only the objective differs."""

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        if "dias" in cfg.loss.regularizers:
            raise ItmatchError("config key 'loss.regularizers': method dias already includes the dias "
                               "regularizer; remove it from loss.regularizers")
        return RegularizedObjective(VSEObjective(cfg, model.similarity), {"dias": build_regularizer("dias", cfg)})
