"""Region boxes as model inputs: the 5-d normalised encoding of TERAN / BUTD-style region models.

`box_features(boxes, W, H)` turns N x R x 4 pixel boxes (x1, y1, x2, y2) into N x R x 5 float32:

    (x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) (y2 - y1) / (W H))

so every value lies in [0, 1] for boxes inside the image. An all-zero box (an empty, padded region
slot of the scenes benchmark) encodes as five zeros.
"""

from __future__ import annotations

import numpy as np

from itmatch.errors import ItmatchError


def box_features(boxes, image_w: float, image_h: float) -> np.ndarray:
    """N x R x 4 pixel boxes -> N x R x 5 float32 (x1/W, y1/H, x2/W, y2/H, area fraction)."""
    b = np.asarray(boxes)
    if b.ndim != 3 or b.shape[-1] != 4:
        raise ItmatchError(f"boxes must be N x R x 4 (x1, y1, x2, y2), got shape {b.shape}")
    if b.dtype.kind not in "iuf":
        raise ItmatchError(f"boxes must be numbers, got dtype {b.dtype}")
    for name, v in (("image_w", image_w), ("image_h", image_h)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
            raise ItmatchError(f"{name} must be a positive number, got {v!r}")
    b = b.astype(np.float64)
    if not np.isfinite(b).all():
        raise ItmatchError("boxes hold NaN or infinite values")
    if (b[..., 2] < b[..., 0]).any() or (b[..., 3] < b[..., 1]).any():
        raise ItmatchError("boxes must have x2 >= x1 and y2 >= y1")
    w, h = float(image_w), float(image_h)
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) / (w * h)
    out = np.stack([b[..., 0] / w, b[..., 1] / h, b[..., 2] / w, b[..., 3] / h, area], axis=-1)
    return out.astype(np.float32)
