"""Evaluation-only captions: minimal pairs (true caption + foil) and the set track.

Minimal pairs, in the spirit of Winoground / ARO: two captions with the same words that differ by
one change, the first true of the image and the second false of it. They use one fixed word per
attribute ("large red circle"), so nothing but the change tells them apart.

    relation_swap   "a red circle left of a blue star" / "a blue star left of a red circle"
    attribute_swap  the full description / the same with the colours (or sizes) of two objects of
                    different shapes exchanged
    count           "two red circles" / "three red circles"

Set track: one caption per distinct object ("a large red circle", kind `object`) and captions
naming a subset of two objects (kind `subset`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from itmatch.data.scenes.facts import ANY, Desc, Fact, caption_value
from itmatch.data.scenes.grammar import (
    COLOUR_WORDS,
    NUMBER_WORDS,
    RELATION_WORDS,
    SHAPE_NOUNS,
    SIZE_WORDS,
    Caption,
    _article,
    _join,
)
from itmatch.data.scenes.scene import MAX_OBJECTS, SPATIAL, Scene

PAIR_CHANGES = ("relation_swap", "attribute_swap", "count")
SET_SUBSETS = 2  # subset captions per image in the set track


def plain_phrase(d: Desc, det: str | int = "a") -> str:
    """A noun phrase with the first synonym of every word: 'a large red circle', 'two red circles'."""
    shape, colour, size = d
    plural = isinstance(det, int) and det != 1
    noun = (SHAPE_NOUNS[shape][0] if shape else ("shape", "shapes"))[1 if plural else 0]
    words = " ".join(w for w in (SIZE_WORDS[size][0] if size else None,
                                 COLOUR_WORDS[colour][0] if colour else None, noun) if w)
    if isinstance(det, int):
        return f"{NUMBER_WORDS[det]} {words}"
    return f"{_article(words) if det == 'a' else det} {words}"


def _description(objects) -> tuple[str, list[Fact]]:
    """Full description of a list of objects in their order: text and facts (as full captions state)."""
    groups = Counter((o.shape, o.colour, o.size) for o in objects)
    order = list(dict.fromkeys((o.shape, o.colour, o.size) for o in objects))
    text = _join([plain_phrase(d, groups[d] if groups[d] > 1 else "a") for d in order])
    facts: list[Fact] = [("count", d, groups[d]) for d in order] + [("count", ANY, len(objects))]
    return text, facts


def _relation_swap(scene: Scene, rng: np.random.Generator) -> tuple[Caption, Caption] | None:
    rels = [r for r in scene.relations() if r[1] in SPATIAL]
    for idx in rng.permutation(len(rels)):
        i, rel, j = rels[idx]
        oa, ob = scene.objects[i], scene.objects[j]
        da, db = (oa.shape, oa.colour, None), (ob.shape, ob.colour, None)
        a, b, w = plain_phrase(da), plain_phrase(db), RELATION_WORDS[rel][1]
        true = Caption(f"{a} {w} {b}", "probe", [("rel", da, rel, db)])
        foil = Caption(f"{b} {w} {a}", "foil", [("rel", db, rel, da)])
        if caption_value(foil.facts, scene) is False:
            return true, foil
    return None


def _attribute_swap(scene: Scene, rng: np.random.Generator) -> tuple[Caption, Caption] | None:
    objs = scene.objects
    pairs = [(a, b, attr) for a in range(len(objs)) for b in range(a + 1, len(objs)) for attr in ("colour", "size")
             if objs[a].shape != objs[b].shape and getattr(objs[a], attr) != getattr(objs[b], attr)]
    for idx in rng.permutation(len(pairs)):
        a, b, attr = pairs[idx]
        swapped = list(objs)
        swapped[a] = replace(objs[a], **{attr: getattr(objs[b], attr)})
        swapped[b] = replace(objs[b], **{attr: getattr(objs[a], attr)})
        if len({(o.shape, o.colour, o.size) for o in swapped}) < len(objs) or \
                len({(o.shape, o.colour, o.size) for o in objs}) < len(objs):
            continue  # grouped twins ("two red circles") would change the sentence, not just two words
        true_text, true_facts = _description(objs)
        foil_text, foil_facts = _description(swapped)
        foil = Caption(foil_text, "foil", foil_facts)
        if caption_value(foil.facts, scene) is False:
            return Caption(true_text, "probe", true_facts), foil
    return None


def _count(scene: Scene, rng: np.random.Generator) -> tuple[Caption, Caption] | None:
    objs = scene.objects
    for idx in rng.permutation(len(objs)):
        o = objs[idx]
        d = (o.shape, o.colour, None) if rng.random() < 0.5 else (o.shape, None, None)
        n = sum(p.shape == o.shape and (d[1] is None or p.colour == o.colour) for p in objs)
        if n + 1 <= MAX_OBJECTS:
            return (Caption(plain_phrase(d, n), "probe", [("count", d, n)]),
                    Caption(plain_phrase(d, n + 1), "foil", [("count", d, n + 1)]))
    return None


def minimal_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, Caption, Caption]]:
    """(change, true caption, foil) for each change the scene allows, in PAIR_CHANGES order."""
    out = []
    for change, make in zip(PAIR_CHANGES, (_relation_swap, _attribute_swap, _count)):
        pair = make(scene, rng)
        if pair is not None:
            if caption_value(pair[0].facts, scene) is not True:
                raise RuntimeError("a minimal pair's true caption is not true")  # a bug, never user input
            out.append((change, *pair))
    return out


def set_captions(scene: Scene, rng: np.random.Generator) -> list[Caption]:
    """One caption per distinct object descriptor, then SET_SUBSETS captions naming two objects."""
    descs = list(dict.fromkeys((o.shape, o.colour, o.size) for o in scene.objects))
    caps = [Caption(plain_phrase(d), "object", [("exists", d)]) for d in descs]
    pairs = [(a, b) for a in range(len(descs)) for b in range(a + 1, len(descs))]
    for idx in rng.permutation(len(pairs))[:SET_SUBSETS]:
        a, b = pairs[idx]
        caps.append(Caption(f"{plain_phrase(descs[a])} and {plain_phrase(descs[b])}", "subset",
                            [("exists", descs[a]), ("exists", descs[b])]))
    return caps
