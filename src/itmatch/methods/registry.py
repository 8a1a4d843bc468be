"""Methods and regularizers by name, each with the config section it owns.

    @register_method("hrem", config=HremConfig, ignores=("model.pooling",))
    class HREM:
        @staticmethod
        def build_model(cfg: Config, tokenizer) -> nn.Module: ...   # encode_image, encode_text, similarity, kind
        @staticmethod
        def build_objective(cfg: Config, model) -> nn.Module: ...   # dict of named loss terms with "loss"
        @staticmethod
        def check_config(cfg: Config) -> None: ...                  # optional: checks across sections

Any object with the two build callables may be registered (a class, an instance, a module-like
namespace). `config=` makes `hrem:` a config section read into that dataclass (`cfg.hrem`); it exists
only in configs whose `model.method` is `hrem`. `ignores=` lists the dotted keys the method does not
read: a config that sets one explicitly is refused.

`register_regularizer("dias", build=..., config=DiasConfig)` adds a regularizer that any method's
objective can carry through `loss.regularizers: [dias]`, with its own section `dias:`.

Every module of the `itmatch.methods` package is imported before a method is looked up, so a new
method is one new module there; an import error inside one is raised.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from itmatch.errors import ItmatchError
from itmatch.sections import register_section


@dataclass(frozen=True)
class MethodSpec:
    name: str
    builder: object
    config: type | None = None  # dataclass of the method's section, named after the method
    ignores: tuple[str, ...] = ()  # dotted config keys the method does not read


@dataclass(frozen=True)
class RegularizerSpec:
    name: str
    build: Callable  # (cfg: Config) -> nn.Module with forward(out, positives) -> dict with "loss"
    config: type | None = None


_METHODS: dict[str, MethodSpec] = {}
_REGULARIZERS: dict[str, RegularizerSpec] = {}
_discovered = False


def _same(a, b) -> bool:
    key = lambda x: (getattr(x, "__module__", None), getattr(x, "__qualname__", None))  # noqa: E731
    return a is b or key(a) == key(b) != (None, None)


def register_method(name: str, config: type | None = None, ignores: tuple[str, ...] = ()):
    """Class/object decorator: make `name` buildable by `build_model` / `build_objective`, with the
    config section `name:` read into the dataclass `config` (if given)."""

    def wrap(builder):
        for attr in ("build_model", "build_objective"):
            if not callable(getattr(builder, attr, None)):
                raise TypeError(f"method {name!r}: the registered builder has no callable {attr}")
        known = _METHODS.get(name)
        if known is not None and not _same(known.builder, builder):
            raise ValueError(f"method {name!r} is registered twice ({known.builder!r} and {builder!r})")
        if config is not None:
            register_section(name, config)
        _METHODS[name] = MethodSpec(name, builder, config, tuple(ignores))
        return builder

    return wrap


def unregister_method(name: str) -> None:
    """Remove a method (tests that register throw-away methods clean up with this)."""
    _METHODS.pop(name, None)


def register_regularizer(name: str, build: Callable, config: type | None = None) -> None:
    """Make `name` usable in `loss.regularizers`; `build(cfg)` returns the regularizer module."""
    known = _REGULARIZERS.get(name)
    if known is not None and not _same(known.build, build):
        raise ValueError(f"regularizer {name!r} is registered twice")
    if config is not None:
        register_section(name, config)
    _REGULARIZERS[name] = RegularizerSpec(name, build, config)


def discover_methods() -> None:
    """Import every module of the `itmatch.methods` package (once); their import errors are raised."""
    global _discovered
    if _discovered:
        return
    import itmatch.methods as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def available_methods() -> list[str]:
    discover_methods()
    return sorted(_METHODS)


def available_regularizers() -> list[str]:
    discover_methods()
    return sorted(_REGULARIZERS)


def get_method_spec(name: str) -> MethodSpec:
    discover_methods()
    if name not in _METHODS:
        raise ItmatchError(f"config key 'model.method': unknown method {name!r} "
                           f"(available: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def get_method(name: str):
    return get_method_spec(name).builder


def get_regularizer_spec(name: str) -> RegularizerSpec:
    discover_methods()
    if name not in _REGULARIZERS:
        raise ItmatchError(f"config key 'loss.regularizers': unknown regularizer {name!r} "
                           f"(available: {', '.join(sorted(_REGULARIZERS))})")
    return _REGULARIZERS[name]


def build_regularizer(name: str, cfg) -> nn.Module:
    """A module with `forward(out, positives) -> dict of named terms`, its weighted total under "loss"."""
    return get_regularizer_spec(name).build(cfg)


def build_model(cfg, tokenizer) -> nn.Module:
    """The model of `cfg.model.method`, built from the typed config and the tokenizer."""
    return get_method(cfg.model.method).build_model(cfg, tokenizer)


def build_objective(cfg, model: nn.Module) -> nn.Module:
    """The training objective of `cfg.model.method` for `model`, wrapped with `cfg.loss.regularizers`.

    The objective sees the model so that it scores batches with the model's own `similarity` and can
    build what depends on it (momentum copies, prototypes of its width)."""
    objective = get_method(cfg.model.method).build_objective(cfg, model)
    names = list(cfg.loss.regularizers)  # known and each once: checked when the config is loaded
    if not names:
        return objective
    from itmatch.objectives.regularizers import RegularizedObjective

    return RegularizedObjective(objective, {name: build_regularizer(name, cfg) for name in names})
