"""What can be indexed: a folder of images, a CSV/JSONL table of image paths and/or captions, or a
split of a precomp folder (region features, with the scenes image files when present).

A collection is read into `Item`s: an image (a file, or a row of precomputed features) or a
caption (its text, and the key of the image it describes when known). Keys are stable strings
(relative paths, original ids), so `index add` / `remove` and resumed builds name items the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from itmatch.errors import ItmatchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass
class Item:
    side: str  # "image" | "caption"
    key: str
    path: str | None = None  # absolute image file, when the item has one
    caption: str | None = None
    image_key: str | None = None  # a caption's image
    feature_row: int | None = None  # precomp: the row of the region features
    feature_source: str | None = None  # precomp: "root:split" the row belongs to
    checksum: str = ""


@dataclass
class Collection:
    items: list[Item]
    source: str  # what was read, for the manifest
    precomp: tuple[str, str] | None = None  # (root, split) when images are feature rows


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _image_item(key: str, path: Path, feature_row: int | None = None) -> Item:
    checksum = file_sha256(path) if path.is_file() else ""
    return Item("image", key, path=str(path.resolve()) if path.is_file() else None, feature_row=feature_row,
                checksum=checksum)


def _caption_item(key: str, text: str, image_key: str | None) -> Item:
    return Item("caption", key, caption=text, image_key=image_key, checksum=text_sha256(text))


def read_image_folder(root: Path) -> Collection:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ItmatchError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return Collection([_image_item(p.relative_to(root).as_posix(), p) for p in files], source=str(root.resolve()))


def _table_rows(path: Path) -> list[dict]:
    from itmatch.data.captions import _read_table_rows

    return _read_table_rows(path)


def read_table(path: Path) -> Collection:
    """Rows with an `image` column, a `caption` column or both (a caption then describes that image)."""
    rows = _table_rows(path)
    if not rows:
        raise ItmatchError(f"{path} holds no rows")
    if not any("image" in r or "caption" in r for r in rows):
        raise ItmatchError(f"{path} needs an 'image' and/or a 'caption' column")
    items: list[Item] = []
    seen_images: set[str] = set()
    line_offset = 2 if path.suffix.lower() == ".csv" else 1
    for i, r in enumerate(rows):
        name = str(r.get("image") or "").strip()
        text = str(r.get("caption") or "").strip()
        if not name and not text:
            raise ItmatchError(f"{path} row {i + line_offset}: neither an image nor a caption")
        if name and name not in seen_images:
            file = path.parent / name
            if not file.is_file():
                raise ItmatchError(f"{path} row {i + line_offset}: image not found: {file}")
            seen_images.add(name)
            items.append(_image_item(name, file))
        if text:
            key = str(r.get("caption_id") or f"{path.name}:{i + line_offset}")
            items.append(_caption_item(key, text, name or None))
    return Collection(items, source=str(path.resolve()))


def read_precomp(root: Path, split: str) -> Collection:
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.html_report import image_file

    s = load_split(root, split)
    items = []
    for row, image_id in enumerate(s.image_ids):
        file = image_file(s, row)
        item = _image_item(str(image_id), file) if file is not None else Item("image", str(image_id))
        item.feature_row, item.feature_source = row, f"{root.resolve()}:{split}"
        items.append(item)
    for c, text in enumerate(s.captions):
        key = s.caption_ids[c] if s.caption_ids is not None else f"{split}:{c}"
        items.append(_caption_item(str(key), text, str(s.image_ids[int(s.caption_to_image[c])])))
    return Collection(items, source=f"{root.resolve()}:{split}", precomp=(str(root.resolve()), split))


def read_collection(path: str | Path, split: str | None = None) -> Collection:
    """A folder of images, a .csv/.jsonl table, or (with `split`, or a folder holding
    `test_caps.txt`) a precomp split."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise ItmatchError(f"{path}: a collection file must be .csv or .jsonl")
        return read_table(path)
    if not path.is_dir():
        raise ItmatchError(f"collection not found: {path}")
    if split is not None:
        return read_precomp(path, split)
    if (path / "test_caps.txt").is_file():
        return read_precomp(path, "test")
    return read_image_folder(path)


def collection_digest(collection: Collection) -> str:
    """Identifies a collection's content: a resumed build must read the same items."""
    h = hashlib.sha256()
    for it in collection.items:
        h.update(json.dumps([it.side, it.key, it.checksum]).encode())
    return h.hexdigest()
