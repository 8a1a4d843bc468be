"""SCAN "precomp" folders: region features as memory-mapped .npy plus caption text files.

Files of a split `S` inside one folder (see docs/data.md):

    S_ims.npy       N_img x R x F floating region features (required unless features=False)
    S_caps.txt      one caption per line (required)
    S_cap2img.txt   one image row per caption line (optional; without it captions must come
                    k per image, in image order, and caption c belongs to image c // k)
    S_ids.txt       one image id per line (optional; default "0".."N-1")
    S_capids.txt    one caption id per line (optional, e.g. COCO caption annotation ids)
    S_boxes.npy     N_img x R x 4 region boxes x1, y1, x2, y2 (optional)
    S_image_sizes.npy N_img x 2 image width, height: the pixel unit of S_boxes.npy (optional; without
                    it boxes must already be relative to the image, in [0, 1], unless the folder is
                    a scenes benchmark whose scenes.json gives the image size)
    S_relevance.npz scipy.sparse captions x images extended positives (optional)
    S_twins.npy     K x 2 image rows of hard-negative twins (optional)

Arrays are opened with `mmap_mode="r"`: nothing is read until a row is indexed, so a 31 GiB COCO
train file costs no memory. Their headers are checked against the file size first, because a
truncated .npy maps fine and only fails (or returns garbage) when the missing rows are read.
"""

from __future__ import annotations

import json
import mmap
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError

# Bytes of features scanned per chunk by the NaN/inf check: bounded memory whatever the file size.
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # bytes before the array data
    file_size: int


def split_files(root: str | Path, split: str) -> dict[str, Path]:
    """The path of every file a split may have, present or not."""
    root = Path(root)
    return {
        "ims": root / f"{split}_ims.npy",
        "caps": root / f"{split}_caps.txt",
        "cap2img": root / f"{split}_cap2img.txt",
        "ids": root / f"{split}_ids.txt",
        "capids": root / f"{split}_capids.txt",
        "boxes": root / f"{split}_boxes.npy",
        "image_sizes": root / f"{split}_image_sizes.npy",
        "relevance": root / f"{split}_relevance.npz",
        "twins": root / f"{split}_twins.npy",
    }


def find_splits(root: str | Path) -> list[str]:
    """Names of the splits in a folder (every `{split}_caps.txt`), sorted."""
    return sorted(p.name[: -len("_caps.txt")] for p in Path(root).glob("*_caps.txt") if p.is_file())


def read_npy_header(path: str | Path) -> NpyHeader:
    """Parse a .npy header without reading data; refuse files whose size disagrees with it."""
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            version = np.lib.format.read_magic(fp)
            # Version 3 differs from 2 only by a utf-8 (instead of latin-1) header; ASCII headers read alike.
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = reader(fp)
            offset = fp.tell()
    except (ValueError, EOFError, SyntaxError) as exc:
        raise ItmatchError(f"{path} is not a valid .npy file (corrupt header: {exc})") from None
    except OSError as exc:
        raise ItmatchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if dtype.hasobject:
        raise ItmatchError(f"{path} holds Python objects (dtype {dtype}); only plain numeric arrays are accepted")
    size = path.stat().st_size
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "corrupt"
        raise ItmatchError(
            f"{path} is {what}: its header declares shape {tuple(shape)} {dtype} ({expected} bytes) "
            f"but the file has {size} bytes"
        )
    return NpyHeader(tuple(int(s) for s in shape), dtype, bool(fortran_order), offset, size)


def open_npy(path: str | Path) -> np.ndarray:
    """Memory-map a validated .npy file read-only (no data is read)."""
    read_npy_header(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ItmatchError(f"cannot map {path}: {exc}") from None


def read_lines(path: str | Path) -> list[str]:
    """UTF-8 text lines without line endings; a bad byte is an error naming its line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ItmatchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ItmatchError(f"{path} line {line} is not valid UTF-8 (byte {data[exc.start]:#04x})") from None
    if not text:
        return []
    # split("\n") rather than splitlines(): captions may hold \x0b, \x1c or U+2028, which are not line ends here.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _line_numbers(rows, limit: int = 5) -> str:
    rows = [int(r) + 1 for r in rows]
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def read_captions(path: str | Path) -> list[str]:
    """Captions, one per line; empty or blank lines are an error naming them."""
    lines = read_lines(path)
    captions = [ln.strip() for ln in lines]
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        raise ItmatchError(f"{path}: empty caption on line {_line_numbers(empty)}")
    if not captions:
        raise ItmatchError(f"{path} holds no captions")
    return captions


def read_int_lines(path: Path) -> np.ndarray:
    values = []
    for i, ln in enumerate(read_lines(path)):
        try:
            values.append(int(ln.strip()))
        except ValueError:
            raise ItmatchError(f"{path} line {i + 1}: expected an integer image row, got {ln.strip()!r}") from None
    return np.asarray(values, dtype=np.int64)


def caption_to_image_rows(n_captions: int, n_images: int, caps_name: str, cap2img_name: str) -> np.ndarray:
    """The k-per-image rule: caption c belongs to image c // k."""
    if n_images <= 0:
        raise ItmatchError(f"{n_captions} captions for 0 images")
    if n_captions % n_images or n_captions < n_images:
        raise ItmatchError(
            f"{n_captions} captions for {n_images} images: not a whole number per image; give {cap2img_name}"
        )
    return np.arange(n_captions, dtype=np.int64) // (n_captions // n_images)


def _check_features_header(path: Path, header: NpyHeader) -> None:
    if len(header.shape) != 3:
        raise ItmatchError(f"{path} must be N_img x R x F (rank 3), got shape {header.shape}")
    if not np.issubdtype(header.dtype, np.floating):
        raise ItmatchError(f"{path} must hold floating point features, got dtype {header.dtype}")


def _load_relevance(path: Path, n_captions: int, n_images: int):
    import scipy.sparse

    try:
        matrix = scipy.sparse.load_npz(path)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ItmatchError(f"{path} is not a scipy.sparse .npz file: {exc}") from None
    if matrix.shape != (n_captions, n_images):
        raise ItmatchError(
            f"{path} has shape {matrix.shape}, expected captions x images = ({n_captions}, {n_images})"
        )
    return scipy.sparse.csr_matrix(matrix, dtype=bool)


def _load_twins(path: Path, n_images: int) -> np.ndarray:
    header = read_npy_header(path)
    if len(header.shape) != 2 or header.shape[1] != 2 or not np.issubdtype(header.dtype, np.integer):
        raise ItmatchError(f"{path} must be a K x 2 integer array, got shape {header.shape} {header.dtype}")
    twins = np.load(path, allow_pickle=False).astype(np.int64)
    bad = np.flatnonzero(((twins < 0) | (twins >= n_images)).any(axis=1))
    if len(bad):
        raise ItmatchError(
            f"{path}: image rows out of range 0..{n_images - 1} in twin rows {', '.join(map(str, bad[:5]))}"
        )
    return twins


def _manifest_image_size(root: Path) -> float | None:
    """The square image side a scenes benchmark folder's manifest (scenes.json) declares, if any."""
    path = root / "scenes.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = manifest.get("image_size") if isinstance(manifest, dict) else None
    return float(size) if isinstance(size, (int, float)) and size > 0 else None


def _load_image_sizes(path: Path, n_images: int) -> np.ndarray:
    header = read_npy_header(path)
    if header.shape != (n_images, 2) or not (
        np.issubdtype(header.dtype, np.integer) or np.issubdtype(header.dtype, np.floating)
    ):
        raise ItmatchError(f"{path} must be an ({n_images}, 2) numeric array of image width, height; "
                           f"got shape {header.shape} {header.dtype}")
    sizes = np.load(path, allow_pickle=False).astype(np.float64)
    bad = np.flatnonzero(~(np.isfinite(sizes) & (sizes > 0)).all(axis=1))
    if len(bad):
        raise ItmatchError(f"{path}: image width and height must be finite and > 0; not so in rows "
                           f"{', '.join(map(str, bad[:5]))}")
    return sizes


def _check_box_values(path: Path, boxes: np.ndarray, sizes: np.ndarray | None, chunk_rows: int = 4096) -> None:
    """Raise on the first rows whose boxes are not finite, inverted (x2 < x1, y2 < y1) or outside the
    image: [0, W] x [0, H] in pixels, [0, 1] for relative boxes (a tolerance of 1e-3 of the side)."""
    problems: dict[str, list[int]] = {}
    for start in range(0, boxes.shape[0], chunk_rows):
        b = np.asarray(boxes[start : start + chunk_rows], dtype=np.float64)  # (n, R, 4)
        if sizes is None:
            w = h = np.ones((b.shape[0], 1))
        else:
            w, h = sizes[start : start + chunk_rows, :1], sizes[start : start + chunk_rows, 1:]
        x1, y1, x2, y2 = (b[..., k] for k in range(4))
        finite = np.isfinite(b).all(axis=-1)
        tol_w, tol_h = 1e-3 * w, 1e-3 * h
        checks = {
            "NaN or inf": ~finite,
            "x2 < x1 or y2 < y1": finite & ((x2 < x1) | (y2 < y1)),
            "outside the image": finite & ((x1 < -tol_w) | (y1 < -tol_h) | (x2 > w + tol_w) | (y2 > h + tol_h)),
        }
        for what, bad in checks.items():
            rows = start + np.flatnonzero(bad.any(axis=1))
            if len(rows):
                problems.setdefault(what, []).extend(rows[:5].tolist())
    if problems:
        what, rows = next(iter(problems.items()))
        hint = ("" if sizes is not None else
                " (boxes without an image sizes file must be relative to the image, in [0, 1]; "
                f"give {path.name.replace('_boxes.npy', '_image_sizes.npy')} for pixel boxes)")
        raise ItmatchError(f"{path}: boxes {what} in image rows {', '.join(map(str, rows[:5]))}"
                           + (hint if what == "outside the image" else ""))


def _load_boxes(path: Path, sizes_path: Path, root: Path, n_images: int, n_regions: int | None):
    """(boxes memmap, image sizes or None): shapes, values and their pixel unit checked."""
    bh = read_npy_header(path)
    if len(bh.shape) != 3 or bh.shape[0] != n_images or bh.shape[2] != 4 or (
        n_regions is not None and bh.shape[1] != n_regions
    ):
        want = f"({n_images}, {n_regions if n_regions is not None else 'R'}, 4)"
        raise ItmatchError(f"{path} has shape {bh.shape}, expected {want}")
    if not (np.issubdtype(bh.dtype, np.floating) or np.issubdtype(bh.dtype, np.integer)):
        raise ItmatchError(f"{path} must hold numeric boxes, got dtype {bh.dtype}")
    boxes = open_npy(path)
    if sizes_path.is_file():
        sizes = _load_image_sizes(sizes_path, n_images)
    else:
        side = _manifest_image_size(root)
        sizes = None if side is None else np.full((n_images, 2), side)
    _check_box_values(path, boxes, sizes)
    return boxes, sizes


def load_split(
    root: str | Path, split: str, *, features: bool = True, check_finite: bool = False
) -> RetrievalSplit:
    """Load split `split` of a SCAN precomp folder; arrays stay memory-mapped.

    features=False never maps `{split}_ims.npy` (it still reads its header, if present, to count
    images). check_finite=True streams the features once and raises on NaN or inf rows.
    """
    root = Path(root)
    if not root.is_dir():
        raise ItmatchError(f"data folder not found: {root}")
    files = split_files(root, split)
    required = ["caps"] + (["ims"] if features else [])
    missing = [files[k].name for k in required if not files[k].is_file()]
    if missing:
        raise ItmatchError(f"split '{split}' in {root}: missing {', '.join(missing)}")

    # Image count: the features header, else the ids file.
    header = None
    image_ids = None
    if files["ims"].is_file():
        header = read_npy_header(files["ims"])
        _check_features_header(files["ims"], header)
        n_images = header.shape[0]
    elif files["ids"].is_file():
        image_ids = [ln.strip() for ln in read_lines(files["ids"])]
        n_images = len(image_ids)
    else:
        raise ItmatchError(
            f"split '{split}' in {root}: cannot count images without {files['ims'].name} or {files['ids'].name}"
        )

    captions = read_captions(files["caps"])
    n_captions = len(captions)
    if files["cap2img"].is_file():
        cap2img = read_int_lines(files["cap2img"])
        if len(cap2img) != n_captions:
            raise ItmatchError(f"{files['cap2img']} has {len(cap2img)} lines for {n_captions} captions")
        bad = np.flatnonzero((cap2img < 0) | (cap2img >= n_images))
        if len(bad):
            raise ItmatchError(
                f"{files['cap2img']} line {_line_numbers(bad)}: image row out of range 0..{n_images - 1}"
            )
    else:
        cap2img = caption_to_image_rows(n_captions, n_images, files["caps"].name, files["cap2img"].name)

    if image_ids is None:
        if files["ids"].is_file():
            image_ids = [ln.strip() for ln in read_lines(files["ids"])]
            if len(image_ids) != n_images:
                raise ItmatchError(
                    f"{files['ids']} has {len(image_ids)} lines for {n_images} images (rows of {files['ims'].name})"
                )
        else:
            image_ids = [str(i) for i in range(n_images)]

    caption_ids = None
    if files["capids"].is_file():
        caption_ids = [ln.strip() for ln in read_lines(files["capids"])]
        if len(caption_ids) != n_captions:
            raise ItmatchError(f"{files['capids']} has {len(caption_ids)} lines for {n_captions} captions")

    boxes, image_sizes = None, None
    if files["boxes"].is_file():
        n_regions = header.shape[1] if header is not None else None
        boxes, image_sizes = _load_boxes(files["boxes"], files["image_sizes"], root, n_images, n_regions)
    elif files["image_sizes"].is_file():
        raise ItmatchError(f"{files['image_sizes']} is given but {files['boxes'].name} is missing")

    relevance = _load_relevance(files["relevance"], n_captions, n_images) if files["relevance"].is_file() else None
    twins = _load_twins(files["twins"], n_images) if files["twins"].is_file() else None

    feats = open_npy(files["ims"]) if features else None
    result = RetrievalSplit(
        name=split,
        root=root,
        captions=captions,
        caption_to_image=cap2img,
        image_ids=image_ids,
        caption_ids=caption_ids,
        features=feats,
        boxes=boxes,
        image_sizes=image_sizes,
        relevance=relevance,
        twins=twins,
        extra={
            "format": "precomp",
            "features_file": str(files["ims"]),
            "features_shape": header.shape if header is not None else None,
            "features_dtype": str(header.dtype) if header is not None else None,
            "has_cap2img": files["cap2img"].is_file(),
            "has_ids": files["ids"].is_file(),
        },
    )
    if check_finite and feats is not None:
        _raise_on_nonfinite(feats, files["ims"].name)
    return result


def default_chunk_rows(features: np.ndarray) -> int:
    row_bytes = max(1, int(np.prod(features.shape[1:], dtype=np.int64)) * features.dtype.itemsize)
    return max(1, _CHUNK_BYTES // row_bytes)


def _row_chunks(features: np.ndarray, chunk_rows: int):
    """(first row, rows) for each chunk of `chunk_rows` rows.

    A memory-mapped .npy file is read with explicit file reads into one reused buffer: pages touched
    through a map stay resident and count against the process (and a container's memory limit) until
    the map closes, so a full pass over a 5 GiB map peaked at 5.8 GB RSS. Read pages are then dropped
    from the page cache too (posix_fadvise), which a cgroup also charges. Other arrays are sliced.
    """
    n = features.shape[0]
    whole_map = (isinstance(features, np.memmap) and isinstance(features.base, mmap.mmap)
                 and features.filename is not None and features.flags.c_contiguous)
    if not whole_map:
        for start in range(0, n, chunk_rows):
            yield start, np.asarray(features[start : start + chunk_rows])
        return
    row_bytes = int(np.prod(features.shape[1:], dtype=np.int64)) * features.dtype.itemsize
    buf = bytearray(min(n, chunk_rows) * row_bytes)
    with open(features.filename, "rb", buffering=0) as f:
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            view = memoryview(buf)[: rows * row_bytes]
            pos = features.offset + start * row_bytes
            f.seek(pos)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ItmatchError(f"{features.filename} ended early: was it truncated while being read?")
                done += got
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), pos, len(view), os.POSIX_FADV_DONTNEED)
            yield start, np.frombuffer(view, dtype=features.dtype).reshape((rows, *features.shape[1:]))


def find_nonfinite_rows(features: np.ndarray, chunk_rows: int | None = None, progress: bool = False) -> np.ndarray:
    """Rows (first axis) holding any NaN or inf, scanning `chunk_rows` rows at a time.

    Only one chunk is ever in memory, so the peak stays bounded on a memory-mapped 31 GiB file.
    """
    n = features.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(features)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    bar = None
    if progress:
        from itmatch.progress import progress_bar

        bar = progress_bar(-(-n // chunk_rows), "NaN/inf scan", unit="chunk")
    bad = []
    try:
        for start, chunk in _row_chunks(features, chunk_rows):
            flat = chunk.reshape(chunk.shape[0], -1)
            # isfinite().all() on the chunk first: the common all-finite case costs one pass.
            if not np.isfinite(flat).all():
                bad.append(start + np.flatnonzero(~np.isfinite(flat).all(axis=1)))
            del chunk, flat
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, dtype=np.int64)


def _raise_on_nonfinite(features: np.ndarray, name: str, chunk_rows: int | None = None) -> None:
    bad = find_nonfinite_rows(features, chunk_rows, progress=True)
    if len(bad):
        rows = ", ".join(map(str, bad[:5])) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ItmatchError(f"NaN or inf in rows {rows} of {name}")


def check_finite(split: RetrievalSplit, chunk_rows: int | None = None) -> None:
    """Raise `ItmatchError` naming the first rows of `split.features` that hold NaN or inf."""
    if split.features is None:
        return
    name = os.path.basename(split.extra.get("features_file", f"{split.name} features"))
    _raise_on_nonfinite(split.features, name, chunk_rows)
