"""Checkpoints: weights as safetensors + config.json, training state for `--resume`.

A checkpoint is a folder:
    model.safetensors      the model's weights (no objective, no optimizer: what inference needs)
    config.json            the fully resolved config, the method name and the itmatch version
    tokenizer/             the tokenizer, so a checkpoint is self-contained
    training_state.pt      optional: optimizer, scheduler, objective, position in the run, RNG states;
                           plain tensors and numbers, loaded with weights_only=True
Folders are written under a temporary name and renamed into place, so a killed process never leaves
a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from itmatch.config import Config, config_from_dict
from itmatch.errors import ItmatchError
from itmatch.files import replace_dir
from itmatch.version import __version__

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"
STATE = "training_state.pt"


def save_pretrained(model, tokenizer, cfg: Config, folder: str | Path, training_state: dict | None = None) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"itmatch_version": __version__})
        meta = {"itmatch_version": __version__, "method": cfg.model.method, "config": cfg.to_dict()}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tokenizer.save(tmp / TOKENIZER)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_checkpoint_config(folder: str | Path) -> Config:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise ItmatchError(f"not a checkpoint: {folder} has no {CONFIG}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return config_from_dict(meta["config"], saved=True)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ItmatchError(f"corrupt checkpoint config {path}: {exc}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its best/ checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / "best" / CONFIG).is_file():
        return path / "best"
    if (path / CONFIG).is_file():
        return path
    if path.is_dir():
        raise ItmatchError(f"{path} is neither a run folder with a best/ checkpoint nor a checkpoint folder")
    raise ItmatchError(f"checkpoint not found: {path}")


def from_pretrained(folder: str | Path, device: str | torch.device = "cpu"):
    """Rebuild (model, tokenizer, config) from a checkpoint folder. The model is in eval mode."""
    from itmatch.data.text import load_tokenizer
    from itmatch.methods.registry import build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise ItmatchError(f"checkpoint not found: {folder}")
    cfg = read_checkpoint_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise ItmatchError(f"corrupt checkpoint {folder}: {WEIGHTS} is missing")
    tokenizer = load_tokenizer(folder / TOKENIZER)
    model = build_model(cfg, tokenizer)
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ItmatchError(f"corrupt checkpoint {folder / WEIGHTS}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ItmatchError(
            f"checkpoint {folder} does not match its config: {' '.join(first[:2])[:300]}"
        ) from None
    return model.to(device).eval(), tokenizer, cfg


def load(path: str | Path, device: str | torch.device = "cpu"):
    """`(model, image_transform, tokenizer)` from a run folder or a checkpoint folder, ready for inference.

    In the spirit of open_clip's `create_model_and_transforms`: `image_transform` turns a PIL image
    into the tensor `encode_image` expects (grid models), and is None for models that read
    precomputed region features; `tokenizer.encode_batch(texts, max_length)` gives token ids and
    masks for `encode_text`. The model is in eval mode on `device` ("auto" picks CUDA if present).
    """
    from itmatch.data.datasets import eval_image_transform
    from itmatch.device import resolve_device

    model, tokenizer, cfg = from_pretrained(resolve_checkpoint(path), resolve_device(device))
    return model, eval_image_transform(cfg.model), tokenizer


def load_training_state(folder: str | Path) -> dict:
    path = Path(folder) / STATE
    if not path.is_file():
        raise ItmatchError(f"cannot resume from {folder}: it has no {STATE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise ItmatchError(f"corrupt training state {path}: {str(exc).splitlines()[0][:200]}") from None
