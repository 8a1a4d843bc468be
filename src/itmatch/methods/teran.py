"""`teran`: TERAN (Messina et al., TOMM 2021), the fragment-matching base of HOSA.

Regions and words pass through their own Transformer encoders into a common space; a pair is scored
by MrSw (max over regions of the region-word cosine, summed over words) and trained with the hinge of
VSE++ on the hardest negative (`loss.name: hinge`). A `score` model: evaluation tiles its similarity
in `score_block` blocks. GPO pooling is not used, so `model.pooling` and the GPO sizes are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from itmatch.config import Config, check_values
from itmatch.methods.registry import register_method
from itmatch.models.teran import TeranModel
from itmatch.objectives.vse import FragmentRankingObjective

POOLING_KEYS = ("model.pooling", "model.gpo_pe_dim", "model.gpo_hidden")


@dataclass
class TeranConfig:
    """The `teran:` section: the two fragment encoders and the aggregation of region-word cosines."""

    layers: int = 2  # Transformer encoder layers per modality (TERAN: 2 after the projection to d)
    heads: int = 4
    ff: int = 2048
    dropout: float = 0.1
    region_reduce: Literal["max", "sum"] = "max"  # MrSw: max over regions ...
    word_reduce: Literal["sum", "mean"] = "sum"  # ... summed over words
    score_rows: int = 64  # images x captions per scoring block (memory: rows*cols*regions*words floats)
    score_cols: int = 512

    def check(self, cfg: Config) -> None:
        dim = cfg.model.embed_dim
        check_values(self, cfg.model.method, [
            ("layers", self.layers >= 0, ">= 0"),
            ("heads", self.heads >= 1 and dim % self.heads == 0, f"a divisor of model.embed_dim ({dim})"),
            ("ff", self.ff >= 1, ">= 1"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("score_rows", self.score_rows >= 1, ">= 1"),
            ("score_cols", self.score_cols >= 1, ">= 1"),
        ])


@register_method("teran", config=TeranConfig, ignores=POOLING_KEYS)
class TERAN:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return TeranModel(cfg, tokenizer)

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return FragmentRankingObjective(cfg.loss, model.similarity)
