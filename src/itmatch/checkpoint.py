"""Checkpoints: weights as safetensors + config.json, training state for `--resume`.

A checkpoint is a folder:
    model.safetensors      the model's weights (no objective, no optimizer: what inference needs)
    config.json            the fully resolved config, the method name, the itmatch version and the
                           manifest: size and sha256 of model.safetensors and training_state.pt,
                           checked on every load so a damaged checkpoint is named, never half-loaded
    tokenizer/             the tokenizer, so a checkpoint is self-contained
    training_state.pt      optional: optimizer, scheduler, objective, position in the run, RNG states;
                           plain tensors and numbers, loaded with weights_only=True
Folders are written under a temporary name and renamed into place, so a killed process never leaves
a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from itmatch.config import Config, config_from_dict
from itmatch.errors import ItmatchError
from itmatch.files import follow_umask, replace_dir
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
        tokenizer.save(tmp / TOKENIZER)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        meta["files"] = {name: _fingerprint(tmp / name) for name in (WEIGHTS, STATE) if (tmp / name).is_file()}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        follow_umask(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete what a checkpoint writer killed mid-save left behind (`.NAME.tmp-*` folders, `.NAME.old`
    swaps) in a run folder and its `checkpoints/`. Only call it while holding the run's lock: then no
    other process can be writing them. Returns what was removed."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(".") and (".tmp-" in entry.name or entry.name.endswith(".old")):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(folder: str | Path, training_state: bool = False) -> None:
    """Raise `ItmatchError` naming what is wrong when a checkpoint's files are missing or differ from its
    manifest. Checkpoints written before the manifest existed are only checked for presence."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise ItmatchError(f"not a checkpoint: {folder} has no {CONFIG}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ItmatchError(f"corrupt checkpoint config {path}: {exc}") from None
    for name in (WEIGHTS, STATE) if training_state else (WEIGHTS,):
        file = folder / name
        if not file.is_file():
            raise ItmatchError(f"corrupt checkpoint {folder}: {name} is missing")
        want = manifest.get(name)
        if want is None:
            continue
        if file.stat().st_size != want["bytes"]:
            raise ItmatchError(f"corrupt checkpoint {folder}: {name} has {file.stat().st_size} bytes, "
                               f"its manifest says {want['bytes']}")
        if _fingerprint(file)["sha256"] != want["sha256"]:
            raise ItmatchError(f"corrupt checkpoint {folder}: {name} does not match the checksum in {CONFIG}")


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
    verify_checkpoint(folder)
    tokenizer = load_tokenizer(folder / TOKENIZER)
    model = build_model(cfg, tokenizer)
    load_weights(model, folder)
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
        raise ItmatchError(f"corrupt training state {path}: {str(exc).strip()}") from None


def load_weights(model, folder: str | Path) -> None:
    """Load `folder`'s model.safetensors into `model` (strict), every failure as one `ItmatchError`."""
    folder = Path(folder)
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ItmatchError(f"corrupt checkpoint {folder / WEIGHTS}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ItmatchError(f"checkpoint {folder} does not match its config: {' '.join(first[:2])}") from None
