"""itmatch: image-text matching (cross-modal retrieval) on one shared backbone."""

__version__ = "0.1.0"
