"""Facts (predicates over a scene) and the relevance of every caption to every image.

A caption states a list of facts; it is relevant to an image when every one of them holds there.
Three fact types cover every caption the grammar writes:

    ("exists", D)            at least one object matches descriptor D
    ("count", D, n)          exactly n objects match D (n may be 0: "no circles")
    ("rel", A, R, B)         two different objects a ~ A and b ~ B with a R b (R in scene.RELATIONS)

A descriptor D = (shape, colour, size) where None means "any" ("a red shape" = (None, "red", None)).
"""

from __future__ import annotations

from itertools import product

import numpy as np
import scipy.sparse as sp

from itmatch.data.scenes.scene import COLOURS, MAX_OBJECTS, RELATIONS, SHAPES, SIZES, Scene, pair_relations

Desc = tuple  # (shape | None, colour | None, size | None)
Fact = tuple
ANY: Desc = (None, None, None)
_VOCAB = (SHAPES, COLOURS, SIZES)
N_DESC = (len(SHAPES) + 1) * (len(COLOURS) + 1) * (len(SIZES) + 1)


def desc_json(d: Desc) -> dict:
    return {"shape": d[0], "colour": d[1], "size": d[2]}


def fact_to_json(f: Fact) -> dict:
    if f[0] == "exists":
        return {"type": "exists", "desc": desc_json(f[1])}
    if f[0] == "count":
        return {"type": "count", "desc": desc_json(f[1]), "n": int(f[2])}
    return {"type": "rel", "a": desc_json(f[1]), "rel": f[2], "b": desc_json(f[3])}


def fact_from_json(j: dict) -> Fact:
    d = lambda x: (x["shape"], x["colour"], x["size"])  # noqa: E731
    if j["type"] == "exists":
        return ("exists", d(j["desc"]))
    if j["type"] == "count":
        return ("count", d(j["desc"]), int(j["n"]))
    return ("rel", d(j["a"]), j["rel"], d(j["b"]))


# --- one scene (used while writing captions: cheap, a few objects) --------------------------------

def matches(obj, d: Desc) -> bool:
    return all(want is None or want == have for want, have in zip(d, (obj.shape, obj.colour, obj.size)))


def holds(fact: Fact, scene: Scene, table: np.ndarray | None = None) -> bool:
    """Does the fact hold in the scene? `table` is `pair_relations` of the scene (computed if None)."""
    objs = scene.objects
    if fact[0] == "exists":
        return any(matches(o, fact[1]) for o in objs)
    if fact[0] == "count":
        return sum(matches(o, fact[1]) for o in objs) == fact[2]
    table = pair_relations(*scene.geometry) if table is None else table
    k = RELATIONS.index(fact[2])
    return any(table[i, j, k] and matches(objs[i], fact[1]) and matches(objs[j], fact[3])
               for i in range(len(objs)) for j in range(len(objs)))


def all_hold(facts: list[Fact], scene: Scene) -> bool:
    table = pair_relations(*scene.geometry)
    return all(holds(f, scene, table) for f in facts)


# --- every image at once ---------------------------------------------------------------------------

def desc_code(d: Desc) -> int:
    """Index of a descriptor in 0..N_DESC-1 (0 in a slot means "any")."""
    code = 0
    for value, vocab in zip(d, _VOCAB):
        code = code * (len(vocab) + 1) + (0 if value is None else vocab.index(value) + 1)
    return code


class SceneTable:
    """The scenes of a split as padded arrays, plus the boolean image-property tables facts read."""

    def __init__(self, scenes: list[Scene]):
        n, m = len(scenes), MAX_OBJECTS
        attrs = np.full((n, m, 3), -1, dtype=np.int64)
        geom = np.zeros((3, n, m))
        valid = np.zeros((n, m), dtype=bool)
        for i, s in enumerate(scenes):
            for k, o in enumerate(s.objects):
                attrs[i, k] = (SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size))
                geom[:, i, k] = (o.cx, o.cy, o.r)
                valid[i, k] = True
        self.n_images = n
        # matches[i, k, d]: object k of image i matches descriptor d. Every object matches the 8
        # descriptors obtained by keeping or dropping each of its three attributes.
        self.matches = np.zeros((n, m, N_DESC), dtype=bool)
        img, obj = np.nonzero(valid)
        for keep in product((False, True), repeat=3):
            code = np.zeros(len(img), dtype=np.int64)
            for slot, vocab in enumerate(_VOCAB):
                value = attrs[img, obj, slot] + 1 if keep[slot] else 0
                code = code * (len(vocab) + 1) + value
            self.matches[img, obj, code] = True
        self.counts = self.matches.sum(axis=1, dtype=np.int16)  # N x N_DESC
        self.relations = pair_relations(geom[0], geom[1], geom[2], valid)  # N x m x m x len(RELATIONS)

    def evaluate(self, facts: list[Fact], chunk: int = 256) -> np.ndarray:
        """Boolean table F x N: fact f holds in image i."""
        out = np.zeros((len(facts), self.n_images), dtype=bool)
        kinds = np.array([f[0] for f in facts])
        for kind in ("exists", "count"):
            rows = np.nonzero(kinds == kind)[0]
            if len(rows):
                codes = np.array([desc_code(facts[r][1]) for r in rows])
                vals = self.counts[:, codes].T  # F_kind x N
                if kind == "exists":
                    out[rows] = vals >= 1
                else:
                    out[rows] = vals == np.array([facts[r][2] for r in rows])[:, None]
        rows = np.nonzero(kinds == "rel")[0]
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            a = self.matches[:, :, [desc_code(facts[r][1]) for r in part]]  # N x m x F
            b = self.matches[:, :, [desc_code(facts[r][3]) for r in part]]
            rel = self.relations[..., [RELATIONS.index(facts[r][2]) for r in part]]  # N x m x m x F
            out[part] = (a[:, :, None, :] & b[:, None, :, :] & rel).any(axis=(1, 2)).T
        return out


def relevance_matrix(scenes: list[Scene], caption_facts: list[list[Fact]], chunk: int = 2048) -> sp.csr_matrix:
    """Captions x images boolean CSR: True where every fact of the caption holds in the image.

    Each distinct fact is evaluated once over all images (a boolean table), and a caption's row is
    the AND of its facts' rows.
    """
    index: dict[Fact, int] = {}
    for facts in caption_facts:
        for f in facts:
            index.setdefault(f, len(index))
    table = SceneTable(scenes)
    truth = np.concatenate([table.evaluate(list(index)), np.ones((1, len(scenes)), dtype=bool)])
    pad = len(index)  # the all-true row pads short fact lists
    width = max((len(f) for f in caption_facts), default=1)
    ids = np.full((len(caption_facts), width), pad, dtype=np.int64)
    for c, facts in enumerate(caption_facts):
        ids[c, :len(facts)] = [index[f] for f in facts]
    blocks = []
    for start in range(0, len(caption_facts), chunk):
        block = truth[ids[start:start + chunk]].all(axis=1)  # C_chunk x N
        blocks.append(sp.csr_matrix(block))
    if not blocks:
        return sp.csr_matrix((0, len(scenes)), dtype=bool)
    return sp.vstack(blocks, format="csr").astype(bool)
