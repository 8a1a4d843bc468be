"""Methods by name: each registers a builder of its model and of its training objective.

    @register_method("vse")
    class VSE:
        build_model(cfg, tokenizer) -> nn.Module   (encode_image, encode_text, similarity, kind)
        build_objective(cfg) -> nn.Module          (returns a dict of named loss terms with "loss")

`loss.regularizers` (e.g. [dias]) wraps any method's objective with extra terms.
"""

from __future__ import annotations

import importlib

from torch import nn

from itmatch.errors import ItmatchError

_METHODS: dict[str, type] = {}
# Modules that register methods when imported; listed here so `build_model("hrem")` needs no import.
_METHOD_MODULES = ("itmatch.methods.vse", "itmatch.methods.hrem", "itmatch.methods.dias")


def register_method(name: str):
    def wrap(cls):
        _METHODS[name] = cls
        return cls

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
    return get_method(cfg.model.method).build_model(cfg, tokenizer)


def build_objective(cfg) -> nn.Module:
    objective = get_method(cfg.model.method).build_objective(cfg)
    if cfg.loss.regularizers:
        from itmatch.objectives.regularizers import with_regularizers

        objective = with_regularizers(objective, cfg)
    return objective
