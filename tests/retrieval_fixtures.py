"""Small models for the retrieval tests: a random VSE model and the toy set/score models, saved as
checkpoints of the tiny scenes data (random weights rank deterministically, which is all search needs)."""

from __future__ import annotations

from pathlib import Path

import torch

from itmatch.checkpoint import save_pretrained
from itmatch.config import config_from_dict
from itmatch.data.precomp import load_split
from itmatch.data.text import WordVocab
from itmatch.methods.registry import available_methods, build_model, register_method
from toy_methods import TOY_METHODS


def register_toys() -> None:
    for name, builder in TOY_METHODS.items():
        if name not in available_methods():
            register_method(name)(builder)


def save_random_model(scenes: Path, out: Path, method: str = "vse", seed: int = 0, image_kind: str = "precomp") -> Path:
    register_toys()
    split = load_split(scenes, "train")
    vocab = WordVocab.build(split.captions)
    cfg = config_from_dict({"model": {"method": method, "embed_dim": 16,
                                      "image": {"feature_dim": int(split.features.shape[-1]), "kind": image_kind},
                                      "text": {"word_dim": 8}}})
    torch.manual_seed(seed)
    return save_pretrained(build_model(cfg, vocab), vocab, cfg, out)
