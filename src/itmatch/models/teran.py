"""TERAN (Messina et al., TOMM 2021): fragments kept, contextualised, and matched region by word.

Regions (with their box code where `model.image.boxes` asks for it) and words are projected to the
common width d by the shared backbone's encoders, then each side passes through its own Transformer
encoder (`teran.layers`, `teran.heads`, `teran.ff`). The encodings are the L2-normalised fragments
themselves (`kind = "score"`), and a pair is scored by `similarity.fragment.fragment_scores`: MrSw by
default (each word's best region cosine, summed over words; `teran.region_reduce`, `teran.word_reduce`
give TERAN's other aggregations). Evaluation scores blocks of `score_block` images x captions in one GEMM.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.fragments import FragmentSelfAttention
from itmatch.models.backbone import VSEModel
from itmatch.models.contract import Fragments
from itmatch.similarity.fragment import (
    CaptionWords,
    candidate_fragment_scores,
    fragment_scores,
    pair_fragment_scores,
    unit_fragments,
)


def fragment_outputs(img: Fragments, txt: Fragments) -> dict:
    """Training outputs of a fragment model: the encodings, and their tensors as flat rows, which
    multi-process training gathers into the global batch (it gathers tensors, not Fragments)."""
    return {"img": img, "txt": txt, "img_frag": img.features, "img_mask": img.mask,
            "txt_frag": txt.features, "txt_mask": txt.mask}


class TeranModel(nn.Module):
    kind = "score"

    def __init__(self, cfg, tokenizer, section=None):
        super().__init__()
        t = section if section is not None else cfg.teran
        self.cfg = cfg.model
        # The shared encoders without poolers: fragments out, projected to model.embed_dim.
        self.backbone = VSEModel(cfg.model, tokenizer, image_pool=nn.Identity(), text_pool=nn.Identity())
        dim = cfg.model.embed_dim
        self.image_te = FragmentSelfAttention(dim, t.heads, t.ff, t.dropout, t.layers)
        self.text_te = FragmentSelfAttention(dim, t.heads, t.ff, t.dropout, t.layers)
        self.region_reduce, self.word_reduce = t.region_reduce, t.word_reduce
        self.score_block = (int(t.score_rows), int(t.score_cols))

    # fragments ----------------------------------------------------------------------------------
    def image_fragments(self, batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        frag, mask = self.backbone.image_fragments(batch)
        return self.image_te(frag, mask), mask

    def text_fragments(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        frag, mask = self.backbone.text_fragments(batch)
        return self.text_te(frag, mask), mask

    def encode_image(self, batch: ImageBatch) -> Fragments:
        frag, mask = self.image_fragments(batch)
        return Fragments(unit_fragments(frag, mask), mask)

    def encode_text(self, batch: TextBatch) -> Fragments:
        frag, mask = self.text_fragments(batch)
        return Fragments(unit_fragments(frag, mask), mask)

    # scoring ------------------------------------------------------------------------------------
    def similarity(self, img: Fragments, txt: Fragments) -> torch.Tensor:
        """(len(img), len(txt)) MrSw (or the configured aggregation) of unit fragments, one GEMM."""
        return fragment_scores(img.features, img.mask, txt.features, txt.mask, self.region_reduce,
                               self.word_reduce, normalized=True)

    def pair_similarity(self, img: Fragments, txt: Fragments) -> torch.Tensor:
        return pair_fragment_scores(img.features, img.mask, txt.features, txt.mask, self.region_reduce,
                                    self.word_reduce, normalized=True)

    def candidate_scorer(self, txt: Fragments):
        """`score(img, captions)`: one encoded image against the listed captions of `txt`, exact (the
        shortlist's re-ranking stage, `evaluation.shortlist`), reading only those captions' real words."""
        words = CaptionWords(txt.features, txt.mask)

        def score(img: Fragments, captions: torch.Tensor) -> torch.Tensor:
            return candidate_fragment_scores(img.features[0], img.mask[0], words, captions, self.region_reduce,
                                             self.word_reduce)
        return score

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        return fragment_outputs(self.encode_image(img_batch), self.encode_text(txt_batch))

    # optimisation -------------------------------------------------------------------------------
    def param_groups(self, cfg) -> list[dict]:
        """The backbone's groups (pretrained text at lr * text_lr_scale), the encoders in the default one."""
        groups = self.backbone.param_groups(cfg)
        own = [p for name, p in self.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
        default = next((g for g in groups if g["name"] == "default"), None)
        if default is None:
            groups.insert(0, {"params": own, "lr": cfg.lr, "name": "default"})
        else:
            default["params"] = default["params"] + own
        return groups
