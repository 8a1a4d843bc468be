"""What the scenes protocol reads besides the relevance matrix: caption kinds and roles, minimal
pairs, undetermined pairs and twin changes, aligned to a loaded split by caption and image ids.

Reading by ids (not by position) keeps them right for a subset of a split (the training loop's
first-N-images dev subset), and a folder of another format version is refused with one message.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError

FORMAT_VERSION = 2  # the version of generate.VERSION these files belong to
ROLES = ("main", "probe", "foil")


@dataclass
class SceneAnnotations:
    kind: np.ndarray  # per caption column: full, relation, count, attribute, partial, object, subset, probe, foil
    role: np.ndarray  # per caption column: main (ranked), probe (true half of a minimal pair) or foil
    change: np.ndarray  # per caption column: the minimal pair's change (probes and foils), else ""
    pair: np.ndarray  # per caption column: for a foil, the column of its true caption; else -1
    undetermined: sp.csr_matrix  # captions x images, bool
    twin_change: np.ndarray  # per row of split.twins: colour, size, position or count


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ItmatchError(f"cannot read {path}: {exc}") from None


def check_version(root: Path) -> None:
    manifest = root / "scenes.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        raise ItmatchError(f"{manifest}: not a readable scenes manifest") from None
    if version != FORMAT_VERSION:
        raise ItmatchError(f"{root} holds scenes format version {version}, this itmatch reads version "
                           f"{FORMAT_VERSION} (undetermined pairs, minimal pairs): regenerate it with "
                           f"`itmatch data scenes --out NEW_FOLDER`")


def _is_scenes_manifest(path: Path) -> bool:
    """A scenes.json written by the generator (another file of that name, e.g. a report, is not)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == "itmatch-scenes"
    except (OSError, ValueError, AttributeError):
        return False


def load_annotations(split: RetrievalSplit) -> SceneAnnotations | None:
    """The annotations of a scenes split, or None for a split that is not from a scenes folder.

    `split.extra["scenes_annotations"]` (a SceneAnnotations) is used as is when present.
    """
    given = split.extra.get("scenes_annotations") if split.extra else None
    if given is not None:
        return given
    root = Path(split.root) if split.root is not None else None
    name = split.name
    path = None if root is None else root / f"{name}_captions.jsonl"
    manifest = root is not None and _is_scenes_manifest(root / "scenes.json")
    if root is None or not (manifest or path.is_file()):
        return None  # not a scenes folder
    if manifest:  # absent only while the generator computes the ceilings
        check_version(root)
    if not path.is_file():
        raise ItmatchError(f"{root}: scenes split {name!r} has no {path.name}; regenerate the folder")
    if split.caption_ids is None:
        raise ItmatchError(f"split {name!r} of {root} has no caption ids: cannot align {path.name}")
    try:
        records = [json.loads(line) for line in _read_lines(path)]
        ids = {r["id"]: k for k, r in enumerate(records)}
        cols = np.array([ids[c] for c in split.caption_ids], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise ItmatchError(f"{path}: unreadable or not matching {name}_capids.txt ({exc!r})") from None
    image_index = {v: k for k, v in enumerate(_read_lines(root / f"{name}_ids.txt"))}
    try:
        images = np.array([image_index[i] for i in split.image_ids], dtype=np.int64)
    except KeyError as exc:
        raise ItmatchError(f"{root}: image id {exc.args[0]!r} of split {name!r} is not in {name}_ids.txt") from None
    und_path = root / f"{name}_undetermined.npz"
    try:
        und = sp.load_npz(und_path)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ItmatchError(f"{und_path} is not a scipy.sparse .npz file: {exc}") from None
    if und.shape != (len(records), len(image_index)):
        raise ItmatchError(f"{und_path} has shape {und.shape}, expected ({len(records)}, {len(image_index)})")
    und = sp.csr_matrix(und, dtype=bool)[cols][:, images].tocsr()

    kind = np.array([records[c]["kind"] for c in cols], dtype=object)
    role = np.array([records[c]["role"] for c in cols], dtype=object)
    change = np.array([records[c]["change"] or "" for c in cols], dtype=object)
    position = np.full(len(records), -1, dtype=np.int64)
    position[cols] = np.arange(len(cols))
    pair = np.array([position[records[c]["pair"]] if records[c]["pair"] is not None else -1 for c in cols],
                    dtype=np.int64)
    if not set(role) <= set(ROLES):
        raise ItmatchError(f"{path}: unknown caption role(s) {sorted(set(role) - set(ROLES))}")

    changes = {}
    for line in _read_lines(root / f"{name}_scenes.jsonl"):
        g = json.loads(line)
        if g.get("twin"):
            changes[g["id"]] = g["twin"]["change"]
    twins = split.twins if split.twins is not None else np.zeros((0, 2), dtype=np.int64)
    twin_change = np.array([changes.get(split.image_ids[a], "") for a, _b in twins], dtype=object)
    return SceneAnnotations(kind, role, change, pair, und, twin_change)
