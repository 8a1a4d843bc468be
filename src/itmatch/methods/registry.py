"""Methods by name: each registers a builder of its model and of its training objective.

    @register_method("vse")
    class VSE:
        @staticmethod
        def build_model(cfg: Config, tokenizer) -> nn.Module: ...   # encode_image, encode_text, similarity, kind
        @staticmethod
        def build_objective(cfg: Config, model) -> nn.Module: ...   # dict of named loss terms with "loss"

Any object with those two callables may be registered (a class, an instance, a module-like
namespace). `loss.regularizers` (e.g. [dias]) wraps any method's objective with extra terms.
"""

from __future__ import annotations

import importlib

from torch import nn

from itmatch.errors import ItmatchError

_METHODS: dict[str, object] = {}
# Modules that register methods when imported; listed here so `build_model` needs no import first.
# A module that does not exist yet is skipped; an import error inside an existing one is raised.
_METHOD_MODULES = ("itmatch.methods.vse", "itmatch.methods.hrem", "itmatch.methods.dias")


def register_method(name: str):
    """Class/object decorator: make `name` buildable by `build_model` / `build_objective`."""

    def wrap(builder):
        for attr in ("build_model", "build_objective"):
            if not callable(getattr(builder, attr, None)):
                raise TypeError(f"method {name!r}: the registered builder has no callable {attr}")
        known = _METHODS.get(name)
        if known is not None and getattr(known, "__qualname__", None) != getattr(builder, "__qualname__", None):
            raise ValueError(f"method {name!r} is registered twice ({known!r} and {builder!r})")
        _METHODS[name] = builder
        return builder

    return wrap


def _load_all() -> None:
    for module in _METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str):
    _load_all()
    if name not in _METHODS:
        raise ItmatchError(f"config key 'model.method': unknown method {name!r} "
                           f"(available: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def build_model(cfg, tokenizer) -> nn.Module:
    """The model of `cfg.model.method`, built from the typed config and the tokenizer."""
    return get_method(cfg.model.method).build_model(cfg, tokenizer)


def build_objective(cfg, model: nn.Module) -> nn.Module:
    """The training objective of `cfg.model.method` for `model`, wrapped with `cfg.loss.regularizers`.

    The objective sees the model so that it scores batches with the model's own `similarity` and can
    build what depends on it (momentum copies, prototypes of its width)."""
    from itmatch.data.batch import NEGATIVES

    if cfg.loss.negatives not in NEGATIVES:
        raise ItmatchError(f"config key 'loss.negatives': unknown value {cfg.loss.negatives!r} "
                           f"(use {', '.join(NEGATIVES)})")
    objective = get_method(cfg.model.method).build_objective(cfg, model)
    if cfg.loss.regularizers:
        from itmatch.objectives.regularizers import with_regularizers

        objective = with_regularizers(objective, cfg)
    return objective
