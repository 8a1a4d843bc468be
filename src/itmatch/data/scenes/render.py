"""Drawing scenes: backgrounds and anti-aliased RGB pictures (shape geometry lives in shapes.py).

Rendering is a pure function of the `Scene` (the background carries its own noise seed), so a scene
graph read back from `{split}_scenes.jsonl` redraws the same picture.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from itmatch.data.scenes.scene import IMAGE_SIZE, Scene
from itmatch.data.scenes.shapes import draw_object

SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing
RGB = {
    "red": (214, 38, 38), "orange": (246, 138, 22), "yellow": (242, 218, 36), "green": (36, 160, 60),
    "blue": (38, 86, 222), "purple": (142, 56, 190), "white": (246, 246, 246), "black": (22, 22, 22),
}


def _hsv(hsv: list[float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(*hsv)) * 255.0


def _soft_step(v: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 ramp of `width` around v = 0: pattern edges come out anti-aliased without supersampling."""
    return np.clip(0.5 + v / width, 0.0, 1.0)


def background(spec: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    """size x size x 3 float32 array in 0..255 for a background spec (see scene._sample_background)."""
    rng = np.random.default_rng(spec["seed"])
    c1, c2 = _hsv(spec["hsv1"]).astype(np.float32), _hsv(spec["hsv2"]).astype(np.float32)
    u = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    x, y = u[None, :], u[:, None]
    a = math.radians(spec["angle"])
    along = x * math.cos(a) + y * math.sin(a)
    period = spec["period"] / IMAGE_SIZE
    pixel = 1.0 / size
    kind = spec["kind"]
    if kind == "gradient":
        t = (along - along.min()) / (along.max() - along.min())
    elif kind == "radial":
        t = np.clip(np.hypot(x - 0.5, y - 0.5) / 0.71, 0, 1)
    elif kind == "noise":
        coarse = rng.random((6, 6), dtype=np.float32)
        t = np.clip(np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)), 0, 1)
    elif kind == "stripes":
        t = _soft_step(np.sin(2 * math.pi * along / period) * period / (2 * math.pi), pixel)
    elif kind == "checker":
        sx, sy = np.sin(math.pi * x / period), np.sin(math.pi * y / period)
        t = _soft_step(sx * sy * period / math.pi, pixel)
    elif kind == "dots":
        fx, fy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        t = _soft_step((0.22 - np.hypot(fx, fy)) * period, pixel)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    t = np.broadcast_to(t, (size, size))[..., None]
    img = c1 * (1 - t) + c2 * t
    # fine grain, like sensor noise, so that no background is perfectly flat
    img += 5.0 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return np.clip(img, 0, 255)


def render(scene: Scene) -> Image.Image:
    """The 128 x 128 RGB picture of a scene (drawn at 2x, then box-filtered down)."""
    # the background is computed at the final size (its edges are already soft) and only blown up
    # for drawing, so the box filter below gives its pixels back unchanged
    big = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.fromarray(background(scene.background).astype(np.uint8), mode="RGB")
    canvas = canvas.resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = tuple(int(min(max(c + t, 0), 255)) for c, t in zip(RGB[obj.colour], obj.tint))
        edge = tuple(int(c * 0.55) for c in fill)
        draw_object(draw, obj, SUPERSAMPLE, fill=fill, line=edge, width=SUPERSAMPLE)
    return canvas.reduce(SUPERSAMPLE)
