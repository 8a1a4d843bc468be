"""The shared backbone: region/grid and GRU/BERT encoders with one pooler per side.

`VSEModel` is VSE-infinity's model (Chen et al., CVPR 2021) and the base every other method
composes: HREM passes its own poolers, DIAS and later methods read the fragments `forward` returns.
It holds only what inference needs; losses live in `objectives/`.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.config import ModelConfig, OptimConfig
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.image import GridEncoder, RegionEncoder
from itmatch.encoders.pooling import build_pooling
from itmatch.encoders.text import BertTextEncoder, GRUTextEncoder, load_glove_embeddings
from itmatch.errors import ItmatchError
from itmatch.similarity.dense import dot_similarity, l2_normalize, pair_dot


def build_image_encoder(cfg: ModelConfig, load_pretrained: bool = True) -> nn.Module:
    if cfg.image.kind == "precomp":
        return RegionEncoder(cfg.image.feature_dim, cfg.embed_dim, cfg.image.mlp, boxes=cfg.image.boxes)
    if cfg.image.kind == "grid":
        return GridEncoder(cfg.embed_dim, cfg.image.backbone_weights, cfg.image.freeze_backbone,
                           load_weights=load_pretrained, mlp=cfg.image.mlp, cell_drop=cfg.image.region_drop)
    raise ItmatchError(f"config key 'model.image.kind': unknown {cfg.image.kind!r} (use precomp, grid)")


def build_text_encoder(cfg: ModelConfig, tokenizer) -> nn.Module:
    if cfg.text.kind == "gru":
        if tokenizer.kind != "word":
            raise ItmatchError("config key 'model.text.kind': gru needs a word vocabulary, "
                               f"got a {tokenizer.kind} tokenizer")
        if not cfg.text.glove:
            return GRUTextEncoder(tokenizer.vocab_size, cfg.text.word_dim, cfg.embed_dim, cfg.text.num_layers,
                                  tokenizer.pad_id)
        # GloVe fixes the word size (model.text.word_dim is then ignored).
        matrix, hits = load_glove_embeddings(list(tokenizer.words), cfg.text.glove)
        enc = GRUTextEncoder(tokenizer.vocab_size, matrix.shape[1], cfg.embed_dim, cfg.text.num_layers,
                             tokenizer.pad_id)
        enc.load_word_vectors(matrix)
        enc.glove_hits = hits
        return enc
    if cfg.text.kind == "bert":
        if tokenizer.kind != "wordpiece":
            raise ItmatchError("config key 'model.text.kind': bert needs its own word-piece tokenizer, "
                               f"got a {tokenizer.kind} tokenizer")
        from itmatch.data.text import default_bert_path

        # The tokenizer records the model folder it came from; the encoder must be the same model.
        path = getattr(tokenizer, "source", None) or cfg.text.bert_path or default_bert_path()
        return BertTextEncoder(path, cfg.embed_dim, cfg.text.freeze)
    raise ItmatchError(f"config key 'model.text.kind': unknown {cfg.text.kind!r} (use gru, bert)")


class VSEModel(nn.Module):
    """Image and text encoders with one pooler each; global embeddings compared by cosine.

    `image_pool` / `text_pool`: methods that only change how fragments become one vector (HREM)
    pass their own `forward(x, mask) -> (B, D)` modules; the default is `model.pooling`.
    """

    kind = "global"
    # Scoring a block is one matrix product: rows are bounded by the engine's row blocks already.
    score_block = (4096, 1 << 16)

    def __init__(self, cfg: ModelConfig, tokenizer, image_pool: nn.Module | None = None,
                 text_pool: nn.Module | None = None, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.image_encoder = build_image_encoder(cfg, load_pretrained)
        self.text_encoder = build_text_encoder(cfg, tokenizer)
        self.image_pool = image_pool if image_pool is not None else build_pooling(cfg.pooling, cfg.gpo_pe_dim,
                                                                                 cfg.gpo_hidden)
        self.text_pool = text_pool if text_pool is not None else build_pooling(cfg.pooling, cfg.gpo_pe_dim,
                                                                              cfg.gpo_hidden)

    # fragments ------------------------------------------------------------------------------
    def image_fragments(self, batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) fragments and their (B, L) mask."""
        if self.cfg.image.kind == "grid":
            if batch.pixels is None:
                raise ItmatchError("model.image.kind is grid but the image batch holds no pixels "
                                   "(is the data set in precomp format?)")
            return self.image_encoder(batch.pixels)
        if batch.regions is None:
            raise ItmatchError("model.image.kind is precomp but the image batch holds no region features "
                               "(is the data set made of image files?)")
        mask = batch.region_mask
        if mask is None:
            mask = torch.ones(batch.regions.shape[:2], dtype=torch.bool, device=batch.regions.device)
        return self.image_encoder(batch.regions, mask, batch.boxes), mask

    def text_fragments(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(batch.tokens, batch.token_mask), batch.token_mask

    # global embeddings ------------------------------------------------------------------------
    def pool_image(self, frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.image_pool(frag, mask))

    def pool_text(self, frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.text_pool(frag, mask))

    def encode_image(self, batch: ImageBatch) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings."""
        return self.pool_image(*self.image_fragments(batch))

    def encode_text(self, batch: TextBatch) -> torch.Tensor:
        """(B, D) L2-normalised caption embeddings."""
        return self.pool_text(*self.text_fragments(batch))

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(N, M) cosine similarities of encodings from `encode_image` / `encode_text`.

        Those are unit vectors, so the cosine is their dot product; training, evaluation and search
        all score through this one function."""
        return dot_similarity(img, txt)

    def pair_similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(P,) similarities of aligned pairs img[p], txt[p]: the diagonal of `similarity`, cheaply."""
        return pair_dot(img, txt)

    def forward(self, img_batch: ImageBatch, txt_batch: TextBatch) -> dict:
        """Global embeddings plus the fragments, which objectives of later methods read."""
        img_frag, img_mask = self.image_fragments(img_batch)
        txt_frag, txt_mask = self.text_fragments(txt_batch)
        return {
            "img": self.pool_image(img_frag, img_mask), "txt": self.pool_text(txt_frag, txt_mask),
            "img_frag": img_frag, "img_mask": img_mask, "txt_frag": txt_frag, "txt_mask": txt_mask,
        }

    # optimisation -----------------------------------------------------------------------------
    def pretrained_parameters(self) -> dict[str, set[int]]:
        """ids of the parameters of pretrained parts: the BERT-family encoder, the CNN backbone."""
        text = getattr(self.text_encoder, "bert", None)
        cnn = getattr(self.image_encoder, "backbone", None)
        return {
            "text_pretrained": {id(p) for p in text.parameters()} if text is not None else set(),
            "cnn_pretrained": {id(p) for p in cnn.parameters()} if cnn is not None else set(),
        }

    def param_groups(self, cfg: OptimConfig) -> list[dict]:
        """AdamW groups: pretrained BERT at lr * text_lr_scale, the pretrained CNN at
        lr * backbone_lr_scale, everything else at lr. The default group comes first (the training
        log reports group 0's rate). Weight decay applies to every group, as in VSE-infinity."""
        pretrained = self.pretrained_parameters()
        groups: dict[str, list] = {"default": [], "text_pretrained": [], "cnn_pretrained": []}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            key = next((k for k, ids in pretrained.items() if id(p) in ids), "default")
            groups[key].append(p)
        scale = {"default": 1.0, "text_pretrained": cfg.text_lr_scale, "cnn_pretrained": cfg.backbone_lr_scale}
        return [{"params": ps, "lr": cfg.lr * scale[k], "name": k} for k, ps in groups.items() if ps]
