"""Batches that flow from datasets into encoders.

Rows of an `ImageBatch` and a `TextBatch` built for training are aligned (row k of each is one
positive pair); `image_index` carries the image row so that two captions of one image in a batch
are recognised as positives, never as negatives. With `loss.negatives: relevance` the training
collate also sets `TextBatch.non_negatives` from the split's relevance matrix, and `pair_masks`
keeps relevant pairs out of the negatives of every loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ImageBatch:
    image_index: torch.Tensor  # (B,) long: image row in its split
    regions: torch.Tensor | None = None  # (B, R, F) float: precomputed region features
    region_mask: torch.Tensor | None = None  # (B, R) bool: True where a region is real
    pixels: torch.Tensor | None = None  # (B, 3, H, W) float: normalised image tensor
    boxes: torch.Tensor | None = None  # (B, R, 5) float: box code of each region (data.boxes.box_features)

    def to(self, device) -> ImageBatch:
        return _to(self, device)

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


@dataclass
class TextBatch:
    tokens: torch.Tensor  # (B, T) long
    token_mask: torch.Tensor  # (B, T) bool: True where a token is real
    caption_index: torch.Tensor  # (B,) long: caption row in its split
    image_index: torch.Tensor  # (B,) long: row of the caption's image
    # (B_img, B_txt) bool, training only: pairs of this batch's image and caption rows that the data
    # declares relevant (or undetermined), which may therefore never serve as negatives. None = the
    # negatives are every pair of different images (`loss.negatives: ids`).
    non_negatives: torch.Tensor | None = None
    # The raw caption strings, for encoders with their own tokenizer (AAHR's frozen global branch).
    texts: list[str] | None = None

    def to(self, device) -> TextBatch:
        return _to(self, device)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _to(batch, device):
    kwargs = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        kwargs[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return type(batch)(**kwargs)


def positive_mask(image_index_a: torch.Tensor, image_index_b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) bool: True where the two rows show the same image."""
    return image_index_a[:, None] == image_index_b[None, :]


NEGATIVES = ("ids", "relevance")  # loss.negatives


def pair_masks(img_batch: ImageBatch, txt_batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(positives, negatives)`, both (B_img, B_txt) bool, for every loss that picks negatives.

    positives: the rows show the same image (the anchors of ranking losses, DIAS's matched pairs).
    negatives: every other pair, minus those in `txt_batch.non_negatives` (relevant by the data but
    not the caption's own image: neither anchors nor negatives, simply left out).
    """
    positives = positive_mask(img_batch.image_index, txt_batch.image_index)
    negatives = ~positives
    if txt_batch.non_negatives is not None:
        negatives = negatives & ~txt_batch.non_negatives.to(device=negatives.device, dtype=torch.bool)
    return positives, negatives
