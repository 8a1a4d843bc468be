"""`dias`: DIAS (Ma et al., ACM MM 2024) with the paper's setting, and the `dias` regularizer.

The VSE-infinity model (fragments pooled into global embeddings), trained with the distance-weighted
triplet loss (Eq. 3) plus the DIAS regularizer (Eq. 17). `loss.regularizers: [dias]` adds the same
regularizer to any other method instead; listing it here as well would apply it twice, so it is refused.
Both read the `dias:` config section (`DiasConfig`).
"""

from __future__ import annotations

from torch import nn

from itmatch.config import Config
from itmatch.errors import ItmatchError
from itmatch.methods.registry import build_regularizer, register_method, register_regularizer
from itmatch.methods.vse import VSE
from itmatch.objectives.dias import DiasConfig, DIASRegularizer
from itmatch.objectives.regularizers import RegularizedObjective
from itmatch.objectives.vse import VSEObjective


def build_dias_regularizer(cfg: Config) -> nn.Module:
    return DIASRegularizer(cfg.dias)


register_regularizer("dias", build=build_dias_regularizer, config=DiasConfig)


@register_method("dias", config=DiasConfig)
class DIAS(VSE):
    """The VSE model (`VSE.build_model`); only the objective differs."""

    @staticmethod
    def check_config(cfg: Config) -> None:
        if "dias" in cfg.loss.regularizers:
            raise ItmatchError("config key 'loss.regularizers': method dias already includes the dias "
                               "regularizer; remove it from loss.regularizers")

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return RegularizedObjective(VSEObjective(cfg, model.similarity), {"dias": build_regularizer("dias", cfg)})
