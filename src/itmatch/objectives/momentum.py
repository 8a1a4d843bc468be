"""Momentum contrast (MoCo) for image-text matching, as AAHR adds it.

Key encoders are a copy of the model's trainable parts (frozen encoders are shared, never copied),
updated after every optimizer step by theta_k <- m theta_k + (1 - m) theta_q. Their encodings of each
batch enter two FIFO queues (images, captions) that hold `size` entries with the image id of each.
Once the queues are full, each online query (image or caption) is classified against its own pair's
momentum key of the other modality (the positive) and that modality's queue (the negatives), at
temperature tau. Queue entries of the query's own image are masked out of the negatives (the public
code tracks those ids but never uses them).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.encoders.frozen import shared_memo
from itmatch.objectives.base import StepContext, TrainingHooks


class FeatureQueue(nn.Module):
    """A FIFO ring of (size, D) unit vectors and their image ids, in buffers (saved for --resume)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))  # entries ever pushed

    @property
    def full(self) -> bool:
        return int(self.pushed) >= len(self.feats)

    @torch.no_grad()
    def push(self, feats: torch.Tensor, ids: torch.Tensor) -> None:
        size = len(self.feats)
        feats, ids = feats[-size:], ids[-size:]
        rows = (int(self.ptr) + torch.arange(len(feats), device=self.feats.device)) % size
        self.feats[rows] = feats.to(self.feats.dtype)
        self.ids[rows] = ids.to(self.ids.device)
        self.ptr.fill_((int(self.ptr) + len(feats)) % size)
        self.pushed.add_(len(feats))


def queue_infonce(query: torch.Tensor, positive_key: torch.Tensor, queue: FeatureQueue, query_ids: torch.Tensor,
                  temperature: float, mask_same_image: bool = True) -> torch.Tensor:
    """Mean over queries of CE([q.k+, q.Queue] / tau, 0); queue entries of the query's own image are
    left out of its negatives when `mask_same_image`."""
    pos = (query * positive_key).sum(1, keepdim=True)
    neg = query @ queue.feats.T.to(query.dtype)
    if mask_same_image:
        neg = neg.masked_fill(query_ids[:, None] == queue.ids[None, :], float("-inf"))
    logits = torch.cat([pos, neg], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


class MomentumContrast(nn.Module, TrainingHooks):
    def __init__(self, model: nn.Module, dim: int, queue_size: int = 2048, momentum: float = 0.999,
                 temperature: float = 0.07, mask_same_image: bool = True, query: str = "local"):
        super().__init__()
        self.key_model = copy.deepcopy(model, memo=shared_memo(model))
        self.key_model.requires_grad_(False)
        self.image_queue = FeatureQueue(queue_size, dim)
        self.text_queue = FeatureQueue(queue_size, dim)
        self.momentum, self.temperature = momentum, temperature
        self.mask_same_image, self.query = mask_same_image, query
        self._pending = None  # this step's keys, pushed after the optimizer step

    @torch.no_grad()
    def keys(self, out: dict, img_batch, txt_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encodings of the batch (fused); the frozen features of the online pass are reused."""
        k_img = self.key_model.embed_image(img_batch, frozen=out["img_frozen"]).fused
        k_txt = self.key_model.embed_text(txt_batch, frozen=out["txt_frozen"]).fused
        return k_img.detach(), k_txt.detach()

    def forward(self, out: dict, img_batch, txt_batch) -> torch.Tensor | None:
        """The loss once the queues are full (None before); stashes this batch's keys for `after_step`."""
        k_img, k_txt = self.keys(out, img_batch, txt_batch)
        self._pending = (k_img, k_txt, img_batch.image_index.detach(), txt_batch.image_index.detach())
        if not (self.image_queue.full and self.text_queue.full):
            return None
        q_img = F.normalize(out["img_local" if self.query == "local" else "img"], dim=1)
        q_txt = F.normalize(out["txt_local" if self.query == "local" else "txt"], dim=1)
        i2t = queue_infonce(q_img, k_txt, self.text_queue, img_batch.image_index, self.temperature,
                            self.mask_same_image)
        t2i = queue_infonce(q_txt, k_img, self.image_queue, txt_batch.image_index, self.temperature,
                            self.mask_same_image)
        return i2t + t2i

    @torch.no_grad()
    def update_keys(self, model: nn.Module) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over the parameters (frozen encoders hold none)."""
        online = dict(model.named_parameters())
        for name, p in self.key_model.named_parameters():
            p.mul_(self.momentum).add_(online[name].detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self.update_keys(ctx.model)
        if self._pending is not None:
            k_img, k_txt, img_ids, txt_ids = self._pending
            self.image_queue.push(k_img, img_ids)
            self.text_queue.push(k_txt, txt_ids)
            self._pending = None
