"""Writing a scenes data set folder: splits, files in SCAN precomp layout, the manifest, the cache.

The folder is complete once `scenes.json` exists: it is written last and atomically, so a folder
with a manifest is a finished data set (a cache hit when asked for again with the same parameters)
and a folder without one is never trusted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from itmatch.data.scenes.facts import ORACLES, caption_value, fact_to_json, relevance_tables
from itmatch.data.scenes.features import (
    CROP,
    FEATURE_DIM,
    FEATURE_EXTRACTOR,
    REGIONS,
    crop_regions,
    filled_slots,
    region_boxes,
)
from itmatch.data.scenes.grammar import Caption, discriminative_caption, write_captions
from itmatch.data.scenes.probes import minimal_pairs, set_captions
from itmatch.data.scenes.render import render
from itmatch.data.scenes.scene import IMAGE_SIZE, Scene, make_twin, pair_undetermined, sample_scene
from itmatch.errors import ItmatchError

FORMAT = "itmatch-scenes"
VERSION = 2  # 2: three-valued relevance, minimal pairs, test_comp / test_set, fixed box template
SPLITS = ("train", "dev", "test", "test_comp", "test_set")
# What each split holds: compositional scenes, minimal pairs, set-track captions, twins
SPLIT_SPEC = {
    "train": {"comp": False, "pairs": False, "set": False, "twins": True},
    "dev": {"comp": False, "pairs": False, "set": False, "twins": True},
    "test": {"comp": False, "pairs": True, "set": False, "twins": True},
    "test_comp": {"comp": True, "pairs": True, "set": False, "twins": True},
    "test_set": {"comp": False, "pairs": False, "set": True, "twins": False},
}
EVAL_SPLITS = ("test", "test_comp", "test_set")  # the splits ceilings.json reports
PRESETS = {"tiny": (120, 40, 40), "small": (1500, 200, 300), "default": (5000, 500, 1000)}
CAPTIONS_PER_IMAGE = 5
TWIN_SHARE = 0.22  # share of the images of a split that belong to a hard-negative twin pair
MANIFEST = "scenes.json"
CEILINGS = "ceilings.json"
IN_PROGRESS = ".scenes-in-progress"  # written first: marks a folder as ours while it is being filled
SPLIT_FILES = ("_ims.npy", "_boxes.npy", "_image_sizes.npy", "_caps.txt", "_ids.txt", "_capids.txt", "_relevance.npz",
               "_undetermined.npz", "_captions.jsonl", "_twins.npy", "_scenes.jsonl", ".csv")
VARYING_FILES = ("_cap2img.txt",)  # splits whose images have different numbers of captions
CHUNK_IMAGES = 64  # images rendered and encoded per step: bounds memory whatever the split size


def split_sizes(n_train: int, n_dev: int, n_test: int) -> dict[str, int]:
    """Sizes of all five splits: test_comp and test_set get half the test size each (at least 1)."""
    half = max(1, n_test // 2)
    return {"train": n_train, "dev": n_dev, "test": n_test, "test_comp": half, "test_set": half}


def preset_sizes(name: str) -> tuple[int, int, int]:
    """(n_train, n_dev, n_test) of a named preset: tiny, small or default."""
    if name not in PRESETS:
        raise ItmatchError(f"unknown scenes size {name!r} (use {', '.join(PRESETS)})")
    return PRESETS[name]


def _image_rng(seed: int, split: str, row: int) -> np.random.Generator:
    # one stream per (seed, split, image): a split's content never depends on another split's size
    return np.random.default_rng([seed, SPLITS.index(split), 0, row])


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), 1])


def _ensure_discriminative(caps: list[Caption], scene: Scene, other: Scene, rng: np.random.Generator) -> bool:
    if any(caption_value(c.facts, other) is False for c in caps):
        return True
    cap = discriminative_caption(scene, other, rng)
    if cap is None:
        return False
    replaceable = [i for i, c in enumerate(caps) if c.kind != "full"] or list(range(len(caps)))
    caps[replaceable[int(rng.integers(len(replaceable)))]] = cap
    return True


def build_split(seed: int, split: str, n: int) -> tuple[list[Scene], list[list[Caption]], np.ndarray]:
    """Scene graphs, their main captions and the twin pairs (K x 2 rows) of one split."""
    spec = SPLIT_SPEC[split]
    rngs = [_image_rng(seed, split, row) for row in range(n)]
    perm = _split_rng(seed, split).permutation(n)
    n_pairs = int(round(n * TWIN_SHARE / 2)) if spec["twins"] else 0
    partner = {}
    for k in range(n_pairs):
        a, b = sorted((int(perm[2 * k]), int(perm[2 * k + 1])))
        partner[a] = b
    scenes: list[Scene | None] = [None] * n
    for row in range(n):
        if scenes[row] is None:
            scenes[row] = sample_scene(rngs[row], comp=spec["comp"])
        if row in partner:
            twin = make_twin(scenes[row], rngs[partner[row]], comp=spec["comp"])
            if twin is not None:
                scenes[partner[row]] = twin[0]
                change = twin[1]
                scenes[row].twin = {"row": partner[row], **change}
                scenes[partner[row]].twin = {"row": row, **change}
    if spec["set"]:
        captions = [set_captions(s, rngs[row]) for row, s in enumerate(scenes)]
    else:
        captions = [write_captions(s, rngs[row], CAPTIONS_PER_IMAGE) for row, s in enumerate(scenes)]
    twins = []
    for a, b in partner.items():
        if scenes[a].twin is None:
            continue
        if (_ensure_discriminative(captions[a], scenes[a], scenes[b], rngs[a])
                and _ensure_discriminative(captions[b], scenes[b], scenes[a], rngs[b])):
            twins.append((a, b))
        else:  # no caption tells them apart: replace the twin by an ordinary scene
            scenes[a].twin = None
            scenes[b] = sample_scene(rngs[b], comp=spec["comp"])
            captions[b] = write_captions(scenes[b], rngs[b], CAPTIONS_PER_IMAGE)
    return scenes, captions, np.array(sorted(twins), dtype=np.int64).reshape(-1, 2)


def caption_columns(seed: int, split: str, scenes: list[Scene], captions: list[list[Caption]]
                    ) -> list[tuple[int, Caption, dict]]:
    """Every caption column of a split in order: (image row, caption, annotation).

    Per image: its main captions, then its minimal pairs (true caption, foil) where the split has them.
    """
    cols = []
    for row, scene in enumerate(scenes):
        for c in captions[row]:
            cols.append((row, c, {"role": "main", "change": None, "pair": None}))
        if SPLIT_SPEC[split]["pairs"]:
            rng = np.random.default_rng([seed, SPLITS.index(split), 3, row])
            for change, true, foil in minimal_pairs(scene, rng):
                cols.append((row, true, {"role": "probe", "change": change, "pair": None}))
                cols.append((row, foil, {"role": "foil", "change": change, "pair": len(cols) - 1}))
    return cols


def _save_npz_reproducible(path: Path, matrix: sp.csr_matrix) -> None:
    """`scipy.sparse.save_npz`, then the zip re-packed with fixed timestamps (byte-identical reruns)."""
    buffer = io.BytesIO()
    sp.save_npz(buffer, matrix, compressed=True)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, src.read(name))


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _progress_bar(total: int, desc: str, progress: bool | None):
    from itmatch.progress import progress_bar

    return progress_bar(total, desc, unit="img", enabled=progress)


def _graph_record(scene: Scene, row: int, ids: list[str], cols, cap_ids: list[str], first: int, last: int) -> dict:
    cx, cy, r = scene.geometry
    unsure = pair_undetermined(cx, cy, r)
    from itmatch.data.scenes.scene import RELATIONS

    captions, pairs = [], []
    for k in range(first, last):
        _row, c, info = cols[k]
        entry = {"id": cap_ids[k], "text": c.text, "kind": c.kind, "facts": [fact_to_json(f) for f in c.facts]}
        if info["role"] == "main":
            captions.append(entry)
        elif info["role"] == "probe":
            pairs.append({"change": info["change"], "true": entry})
        else:
            pairs[-1]["foil"] = entry
    return {
        "id": ids[row], "row": row,
        "objects": [o.to_json() for o in scene.objects],
        "relations": [list(rel) for rel in scene.relations()],
        "undetermined": [[int(i), RELATIONS[k], int(j)] for i, j, k in zip(*np.nonzero(unsure))],
        "background": scene.background, "twin": scene.twin,
        "captions": captions, "minimal_pairs": pairs,
    }


def write_split(out: Path, seed: int, split: str, n: int, encoder, progress: bool | None) -> dict:
    scenes, captions, twins = build_split(seed, split, n)
    cols = caption_columns(seed, split, scenes, captions)
    ids = [f"scene-{split}-{row:06d}" for row in range(n)]
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)

    cap2img = np.array([row for row, _c, _i in cols], dtype=np.int64)
    cap_text = [c.text for _r, c, _i in cols]
    cap_ids, seen = [], {}
    for row, _c, info in cols:
        tag = {"main": "", "probe": "p", "foil": "f"}[info["role"]]
        k = seen[(row, tag)] = seen.get((row, tag), -1) + 1
        cap_ids.append(f"{ids[row]}#{tag}{k}")
    _write_text(out / f"{split}_caps.txt", cap_text)
    _write_text(out / f"{split}_ids.txt", ids)
    _write_text(out / f"{split}_capids.txt", cap_ids)
    varying = not (len(cols) == CAPTIONS_PER_IMAGE * n and
                   np.array_equal(cap2img, np.repeat(np.arange(n), CAPTIONS_PER_IMAGE)))
    if varying:
        _write_text(out / f"{split}_cap2img.txt", [str(r) for r in cap2img])
    with open(out / f"{split}_captions.jsonl", "w", encoding="utf-8") as fh:
        for k, (row, c, info) in enumerate(cols):
            fh.write(json.dumps({"id": cap_ids[k], "image": int(row), "kind": c.kind, **info}, sort_keys=True) + "\n")
    main_cols = [k for k, (_r, _c, info) in enumerate(cols) if info["role"] == "main"]
    with open(out / f"{split}.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "caption"])
        for k in main_cols:  # raw-image loaders see the main captions only
            writer.writerow([f"images/{split}/{ids[cap2img[k]]}.png", cap_text[k]])

    rel, und = relevance_tables(scenes, [c.facts for _r, c, _i in cols])
    if not np.asarray(rel[np.arange(len(cols)), cap2img]).ravel().astype(bool)[
            [info["role"] != "foil" for _r, _c, info in cols]].all():
        raise RuntimeError(f"{split}: a caption is not relevant to its own image")  # a bug, never user input
    if np.asarray((rel + und)[np.arange(len(cols)), cap2img]).ravel().astype(bool)[
            [info["role"] == "foil" for _r, _c, info in cols]].any():
        raise RuntimeError(f"{split}: a foil is not false of its own image")  # a bug, never user input
    _save_npz_reproducible(out / f"{split}_relevance.npz", rel)
    _save_npz_reproducible(out / f"{split}_undetermined.npz", und)
    np.save(out / f"{split}_twins.npy", twins)

    boxes = np.zeros((n, REGIONS, 4), dtype=np.float32)
    feats = None
    if encoder is not None:
        feats = np.lib.format.open_memmap(out / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                          shape=(n, REGIONS, FEATURE_DIM))
    starts = np.searchsorted(cap2img, np.arange(n + 1))
    with open(out / f"{split}_scenes.jsonl", "w", encoding="utf-8") as jsonl, \
            _progress_bar(n, f"scenes {split}", progress) as bar:
        for start in range(0, n, CHUNK_IMAGES):
            rows = range(start, min(start + CHUNK_IMAGES, n))
            crops, filled = [], []
            for row in rows:
                scene = scenes[row]
                image = render(scene)
                image.save(image_dir / f"{ids[row]}.png", compress_level=1)
                boxes[row] = region_boxes(scene, np.random.default_rng([seed, SPLITS.index(split), 2, row]))
                if encoder is not None:
                    keep = filled_slots(boxes[row])
                    crops.append(crop_regions(image, boxes[row])[keep])
                    filled.append(keep)
                record = _graph_record(scene, row, ids, cols, cap_ids, starts[row], starts[row + 1])
                jsonl.write(json.dumps(record, sort_keys=True) + "\n")
            if encoder is not None:
                # empty object slots are never encoded: their features stay exactly zero
                encoded = encoder.encode(np.concatenate(crops))
                block = np.zeros((len(rows), REGIONS, FEATURE_DIM), dtype=np.float32)
                block[np.stack(filled)] = encoded
                feats[rows.start:rows.stop] = block
            bar.update(len(rows))
    if feats is not None:
        feats.flush()
        del feats
    np.save(out / f"{split}_boxes.npy", boxes)
    # boxes are in pixels: the sizes file says so to any reader (also while the manifest is not written yet)
    np.save(out / f"{split}_image_sizes.npy", np.full((len(boxes), 2), IMAGE_SIZE, dtype=np.float32))
    roles = [info["role"] for _r, _c, info in cols]
    stats = {"images": n, "captions": roles.count("main"), "minimal_pairs": roles.count("foil"),
             "twin_pairs": int(len(twins)), "relevant_pairs": int(rel.nnz), "undetermined_pairs": int(und.nnz)}
    return stats, scenes, [c.facts for _r, c, _i in cols]


def oracle_scores(scenes: list[Scene], caption_facts: list[list], oracle: str) -> np.ndarray:
    """Images x captions scores of an oracle that reads the facts: 1 relevant, 0.5 undetermined, 0 not."""
    rel, und = relevance_tables(scenes, caption_facts, oracle=oracle)
    return rel.T.toarray().astype(np.float32) + 0.5 * und.T.toarray().astype(np.float32)


def write_ceilings(out: Path, built: dict) -> dict:
    """Metrics of the fact oracles on the evaluation splits, through the scenes protocol.

    `built[split]` = (scenes, caption facts of every column) as generated (exact coordinates).
    """
    from itmatch.data.precomp import load_split
    from itmatch.evaluation.protocols import evaluate_sims

    result = {"oracles": list(ORACLES), "splits": {}}
    for split, (scenes, facts) in built.items():
        data = load_split(out, split, features=False)
        result["splits"][split] = {
            oracle: evaluate_sims(oracle_scores(scenes, facts, oracle), "scenes", data, split_name=split)["metrics"]
            for oracle in ORACLES}
    text = json.dumps(result, indent=1, sort_keys=True, allow_nan=False) + "\n"
    (out / CEILINGS).write_text(text, encoding="utf-8")
    return result


def _requested(seed: int, sizes: dict, features: bool) -> dict:
    return {"format": FORMAT, "version": VERSION, "seed": seed, "sizes": sizes,
            "captions_per_image": CAPTIONS_PER_IMAGE, "image_size": IMAGE_SIZE, "regions": REGIONS,
            "crop_size": CROP, "feature_dim": FEATURE_DIM if features else None,
            "feature_extractor": FEATURE_EXTRACTOR if features else None}


def _our_entries(sizes: dict) -> set[str]:
    names = {MANIFEST, IN_PROGRESS, CEILINGS, "images"}
    for split in sizes:
        names |= {split + suffix for suffix in SPLIT_FILES + VARYING_FILES}
    return names


def _check_folder(out: Path, want: dict) -> bool:
    """True for a cache hit; False when the folder may be (re)filled; ItmatchError otherwise."""
    if out.exists() and not out.is_dir():
        raise ItmatchError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            have = json.loads(manifest.read_text(encoding="utf-8"))
            same = all(have[k] == want[k] for k in ("format", "version", "seed", "sizes"))
            has_features = have["feature_extractor"] is not None
        except (ValueError, KeyError, TypeError):
            raise ItmatchError(f"{manifest}: not a readable scenes manifest; refusing to write into {out}") from None
        if same and (has_features or want["feature_extractor"] is None):
            missing = [f for f in have.get("files", []) if not (out / f).exists()]
            if missing:
                raise ItmatchError(f"{out}: scenes data set is missing {', '.join(missing[:3])}; "
                                   f"delete the folder and regenerate")
            return True
        raise ItmatchError(
            f"{out} holds a different scenes data set (format version {have.get('version')}, "
            f"seed {have.get('seed')}, sizes {have.get('sizes')}, features {'yes' if has_features else 'no'}); "
            f"requested version {want['version']}, "
            f"seed {want['seed']}, sizes {want['sizes']}, features {'yes' if want['feature_extractor'] else 'no'}: "
            f"choose another --out or delete it")
    if (out / IN_PROGRESS).is_file():
        entries = {p.name for p in out.iterdir()}
        if entries <= _our_entries(want["sizes"]):
            # an interrupted run of ours: clear exactly what we wrote, then start again
            for name in entries:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            return False
    raise ItmatchError(f"--out {out} is not empty and is not a scenes data set folder; "
                       f"refusing to write into it (choose a new or empty folder)")


def _ensure(out_dir, seed: int, n_train: int, n_dev: int, n_test: int, features: bool,
            progress: bool | None) -> tuple[Path, bool]:
    out = Path(out_dir).expanduser()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ItmatchError(f"scenes seed must be a non-negative integer, got {seed!r}")
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ItmatchError(f"scenes split {split!r} needs at least 1 image, got {n!r}")
    sizes = split_sizes(*(int(v) for v in sizes.values()))
    want = _requested(int(seed), sizes, features)
    if _check_folder(out, want):
        return out, True
    out.mkdir(parents=True, exist_ok=True)
    (out / IN_PROGRESS).write_text(json.dumps(want) + "\n", encoding="utf-8")

    encoder = None
    if features:
        from itmatch.data.scenes.features import RegionEncoder

        encoder = RegionEncoder()
    stats, built = {}, {}
    for split, n in sizes.items():
        stats[split], scenes, facts = write_split(out, int(seed), split, n, encoder, progress)
        if split in EVAL_SPLITS:
            built[split] = (scenes, facts)
    write_ceilings(out, built)
    files = [split + suffix for split in sizes for suffix in SPLIT_FILES if features or suffix != "_ims.npy"]
    files += [split + suffix for split in sizes for suffix in VARYING_FILES if (out / (split + suffix)).exists()]
    files = sorted(files + [CEILINGS])
    manifest = {**want, "files": files, "stats": stats}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)  # the completion marker: written last, atomically
    (out / IN_PROGRESS).unlink()
    return out, False


def generate_scenes(out_dir, *, seed: int = 0, n_train: int = 5000, n_dev: int = 500, n_test: int = 1000,
                    features: bool = True, progress: bool | None = None) -> Path:
    """Generate the scenes benchmark into `out_dir` (or return it unchanged if it already holds it).

    `progress`: None shows tqdm bars when stderr is a terminal, a line every ~30 s otherwise; True / False
    force the bars on / off.
    Raises ItmatchError for a non-empty folder that is not this data set (nothing is overwritten).
    """
    return _ensure(out_dir, seed, n_train, n_dev, n_test, features, progress)[0]


def cmd_scenes(args) -> int:
    n_train, n_dev, n_test = preset_sizes(args.size)
    n_train = n_train if args.train is None else args.train
    n_dev = n_dev if args.dev is None else args.dev
    n_test = n_test if args.test is None else args.test
    t0 = time.perf_counter()
    out, cached = _ensure(args.out, args.seed, n_train, n_dev, n_test, not args.no_features, None)
    sizes = split_sizes(n_train, n_dev, n_test)
    what = f"{'/'.join(str(v) for v in sizes.values())} {'/'.join(sizes)} images"
    if cached:
        print(f"scenes: {out} already holds this data set ({what}); nothing to do")
    else:
        print(f"scenes: wrote {out} ({what}, features {'on' if not args.no_features else 'off'}) "
              f"in {time.perf_counter() - t0:.1f}s")
    return 0
