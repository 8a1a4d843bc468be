"""Vector indexes behind one interface: FAISS (embedded, the default) and Qdrant (scales out).

An index holds float32 vectors under int64 ids and answers inner-product top-k queries. The
search layer (`retrieval/search.py`) only uses this interface, so the engine is a choice made by
a key in the manifest (`--backend`):

    flat                          exact inner product (faiss.IndexFlatIP), the default
    ivf[:nlist=N,nprobe=P]        inverted lists (faiss.IndexIVFFlat), trained on the indexed vectors
    hnsw[:m=M,ef_search=E,ef_construction=C]   graph (faiss.IndexHNSWFlat)
    qdrant[:url=URL]              Qdrant through qdrant-client; local (embedded) mode in the index
                                  folder without a url, the same code against a server with one
    auto                          flat up to 200k vectors, else ivf with nlist = 4 * sqrt(n)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from itmatch.errors import ItmatchError


class VectorIndex(Protocol):
    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (len(queries), k); missing hits have id -1."""
        ...

    def save(self) -> None: ...

    def reset(self) -> None:
        """Drop every vector (a build puts them all in again)."""
        ...

    def __len__(self) -> int: ...


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'ivf:nlist=64,nprobe=8' -> ('ivf', {'nlist': '64', 'nprobe': '8'})."""
    name, _, rest = spec.partition(":")
    params = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ItmatchError(f"backend {spec!r}: parameter {part!r} must be key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params


def _int_params(spec: str, params: dict, allowed: dict[str, int]) -> dict[str, int]:
    unknown = set(params) - set(allowed)
    if unknown:
        raise ItmatchError(f"backend {spec!r}: unknown parameter {sorted(unknown)[0]!r} "
                           f"(known: {', '.join(allowed) or 'none'})")
    out = dict(allowed)
    for key, value in params.items():
        try:
            out[key] = int(value)
        except ValueError:
            raise ItmatchError(f"backend {spec!r}: {key} must be an integer, got {value!r}") from None
        if out[key] < 1:
            raise ItmatchError(f"backend {spec!r}: {key} must be >= 1")
    return out


def resolve_spec(spec: str, n_vectors: int) -> str:
    """'auto' becomes a concrete spec for the corpus size; others are checked and kept."""
    name, params = parse_spec(spec)
    if name == "auto":
        if n_vectors <= 200_000:
            return "flat"
        return f"ivf:nlist={int(4 * math.sqrt(n_vectors))},nprobe=16"
    if name not in ("flat", "ivf", "hnsw", "qdrant"):
        raise ItmatchError(f"unknown backend {name!r} (use flat, ivf, hnsw, qdrant or auto)")
    if name != "qdrant":
        FaissIndex._params(spec)
    return spec


class FaissIndex:
    """A FAISS index with ids, written with faiss.write_index (FAISS's own format, no pickle)."""

    DEFAULTS = {"flat": {}, "ivf": {"nlist": 1024, "nprobe": 16},
                "hnsw": {"m": 32, "ef_search": 64, "ef_construction": 80}}

    def __init__(self, path: Path, dim: int, spec: str = "flat"):
        import faiss

        self.path, self.dim, self.spec = Path(path), int(dim), spec
        self.kind, self.params = self._params(spec)
        if self.path.is_file():
            self.index = faiss.read_index(str(self.path))
            if self.index.d != self.dim:
                raise ItmatchError(f"{self.path}: vectors of dimension {self.index.d}, expected {self.dim}")
        else:
            self.index = None  # made on the first add (IVF trains on it)
        self._configure()

    @classmethod
    def _params(cls, spec: str) -> tuple[str, dict[str, int]]:
        name, params = parse_spec(spec)
        if name not in cls.DEFAULTS:
            raise ItmatchError(f"unknown FAISS index {name!r} (use flat, ivf or hnsw)")
        return name, _int_params(spec, params, cls.DEFAULTS[name])

    def _configure(self) -> None:
        import faiss

        if self.index is None:
            return
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = self.params["ef_search"]

    def _new(self, vectors: np.ndarray):
        import faiss

        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params["m"], faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params["ef_construction"]
            return faiss.IndexIDMap2(inner)
        nlist = min(self.params["nlist"], max(1, len(vectors)))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.train(vectors)
        return index

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return
        if self.index is None:
            self.index = self._new(vectors)
            self._configure()
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        import faiss

        if self.index is None or len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.kind == "hnsw":
            # HNSW graphs cannot drop nodes: rebuild from the vectors that stay.
            keep = np.setdiff1d(faiss.vector_to_array(self.index.id_map), ids)
            vectors = np.stack([self.index.reconstruct(int(i)) for i in keep]) if len(keep) else None
            self.index = None
            if vectors is not None:
                self.add(keep, vectors)
            return
        self.index.remove_ids(faiss.IDSelectorBatch(ids))

    def reset(self) -> None:
        self.index = None
        self.path.unlink(missing_ok=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.index is None or self.index.ntotal == 0:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        return self.index.search(queries, k)

    def save(self) -> None:
        import faiss

        if self.index is None:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(self.path)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)


_QDRANT_CLIENTS: dict[str, object] = {}  # local mode locks its folder: one client per folder, shared


class QdrantIndex:
    """A Qdrant collection through qdrant-client: local mode in `folder` (no server), or a server by url.

    Collections are named `<prefix><side>`; `prefix` (a `prefix=` parameter) keeps several indexes
    apart on one server."""

    def __init__(self, folder: Path, name: str, dim: int, spec: str = "qdrant"):
        from qdrant_client import QdrantClient, models

        _, params = parse_spec(spec)
        unknown = set(params) - {"url", "prefix"}
        if unknown:
            raise ItmatchError(f"backend {spec!r}: unknown parameter {sorted(unknown)[0]!r} (known: url, prefix)")
        self.models, self.dim, self.name = models, int(dim), params.get("prefix", "") + name
        self.key = params.get("url") or str(Path(folder).resolve())
        if self.key not in _QDRANT_CLIENTS:
            _QDRANT_CLIENTS[self.key] = QdrantClient(url=params["url"]) if "url" in params \
                else QdrantClient(path=str(folder))
        self.client = _QDRANT_CLIENTS[self.key]
        self._create()

    def _create(self) -> None:
        if not self.client.collection_exists(self.name):
            self.client.create_collection(
                self.name, vectors_config=self.models.VectorParams(size=self.dim, distance=self.models.Distance.DOT))

    def reset(self) -> None:
        self.client.delete_collection(self.name)
        self._create()

    def add(self, ids: np.ndarray, vectors: np.ndarray, batch: int = 1024) -> None:
        for start in range(0, len(ids), batch):
            self.client.upsert(self.name, points=self.models.Batch(
                ids=[int(i) for i in ids[start:start + batch]],
                vectors=np.asarray(vectors[start:start + batch], np.float32).tolist()))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.client.delete(self.name, points_selector=self.models.PointIdsList(points=[int(i) for i in ids]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.zeros((len(queries), k), np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, q in enumerate(np.asarray(queries, np.float32)):
            hits = self.client.query_points(self.name, query=q.tolist(), limit=k).points
            for j, hit in enumerate(hits):
                scores[row, j], ids[row, j] = hit.score, int(hit.id)
        return scores, ids

    def save(self) -> None:
        pass  # every call is persisted by the client

    def close(self) -> None:
        client = _QDRANT_CLIENTS.pop(self.key, None)
        if client is not None:
            client.close()

    def __len__(self) -> int:
        return int(self.client.count(self.name, exact=True).count)


def open_index(folder: Path, name: str, dim: int, spec: str):
    """The vector index `name` (one per side and kind of vector) of an index folder."""
    kind, _ = parse_spec(spec)
    if kind == "qdrant":
        return QdrantIndex(folder / "qdrant", name, dim, spec)
    return FaissIndex(folder / f"{name}.faiss", dim, spec)

