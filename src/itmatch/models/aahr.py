"""AAHR's model: the VSE backbone's fragment encoders, a frozen global branch, and gated fusion.

Per side: fragments (regions / words) -> `GlobalGuidedPool` queried by the projected frozen global
feature -> local l; frozen feature -> `GlobalProjection` -> c; `GatedFusion(l, c)` -> e, the encoding
(kind global, scored by dot product). Prototypes, the relation graph and the momentum encoders are
training-only and live in the objective (`objectives/aahr.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.frozen import FrozenGlobalEncoders
from itmatch.encoders.global_local import GatedFusion, GlobalGuidedPool, GlobalProjection
from itmatch.models.backbone import VSEModel
from itmatch.similarity.dense import l2_normalize


@dataclass
class SideEmbedding:
    fused: torch.Tensor  # (B, D): the encoding
    local: torch.Tensor  # (B, D) l, unit
    glob: torch.Tensor  # (B, D) c, unit
    frozen: torch.Tensor  # (B, F) the frozen global feature (reused by the momentum encoders)
    frag: torch.Tensor  # (B, L, D) fragments before self-attention
    mask: torch.Tensor


class AAHRModel(VSEModel):
    def __init__(self, cfg, tokenizer, frozen: FrozenGlobalEncoders, load_pretrained: bool = True):
        a = cfg.aahr
        d = cfg.model.embed_dim

        def pool() -> GlobalGuidedPool:
            return GlobalGuidedPool(d, a.beta, a.maxk, a.fragment_heads, a.fragment_ff, a.dropout,
                                    a.fragment_layers, a.pool_heads)

        super().__init__(cfg.model, tokenizer, image_pool=pool(), text_pool=pool(), load_pretrained=load_pretrained)
        self.frozen = frozen
        self.normalize_fused = a.normalize_fused
        self.image_global = GlobalProjection(frozen.image_dim, d)
        self.text_global = GlobalProjection(frozen.text_dim, d)
        self.image_gate = GatedFusion(d)
        self.text_gate = GatedFusion(d)

    def _side(self, frag, mask, frozen, pool, project, gate) -> SideEmbedding:
        glob = l2_normalize(project(frozen))
        local = l2_normalize(pool(frag, mask, glob))
        fused = gate(local, glob)
        if self.normalize_fused:
            fused = l2_normalize(fused)
        return SideEmbedding(fused, local, glob, frozen, frag, mask)

    def embed_image(self, batch: ImageBatch, frozen: torch.Tensor | None = None) -> SideEmbedding:
        """Every level of the image side; `frozen` reuses already computed frozen features."""
        frozen = self.frozen.image(batch) if frozen is None else frozen
        frag, mask = self.image_fragments(batch)
        return self._side(frag, mask, frozen.to(frag.dtype), self.image_pool, self.image_global, self.image_gate)

    def embed_text(self, batch: TextBatch, frozen: torch.Tensor | None = None) -> SideEmbedding:
        frozen = self.frozen.text(batch) if frozen is None else frozen
        frag, mask = self.text_fragments(batch)
        return self._side(frag, mask, frozen.to(frag.dtype), self.text_pool, self.text_global, self.text_gate)

    def encode_image(self, batch: ImageBatch) -> torch.Tensor:
        return self.embed_image(batch).fused

    def encode_text(self, batch: TextBatch) -> torch.Tensor:
        return self.embed_text(batch).fused

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        i, t = self.embed_image(img_batch), self.embed_text(txt_batch)
        return {
            "img": i.fused, "txt": t.fused, "img_local": i.local, "txt_local": t.local,
            "img_frozen": i.frozen, "txt_frozen": t.frozen,
            "img_frag": i.frag, "img_mask": i.mask, "txt_frag": t.frag, "txt_mask": t.mask,
        }

