"""From a `DataConfig` to loaded splits: format dispatch, the scenes cache, dev subsets."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from itmatch.config import SCENES_SIZES, DataConfig
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError


def scenes_cache_dir(size: str = "default", seed: int = 0) -> Path:
    base = Path(os.environ.get("ITMATCH_CACHE", ".cache"))
    return base / f"scenes-{size}-seed{seed}"


def resolve_data_root(cfg: DataConfig, generate: bool = True) -> Path:
    """`root: scenes` (or `scenes:small`, `scenes:tiny`) is the embedded benchmark, generated on first use."""
    root = cfg.root
    if root == "scenes" or root.startswith("scenes:"):
        size = root.split(":", 1)[1] if ":" in root else "default"
        if size not in SCENES_SIZES:
            raise ItmatchError(f"config key 'data.root': unknown scenes size {size!r} (use {', '.join(SCENES_SIZES)})")
        folder = scenes_cache_dir(size)
        if generate and not (folder / "scenes.json").is_file():
            from itmatch.data.scenes import generate_scenes, preset_sizes

            n_train, n_dev, n_test = preset_sizes(size)
            generate_scenes(folder, seed=0, n_train=n_train, n_dev=n_dev, n_test=n_test)
        return folder
    path = Path(root).expanduser()
    if not path.exists():
        raise ItmatchError(f"data folder not found: {path} (config key 'data.root')")
    return path


def load_configured_split(cfg: DataConfig, split: str, root: Path | None = None, features: bool = True,
                          check_finite: bool = False) -> RetrievalSplit:
    """`check_finite` streams the whole feature file once: worth it for dev and test; training
    checks each batch instead, so a 31 GiB train file is not read twice."""
    root = root if root is not None else resolve_data_root(cfg)
    if cfg.format == "precomp":
        from itmatch.data.precomp import load_split

        return load_split(root, split, features=features, check_finite=check_finite)
    if cfg.format == "karpathy":
        from itmatch.data.captions import load_karpathy

        if not cfg.annotations:
            raise ItmatchError("config key 'data.annotations' must name the Karpathy json for format karpathy")
        return load_karpathy(cfg.annotations, cfg.image_root or root, split)
    if cfg.format in ("csv", "jsonl"):
        from itmatch.data.captions import load_table

        table = Path(cfg.annotations) if cfg.annotations else root / f"{split}.{cfg.format}"
        return load_table(table, image_root=cfg.image_root, split=None if not cfg.annotations else split)
    raise ItmatchError(f"config key 'data.format': unknown format {cfg.format!r} (use precomp, karpathy, csv, jsonl)")


def check_split_fits(cfg, split: RetrievalSplit, training: bool = False) -> None:
    """One clear error, before any model is built, when the config asks for data the split lacks:
    features of another width than `model.image.feature_dim`, region boxes for `model.image.boxes` != none,
    a relevance matrix for `loss.negatives: relevance` (training splits only). `cfg` is the whole `Config`."""
    image = cfg.model.image
    if image.kind == "precomp" and split.features is not None and split.features.shape[-1] != image.feature_dim:
        name = Path(split.extra.get("features_file", f"{split.name}_ims.npy")).name
        raise ItmatchError(f"config key 'model.image.feature_dim' is {image.feature_dim} but {name} in {split.root} "
                           f"holds {split.features.shape[-1]}-dimensional region features: "
                           f"set model.image.feature_dim={split.features.shape[-1]}")
    boxes = cfg.model.image.boxes
    if boxes != "none" and cfg.model.image.kind == "precomp" and split.boxes is None:
        raise ItmatchError(f"config key 'model.image.boxes' is {boxes} but split '{split.name}' in {split.root} "
                           f"has no region boxes ({split.name}_boxes.npy); use model.image.boxes: none")
    if training:
        from itmatch.data.datasets import check_negatives

        check_negatives(split, cfg.loss.negatives)


def take_images(split: RetrievalSplit, n_images: int | None) -> RetrievalSplit:
    """The first `n_images` images of a split with their captions (the reference repos' 1K dev subset)."""
    if n_images is None or n_images >= split.n_images:
        return split
    keep_caps = np.flatnonzero(split.caption_to_image < n_images)
    relevance = split.relevance
    if relevance is not None:
        relevance = relevance[keep_caps][:, :n_images]
    twins = split.twins
    if twins is not None:
        twins = twins[(twins < n_images).all(axis=1)]
    return replace(
        split,
        captions=[split.captions[i] for i in keep_caps],
        caption_to_image=split.caption_to_image[keep_caps],
        image_ids=split.image_ids[:n_images],
        caption_ids=None if split.caption_ids is None else [split.caption_ids[i] for i in keep_caps],
        features=None if split.features is None else split.features[:n_images],
        boxes=None if split.boxes is None else split.boxes[:n_images],
        image_sizes=None if split.image_sizes is None else split.image_sizes[:n_images],
        image_paths=None if split.image_paths is None else split.image_paths[:n_images],
        relevance=relevance,
        twins=twins,
    )
