"""`maxmatch`: Maximal Matching Matters (Alomari et al., ACL 2025) on the shared backbone.

Each image and each caption becomes a set of K unit embeddings (`encoders/sets.py`: K slots refined
by L cross-attention blocks over the backbone's fragments, offset from the GPO-pooled global vector),
and two sets are compared by a set similarity of `similarity/sets.py` (the maximal pair assignment by
default). The objective (`objectives/sets.py`) adds the Global Discriminative and Intra-Set Divergence
losses and DivE's/PVSE's extras. The same method with `maxmatch.similarity: chamfer` and DivE's
weights is the DivE baseline (`dive_*` configs). See docs/methods/maxmatch.md for every reading.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.config import Config, check_values
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.sets import SetPrediction
from itmatch.methods.registry import register_method
from itmatch.models.backbone import VSEModel
from itmatch.similarity.dense import l2_normalize
from itmatch.similarity.sets import SetSimilarity

Similarity = Literal["maxpair", "sinkhorn", "chamfer", "max", "mean"]
Form = Literal["exp", "hinge"]


@dataclass
class MaxMatchConfig:
    """The `maxmatch:` config section. Defaults: DivE's module (K=4, 4 shared blocks) and the weights
    chosen from measured gradient shares (docs/methods/maxmatch.md)."""

    k: int = 4  # elements per set (both modalities)
    depth: int = 4  # L aggregation blocks
    heads: int = 4
    share_blocks: bool = True  # one block applied `depth` times (DivE)
    dropout: float = 0.1
    attention: Literal["slot", "standard"] = "slot"  # softmax over slots then keys (DivE) | over keys
    set_lr_scale: float = 1.0  # the set predictors train at optim.lr * this (DivE: 0.1)
    # set similarity used in training (and at inference unless `inference: topk`)
    similarity: Similarity = "maxpair"
    scaling: Literal["mean", "exp"] = "mean"  # matched pairs averaged as cosines, or as e^cos - 1
    tau: float = 16.0  # smooth-Chamfer temperature (DivE)
    sinkhorn_iters: int = 10
    sinkhorn_temperature: float = 0.05
    inference: Literal["same", "topk"] = "same"  # topk: the paper's shortcut at evaluation/search
    topk: int = 0  # pairs kept by inference: topk; 0 = k
    # loss weights (0 switches a term off) and the readings of the unverified terms
    gd_weight: float = 1.0  # Global Discriminative (E6)
    gd_form: Form = "exp"
    gd_margin: float = 0.5  # delta_2
    gd_scale: float = 5.0  # alpha of the exponential form
    isd_weight: float = 1.0  # Intra-Set Divergence (E7)
    isd_form: Form = "exp"
    isd_margin: float = 0.5  # delta_3
    isd_scale: float = 5.0
    mmd_weight: float = 0.01  # DivE
    mmd_gamma: float = 0.5
    div_weight: float = 0.0  # PVSE diversity on the slot residuals
    unif_weight: float = 0.0  # DivE's within-set uniformity
    con_weight: float = 0.0  # InfoNCE on the set similarity
    con_temperature: float = 0.05

    def check(self, cfg: Config) -> None:
        dim = cfg.model.embed_dim
        check_values(self, "maxmatch", [
            ("k", self.k >= 1, ">= 1"),
            ("depth", self.depth >= 1, ">= 1"),
            ("heads", self.heads >= 1 and dim % self.heads == 0, f"a divisor of model.embed_dim ({dim})"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("set_lr_scale", self.set_lr_scale > 0, "> 0"),
            ("tau", self.tau > 0, "> 0"),
            ("sinkhorn_iters", self.sinkhorn_iters >= 1, ">= 1"),
            ("sinkhorn_temperature", self.sinkhorn_temperature > 0, "> 0"),
            ("topk", 0 <= self.topk <= self.k * self.k, f"in [0, k*k] ({self.k * self.k})"),
            ("gd_scale", self.gd_scale > 0, "> 0"),
            ("isd_scale", self.isd_scale > 0, "> 0"),
            ("mmd_gamma", self.mmd_gamma > 0, "> 0"),
            ("con_temperature", self.con_temperature > 0, "> 0"),
        ])
        for name in ("gd_weight", "isd_weight", "mmd_weight", "div_weight", "unif_weight", "con_weight"):
            check_values(self, "maxmatch", [(name, getattr(self, name) >= 0, ">= 0")])


SIMILARITY_CHOICES = typing.get_args(Similarity)


def set_similarities(m: MaxMatchConfig) -> tuple[SetSimilarity, SetSimilarity]:
    """(training similarity, inference similarity) of a config."""
    train = SetSimilarity(m.similarity, m.scaling, m.tau, m.sinkhorn_iters, m.sinkhorn_temperature)
    if m.inference == "topk":
        return train, SetSimilarity("topk", m.scaling, topk=m.topk or m.k)
    return train, train


class MaxMatchModel(nn.Module):
    """The backbone's encoders and GPO poolers (global phi) + one set predictor per modality."""

    kind = "set"

    def __init__(self, cfg: Config, tokenizer):
        super().__init__()
        self.cfg = cfg.model
        m = cfg.maxmatch
        self.backbone = VSEModel(cfg.model, tokenizer)
        dim = cfg.model.embed_dim
        self.image_set = SetPrediction(dim, m.k, m.depth, m.heads, m.share_blocks, m.dropout, m.attention)
        self.text_set = SetPrediction(dim, m.k, m.depth, m.heads, m.share_blocks, m.dropout, m.attention)
        self.set_lr_scale = m.set_lr_scale
        self.train_similarity, self.set_similarity = set_similarities(m)
        # tiles of the inference similarity bounded in memory (similarity/sets.TILE_ELEMENTS)
        self.score_block = self.set_similarity.score_block(m.k, m.k)

    def _image(self, batch: ImageBatch) -> dict:
        frag, mask = self.backbone.image_fragments(batch)
        phi = self.backbone.image_pool(frag, mask)
        elements, residuals = self.image_set(frag, mask, phi)
        return {"set": elements, "res": residuals, "global": l2_normalize(phi)}

    def _text(self, batch: TextBatch) -> dict:
        frag, mask = self.backbone.text_fragments(batch)
        phi = self.backbone.text_pool(frag, mask)
        elements, residuals = self.text_set(frag, mask, phi)
        return {"set": elements, "res": residuals, "global": l2_normalize(phi)}

    def encode_image(self, batch: ImageBatch) -> torch.Tensor:
        """(B, K, D) unit elements."""
        return self._image(batch)["set"]

    def encode_text(self, batch: TextBatch) -> torch.Tensor:
        return self._text(batch)["set"]

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(N, M) set scores (the inference similarity; the training one unless inference: topk)."""
        return self.set_similarity(img, txt)

    def pair_similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.set_similarity.pairs(img, txt)

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        i, t = self._image(img_batch), self._text(txt_batch)
        return {"img": i["set"], "txt": t["set"], "img_res": i["res"], "txt_res": t["res"],
                "img_global": i["global"], "txt_global": t["global"]}

    def param_groups(self, cfg) -> list[dict]:
        return _param_groups(self, cfg)


def _param_groups(model: MaxMatchModel, cfg) -> list[dict]:
    """The backbone's groups (pretrained parts at their scaled rates, the default group first), then
    the two set predictors at lr * maxmatch.set_lr_scale (DivE trains them at 0.1 x)."""
    groups = model.backbone.param_groups(cfg)
    seen = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [*groups, {"params": rest, "lr": cfg.lr * model.set_lr_scale, "name": "set_prediction"}]


@register_method("maxmatch", config=MaxMatchConfig)
class MaxMatch:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return MaxMatchModel(cfg, tokenizer)

    @staticmethod
    def build_objective(cfg: Config, model: nn.Module) -> nn.Module:
        from itmatch.objectives.sets import SetObjective

        return SetObjective(cfg, model.train_similarity)
