"""Region boxes as the model sees them: the 5-d geometry code of BUTD / TERAN.

A box (x1, y1, x2, y2) in pixels of a W x H image becomes

    (x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) (y2 - y1) / (W H))

i.e. its corners relative to the image and the share of the image it covers, all in [0, 1] for a
box inside the image. The region encoder appends it to each region feature or adds a learned
projection of it (`model.image.boxes`, see docs/methods/vse.md).
"""

from __future__ import annotations

import numpy as np

BOX_DIM = 5
BOX_MODES = ("none", "concat", "add")


def box_features(boxes, image_w, image_h) -> np.ndarray:
    """(N, R, 4) x1, y1, x2, y2 pixel boxes -> (N, R, 5) float32 geometry codes.

    `image_w` / `image_h` are one number for every image or one per image (shape (N,)). Boxes that
    are already relative to the image are encoded with `image_w = image_h = 1`.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 3 or b.shape[-1] != 4:
        raise ValueError(f"boxes must be N x R x 4, got shape {b.shape}")
    w = np.asarray(image_w, dtype=np.float64).reshape(-1, 1)
    h = np.asarray(image_h, dtype=np.float64).reshape(-1, 1)
    if (w <= 0).any() or (h <= 0).any():
        raise ValueError("image sizes must be > 0")
    x1, y1, x2, y2 = (b[..., k] for k in range(4))
    area = (x2 - x1) * (y2 - y1) / (w * h)
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, area], axis=-1).astype(np.float32)
