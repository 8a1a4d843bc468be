"""itmatch: image-text matching (cross-modal retrieval) on one shared backbone."""

from itmatch.version import __version__

__all__ = ["__version__", "load"]


def load(path, device="cpu"):
    """`(model, image_transform, tokenizer)` of a trained run or checkpoint folder (see `itmatch.checkpoint.load`)."""
    from itmatch.checkpoint import load as _load

    return _load(path, device)
