"""`RetrievalSplit`: one split of a retrieval data set, whatever format it was read from.

Every loader (SCAN precomp, Karpathy json / csv / jsonl with image files, the scenes benchmark)
returns this object; datasets, evaluation protocols and the training loop only ever see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RetrievalSplit:
    name: str
    root: Path
    captions: list[str]
    # caption_to_image[c] is the row (0-based position) of caption c's image. Never assume 5 per image.
    caption_to_image: np.ndarray
    # Original ids as strings, one per image row / caption row (ECCV Caption needs them).
    image_ids: list[str]
    caption_ids: list[str] | None = None
    # Precomputed region features, N_img x R x F, normally a read-only np.memmap. None for image files.
    features: np.ndarray | None = None
    # Region boxes, N_img x R x 4 (x1, y1, x2, y2), row-aligned with `features`, normally a read-only
    # np.memmap: in pixels of the image when `image_sizes` is given, else already relative (in [0, 1]).
    boxes: np.ndarray | None = None
    # N_img x 2 float (width, height) of each image, the unit of pixel `boxes`; None for relative boxes.
    image_sizes: np.ndarray | None = None
    # Image files, one per image row, for datasets of raw images.
    image_paths: list[Path] | None = None
    # Extended positives: sparse captions x images boolean matrix (scipy.sparse.csr_matrix).
    relevance: object | None = None
    # Hard-negative twins: K x 2 int array of image rows (i, j) that differ by swapped attributes.
    twins: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def captions_per_image(self) -> int | None:
        """The common number of captions per image, or None when it varies."""
        counts = np.bincount(self.caption_to_image, minlength=self.n_images)
        return int(counts[0]) if len(counts) and (counts == counts[0]).all() else None
