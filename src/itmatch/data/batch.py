"""Batches that flow from datasets into encoders.

Rows of an `ImageBatch` and a `TextBatch` built for training are aligned (row k of each is one
positive pair); `image_index` carries the image row so that two captions of one image in a batch
are recognised as positives, never as negatives.
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
