"""`aahr`: AAHR (Chen et al., 2025, arXiv 2507.09256) = HREM's fragment level with pooling guided by a
frozen global feature, gated global-local fusion (the model), plus training-only prototype contrast,
high-order relations over the batch and momentum contrast (the objective). See docs/methods/aahr.md.

The global branch's frozen encoders are built once per model and shared with the momentum encoders.
`global_image` / `global_text` choose them: the paper's OpenCLIP (`open_clip`, a model name and a local
weights file), or what exists offline (`regions_mean`: the mean of the region features; `sentence`: the
MiniLM sentence embedding), the setting of the packaged configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from itmatch.config import Config, check_values
from itmatch.encoders.frozen import FrozenGlobalEncoders
from itmatch.methods.registry import register_method
from itmatch.models.aahr import AAHRModel
from itmatch.objectives.aahr import AAHRObjective


@dataclass
class AahrConfig:
    """The `aahr:` config section. Defaults are the public code's F30K run script."""

    # global branch (frozen)
    global_image: Literal["regions_mean", "open_clip"] = "regions_mean"
    global_text: Literal["sentence", "open_clip"] = "sentence"
    open_clip_model: str = "ViT-B-32"
    open_clip_weights: str | None = None  # local file (the paper: laion2B-s34B-b79K); nothing is downloaded
    sentence_path: str | None = None  # local transformers folder; None = the packaged MiniLM
    global_cache: int = 200_000  # frozen text features memoised per caption text (0 = off)
    # local branch and fusion
    beta: float = 0.8  # local = beta * MaxK(initial) + (1 - beta) * guided attention pool(enhanced)
    maxk: int = 2
    fragment_layers: int = 1
    fragment_heads: int = 16
    fragment_ff: int = 1024
    dropout: float = 0.1
    pool_heads: int = 8  # cosine attention heads of the guided pool, averaged
    normalize_fused: bool = True  # re-normalise g*l + (1-g)*c (the public code does not)
    # ranking on the fused embeddings
    base_weight: float = 1.0
    # prototype contrast
    prototypes: int = 384  # F30K 384, COCO 768
    sinkhorn_epsilon: float = 0.1
    sinkhorn_iterations: int = 3
    proto_temperature: float = 0.1
    proto_weight: float = 0.2  # 0 = no prototypes (ablation)
    proto_start_steps: int = 2200
    # high-order relations (HREM's graph + GCNs + masked attention)
    gnn_weight: float = 1.0  # each of the three cross ranking terms
    reg_weight: float = 10.0
    graph_warmup_steps: int = 8000
    relevance: Literal["learned", "mean"] = "learned"  # mean = the public code (relevance MLPs get no gradient)
    gcn_dropout: float = 0.6
    gcn_slope: float = 0.2
    heads: int = 16
    tau: float = 0.5
    relevance_weight: float = 1.0  # lambda: F30K 1.0, COCO 1.5
    sigma: float = 1.0
    topk: int = 10
    detach_fragments: bool = True
    matching: Literal["scan", "cosine"] = "scan"
    # momentum contrast
    moco_weight: float = 1.0  # 0 = no momentum encoders (ablation)
    momentum: float = 0.999
    queue_size: int = 2048
    moco_temperature: float = 0.07
    moco_query: Literal["local", "fused"] = "local"  # the public code: online local vs momentum fused
    mask_same_image: bool = True  # the public code does not mask

    def check(self, cfg: Config) -> None:
        d = cfg.model.embed_dim
        check_values(self, "aahr", [
            ("global_cache", self.global_cache >= 0, ">= 0"),
            ("beta", 0.0 <= self.beta <= 1.0, "in [0, 1]"),
            ("maxk", self.maxk >= 1, ">= 1"),
            ("fragment_layers", self.fragment_layers >= 0, ">= 0"),
            ("fragment_ff", self.fragment_ff >= 1, ">= 1"),
            ("fragment_heads", self.fragment_heads >= 1 and d % self.fragment_heads == 0,
             f"a divisor of model.embed_dim ({d})"),
            ("heads", self.heads >= 1 and d % self.heads == 0, f"a divisor of model.embed_dim ({d})"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("pool_heads", self.pool_heads >= 1, ">= 1"),
            ("prototypes", self.prototypes >= 2, ">= 2"),
            ("sinkhorn_epsilon", self.sinkhorn_epsilon > 0, "> 0"),
            ("sinkhorn_iterations", self.sinkhorn_iterations >= 1, ">= 1"),
            ("proto_temperature", self.proto_temperature > 0, "> 0"),
            ("gcn_dropout", 0.0 <= self.gcn_dropout < 1.0, "in [0, 1)"),
            ("gcn_slope", self.gcn_slope >= 0, ">= 0"),
            ("tau", 0.0 < self.tau <= 1.0, "in (0, 1]"),
            ("sigma", self.sigma > 0, "> 0"),
            ("topk", self.topk >= 1, ">= 1"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("queue_size", self.queue_size >= 1, ">= 1"),
            ("moco_temperature", self.moco_temperature > 0, "> 0"),
            ("proto_start_steps", self.proto_start_steps >= 0, ">= 0"),
            ("graph_warmup_steps", self.graph_warmup_steps >= 0, ">= 0"),
        ] + [(k, getattr(self, k) >= 0, ">= 0") for k in ("base_weight", "proto_weight", "gnn_weight",
                                                          "reg_weight", "moco_weight", "relevance_weight")])


def build_frozen(cfg: Config) -> FrozenGlobalEncoders:
    a = cfg.aahr
    return FrozenGlobalEncoders(a.global_image, a.global_text, feature_dim=cfg.model.image.feature_dim,
                                sentence_path=a.sentence_path, open_clip_model=a.open_clip_model,
                                open_clip_weights=a.open_clip_weights, cache_limit=a.global_cache)


@register_method("aahr", config=AahrConfig, ignores=("model.pooling", "model.gpo_pe_dim", "model.gpo_hidden"))
class AAHR:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return AAHRModel(cfg, tokenizer, build_frozen(cfg))

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        return AAHRObjective(cfg, model)
