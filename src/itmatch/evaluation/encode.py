"""Encode a split with a trained model and score it: the bridge from models to the metric engine.

Each side is encoded once, independently, in batches; the encodings (global vectors, sets or
fragments: see `models/contract.py`) stay on the CPU. Scores are then computed on demand by the
model's own `similarity`, tiled in the blocks the model declares, so evaluation uses the same
function as training and never holds the images x captions matrix unless a caller asks for it.
"""

from __future__ import annotations

import torch

from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.evaluation.scores import ScoreSource, score_model
from itmatch.models.contract import Encoding, cat_encodings, to_storage


@torch.inference_mode()
def encode_images(model, split: RetrievalSplit, model_cfg, batch_size: int = 256, device="cpu") -> Encoding:
    from itmatch.data.datasets import ImageDataset, eval_image_transform, make_loader

    ds = ImageDataset(split, image_transform=eval_image_transform(model_cfg))
    loader = make_loader(ds, batch_size, shuffle=False)
    return cat_encodings([to_storage(model.encode_image(b.to(device))) for b in loader])


@torch.inference_mode()
def encode_captions(model, split: RetrievalSplit, tokenizer, model_cfg, batch_size: int = 256,
                    device="cpu") -> Encoding:
    from itmatch.data.datasets import CaptionDataset, make_loader

    ds = CaptionDataset(split, tokenizer, max_length=model_cfg.text.max_length)
    loader = make_loader(ds, batch_size, shuffle=False)
    return cat_encodings([to_storage(model.encode_text(b.to(device))) for b in loader])


def split_scores(model, split: RetrievalSplit, tokenizer, model_cfg=None, batch_size: int = 256,
                 device="cpu", shortlist: int | None = None) -> ScoreSource:
    """The images x captions scores of a whole split, as a source the metric engine reads in blocks.

    Scores are computed lazily, while the metrics read them, so the model is put in eval mode and
    must stay so until the caller is done with the source (the trainer switches back after
    validation). `model_cfg` (image size of grid models, caption length) defaults to `model.cfg`.
    `shortlist=k`: exact scores only for each query's top-k first-stage candidates
    (`evaluation.shortlist.ShortlistScores`), the re-ranking path of `score` models."""
    model_cfg = model_cfg if model_cfg is not None else model.cfg
    model.eval()
    img = encode_images(model, split, model_cfg, batch_size, device)
    txt = encode_captions(model, split, tokenizer, model_cfg, batch_size, device)
    if shortlist is not None:
        from itmatch.evaluation.shortlist import ShortlistScores

        if shortlist < 1:
            raise ItmatchError(f"--shortlist must be >= 1, got {shortlist}")
        return ShortlistScores.for_model(model, img, txt, shortlist)
    return score_model(model, img, txt, device=device)
