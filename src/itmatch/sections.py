"""Config sections owned by methods and regularizers (`hrem:`, `dias:`).

A leaf module, so that the config loader and the method registry both use it without importing
each other: a method module registers its section here through `register_method(name, config=...)`.
"""

from __future__ import annotations

import dataclasses

CORE_SECTIONS = ("model", "loss", "data", "optim", "train", "sampler")
# Sections registered by methods and regularizers: name -> dataclass (see register_section).
SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    """Make `name:` a config section read into the dataclass `cls` (whose fields have defaults).

    Called by `register_method(name, config=cls)` and `register_regularizer(name, config=cls)`; a method
    and a regularizer may share one section (the `dias` method and the `dias` regularizer do)."""
    if name in CORE_SECTIONS:
        raise ValueError(f"config section {name!r} is a core section")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config section {name!r}: {cls!r} is not a dataclass")
    known = SECTIONS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"config section {name!r} is registered twice ({known!r} and {cls!r})")
    SECTIONS[name] = cls
