"""Image files with captions: Karpathy split json, or a simple CSV / JSONL table.

Both loaders return a `RetrievalSplit` with `image_paths` set and no features; images are read
later, one at a time, by the datasets. Every image file is checked to exist at load time, so a
wrong `image_root` fails at once with the first missing paths rather than mid-epoch.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError

# Split names accepted by `load_karpathy` and the json "split" values they select.
_KARPATHY_SPLITS = {
    "train": ("train",),
    "restval": ("restval",),
    "dev": ("val",),
    "val": ("val",),
    "test": ("test",),
    "testall": ("test",),  # SCAN's name for the full 5K COCO test; Karpathy's "test" already is that
}


def _check_images_exist(paths: list[Path], source: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ItmatchError(f"{len(missing)} image files named in {source} are missing: {shown}{more}")


def load_karpathy(
    json_path: str | Path, image_root: str | Path, split: str, *, include_restval: bool = False
) -> RetrievalSplit:
    """One split of `dataset_coco.json` / `dataset_flickr30k.json` with its image folder.

    split: train (plus restval when include_restval), dev / val, test (testall is an alias of
    test). Image ids are COCO ids when the json has `cocoid`, else the file name without suffix
    (the Flickr id); caption ids are Karpathy's `sentid`. Every sentence is kept, so COCO images
    with 6 or 7 captions keep them all.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if split not in _KARPATHY_SPLITS:
        raise ItmatchError(f"unknown Karpathy split {split!r} (use {', '.join(_KARPATHY_SPLITS)})")
    wanted = set(_KARPATHY_SPLITS[split]) | ({"restval"} if include_restval and split == "train" else set())
    if not json_path.is_file():
        raise ItmatchError(f"Karpathy json not found: {json_path}")
    if not image_root.is_dir():
        raise ItmatchError(f"image folder not found: {image_root}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItmatchError(f"{json_path} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ItmatchError(f"{json_path} has no 'images' list: not a Karpathy split file")

    captions, cap2img, caption_ids, image_ids, paths = [], [], [], [], []
    for n, entry in enumerate(data["images"]):
        try:
            if entry["split"] not in wanted:
                continue
            filename = entry["filename"]
            sentences = entry["sentences"]
        except (KeyError, TypeError):
            raise ItmatchError(f"{json_path}: images[{n}] lacks 'split', 'filename' or 'sentences'") from None
        row = len(image_ids)
        sub = image_root / entry["filepath"] / filename if entry.get("filepath") else image_root / filename
        paths.append(sub)
        image_ids.append(str(entry["cocoid"]) if "cocoid" in entry else Path(filename).stem)
        for s in sentences:
            raw = (s.get("raw") or " ".join(s.get("tokens", []))).strip()
            if not raw:
                raise ItmatchError(f"{json_path}: empty sentence {s.get('sentid')} of image {filename}")
            captions.append(raw)
            cap2img.append(row)
            caption_ids.append(str(s.get("sentid", len(caption_ids))))
    if not image_ids:
        raise ItmatchError(f"{json_path} has no images in split {split!r}")
    if not captions:
        raise ItmatchError(f"{json_path}: the images of split {split!r} have no sentences")
    _check_images_exist(paths, json_path)
    return RetrievalSplit(
        name=split,
        root=image_root,
        captions=captions,
        caption_to_image=np.asarray(cap2img, dtype=np.int64),
        image_ids=image_ids,
        caption_ids=caption_ids,
        image_paths=paths,
        extra={"format": "karpathy", "annotations": str(json_path)},
    )


def _read_table_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise ItmatchError(f"{path} line {line} is not valid UTF-8") from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise ItmatchError(f"{path} is not valid CSV: {exc}") from None
        if any(None in r for r in rows):  # a row with more fields than the header
            bad = next(i for i, r in enumerate(rows) if None in r)
            raise ItmatchError(f"{path} row {bad + 2} has more fields than the header")
        return rows
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ItmatchError(f"{path} line {i + 1} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ItmatchError(f"{path} line {i + 1} must be a JSON object")
            rows.append(row)
        return rows
    raise ItmatchError(f"{path}: unknown table format {suffix!r} (use .csv or .jsonl)")


def load_table(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> RetrievalSplit:
    """Captions from a .csv or .jsonl table with columns `image` and `caption`.

    Several rows naming one image are several captions of it; images are numbered in order of
    first appearance. Image paths are relative to `image_root` (default: the table's folder).
    Optional columns: `split` (rows filtered by it when `split` is given; dev and val are
    synonyms), `image_id`, `caption_id` (original ids); any other column is kept per caption in
    `extra["rows"]`.
    """
    path = Path(path)
    if not path.is_file():
        raise ItmatchError(f"caption table not found: {path}")
    base = Path(image_root) if image_root is not None else path.parent
    rows = _read_table_rows(path)
    if not rows:
        raise ItmatchError(f"{path} holds no rows")
    columns = set(rows[0])
    for need in ("image", "caption"):
        if any(need not in r for r in rows):
            raise ItmatchError(f"{path} needs an '{need}' column (found: {', '.join(sorted(columns))})")
    numbered = list(enumerate(rows))
    if split is not None:
        if any("split" not in r for r in rows):
            raise ItmatchError(f"{path} has no 'split' column to select split {split!r} from")
        accepted = {"dev", "val"} if split in ("dev", "val") else {split}
        numbered = [(i, r) for i, r in numbered if str(r["split"]) in accepted]
        if not numbered:
            found = sorted({str(r["split"]) for r in rows})
            raise ItmatchError(f"{path} has no rows with split {split!r} (found: {', '.join(found)})")

    line_offset = 2 if path.suffix.lower() == ".csv" else 1  # CSV row 1 is the header
    captions, cap2img, image_ids, paths, extras = [], [], [], [], []
    caption_ids: list[str] | None = [] if all("caption_id" in r for _, r in numbered) else None
    row_of: dict[str, int] = {}
    known = {"image", "caption", "split", "image_id", "caption_id"}
    for i, r in numbered:
        caption = str(r["caption"] if r["caption"] is not None else "").strip()
        if not caption:
            raise ItmatchError(f"{path} row {i + line_offset}: empty caption")
        name = str(r["image"]).strip()
        if not name:
            raise ItmatchError(f"{path} row {i + line_offset}: empty image path")
        if name not in row_of:
            row_of[name] = len(image_ids)
            image_ids.append(str(r["image_id"]) if r.get("image_id") not in (None, "") else name)
            paths.append(base / name)
        elif r.get("image_id") not in (None, "") and str(r["image_id"]) != image_ids[row_of[name]]:
            raise ItmatchError(
                f"{path} row {i + line_offset}: image {name} has image_id {r['image_id']} but "
                f"{image_ids[row_of[name]]} earlier"
            )
        captions.append(caption)
        cap2img.append(row_of[name])
        if caption_ids is not None:
            caption_ids.append(str(r["caption_id"]))
        extras.append({k: v for k, v in r.items() if k not in known})
    _check_images_exist(paths, path)
    extra = {"format": path.suffix.lower().lstrip("."), "annotations": str(path)}
    if any(extras):
        extra["rows"] = extras
    return RetrievalSplit(
        name=split or path.stem,
        root=base,
        captions=captions,
        caption_to_image=np.asarray(cap2img, dtype=np.int64),
        image_ids=image_ids,
        caption_ids=caption_ids,
        image_paths=paths,
        extra=extra,
    )
