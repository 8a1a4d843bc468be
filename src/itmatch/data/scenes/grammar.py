"""Captions written from a scene graph by a small grammar with synonyms and varied structure.

Every caption is built from an explicit list of facts (see `facts.py`) and the words are only a
rendering of them: synonyms and sentence shapes vary, the facts (and so the relevance) do not.
Caption kinds: full descriptions (optionally with a relation), relations, counts, attributes, and
partial descriptions that are true of many images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from itmatch.data.scenes.facts import ANY, Desc, Fact, caption_value, matches
from itmatch.data.scenes.scene import SPATIAL, Scene

SHAPE_NOUNS = {
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "hexagon": [("hexagon", "hexagons")],
}
GENERIC_NOUNS = [("shape", "shapes"), ("object", "objects"), ("figure", "figures")]
COLOUR_WORDS = {"red": ["red"], "orange": ["orange"], "yellow": ["yellow"], "green": ["green"], "blue": ["blue"],
                "purple": ["purple", "violet"], "white": ["white"], "black": ["black"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four"}
RELATION_WORDS = {
    "left_of": ["to the left of", "left of", "on the left of"],
    "right_of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over", "higher than"],
    "below": ["below", "under", "beneath"],
    "bigger_than": ["bigger than", "larger than"],
}
# "B with A to its left" states left_of(A, B)
INVERSE_WORDS = {"left_of": ["to its left"], "right_of": ["to its right"], "above": ["above it", "over it"],
                 "below": ["below it", "under it"]}
KINDS = ("relation", "count", "attribute", "partial")
KIND_P = (0.3, 0.25, 0.2, 0.25)


@dataclass
class Caption:
    text: str
    kind: str
    facts: list[Fact]


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(d: Desc, rng: np.random.Generator, det: str | int = "a") -> str:
    """'a large red circle', 'two blue shapes', 'the star', 'a big square in green'."""
    shape, colour, size = d
    plural = isinstance(det, int) and det != 1
    noun = _pick(rng, SHAPE_NOUNS[shape] if shape else GENERIC_NOUNS)[1 if plural else 0]
    size_w = _pick(rng, SIZE_WORDS[size]) if size else None
    colour_w = _pick(rng, COLOUR_WORDS[colour]) if colour else None
    if colour_w and shape and rng.random() < 0.15:
        words = " ".join(w for w in (size_w, noun, "in", colour_w) if w)
    else:
        words = " ".join(w for w in (size_w, colour_w, noun) if w)
    if isinstance(det, int):
        return f"{NUMBER_WORDS[det]} {words}"
    return f"{_article(words) if det == 'a' else det} {words}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _full_desc(o) -> Desc:
    return (o.shape, o.colour, o.size)


def _count(scene: Scene, d: Desc) -> int:
    return sum(matches(o, d) for o in scene.objects)


def _generalise(o, rng: np.random.Generator, p_shape=0.85, p_colour=0.75, p_size=0.4) -> Desc:
    shape = o.shape if rng.random() < p_shape else None
    colour = o.colour if rng.random() < p_colour else None
    size = o.size if rng.random() < p_size else None
    if shape is None and colour is None:
        colour = o.colour  # "a large shape" alone says too little
    return (shape, colour, size)


def _unique_desc(scene: Scene, o) -> Desc | None:
    """The shortest descriptor (always with the shape) that picks out this object alone."""
    for d in ((o.shape, None, None), (o.shape, o.colour, None), (o.shape, None, o.size), _full_desc(o)):
        if _count(scene, d) == 1:
            return d
    return None


def full_caption(scene: Scene, rng: np.random.Generator, with_relation: bool = False) -> Caption:
    groups = Counter(_full_desc(o) for o in scene.objects)
    order = list(groups)
    order = [order[i] for i in rng.permutation(len(order))]
    items = [noun_phrase(d, rng, groups[d] if groups[d] > 1 else "a") for d in order]
    n = len(scene.objects)
    prefix = _pick(rng, ["", "", "a picture of ", "an image of ", "a scene with ", "this picture shows ",
                         f"{NUMBER_WORDS[n]} shapes: ", f"{NUMBER_WORDS[n]} objects: "])
    facts: list[Fact] = [("count", d, groups[d]) for d in order] + [("count", ANY, n)]
    text = prefix + _join(items)
    rels = [r for r in scene.relations() if r[1] in SPATIAL]
    if with_relation and rels:
        i, rel, j = _pick(rng, rels)
        da, db = _unique_desc(scene, scene.objects[i]), _unique_desc(scene, scene.objects[j])
        if da is not None and db is not None:
            text += (f", with {noun_phrase(da, rng, 'the')} {_pick(rng, RELATION_WORDS[rel])} "
                     f"{noun_phrase(db, rng, 'the')}")
            facts.append(("rel", da, rel, db))
    return Caption(text, "full", facts)


def relation_caption(scene: Scene, rng: np.random.Generator) -> Caption | None:
    rels = scene.relations()
    if not rels:
        return None
    weights = np.array([1.0 if r[1] in SPATIAL else 0.25 for r in rels])
    i, rel, j = rels[int(rng.choice(len(rels), p=weights / weights.sum()))]
    p_size = 0.15 if rel == "bigger_than" else 0.4
    da = _generalise(scene.objects[i], rng, p_size=p_size)
    db = _generalise(scene.objects[j], rng, p_size=p_size)
    a, b = noun_phrase(da, rng), noun_phrase(db, rng)
    words = _pick(rng, RELATION_WORDS[rel])
    forms = [f"{a} {words} {b}", f"there is {a} {words} {b}", f"{a} is {words} {b}",
             f"a picture where {a} is {words} {b}"]
    if rel in INVERSE_WORDS:
        forms.append(f"{b} with {a} {_pick(rng, INVERSE_WORDS[rel])}")
    return Caption(_pick(rng, forms), "relation", [("rel", da, rel, db)])


def _count_phrase(d: Desc, n: int, rng: np.random.Generator) -> str:
    if n == 1:  # "one red circle" -> "exactly one red circle" / "a single red circle"
        return _pick(rng, ["exactly one", "a single", "only one"]) + noun_phrase(d, rng, 1)[len("one"):]
    return noun_phrase(d, rng, n)


def _count_desc(o, rng: np.random.Generator) -> Desc:
    kind = rng.choice(4, p=[0.45, 0.25, 0.2, 0.1])
    return [(o.shape, None, None), (None, o.colour, None), ANY, (o.shape, o.colour, None)][kind]


def count_caption(scene: Scene, rng: np.random.Generator) -> Caption:
    n_all = len(scene.objects)
    absent = sorted(set(SHAPE_NOUNS) - {o.shape for o in scene.objects})
    if rng.random() < 0.12 and absent:
        shape = _pick(rng, absent)
        plural = _pick(rng, SHAPE_NOUNS[shape])[1]
        text = _pick(rng, [f"{NUMBER_WORDS[n_all]} shapes but no {plural}",
                           f"a picture of {NUMBER_WORDS[n_all]} objects without any {plural}"])
        return Caption(text, "count", [("count", ANY, n_all), ("count", (shape, None, None), 0)])
    d = _count_desc(_pick(rng, scene.objects), rng)
    n = _count(scene, d)
    facts: list[Fact] = [("count", d, n)]
    phrase = _count_phrase(d, n, rng)
    if rng.random() < 0.35:
        other = _count_desc(_pick(rng, scene.objects), rng)
        if other != d and (other[0] is None) == (d[0] is None) and (other[1] is None) == (d[1] is None):
            m = _count(scene, other)
            facts.append(("count", other, m))
            phrase += " and " + _count_phrase(other, m, rng)
    verb = "there are" if n > 1 else "there is"
    text = _pick(rng, [phrase, f"{verb} {phrase}", f"an image with {phrase}", f"{phrase} in the picture"])
    return Caption(text, "count", facts)


def attribute_caption(scene: Scene, rng: np.random.Generator) -> Caption | None:
    objs = scene.objects
    by_shape = [o for o in objs if _count(scene, (o.shape, None, None)) == 1]
    by_colour = [o for o in objs if _count(scene, (None, o.colour, None)) == 1]
    if by_colour and (not by_shape or rng.random() < 0.3):
        o = _pick(rng, by_colour)
        subject = noun_phrase((None, o.colour, None), rng, _pick(rng, ["the", "the only"]))
        text = f"{subject} is {noun_phrase((o.shape, None, None), rng)}"
        return Caption(text, "attribute", [("count", (None, o.colour, None), 1), ("exists", (o.shape, o.colour, None))])
    if not by_shape:
        return None
    o = _pick(rng, by_shape)
    which = rng.choice(3, p=[0.45, 0.2, 0.35])
    colour = o.colour if which in (0, 2) else None
    size = o.size if which in (1, 2) else None
    adjs = [w for w in (_pick(rng, SIZE_WORDS[size]) if size else None,
                        _pick(rng, COLOUR_WORDS[colour]) if colour else None) if w]
    noun = _pick(rng, SHAPE_NOUNS[o.shape])[0]
    subject = _pick(rng, [f"the {noun}", f"the only {noun}", f"the {noun} in the picture"])
    text = f"{subject} is {' and '.join(adjs)}"
    return Caption(text, "attribute", [("count", (o.shape, None, None), 1), ("exists", (o.shape, colour, size))])


def partial_caption(scene: Scene, rng: np.random.Generator) -> Caption:
    objs = scene.objects
    o = _pick(rng, objs)
    kind = rng.choice(5, p=[0.5, 0.15, 0.15, 0.1, 0.1])
    d = [(o.shape, o.colour, None), (o.shape, None, o.size), _full_desc(o), (None, o.colour, None),
         (o.shape, None, None)][kind]
    facts: list[Fact] = [("exists", d)]
    phrase = noun_phrase(d, rng)
    others = [p for p in objs if p.shape != o.shape]
    if d[0] is not None and others and rng.random() < 0.3:
        # two different shapes, so the two phrases can never be one object
        p = _pick(rng, others)
        d2 = (p.shape, p.colour if rng.random() < 0.6 else None, None)
        facts.append(("exists", d2))
        phrase += " and " + noun_phrase(d2, rng)
    text = _pick(rng, [f"a picture with {phrase}", f"there is {phrase}", f"an image containing {phrase}",
                       f"{phrase} somewhere in the picture", phrase])
    return Caption(text, "partial", facts)


def _make(kind: str, scene: Scene, rng: np.random.Generator) -> Caption | None:
    if kind == "full":
        return full_caption(scene, rng, with_relation=rng.random() < 0.35)
    if kind == "full_rel":
        return full_caption(scene, rng, with_relation=True)
    return {"relation": relation_caption, "count": count_caption, "attribute": attribute_caption,
            "partial": partial_caption}[kind](scene, rng)


def write_captions(scene: Scene, rng: np.random.Generator, k: int = 5) -> list[Caption]:
    """k different captions: one full description, a relation when there is one, then a random mix."""
    caps = [_make("full", scene, rng)]
    first = relation_caption(scene, rng)
    if first is not None:
        caps.append(first)
    for _ in range(500):
        if len(caps) == k:
            break
        cap = _make(str(rng.choice(KINDS, p=KIND_P)), scene, rng)
        if cap is not None and cap.text not in {c.text for c in caps}:
            caps.append(cap)
    else:
        raise RuntimeError("could not write enough different captions")  # a grammar bug, not user input
    caps = caps[:k]
    return [caps[i] for i in rng.permutation(len(caps))]


def discriminative_caption(scene: Scene, other: Scene, rng: np.random.Generator, tries: int = 120) -> Caption | None:
    """A caption true of `scene` and false (not merely undetermined) of `other`, or None if none was found."""
    order = ("full_rel", "relation", "full", "attribute", "count", "partial")
    for t in range(tries):
        cap = _make(order[t % len(order)], scene, rng)
        if cap is not None and caption_value(cap.facts, other) is False:
            return cap
    return None
