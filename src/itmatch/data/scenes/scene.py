"""Scene graphs of the scenes benchmark: objects, their attributes, geometric relations, twins.

A scene is a handful of coloured shapes on a background. Everything else (the picture, the captions,
the relevance of every caption to every image) is derived from it, so the scene is the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from itmatch.data.scenes.shapes import IMAGE_SIZE, visible_fractions

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SIZES = ("small", "large")
RELATIONS = ("left_of", "right_of", "above", "below", "bigger_than")
SPATIAL = ("left_of", "right_of", "above", "below")
BACKGROUNDS = ("gradient", "radial", "noise", "stripes", "checker", "dots")

# Radius ranges (pixels, in the 128 x 128 image) of the two size classes. They are far enough apart
# that "bigger than" (radius ratio >= BIGGER_RATIO) holds exactly between a large and a small object.
RADIUS = {"small": (10.0, 13.0), "large": (19.0, 24.0)}
BIGGER_RATIO = 1.4
# A spatial relation is stated only when the centres are clearly apart along that axis: at least
# MIN_GAP pixels and at least GAP_PER_RADIUS x (sum of the two radii), so touching or stacked
# objects never get a left/right they do not visibly have.
MIN_GAP = 16.0
GAP_PER_RADIUS = 0.6
# Between "clearly apart" and "clearly not": a centre offset along the axis of more than
# MARGIN_SHARE x gap but under the gap makes a spatial relation undetermined ("A is a little left of
# B" is neither clearly true nor false). Such captions are neither relevant nor irrelevant to the
# image; evaluation leaves those pairs out. A relation is false only where the offset is <= 0.
MARGIN_SHARE = 0.0
# Every object keeps at least this share of its own pixels visible after later objects are drawn.
MIN_VISIBLE = 0.6
OBJECT_COUNTS = (2, 3, 4)
OBJECT_COUNT_P = (0.3, 0.4, 0.3)
MAX_OBJECTS = max(OBJECT_COUNTS)
TWIN_CHANGES = ("colour", "size", "position", "count")

# Combinations held out of train / dev / test and shown only in `test_comp` (compositional split).
# (shape, colour): no object of that shape has that colour. (shape A, relation, shape B): no A stands
# in that relation (clearly or undetermined) to a B, so no caption can say it.
HELD_OUT_SHAPE_COLOUR = (("circle", "red"), ("square", "blue"), ("triangle", "yellow"),
                         ("star", "green"), ("cross", "white"), ("hexagon", "purple"))
HELD_OUT_RELATIONS = (("circle", "left_of", "star"), ("triangle", "above", "square"),
                      ("diamond", "left_of", "hexagon"))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    angle: float  # rotation in degrees (small, so a square never turns into a diamond)
    tint: tuple[int, int, int]  # per-object jitter of the named colour, for realism

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "cx": round(self.cx, 3), "cy": round(self.cy, 3), "r": round(self.r, 3),
                "angle": round(self.angle, 3), "tint": list(self.tint)}


@dataclass
class Scene:
    objects: list[SceneObject]
    background: dict
    twin: dict | None = None  # {"row": int, "change": "colour"|"size"|"position", "objects": [a, b]}
    extra: dict = field(default_factory=dict)

    @property
    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cx = np.array([o.cx for o in self.objects])
        cy = np.array([o.cy for o in self.objects])
        r = np.array([o.r for o in self.objects])
        return cx, cy, r

    def relations(self) -> list[tuple[int, str, int]]:
        """Every relation that clearly holds, as (subject row, relation, object row)."""
        table = pair_relations(*self.geometry)
        i, j, k = np.nonzero(table)
        return [(int(a), RELATIONS[c], int(b)) for a, b, c in zip(i, j, k)]


def pair_relations(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Relation table [..., n, n, len(RELATIONS)]: entry (i, j, k) says "object i RELATIONS[k] object j".

    Works on one scene (arrays of shape (n,)) or a batch of padded scenes ((N, n) with `valid`). This
    one predicate serves captions and relevance alike, so both always agree.
    """
    gap = np.maximum(MIN_GAP, GAP_PER_RADIUS * (r[..., :, None] + r[..., None, :]))
    dx = cx[..., None, :] - cx[..., :, None]  # > 0: j is to the right of i
    dy = cy[..., None, :] - cy[..., :, None]  # > 0: j is below i (image rows grow downwards)
    left = dx >= gap
    above = dy >= gap
    bigger = r[..., :, None] >= BIGGER_RATIO * r[..., None, :]
    table = np.stack([left, np.swapaxes(left, -1, -2), above, np.swapaxes(above, -1, -2), bigger], axis=-1)
    return _mask_pairs(table, valid)


def pair_undetermined(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Like `pair_relations`, for the margin zone: MARGIN_SHARE x gap < offset < gap along the axis.

    "bigger than" is never undetermined (the size classes are far apart).
    """
    gap = np.maximum(MIN_GAP, GAP_PER_RADIUS * (r[..., :, None] + r[..., None, :]))
    dx = cx[..., None, :] - cx[..., :, None]
    dy = cy[..., None, :] - cy[..., :, None]
    left = (dx > MARGIN_SHARE * gap) & (dx < gap)
    above = (dy > MARGIN_SHARE * gap) & (dy < gap)
    table = np.stack([left, np.swapaxes(left, -1, -2), above, np.swapaxes(above, -1, -2),
                      np.zeros_like(left)], axis=-1)
    return _mask_pairs(table, valid)


def _mask_pairs(table: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    n = table.shape[-2]
    table &= ~np.eye(n, dtype=bool)[..., None]
    if valid is not None:
        table &= (valid[..., :, None] & valid[..., None, :])[..., None]
    return table


def respects_holdout(objects: list[SceneObject]) -> bool:
    """No held-out shape-colour pair and no held-out relation, not even in the margin zone."""
    if any((o.shape, o.colour) in HELD_OUT_SHAPE_COLOUR for o in objects):
        return False
    for a in objects:
        for b in objects:
            for sa, rel, sb in HELD_OUT_RELATIONS:
                if a is not b and a.shape == sa and b.shape == sb and _loosely(a, rel, b):
                    return False
    return True


def _loosely(a: SceneObject, rel: str, b: SceneObject) -> bool:
    """a rel b holds clearly or in the margin zone."""
    gap = max(MIN_GAP, GAP_PER_RADIUS * (a.r + b.r))
    offset = {"left_of": b.cx - a.cx, "right_of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[rel]
    return offset > MARGIN_SHARE * gap


def shows_holdout(objects: list[SceneObject]) -> bool:
    """At least one held-out combination holds clearly (what a `test_comp` image must show)."""
    if any((o.shape, o.colour) in HELD_OUT_SHAPE_COLOUR for o in objects):
        return True
    table = pair_relations(np.array([o.cx for o in objects]), np.array([o.cy for o in objects]),
                           np.array([o.r for o in objects]))
    return any(table[i, j, RELATIONS.index(rel)] and objects[i].shape == sa and objects[j].shape == sb
               for sa, rel, sb in HELD_OUT_RELATIONS
               for i in range(len(objects)) for j in range(len(objects)))


def _sample_object(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> SceneObject:
    shape = SHAPES[rng.integers(len(SHAPES))] if shape is None else shape
    colour = COLOURS[rng.integers(len(COLOURS))] if colour is None else colour
    size = SIZES[rng.integers(len(SIZES))]
    lo, hi = RADIUS[size]
    r = float(rng.uniform(lo, hi))
    angle = float(rng.uniform(0, 360)) if shape in ("star", "hexagon") else float(rng.uniform(-12, 12))
    tint = tuple(int(t) for t in rng.integers(-14, 15, size=3))
    return SceneObject(shape, colour, size, 0.0, 0.0, r, angle, tint)


def _sample_background(rng: np.random.Generator) -> dict:
    """Muted (low-saturation, mid-brightness) backgrounds so that every named colour stands out."""
    hue = float(rng.uniform(0, 1))
    return {
        "kind": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "hsv1": [hue, float(rng.uniform(0.05, 0.3)), float(rng.uniform(0.42, 0.78))],
        "hsv2": [(hue + float(rng.uniform(-0.15, 0.15))) % 1.0, float(rng.uniform(0.05, 0.3)),
                 float(rng.uniform(0.42, 0.78))],
        "angle": float(rng.uniform(0, 180)),
        "period": float(rng.uniform(10, 24)),
        "seed": int(rng.integers(2**31)),
    }


def layout_ok(objects: list[SceneObject]) -> bool:
    """Inside the frame, and every object keeps MIN_VISIBLE of its pixels (checked on real masks)."""
    for o in objects:
        if not (o.r + 2 <= o.cx <= IMAGE_SIZE - o.r - 2 and o.r + 2 <= o.cy <= IMAGE_SIZE - o.r - 2):
            return False
    return bool((visible_fractions(objects) >= MIN_VISIBLE).all())


def sample_scene(rng: np.random.Generator, comp: bool = False) -> Scene:
    """A random scene; without `comp` it avoids every held-out combination, with it it shows one."""
    n = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_P))
    background = _sample_background(rng)
    while True:
        forced: list[tuple[str | None, str | None]] = [(None, None)] * n
        if comp:
            # half the comp scenes force a held-out shape-colour pair, half a held-out relation's shapes
            if rng.random() < 0.5:
                forced[0] = HELD_OUT_SHAPE_COLOUR[rng.integers(len(HELD_OUT_SHAPE_COLOUR))]
            else:
                sa, _rel, sb = HELD_OUT_RELATIONS[rng.integers(len(HELD_OUT_RELATIONS))]
                forced[0], forced[1] = (sa, None), (sb, None)
        placed: list[SceneObject] = []
        for k in range(n):
            obj = _sample_object(rng, *forced[k])
            for _attempt in range(50):
                cx, cy = rng.uniform(obj.r + 2, IMAGE_SIZE - obj.r - 2, size=2)
                # cheap pre-check on bounding circles; the exact mask check follows
                if all(np.hypot(cx - p.cx, cy - p.cy) >= 0.6 * (obj.r + p.r) for p in placed):
                    placed.append(replace(obj, cx=float(cx), cy=float(cy)))
                    break
            else:
                break
        if len(placed) < n or not (shows_holdout(placed) if comp else respects_holdout(placed)):
            continue
        if layout_ok(placed):
            return Scene(placed, background)


def _twin_candidates(scene: Scene, change: str) -> list[tuple[int, int]]:
    objs = scene.objects
    rel = pair_relations(*scene.geometry)
    pairs = []
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            oa, ob = objs[a], objs[b]
            if change == "colour" and oa.colour != ob.colour and oa.shape != ob.shape:
                pairs.append((a, b))
            elif change == "size" and oa.size != ob.size and oa.shape != ob.shape:
                pairs.append((a, b))
            elif (change == "position" and (oa.shape, oa.colour) != (ob.shape, ob.colour)
                  and rel[a, b, :4].any()):
                pairs.append((a, b))
    return pairs


def _count_twin(scene: Scene, rng: np.random.Generator, comp: bool) -> tuple[Scene, dict] | None:
    """The same scene plus one more copy of one of its objects elsewhere: n vs n + 1 of the same thing."""
    if len(scene.objects) >= MAX_OBJECTS:
        return None
    for idx in rng.permutation(len(scene.objects)):
        src = scene.objects[idx]
        for _attempt in range(20):
            cx, cy = rng.uniform(src.r + 2, IMAGE_SIZE - src.r - 2, size=2)
            objs = [*scene.objects, replace(src, cx=float(cx), cy=float(cy))]
            if _twin_ok(objs, comp) and layout_ok(objs):
                return Scene(objs, dict(scene.background)), {"change": "count",
                                                             "objects": [int(idx), len(objs) - 1]}
    return None


def _twin_ok(objs: list[SceneObject], comp: bool) -> bool:
    # a twin stays on its side of the split: held-out combinations in test_comp only, and always there
    return shows_holdout(objs) if comp else respects_holdout(objs)


def make_twin(scene: Scene, rng: np.random.Generator, comp: bool = False) -> tuple[Scene, dict] | None:
    """The same objects on the same background with one change: colours, sizes or positions of two
    objects swapped, or one object copied (count).

    Returns (twin scene, change) or None when no change keeps every object visible and in frame.
    """
    for change in rng.permutation(list(TWIN_CHANGES)):
        if change == "count":
            twin = _count_twin(scene, rng, comp)
            if twin is not None:
                return twin
            continue
        pairs = _twin_candidates(scene, str(change))
        for idx in rng.permutation(len(pairs)):
            a, b = pairs[idx]
            objs = list(scene.objects)
            oa, ob = objs[a], objs[b]
            if change == "colour":
                objs[a] = replace(oa, colour=ob.colour, tint=ob.tint)
                objs[b] = replace(ob, colour=oa.colour, tint=oa.tint)
            elif change == "size":
                objs[a], objs[b] = replace(oa, size=ob.size, r=ob.r), replace(ob, size=oa.size, r=oa.r)
            else:
                objs[a], objs[b] = replace(oa, cx=ob.cx, cy=ob.cy), replace(ob, cx=oa.cx, cy=oa.cy)
            if _twin_ok(objs, comp) and layout_ok(objs):
                return Scene(objs, dict(scene.background)), {"change": str(change), "objects": [a, b]}
    return None
