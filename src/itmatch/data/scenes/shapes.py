"""Shape geometry shared by scene sampling and rendering: outlines, tight boxes, visibility masks.

Kept apart from `scene.py` (which samples layouts and checks visibility) and `render.py` (which
paints pictures) so that neither imports the other.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128  # every scene is drawn in a 128 x 128 frame


class Drawable(Protocol):
    """What the geometry reads of an object (a `scene.SceneObject`)."""

    shape: str
    cx: float
    cy: float
    r: float
    angle: float


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


def outline(obj: Drawable, scale: float = 1.0) -> list[tuple[float, float]] | None:
    unit = _unit_outline(obj.shape)
    if unit is None:
        return None
    return [((obj.cx + x * obj.r) * scale, (obj.cy + y * obj.r) * scale) for x, y in _rotate(unit, obj.angle)]


def object_box(obj: Drawable) -> tuple[float, float, float, float]:
    """Tight box x1, y1, x2, y2 (pixels of the 128 x 128 image), clipped to the frame."""
    pts = outline(obj)
    if pts is None:
        x1, y1, x2, y2 = obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    clip = lambda v: float(min(max(v, 0.0), IMAGE_SIZE))  # noqa: E731
    return clip(x1), clip(y1), clip(x2), clip(y2)


def draw_object(draw: ImageDraw.ImageDraw, obj: Drawable, scale: float, fill, line=None, width: int = 0) -> None:
    pts = outline(obj, scale)
    if pts is None:
        c, r = (obj.cx * scale, obj.cy * scale), obj.r * scale
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill, outline=line, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=line, width=width)


def visible_fractions(objects: list[Drawable]) -> np.ndarray:
    """Share of each object's own pixels still visible once the objects after it are drawn on top."""
    labels = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(labels)
    own = []
    for k, obj in enumerate(objects):
        alone = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw_object(ImageDraw.Draw(alone), obj, 1.0, fill=1)
        own.append(max(int(np.count_nonzero(np.asarray(alone))), 1))
        draw_object(draw, obj, 1.0, fill=k + 1)
    counts = np.bincount(np.asarray(labels).ravel(), minlength=len(objects) + 1)[1:]
    return counts / np.array(own)
