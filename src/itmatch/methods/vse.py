"""`vse`: VSE-infinity (Chen et al., CVPR 2021), the baseline every other method builds on.

Regions (or CNN grid cells) and words are encoded into fragments, pooled by GPO into one vector per
side, and compared by cosine similarity; training uses the configured ranking loss.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.config import Config, ModelConfig, OptimConfig
from itmatch.data.batch import ImageBatch, TextBatch, positive_mask
from itmatch.encoders.image import GridEncoder, RegionEncoder
from itmatch.encoders.pooling import build_pooling
from itmatch.encoders.text import BertTextEncoder, GRUTextEncoder, glove_dim
from itmatch.errors import ItmatchError
from itmatch.methods.registry import register_method
from itmatch.objectives.base import RankingTerm
from itmatch.similarity.global_sim import cosine_similarity, l2_normalize


def build_image_encoder(cfg: ModelConfig, load_pretrained: bool = True) -> nn.Module:
    if cfg.image.kind == "precomp":
        return RegionEncoder(cfg.image.feature_dim, cfg.embed_dim, cfg.image.mlp)
    if cfg.image.kind == "grid":
        return GridEncoder(cfg.embed_dim, cfg.image.backbone_weights, cfg.image.freeze_backbone, load_pretrained)
    raise ItmatchError(f"config key 'model.image.kind': unknown {cfg.image.kind!r} (use precomp, grid)")


def build_text_encoder(cfg: ModelConfig, tokenizer) -> nn.Module:
    if cfg.text.kind == "gru":
        if tokenizer.kind != "word":
            raise ItmatchError("model.text.kind gru needs a word vocabulary tokenizer")
        word_dim = glove_dim(cfg.text.glove) if cfg.text.glove else cfg.text.word_dim
        enc = GRUTextEncoder(tokenizer.vocab_size, word_dim, cfg.embed_dim, cfg.text.num_layers, tokenizer.pad_id)
        if cfg.text.glove:
            enc.init_from_glove(list(tokenizer.words), cfg.text.glove)
        return enc
    if cfg.text.kind == "bert":
        from itmatch.data.text import default_bert_path

        path = getattr(tokenizer, "source", None) or cfg.text.bert_path or default_bert_path()
        return BertTextEncoder(path, cfg.embed_dim, cfg.text.freeze)
    raise ItmatchError(f"config key 'model.text.kind': unknown {cfg.text.kind!r} (use gru, bert)")


class VSEModel(nn.Module):
    kind = "global"

    def __init__(self, cfg: ModelConfig, tokenizer, image_pool: nn.Module | None = None,
                 text_pool: nn.Module | None = None):
        """Methods that only change how fragments become one vector (HREM) pass their own poolers."""
        super().__init__()
        self.cfg = cfg
        self.image_encoder = build_image_encoder(cfg)
        self.text_encoder = build_text_encoder(cfg, tokenizer)
        self.image_pool = image_pool if image_pool is not None else build_pooling(cfg.pooling, cfg.gpo_pe_dim, cfg.gpo_hidden)
        self.text_pool = text_pool if text_pool is not None else build_pooling(cfg.pooling, cfg.gpo_pe_dim, cfg.gpo_hidden)

    # fragments ------------------------------------------------------------------------------
    def image_fragments(self, batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.image.kind == "grid":
            return self.image_encoder(batch.pixels)
        return self.image_encoder(batch.regions, batch.region_mask), batch.region_mask

    def text_fragments(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(batch.tokens, batch.token_mask), batch.token_mask

    # global embeddings ------------------------------------------------------------------------
    def pool_image(self, frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.image_pool(frag, mask))

    def pool_text(self, frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.text_pool(frag, mask))

    def encode_image(self, batch: ImageBatch) -> torch.Tensor:
        return self.pool_image(*self.image_fragments(batch))

    def encode_text(self, batch: TextBatch) -> torch.Tensor:
        return self.pool_text(*self.text_fragments(batch))

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return cosine_similarity(img, txt)

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        img_frag, img_mask = self.image_fragments(img_batch)
        txt_frag, txt_mask = self.text_fragments(txt_batch)
        return {
            "img": self.pool_image(img_frag, img_mask), "txt": self.pool_text(txt_frag, txt_mask),
            "img_frag": img_frag, "img_mask": img_mask, "txt_frag": txt_frag, "txt_mask": txt_mask,
        }

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        """Pretrained parts (BERT, the CNN backbone) train at a lower learning rate."""
        slow_text = {id(p) for p in getattr(self.text_encoder, "bert", nn.Module()).parameters()}
        slow_cnn = {id(p) for p in getattr(self.image_encoder, "backbone", nn.Module()).parameters()}
        groups = {"text_pretrained": [], "cnn_pretrained": [], "default": []}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            key = "text_pretrained" if id(p) in slow_text else "cnn_pretrained" if id(p) in slow_cnn else "default"
            groups[key].append(p)
        scale = {"text_pretrained": cfg.text_lr_scale, "cnn_pretrained": cfg.backbone_lr_scale, "default": 1.0}
        return [{"params": ps, "lr": cfg.lr * scale[k], "name": k} for k, ps in groups.items() if ps]


class VSEObjective(nn.Module):
    """The ranking loss on global embeddings, with positives from image ids."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ranking = RankingTerm(cfg.loss)

    def forward(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, progress) -> dict:
        positives = positive_mask(img_batch.image_index, txt_batch.image_index)
        base = self.ranking(out["img"] @ out["txt"].T, positives, progress)
        return {"loss": base, self.ranking.name: base.detach()}


@register_method("vse")
class VSE:
    @staticmethod
    def build_model(cfg: Config, tokenizer) -> nn.Module:
        return VSEModel(cfg.model, tokenizer)

    @staticmethod
    def build_objective(cfg: Config) -> nn.Module:
        return VSEObjective(cfg)
