"""Region boxes as the model sees them: the 5-d geometry code of BUTD / TERAN.

A box (x1, y1, x2, y2) in pixels of a W x H image becomes

    (x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) (y2 - y1) / (W H))

i.e. its corners relative to the image and the share of the image it covers, all in [0, 1] for a
box inside the image. The region encoder appends it to each region feature or adds a learned
projection of it (`model.image.boxes`, see docs/methods/vse.md). An all-zero box (an empty,
padded region slot of the scenes benchmark) encodes as five zeros; the dataset masks such slots.
"""

from __future__ import annotations

import numpy as np

from itmatch.errors import ItmatchError

BOX_DIM = 5
BOX_MODES = ("none", "concat", "add")


def box_features(boxes, image_w, image_h) -> np.ndarray:
    """(N, R, 4) x1, y1, x2, y2 pixel boxes -> (N, R, 5) float32 geometry codes.

    `image_w` / `image_h` are one number for every image or one per image (shape (N,)). Boxes that
    are already relative to the image are encoded with `image_w = image_h = 1`.
    """
    b = np.asarray(boxes)
    if b.ndim != 3 or b.shape[-1] != 4:
        raise ItmatchError(f"boxes must be N x R x 4 (x1, y1, x2, y2), got shape {b.shape}")
    if b.dtype.kind not in "iuf":
        raise ItmatchError(f"boxes must be numbers, got dtype {b.dtype}")
    b = b.astype(np.float64)
    if not np.isfinite(b).all():
        raise ItmatchError("boxes hold NaN or infinite values")
    if (b[..., 2] < b[..., 0]).any() or (b[..., 3] < b[..., 1]).any():
        raise ItmatchError("boxes must have x2 >= x1 and y2 >= y1")
    sizes = {}
    for name, v in (("image_w", image_w), ("image_h", image_h)):
        a = np.asarray(v, dtype=np.float64) if not isinstance(v, bool) else np.asarray(-1.0)
        if a.ndim > 1 or (a.ndim == 1 and len(a) != len(b)) or not (np.isfinite(a) & (a > 0)).all():
            raise ItmatchError(f"{name} must be a positive number or one per image, got {v!r}")
        sizes[name] = a.reshape(-1, 1)
    w, h = sizes["image_w"], sizes["image_h"]
    x1, y1, x2, y2 = (b[..., k] for k in range(4))
    area = (x2 - x1) * (y2 - y1) / (w * h)
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, area], axis=-1).astype(np.float32)
