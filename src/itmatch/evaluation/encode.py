"""Encode a split with a trained model and score it: the bridge from models to the metric engine.

Embedding methods (kind "global" or "set") encode each side once, independently; the similarity
matrix is then built in blocks by the model's own `similarity`, so evaluation and search always use
the same function as training.
"""

from __future__ import annotations

import numpy as np
import torch

from itmatch.data.split import RetrievalSplit


def _image_transform(model_cfg):
    if model_cfg.image.kind != "grid":
        return None
    from itmatch.data.datasets import image_transform

    return image_transform(model_cfg.image.image_size, train=False)


@torch.inference_mode()
def encode_images(model, split: RetrievalSplit, model_cfg, batch_size: int = 256, device="cpu") -> torch.Tensor:
    from itmatch.data.datasets import ImageDataset, make_loader

    ds = ImageDataset(split, image_transform=_image_transform(model_cfg))
    out = [model.encode_image(b.to(device)).float().cpu() for b in make_loader(ds, batch_size, shuffle=False)]
    return torch.cat(out)


@torch.inference_mode()
def encode_captions(model, split: RetrievalSplit, tokenizer, model_cfg, batch_size: int = 256,
                    device="cpu") -> torch.Tensor:
    from itmatch.data.datasets import CaptionDataset, make_loader

    ds = CaptionDataset(split, tokenizer, max_length=model_cfg.text.max_length)
    out = [model.encode_text(b.to(device)).float().cpu() for b in make_loader(ds, batch_size, shuffle=False)]
    return torch.cat(out)


@torch.inference_mode()
def similarity_matrix(model, img: torch.Tensor, txt: torch.Tensor, block: int = 4096, device="cpu") -> np.ndarray:
    sims = np.empty((img.shape[0], txt.shape[0]), dtype=np.float32)
    txt_d = txt.to(device)
    for start in range(0, img.shape[0], block):
        sims[start : start + block] = (model.similarity(img[start : start + block].to(device), txt_d)
                                       .float().cpu().numpy())
    return sims


def score_split(model, split: RetrievalSplit, tokenizer, model_cfg, batch_size: int = 256, device="cpu") -> np.ndarray:
    """The images x captions similarity matrix of a whole split."""
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, split, model_cfg, batch_size, device)
        txt = encode_captions(model, split, tokenizer, model_cfg, batch_size, device)
        return similarity_matrix(model, img, txt, device=device)
    finally:
        model.train(was_training)
