"""What each model kind puts into the vector index, and how a query's candidates are found.

    global  one vector per item; vector id = item id
    set     every element of an item's (K, D) set; vector id = item id * MAX_SET + element, so the
            candidates of a query are the items owning the elements nearest to its elements
    score   a first-stage vector per item: the model's `first_stage(enc)` if it has one, else the
            mean of its fragments (masked), L2-normalised; vector id = item id

Candidates are then re-ranked with the model's exact `similarity` (`search.py`), so the index
only decides which items get scored, never the final scores.
"""

from __future__ import annotations

import numpy as np

from itmatch.evaluation.shortlist import first_stage_embeddings
from itmatch.models.contract import Encoding

MAX_SET = 1024  # elements per set item; ids stay far inside int64 for 2**50 items


def index_vectors(model, kind: str, ids: np.ndarray, enc: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """(vector ids, float32 vectors) for items `ids` with encodings `enc`."""
    ids = np.asarray(ids, np.int64)
    if kind == "set":
        n, k, d = enc.shape
        if k > MAX_SET:
            raise ValueError(f"sets of {k} elements exceed {MAX_SET}")
        vids = (ids[:, None] * MAX_SET + np.arange(k)[None]).reshape(-1)
        return vids, enc.reshape(n * k, d).numpy().astype(np.float32)
    if kind == "score":
        return ids, first_stage_embeddings(model, enc).float().numpy()
    return ids, enc.numpy().astype(np.float32)


def query_vectors(model, kind: str, enc: Encoding) -> np.ndarray:
    """The vectors that look up a single query's candidates."""
    if kind == "set":
        return enc.reshape(-1, enc.shape[-1]).numpy().astype(np.float32)
    if kind == "score":
        return first_stage_embeddings(model, enc).float().numpy()
    return enc.numpy().astype(np.float32)


def vector_dim(kind: str, model, enc: Encoding) -> int:
    return int(query_vectors(model, kind, enc[:1]).shape[-1])


def item_ids(kind: str, vector_ids: np.ndarray) -> np.ndarray:
    """Item ids of vector ids (the -1 of missing hits dropped), in order of first appearance."""
    vids = vector_ids.reshape(-1)
    vids = vids[vids >= 0]
    items = vids // MAX_SET if kind == "set" else vids
    _, first = np.unique(items, return_index=True)
    return items[np.sort(first)]


def vector_ids_of_items(kind: str, ids: np.ndarray, set_size: int | None) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if kind == "set":
        return (ids[:, None] * MAX_SET + np.arange(set_size or 1)[None]).reshape(-1)
    return ids
