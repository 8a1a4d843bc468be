"""`itmatch data inspect DIR`: validate a SCAN precomp folder, or image files with caption tables
(`{split}.csv` / `{split}.jsonl` in DIR, or one table given as the path), and summarise each split.

Loading goes through `load_split`, so every format error is the same `ItmatchError` training would
raise. Features stay memory-mapped; the NaN/inf scan streams them in bounded chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from itmatch.data.precomp import find_nonfinite_rows, find_splits, load_split, split_files
from itmatch.errors import ItmatchError

_SHOW_ROWS = 10


def inspect_split(root: str | Path, split: str, chunk_rows: int | None = None) -> dict:
    """A JSON-ready summary of one split (raises `ItmatchError` when the split is invalid)."""
    files = split_files(root, split)
    has_features = files["ims"].is_file()
    data = load_split(root, split, features=has_features)
    counts = np.bincount(data.caption_to_image, minlength=data.n_images)
    per_image = data.captions_per_image
    words = np.array([len(c.split()) for c in data.captions], dtype=np.int64)
    summary: dict = {
        "split": split,
        "n_images": data.n_images,
        "n_captions": data.n_captions,
        "captions_per_image": per_image,
        "captions_per_image_histogram": None,
        "cap2img_file": data.extra["has_cap2img"],
        "features": None,
        "image_ids": {"present": data.extra["has_ids"], "unique": len(set(data.image_ids)) == data.n_images},
        "caption_ids": {
            "present": data.caption_ids is not None,
            "unique": data.caption_ids is not None and len(set(data.caption_ids)) == data.n_captions,
        },
        "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 2), "max": int(words.max())},
        "nonfinite_rows": None,
        "boxes": None if data.boxes is None else list(data.boxes.shape),
        "box_unit": None if data.boxes is None else ("pixels" if data.image_sizes is not None else "relative"),
        "relevance": None,
        "twins": None if data.twins is None else int(len(data.twins)),
    }
    if per_image is None:
        values, freq = np.unique(counts, return_counts=True)
        summary["captions_per_image_histogram"] = {str(int(v)): int(f) for v, f in zip(values, freq)}
    if data.relevance is not None:
        rel = data.relevance
        own = int(np.asarray(rel[np.arange(data.n_captions), data.caption_to_image]).sum())
        nnz = int(rel.count_nonzero())
        summary["relevance"] = {"nnz": nnz, "beyond_own_image": nnz - own}
    if has_features:
        bad = find_nonfinite_rows(data.features, chunk_rows, progress=True)
        summary["features"] = {
            "file": files["ims"].name,
            "shape": list(data.features.shape),
            "dtype": str(data.features.dtype),
            "bytes": int(files["ims"].stat().st_size),
        }
        summary["nonfinite_rows"] = {"count": int(len(bad)), "first": bad[:_SHOW_ROWS].tolist()}
    return summary


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def format_summary(s: dict) -> str:
    if s["captions_per_image"] is not None:
        per = f"{s['captions_per_image']} per image"
    else:
        per = "per image varies: " + ", ".join(f"{k}x{v}" for k, v in s["captions_per_image_histogram"].items())
    lines = [f"split {s['split']}: {s['n_images']} images, {s['n_captions']} captions ({per})"]
    f = s["features"]
    lines.append(f"  features   {f['file']} {tuple(f['shape'])} {f['dtype']} {_mib(f['bytes'])}" if f
                 else "  features   none (no ims.npy)")
    w = s["caption_words"]
    lines.append(f"  captions   words min {w['min']} / mean {w['mean']} / max {w['max']}; "
                 + ("cap2img file" if s["cap2img_file"] else "k per image in order"))
    ids, cids = s["image_ids"], s["caption_ids"]
    lines.append("  ids        image ids " + ("from file" if ids["present"] else "default 0..N-1")
                 + ("" if ids["unique"] else " (NOT unique)") + "; caption ids "
                 + (("from file" + ("" if cids["unique"] else " (NOT unique)")) if cids["present"] else "none"))
    extras = []
    extras.append(f"boxes {tuple(s['boxes'])} in {s['box_unit']}" if s["boxes"] else "no boxes")
    rel = s["relevance"]
    extras.append(f"relevance {rel['nnz']} positives ({rel['beyond_own_image']} beyond own image)" if rel
                  else "no relevance")
    extras.append(f"{s['twins']} twins" if s["twins"] is not None else "no twins")
    lines.append("  extras     " + ", ".join(extras))
    bad = s["nonfinite_rows"]
    if bad is not None:
        if bad["count"]:
            more = " ..." if bad["count"] > len(bad["first"]) else ""
            lines.append(f"  PROBLEM    NaN or inf in {bad['count']} rows: {', '.join(map(str, bad['first']))}{more}")
        else:
            lines.append("  finite     every feature row is finite")
    return "\n".join(lines)


def _table_splits(path: Path, wanted: list[str] | None) -> list[tuple[str, Path, str | None]]:
    """(split name, table file, split to select in it or None) for a table folder or one table file."""
    if path.is_file():
        from itmatch.data.captions import _read_table_rows

        rows = _read_table_rows(path)
        names = sorted({str(r["split"]) for r in rows if "split" in r}) if rows and "split" in rows[0] else []
        if not names:
            return [(path.stem, path, None)]
        return [(name, path, name) for name in (wanted or names)]
    tables = {p.stem: p for ext in ("csv", "jsonl") for p in sorted(path.glob(f"*.{ext}")) if p.is_file()}
    names = wanted or sorted(tables)
    missing = [n for n in names if n not in tables]
    if missing:
        raise ItmatchError(f"{path} has no {missing[0]}.csv or {missing[0]}.jsonl")
    return [(name, tables[name], None) for name in names]


def inspect_table(name: str, table: Path, select: str | None) -> dict:
    """A JSON-ready summary of a caption table; every image file is checked to exist and to open as
    an image (its header only), so a bad file fails here rather than mid-epoch."""
    from PIL import Image, UnidentifiedImageError

    from itmatch.data.captions import load_table

    data = load_table(table, split=select)
    sizes: dict[str, int] = {}
    for path in data.image_paths:
        try:
            with Image.open(path) as im:
                key = f"{im.format} {im.width}x{im.height}"
        except (UnidentifiedImageError, OSError) as exc:
            raise ItmatchError(f"{path} (named in {table}) is not a readable image: {exc}") from None
        sizes[key] = sizes.get(key, 0) + 1
    words = np.array([len(c.split()) for c in data.captions], dtype=np.int64)
    counts = np.bincount(data.caption_to_image, minlength=data.n_images)
    return {"split": name, "table": str(table), "n_images": data.n_images, "n_captions": data.n_captions,
            "captions_per_image": {"min": int(counts.min()), "max": int(counts.max())},
            "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 2), "max": int(words.max())},
            "image_formats": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:5])}


def format_table_summary(s: dict) -> str:
    per = s["captions_per_image"]
    per_text = str(per["min"]) if per["min"] == per["max"] else f"{per['min']}-{per['max']}"
    w = s["caption_words"]
    formats = ", ".join(f"{n}x {k}" for k, n in s["image_formats"].items())
    return "\n".join([
        f"split {s['split']}: {s['n_images']} images, {s['n_captions']} captions ({per_text} per image) "
        f"from {s['table']}",
        f"  images     every file exists and opens: {formats}",
        f"  captions   words min {w['min']} / mean {w['mean']} / max {w['max']}",
    ])


def _print_summaries(root, summaries: list[dict], fmt, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"root": str(root), "splits": summaries}, indent=2))
        return
    print(f"{root}")
    for summary in summaries:
        print(fmt(summary))


def cmd_inspect(args) -> int:
    """Exit 0 when every split is valid, 1 when features hold NaN/inf; bad folders raise (exit 2)."""
    root = Path(args.dir)
    if root.is_file() and root.suffix.lower() in (".csv", ".jsonl"):
        splits = []
    elif not root.is_dir():
        raise ItmatchError(f"data folder not found: {root}")
    else:
        splits = args.split or find_splits(root)
    if not splits:
        tables = _table_splits(root, args.split)
        if not tables:
            raise ItmatchError(f"{root} holds no {{split}}_caps.txt file (not a SCAN precomp folder) and no "
                               "{split}.csv / {split}.jsonl caption tables (see docs/data.md)")
        _print_summaries(root, [inspect_table(*t) for t in tables], format_table_summary, args.json)
        return 0
    summaries = [inspect_split(root, s) for s in splits]
    _print_summaries(root, summaries, format_summary, args.json)
    has_nonfinite = any(s["nonfinite_rows"] and s["nonfinite_rows"]["count"] for s in summaries)
    return 1 if has_nonfinite else 0
