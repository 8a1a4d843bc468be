"""`SearchIndex`: build, grow, shrink and query an index folder with the model it was encoded with.

Text queries search the image side, image queries the caption side. Each search asks the vector
index for candidates (`vectors.py`) and re-ranks them with the model's exact `similarity`, tiled in
the model's `score_block`, so the scores a user sees are the ones evaluation computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itmatch.errors import ItmatchError
from itmatch.models.contract import Encoding
from itmatch.retrieval import vectors
from itmatch.retrieval.backends import open_index, resolve_spec
from itmatch.retrieval.collection import Collection, collection_digest
from itmatch.retrieval.encoder import ModelHandle
from itmatch.retrieval.store import SIDES, Store, is_index

TARGET = {"text": "image", "image": "caption"}  # a query of one modality searches the other side


@dataclass
class Hit:
    id: int
    key: str
    score: float
    side: str
    path: str | None
    caption: str | None

    def to_dict(self) -> dict:
        out = {"id": self.id, "key": self.key, "score": round(self.score, 6)}
        if self.side == "image":
            out["path"] = self.path
        else:
            out["caption"] = self.caption
        return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


class SearchIndex:
    def __init__(self, folder: str | Path, model: ModelHandle | str | Path | None = None):
        self.store = Store(folder)
        self.folder = self.store.folder
        m = self.store.manifest
        if model is None:
            model = m["checkpoint"]
        self.model = model if isinstance(model, ModelHandle) else ModelHandle(model)
        if self.model.hash != m["model_hash"]:
            raise ItmatchError(
                f"index {self.folder} was encoded with another model (weights sha256 {m['model_hash'][:12]}, "
                f"this model {self.model.hash[:12]}): search it with the model that built it, or build a new index")
        self.kind = m["kind"]
        self._cache: dict[str, tuple[np.ndarray, Encoding | None, dict]] = {}
        self._vindex: dict[str, object] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def create(cls, model: ModelHandle, collection: Collection, out: str | Path, backend: str = "flat") -> SearchIndex:
        """A new index folder, or the unfinished build of the same model and collection in it."""
        out = Path(out)
        digest = collection_digest(collection)
        if is_index(out):
            m = Store(out).manifest
            if m.get("state") == "complete":
                raise ItmatchError(f"{out} already holds a complete index: use `itmatch index add` to grow it, "
                                   f"or choose another --out")
            if m.get("model_hash") != model.hash or m.get("collection_digest") != digest:
                raise ItmatchError(f"{out} holds an unfinished build of another model or collection: "
                                   f"choose another --out or delete it")
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ItmatchError(f"{out} exists and is not an itmatch index: choose another --out")
        store = Store(out, create=True)
        if not is_index(out):
            spec = resolve_spec(backend, len(collection.items))
            store.write_manifest({
                "state": "building", "model_hash": model.hash, "checkpoint": str(model.checkpoint),
                "method": model.cfg.model.method, "kind": model.kind, "backend": spec,
                "source": collection.source, "collection_digest": digest, "created": time.time(),
            })
        store.insert(collection.items)
        store.close()
        return cls(out, model)

    def encode_pending(self, batch_size: int = 64, progress: bool = True, on_batch=None) -> dict[str, list[int]]:
        """Encode every item that has no encoding yet, a batch at a time; returns the new ids per side.

        `on_batch(side, n_done)` is called after each batch is on disk (tests interrupt builds with it)."""
        done: dict[str, list[int]] = {}
        for side in SIDES:
            rows = self.store.pending(side)
            done[side] = []
            bar = _progress(len(rows), f"encoding {side}s", progress and bool(rows))
            # images of one source per batch (precomp rows and files need different inputs)
            groups: dict = {}
            for r in rows:
                groups.setdefault(r["feature_source"] if side == "image" else None, []).append(r)
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    batch = group[start:start + batch_size]
                    if side == "image":
                        enc = self.model.encode_image_rows(batch)
                    else:
                        enc = self.model.encode_caption_rows(batch)
                    ids = [int(r["id"]) for r in batch]
                    self.store.write_chunk(side, ids, enc)
                    done[side] += ids
                    bar.update(len(batch))
                    if on_batch is not None:
                        on_batch(side, len(done[side]))
            bar.close()
        self._cache.clear()
        return done

    def _set_size(self, enc: Encoding) -> int | None:
        return int(enc.shape[1]) if self.kind == "set" else None

    def _vector_index(self, side: str, dim: int | None = None):
        if side not in self._vindex:
            m = self.store.manifest
            dim = dim or m.get("dims", {}).get(side)
            if dim is None:
                return None
            self._vindex[side] = open_index(self.folder, side, dim, m["backend"])
        return self._vindex[side]

    def index_vectors(self, ids_by_side: dict[str, list[int]], fresh: bool = False) -> None:
        """Put the vectors of these items into the vector indexes (all of them when `fresh`)."""
        m = self.store.manifest
        dims = dict(m.get("dims", {}))
        set_sizes = dict(m.get("set_sizes", {}))
        for side in SIDES:
            ids, enc = self.store.load_encodings(side, None if fresh else ids_by_side.get(side, []))
            if enc is None:
                continue
            vids, vecs = vectors.index_vectors(self.model.model, self.kind, ids, enc)
            dims[side] = int(vecs.shape[1])
            if self.kind == "set":
                set_sizes[side] = self._set_size(enc)
            index = self._vector_index(side, dims[side])
            if fresh:
                index.reset()
            index.remove(vids)  # idempotent: a rerun of an interrupted add never duplicates a vector
            index.add(vids, vecs)
            index.save()
        self.store.write_manifest({**{k: v for k, v in m.items() if k != "format"}, "dims": dims,
                                   "set_sizes": set_sizes})

    def finish(self) -> None:
        m = self.store.manifest
        self.store.write_manifest({**{k: v for k, v in m.items() if k != "format"}, "state": "complete",
                                   "items": {s: self.store.count(s) for s in SIDES}})

    def add(self, collection: Collection, batch_size: int = 64, progress: bool = True) -> dict[str, int]:
        new = self.store.insert(collection.items)
        done = self.encode_pending(batch_size, progress)
        self.index_vectors(done)
        self.finish()
        return {"new": new, **{s: len(v) for s, v in done.items()}}

    def remove(self, keys: list[str]) -> int:
        found = self.store.ids_for_keys(keys)
        missing = [k for k in keys if not self.store.ids_for_keys([k])]
        if missing:
            raise ItmatchError(f"no item with key {missing[0]!r} in {self.folder}")
        m = self.store.manifest
        for side in SIDES:
            ids = np.asarray([i for i, s in found if s == side], np.int64)
            index = self._vector_index(side)
            if len(ids) and index is not None:
                index.remove(vectors.vector_ids_of_items(self.kind, ids, m.get("set_sizes", {}).get(side)))
                index.save()
        self.store.delete([i for i, _ in found])
        self._cache.clear()
        self.finish()
        return len(found)

    # ------------------------------------------------------------------ searching
    def warm(self) -> None:
        """Load encodings and vector indexes now, so concurrent searches only read them (the server)."""
        for side in SIDES:
            self._side(side)
            self._vector_index(side)

    def _side(self, side: str) -> tuple[np.ndarray, Encoding | None, dict]:
        if side not in self._cache:
            ids, enc = self.store.load_encodings(side)
            self._cache[side] = (ids, enc, {int(i): r for r, i in enumerate(ids)})
        return self._cache[side]

    def candidates(self, side: str, query: Encoding, n: int) -> np.ndarray:
        index = self._vector_index(side)
        if index is None or len(index) == 0:
            return np.zeros(0, np.int64)
        qv = vectors.query_vectors(self.model.model, self.kind, query)
        _, vids = index.search(qv, min(n, len(index)))
        return vectors.item_ids(self.kind, vids)

    @torch.inference_mode()
    def rerank(self, side: str, query: Encoding, ids: np.ndarray) -> np.ndarray:
        """Exact scores of `query` against items `ids` of `side`, tiled in the model's score_block."""
        all_ids, enc, row_of = self._side(side)
        rows = torch.tensor([row_of[int(i)] for i in ids], dtype=torch.long)
        model = self.model.model
        rows_per, cols_per = model.score_block
        step = rows_per if side == "image" else cols_per
        out = []
        for start in range(0, len(rows), step):
            part = enc[rows[start:start + step]]
            s = model.similarity(part, query)[:, 0] if side == "image" else model.similarity(query, part)[0]
            out.append(s.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def _live(self, side: str, ids: np.ndarray) -> np.ndarray:
        live = self._side(side)[2]
        return ids[np.fromiter((int(i) in live for i in ids), bool, len(ids))]  # vectors of removed items

    def shortlist(self, side: str, query: Encoding, k: int = 10, candidates: int | None = None) -> np.ndarray:
        """Ids of the items `search` re-ranks: found by the vector index, removed items left out."""
        n = candidates if candidates is not None else (k if self.kind == "global" else max(100, 10 * k))
        ids = self._live(side, self.candidates(side, query, max(n, k)))
        enc = self._side(side)[1] if self.kind == "set" and len(ids) < k else None
        set_size = int(enc.shape[1]) if enc is not None else 0
        if set_size and n < k * set_size:
            # the n nearest elements may belong to fewer than k items (an item's elements crowd together,
            # all K of them when its set collapsed): k x K elements per query element always hold k items
            ids = self._live(side, self.candidates(side, query, k * set_size))
        return ids

    def search(self, query: Encoding, side: str, k: int = 10, candidates: int | None = None) -> list[Hit]:
        if k < 1:
            raise ItmatchError("k must be >= 1")
        ids = self.shortlist(side, query, k, candidates)
        if len(ids) == 0:
            return []
        scores = self.rerank(side, query, ids)
        order = np.lexsort((ids, -scores))[:k]  # best first; ties by id, deterministic
        meta = self.store.rows(ids[order])
        return [Hit(int(ids[j]), meta[int(ids[j])]["key"], float(scores[j]), side, meta[int(ids[j])]["path"],
                    meta[int(ids[j])]["caption"]) for j in order]

    def search_text(self, text: str, k: int = 10, candidates: int | None = None) -> list[Hit]:
        text = text.strip()
        if not text:
            raise ItmatchError("the text query is empty")
        return self.search(self.model.encode_text(text), "image", k, candidates)

    def image_query(self, data: bytes) -> Encoding:
        """An image's encoding: through the model, or, for a region-feature model, the stored encoding
        of the indexed image with the same bytes."""
        if self.model.transform is not None:
            return self.model.encode_image_bytes(data)
        import hashlib

        row = self.store.find_by_checksum("image", hashlib.sha256(data).hexdigest())
        if row is None:
            raise ItmatchError("this model reads precomputed region features: only images of the indexed "
                               "collection can be queried, and this one is not in it")
        ids, enc, row_of = self._side("image")
        return enc[row_of[int(row["id"])]:row_of[int(row["id"])] + 1]

    def search_image(self, data: bytes, k: int = 10, candidates: int | None = None) -> list[Hit]:
        return self.search(self.image_query(data), "caption", k, candidates)

    def search_image_file(self, path: str | Path, k: int = 10, candidates: int | None = None) -> list[Hit]:
        path = Path(path)
        if not path.is_file():
            raise ItmatchError(f"image not found: {path}")
        return self.search_image(path.read_bytes(), k, candidates)

    def close(self) -> None:
        for index in self._vindex.values():
            if hasattr(index, "close"):
                index.close()
        self.store.close()


def build(model: ModelHandle, collection: Collection, out: str | Path, backend: str = "flat",
          batch_size: int = 64, progress: bool = True, on_batch=None) -> SearchIndex:
    """Encode a collection into a new index folder (or finish an interrupted build there)."""
    index = SearchIndex.create(model, collection, out, backend)
    index.encode_pending(batch_size, progress, on_batch)
    index.index_vectors({}, fresh=True)
    index.finish()
    return index

