"""An index folder on disk: manifest, SQLite metadata, encodings in chunks, vector indexes.

    manifest.json            format, state (building | complete), model hash and checkpoint, kind,
                             backend spec, collection source; written atomically
    items.sqlite             one row per item: id, side, key, path, caption, image_key,
                             feature_row, checksum, and where its encoding lives (chunk, row)
    encodings/*.safetensors  one file per encoded batch: ids + the model's encodings (global
                             vectors, sets, or fragments with their mask); never pickled
    image.faiss, caption.faiss   the vector indexes (or qdrant/ for the Qdrant backend)

A batch's chunk file is written before its rows point at it, in one transaction: a build killed
at any moment leaves every item either encoded exactly once or not at all, and a rerun encodes the
rest. A chunk no row points at (killed between the two steps) is deleted when the store opens.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from itmatch.errors import ItmatchError
from itmatch.files import atomic_write_text
from itmatch.models.contract import Encoding, Fragments, cat_encodings
from itmatch.retrieval.collection import Item

FORMAT = "itmatch-index"
MANIFEST = "manifest.json"
DB = "items.sqlite"
CHUNKS = "encodings"
SIDES = ("image", "caption")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    side TEXT NOT NULL,
    key TEXT NOT NULL,
    path TEXT,
    caption TEXT,
    image_key TEXT,
    feature_row INTEGER,
    feature_source TEXT,
    checksum TEXT NOT NULL,
    chunk TEXT,
    chunk_row INTEGER,
    UNIQUE (side, key)
);
CREATE INDEX IF NOT EXISTS items_checksum ON items (side, checksum);
"""


def model_hash(checkpoint: Path) -> str:
    """sha256 of the checkpoint's weights: the identity of the model an index was encoded with."""
    from itmatch.checkpoint import WEIGHTS
    from itmatch.retrieval.collection import file_sha256

    return file_sha256(Path(checkpoint) / WEIGHTS)


def is_index(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


class Store:
    def __init__(self, folder: str | Path, create: bool = False):
        self.folder = Path(folder)
        if not create and not is_index(self.folder):
            raise ItmatchError(f"not an itmatch index: {self.folder} has no {MANIFEST}")
        (self.folder / CHUNKS).mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the server reads metadata from its worker threads; writes happen
        # only in the single-threaded commands.
        self.db = sqlite3.connect(self.folder / DB, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.lock = threading.Lock()  # one statement at a time on the shared connection
        self.db.executescript(SCHEMA)
        self._drop_orphan_chunks()

    # ------------------------------------------------------------------ manifest
    @property
    def manifest(self) -> dict:
        try:
            data = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ItmatchError(f"corrupt index manifest {self.folder / MANIFEST}: {exc}") from None
        if data.get("format") != FORMAT:
            raise ItmatchError(f"{self.folder / MANIFEST} is not an {FORMAT} manifest")
        return data

    def write_manifest(self, data: dict) -> None:
        atomic_write_text(self.folder / MANIFEST, json.dumps({"format": FORMAT, **data}, indent=2) + "\n")

    # ------------------------------------------------------------------ items
    def insert(self, items: list[Item]) -> int:
        """Insert items not yet present (by side and key); returns how many were new."""
        before = self.db.total_changes
        values = [(it.side, it.key, it.path, it.caption, it.image_key, it.feature_row, it.feature_source, it.checksum)
                  for it in items]
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO items (side, key, path, caption, image_key, feature_row, feature_source, "
                "checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
        return self.db.total_changes - before

    def pending(self, side: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM items WHERE side = ? AND chunk IS NULL ORDER BY id", (side,)).fetchall()

    def count(self, side: str | None = None, encoded: bool = False) -> int:
        sql, args = "SELECT COUNT(*) FROM items WHERE 1", []
        if side is not None:
            sql, args = sql + " AND side = ?", [side]
        if encoded:
            sql += " AND chunk IS NOT NULL"
        return int(self.db.execute(sql, args).fetchone()[0])

    def get(self, item_id: int) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute("SELECT * FROM items WHERE id = ?", (int(item_id),)).fetchone()

    def rows(self, ids) -> dict[int, sqlite3.Row]:
        ids = [int(i) for i in ids]
        out = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            with self.lock:
                found = self.db.execute(f"SELECT * FROM items WHERE id IN ({marks})", part).fetchall()
            out.update((int(r["id"]), r) for r in found)
        return out

    def find_by_checksum(self, side: str, checksum: str) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute("SELECT * FROM items WHERE side = ? AND checksum = ? AND chunk IS NOT NULL "
                                   "ORDER BY id LIMIT 1", (side, checksum)).fetchone()

    def ids_for_keys(self, keys: list[str]) -> list[tuple[int, str]]:
        found = []
        for key in keys:
            found += [(int(r["id"]), r["side"]) for r in
                      self.db.execute("SELECT id, side FROM items WHERE key = ?", (key,))]
        return found

    def delete(self, ids: list[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    # ------------------------------------------------------------------ encodings
    def write_chunk(self, side: str, ids: list[int], enc: Encoding) -> None:
        name = f"{side}-{uuid.uuid4().hex}.safetensors"
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64)}
        if isinstance(enc, Fragments):
            tensors.update(features=enc.features.contiguous(), mask=enc.mask.to(torch.uint8).contiguous())
        else:
            tensors["enc"] = enc.contiguous()
        tmp = self.folder / CHUNKS / (name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / CHUNKS / name)
        with self.db:
            self.db.executemany("UPDATE items SET chunk = ?, chunk_row = ? WHERE id = ?",
                                [(name, row, int(i)) for row, i in enumerate(ids)])

    def _drop_orphan_chunks(self) -> None:
        used = {r[0] for r in self.db.execute("SELECT DISTINCT chunk FROM items WHERE chunk IS NOT NULL")}
        for path in (self.folder / CHUNKS).iterdir():
            if path.name not in used:
                path.unlink()

    def load_encodings(self, side: str, ids=None) -> tuple[np.ndarray, Encoding | None]:
        """(ids, encodings) of the encoded items of a side (all, or those in `ids`), in id order."""
        sql = "SELECT id, chunk, chunk_row FROM items WHERE side = ? AND chunk IS NOT NULL ORDER BY id"
        rows = self.db.execute(sql, (side,)).fetchall()
        if ids is not None:
            wanted = {int(i) for i in ids}
            rows = [r for r in rows if int(r["id"]) in wanted]
        if not rows:
            return np.zeros(0, np.int64), None
        by_chunk: dict[str, list] = {}
        for r in rows:
            by_chunk.setdefault(r["chunk"], []).append(r)
        parts, order = [], []
        for chunk, members in by_chunk.items():
            t = load_file(str(self.folder / CHUNKS / chunk))
            sel = torch.tensor([int(m["chunk_row"]) for m in members])
            if "features" in t:
                parts.append(Fragments(t["features"][sel], t["mask"][sel].bool()))
            else:
                parts.append(t["enc"][sel])
            order += [int(m["id"]) for m in members]
        enc = cat_encodings(parts)
        perm = torch.from_numpy(np.argsort(np.asarray(order), kind="stable"))
        return np.sort(np.asarray(order, np.int64)), enc[perm]

    def close(self) -> None:
        self.db.close()


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
