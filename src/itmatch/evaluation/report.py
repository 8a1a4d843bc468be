"""The evaluation report: one JSON-ready dict per evaluation, a terminal table, an atomic writer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from itmatch.errors import ItmatchError
from itmatch.files import mkstemp_umask
from itmatch.version import __version__

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")


def build_report(*, dataset: str, split: str, protocol: str, n_images: int, n_captions: int,
                 captions_per_image: int | None, tie_policy: str, elapsed_s: float, metrics: dict,
                 folds: list[dict] | None = None) -> dict:
    """The report dict (plain Python types only). Recalls and the other rates are in percent."""
    report = {
        "dataset": dataset, "split": split, "protocol": protocol,
        "n_images": int(n_images), "n_captions": int(n_captions),
        "captions_per_image": None if captions_per_image is None else int(captions_per_image),
        "tie_policy": tie_policy, "elapsed_s": round(float(elapsed_s), 4), "version": __version__,
        "metrics": _plain(metrics),
    }
    if folds is not None:
        report["folds"] = _plain(folds)
    return report


def _plain(value):
    """numpy scalars -> Python numbers; NaN -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fmt(value, width: int = 7, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def format_report(report: dict) -> str:
    """A readable terminal table of a report."""
    m = report.get("metrics", {})
    cpi = report.get("captions_per_image")
    lines = [
        f"protocol {report.get('protocol', '?')}"
        + (f"  dataset {report['dataset']}" if report.get("dataset") else "")
        + (f"  split {report['split']}" if report.get("split") else ""),
        f"{report.get('n_images', '?')} images x {report.get('n_captions', '?')} captions "
        f"({cpi if cpi is not None else 'varying'} per image), ties {report.get('tie_policy', '?')}, "
        f"{report.get('elapsed_s', 0):.2f} s",
        "",
        "          R@1    R@5   R@10   medr  meanr",
    ]
    for d in ("i2t", "t2i"):
        lines.append(f"  {d} " + "".join(_fmt(m.get(f"{d}_{k}")) for k in ("r1", "r5", "r10", "medr", "meanr")))
    lines.append(f"  rSum {_fmt(m.get('rsum'), 8)}")

    extras = sorted({k.rsplit("_", 1)[0] for k in m if k not in METRIC_KEYS and k.endswith(("_i2t", "_t2i"))})
    if extras:
        width = max(len(e) for e in extras) + 2
        lines += ["", " " * (width + 2) + "    i2t    t2i"]
        for name in extras:
            lines.append(f"  {name:<{width}}" + _fmt(m.get(f"{name}_i2t")) + _fmt(m.get(f"{name}_t2i")))
    others = [k for k in m if k not in METRIC_KEYS and not k.endswith(("_i2t", "_t2i"))
              and not isinstance(m[k], dict)]
    for k in others:
        lines.append(f"  {k}: {_fmt(m[k], 0) if isinstance(m[k], float) else m[k]}")
    lines += _scenes_tables(m)

    folds = report.get("folds")
    if folds:
        lines += ["", "  fold  i2t R@1  R@5   R@10 | t2i R@1  R@5   R@10 |   rSum"]
        for f, fm in enumerate(folds):
            lines.append(f"  {f:>4} " + "".join(_fmt(fm.get(f"i2t_{k}")) for k in ("r1", "r5", "r10"))
                         + " |" + "".join(_fmt(fm.get(f"t2i_{k}")) for k in ("r1", "r5", "r10"))
                         + " |" + _fmt(fm.get("rsum"), 7))
        lines.append(f"  (metrics above are the means over the {len(folds)} folds)")
    return "\n".join(lines)


def _scenes_tables(m: dict) -> list[str]:
    """The scenes protocol's per-kind and per-change results, when the report has them."""
    lines = []
    by_kind = m.get("by_kind") or {}
    if by_kind:
        lines += ["", "  per caption kind    captions  mAP@R i2t  t2i   R-Prec i2t  t2i"]
        for kind, km in by_kind.items():
            lines.append(f"  {kind:<18} {km.get('captions', 0):>8}  " + _fmt(km.get("map_at_r_i2t"), 9)
                         + _fmt(km.get("map_at_r_t2i")) + _fmt(km.get("rprecision_i2t"), 12)
                         + _fmt(km.get("rprecision_t2i")))
    by_change = m.get("by_change") or {}
    if by_change:
        lines += ["", "  per change          twin pairs  cap->img  img->cap | minimal pairs  true>foil"]
        for change, cm in by_change.items():
            twins = cm.get("twin_pairs")
            pairs = cm.get("minimal_pairs")
            lines.append(f"  {change:<18} {'' if twins is None else twins:>11} " + _fmt(cm.get("twin_acc_t2i"), 9)
                         + _fmt(cm.get("twin_acc_i2t"), 9) + f" | {'' if pairs is None else pairs:>13} "
                         + _fmt(cm.get("pair_acc"), 10))
    return lines


def write_report(report: dict, path: str | os.PathLike) -> None:
    """Write the report as JSON atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ItmatchError(f"cannot write the report to {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ItmatchError(f"cannot write the report to {path}: it is a folder")
    text = json.dumps(_plain(report), indent=2, allow_nan=False) + "\n"
    try:
        fd, tmp = mkstemp_umask(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ItmatchError(f"cannot write the report to {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ItmatchError(f"cannot write the report to {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
