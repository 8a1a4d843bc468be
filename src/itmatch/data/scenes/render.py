"""Drawing scenes: shape outlines, backgrounds, anti-aliased RGB pictures, visibility masks, boxes.

Rendering is a pure function of the `Scene` (the background carries its own noise seed), so a scene
graph read back from `{split}_scenes.jsonl` redraws the same picture.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from itmatch.data.scenes.scene import IMAGE_SIZE, Scene, SceneObject

SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing
RGB = {
    "red": (214, 38, 38), "orange": (246, 138, 22), "yellow": (242, 218, 36), "green": (36, 160, 60),
    "blue": (38, 86, 222), "purple": (142, 56, 190), "white": (246, 246, 246), "black": (22, 22, 22),
}


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _unit_outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of the shape around (0, 0) with radius about 1; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(1.1 * math.cos(math.radians(a)), 1.1 * math.sin(math.radians(a)) + 0.15) for a in (-90, 30, 150)]
    if shape == "diamond":
        return [(0, -1.0), (0.68, 0), (0, 1.0), (-0.68, 0)]
    if shape == "hexagon":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in range(0, 360, 60)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "cross":
        w, L = 0.33, 0.95
        return [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w),
                (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


def outline(obj: SceneObject, scale: float = 1.0) -> list[tuple[float, float]] | None:
    unit = _unit_outline(obj.shape)
    if unit is None:
        return None
    return [((obj.cx + x * obj.r) * scale, (obj.cy + y * obj.r) * scale) for x, y in _rotate(unit, obj.angle)]


def object_box(obj: SceneObject) -> tuple[float, float, float, float]:
    """Tight box x1, y1, x2, y2 (pixels of the 128 x 128 image), clipped to the frame."""
    pts = outline(obj)
    if pts is None:
        x1, y1, x2, y2 = obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    clip = lambda v: float(min(max(v, 0.0), IMAGE_SIZE))  # noqa: E731
    return clip(x1), clip(y1), clip(x2), clip(y2)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float, fill, line=None, width: int = 0) -> None:
    pts = outline(obj, scale)
    if pts is None:
        c, r = (obj.cx * scale, obj.cy * scale), obj.r * scale
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill, outline=line, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=line, width=width)


def visible_fractions(objects: list[SceneObject]) -> np.ndarray:
    """Share of each object's own pixels still visible once the objects after it are drawn on top."""
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(labels)
    own = []
    for k, obj in enumerate(objects):
        alone = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw(ImageDraw.Draw(alone), obj, 1.0, fill=1)
        own.append(max(int(np.count_nonzero(np.asarray(alone))), 1))
        _draw(draw, obj, 1.0, fill=k + 1)
    counts = np.bincount(np.asarray(labels).ravel(), minlength=len(objects) + 1)[1:]
    return counts / np.array(own)


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
        _draw(draw, obj, SUPERSAMPLE, fill=fill, line=edge, width=SUPERSAMPLE)
    return canvas.reduce(SUPERSAMPLE)
