"""Choosing the torch device from a config or command-line value."""

from __future__ import annotations

import torch

from itmatch.errors import ItmatchError


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` is CUDA where present, else the CPU; an explicit CUDA device without CUDA is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ItmatchError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ItmatchError(f"unknown device {name!r}") from None
