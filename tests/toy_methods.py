"""Two toy methods that keep the model contract with the other two kinds of similarity.

They exercise the engine's paths for `set` and `score` models before the real methods (Maximal
Matching, HOSA) arrive. Both reuse the shared backbone's encoders; only how an item becomes an
encoding and how two encodings are scored differ. Small `score_block`s force tiling on both axes.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.models.backbone import VSEModel
from itmatch.models.contract import Fragments
from itmatch.objectives.vse import VSEObjective
from itmatch.similarity.dense import l2_normalize
from itmatch.similarity.fragment import max_region_similarity


class ToySetModel(nn.Module):
    """K attention slots per item; similarity = mean over image elements of the best caption element."""

    kind = "set"
    score_block = (7, 11)

    def __init__(self, cfg, tokenizer, k: int = 3):
        super().__init__()
        self.backbone = VSEModel(cfg.model, tokenizer)
        self.slots = nn.Parameter(torch.randn(k, cfg.model.embed_dim) / cfg.model.embed_dim ** 0.5)

    def _set(self, frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        att = torch.einsum("kd,nld->nkl", self.slots, frag).masked_fill(~mask[:, None, :], float("-inf"))
        return l2_normalize(torch.einsum("nkl,nld->nkd", att.softmax(-1), frag))

    def encode_image(self, batch):
        return self._set(*self.backbone.image_fragments(batch))

    def encode_text(self, batch):
        return self._set(*self.backbone.text_fragments(batch))

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nkd,mld->nmkl", img, txt).amax(-1).mean(-1)

    def forward(self, img_batch, txt_batch) -> dict:
        return {"img": self.encode_image(img_batch), "txt": self.encode_text(txt_batch)}


class ToyScoreModel(nn.Module):
    """Fragments kept as the encoding; pairs scored jointly by each word's best region (MrSw, mean)."""

    kind = "score"
    score_block = (5, 13)

    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.backbone = VSEModel(cfg.model, tokenizer)

    def encode_image(self, batch) -> Fragments:
        return Fragments(*self.backbone.image_fragments(batch))

    def encode_text(self, batch) -> Fragments:
        return Fragments(*self.backbone.text_fragments(batch))

    def similarity(self, img: Fragments, txt: Fragments) -> torch.Tensor:
        return max_region_similarity(img.features, img.mask, txt.features, txt.mask, word_reduce="mean")

    def forward(self, img_batch, txt_batch) -> dict:
        return {"img": self.encode_image(img_batch), "txt": self.encode_text(txt_batch)}


def toy_method(model_cls):
    """A registrable builder: the toy model, trained with VSE's objective on its own similarity."""

    class Builder:
        @staticmethod
        def build_model(cfg, tokenizer):
            return model_cls(cfg, tokenizer)

        @staticmethod
        def build_objective(cfg, model):
            return VSEObjective(cfg.loss, model.similarity)

    Builder.__qualname__ = f"toy_method({model_cls.__name__})"
    return Builder


TOY_METHODS = {"toy_set": toy_method(ToySetModel), "toy_score": toy_method(ToyScoreModel)}
