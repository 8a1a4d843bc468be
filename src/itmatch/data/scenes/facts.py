"""Facts (predicates over a scene) and the relevance of every caption to every image.

A caption states a list of facts. Each fact is true, false or undetermined in an image (a spatial
relation in the margin zone, see scene.MARGIN_SHARE); a caption is relevant when every fact is
true, irrelevant when one is false, undetermined otherwise (Kleene AND). Three fact types cover
every caption the grammar writes:

    ("exists", D)            at least one object matches descriptor D
    ("count", D, n)          exactly n objects match D (n may be 0: "no circles")
    ("rel", A, R, B)         two different objects a ~ A and b ~ B with a R b (R in scene.RELATIONS)

A descriptor D = (shape, colour, size) where None means "any" ("a red shape" = (None, "red", None)).
"""

from __future__ import annotations

from itertools import product

import numpy as np
import scipy.sparse as sp

from itmatch.data.scenes.scene import (
    COLOURS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPATIAL,
    Scene,
    pair_relations,
    pair_undetermined,
)

Desc = tuple  # (shape | None, colour | None, size | None)
Fact = tuple
ANY: Desc = (None, None, None)
_VOCAB = (SHAPES, COLOURS, SIZES)
N_DESC = (len(SHAPES) + 1) * (len(COLOURS) + 1) * (len(SIZES) + 1)
# How the oracles of ceilings.json read facts: "exact" is the truth; "no_spatial" takes every
# left/right/above/below fact as true; "bag" unbinds adjectives from their noun (an object matches
# a descriptor when it has the first named attribute, shape else colour else size, and the other
# named attributes occur anywhere in the image); "no_count" knows presence, not numbers
# (count D n reads as "D exists" for n > 0 and "D absent" for n = 0).
ORACLES = ("exact", "no_spatial", "bag", "no_count")


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


def fact_value(fact: Fact, scene: Scene, tables=None) -> bool | None:
    """True, False or None (undetermined) for one fact in one scene."""
    objs = scene.objects
    if fact[0] == "exists":
        return any(matches(o, fact[1]) for o in objs)
    if fact[0] == "count":
        return sum(matches(o, fact[1]) for o in objs) == fact[2]
    if tables is None:
        tables = (pair_relations(*scene.geometry), pair_undetermined(*scene.geometry))
    sure, unsure = tables
    k = RELATIONS.index(fact[2])
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs))
             if matches(objs[i], fact[1]) and matches(objs[j], fact[3])]
    if any(sure[i, j, k] for i, j in pairs):
        return True
    return None if any(unsure[i, j, k] for i, j in pairs) else False


def caption_value(facts: list[Fact], scene: Scene) -> bool | None:
    """Kleene AND of the facts: False if one is false, else None if one is undetermined, else True."""
    tables = pair_relations(*scene.geometry), pair_undetermined(*scene.geometry)
    values = [fact_value(f, scene, tables) for f in facts]
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def all_hold(facts: list[Fact], scene: Scene) -> bool:
    return caption_value(facts, scene) is True


# --- every image at once ---------------------------------------------------------------------------

def desc_code(d: Desc) -> int:
    """Index of a descriptor in 0..N_DESC-1 (0 in a slot means "any")."""
    code = 0
    for value, vocab in zip(d, _VOCAB):
        code = code * (len(vocab) + 1) + (0 if value is None else vocab.index(value) + 1)
    return code


def _all_descs() -> list[Desc]:
    return [tuple(None if v == 0 else vocab[v - 1] for v, vocab in zip(values, _VOCAB))
            for values in product(*(range(len(v) + 1) for v in _VOCAB))]


class SceneTable:
    """The scenes of a split as padded arrays, plus the boolean image-property tables facts read."""

    def __init__(self, scenes: list[Scene], oracle: str = "exact"):
        if oracle not in ORACLES:
            raise ValueError(f"unknown oracle {oracle!r}")
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
        self.oracle = oracle
        # present[slot][i, v]: some object of image i has value v in that slot (the bag oracle's view)
        present = [np.stack([(attrs[:, :, slot] == v).any(1) for v in range(len(vocab))], 1)
                   for slot, vocab in enumerate(_VOCAB)]
        # matches[i, k, d]: object k of image i matches descriptor d (codes in desc_code order)
        self.matches = np.zeros((n, m, N_DESC), dtype=bool)
        for code, d in enumerate(_all_descs()):
            hit = valid.copy()
            named = [slot for slot in range(3) if d[slot] is not None]
            for slot in named:
                v = _VOCAB[slot].index(d[slot])
                if oracle == "bag" and slot != named[0]:
                    hit &= present[slot][:, v][:, None]  # anywhere in the image, not bound to this object
                else:
                    hit &= attrs[:, :, slot] == v
            self.matches[:, :, code] = hit
        self.counts = self.matches.sum(axis=1, dtype=np.int16)  # N x N_DESC
        self.relations = pair_relations(geom[0], geom[1], geom[2], valid)  # N x m x m x len(RELATIONS)
        self.undetermined = pair_undetermined(geom[0], geom[1], geom[2], valid)

    def evaluate(self, facts: list[Fact], chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Boolean tables F x N: (fact f is true in image i, fact f is undetermined in image i)."""
        true = np.zeros((len(facts), self.n_images), dtype=bool)
        unknown = np.zeros_like(true)
        kinds = np.array([f[0] for f in facts])
        for kind in ("exists", "count"):
            rows = np.nonzero(kinds == kind)[0]
            if len(rows):
                codes = np.array([desc_code(facts[r][1]) for r in rows])
                vals = self.counts[:, codes].T  # F_kind x N
                if kind == "exists":
                    true[rows] = vals >= 1
                elif self.oracle == "no_count":
                    n = np.array([facts[r][2] for r in rows])[:, None]
                    true[rows] = (vals >= 1) == (n >= 1)
                else:
                    true[rows] = vals == np.array([facts[r][2] for r in rows])[:, None]
        rows = np.nonzero(kinds == "rel")[0]
        if self.oracle == "no_spatial":
            spatial = np.array([facts[r][2] in SPATIAL for r in rows], dtype=bool)
            true[rows[spatial]] = True
            rows = rows[~spatial]
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            a = self.matches[:, :, [desc_code(facts[r][1]) for r in part]]  # N x m x F
            b = self.matches[:, :, [desc_code(facts[r][3]) for r in part]]
            k = [RELATIONS.index(facts[r][2]) for r in part]
            ab = a[:, :, None, :] & b[:, None, :, :]  # N x m x m x F
            true[part] = (ab & self.relations[..., k]).any(axis=(1, 2)).T
            unknown[part] = (ab & self.undetermined[..., k]).any(axis=(1, 2)).T & ~true[part]
        return true, unknown


def relevance_matrix(scenes: list[Scene], caption_facts: list[list[Fact]], chunk: int = 2048) -> sp.csr_matrix:
    """Captions x images boolean CSR: True where every fact of the caption is true in the image."""
    return relevance_tables(scenes, caption_facts, chunk)[0]


def relevance_tables(scenes: list[Scene], caption_facts: list[list[Fact]], chunk: int = 2048,
                     oracle: str = "exact") -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Captions x images boolean CSRs (relevant, undetermined), under an oracle (see ORACLES).

    Each distinct fact is evaluated once over all images (boolean tables), and a caption's row is
    the Kleene AND of its facts' rows: relevant where all are true, undetermined where none is
    false but not all are true.
    """
    index: dict[Fact, int] = {}
    for facts in caption_facts:
        for f in facts:
            index.setdefault(f, len(index))
    table = SceneTable(scenes, oracle)
    true, unknown = table.evaluate(list(index))
    ones = np.ones((1, len(scenes)), dtype=bool)
    true = np.concatenate([true, ones])
    possible = np.concatenate([true[:-1] | unknown, ones])
    pad = len(index)  # the all-true row pads short fact lists
    width = max((len(f) for f in caption_facts), default=1)
    ids = np.full((len(caption_facts), width), pad, dtype=np.int64)
    for c, facts in enumerate(caption_facts):
        ids[c, :len(facts)] = [index[f] for f in facts]
    rel_blocks, und_blocks = [], []
    for start in range(0, len(caption_facts), chunk):
        rel = true[ids[start:start + chunk]].all(axis=1)  # C_chunk x N
        und = possible[ids[start:start + chunk]].all(axis=1) & ~rel
        rel_blocks.append(sp.csr_matrix(rel))
        und_blocks.append(sp.csr_matrix(und))
    if not rel_blocks:
        empty = sp.csr_matrix((0, len(scenes)), dtype=bool)
        return empty, empty.copy()
    return (sp.vstack(rel_blocks, format="csr").astype(bool), sp.vstack(und_blocks, format="csr").astype(bool))
