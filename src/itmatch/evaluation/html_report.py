"""A self-contained HTML page of retrieval examples, metrics and training curves.

Text -> image: a caption and the model's top-k images; image -> text: an image and its top-k
captions. Right answers are marked by the split's full relevance where it has one (a partial caption
is right for every image it is true of), by the ground-truth pairs otherwise. Images are inlined as
base64 so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from itmatch.data.split import RetrievalSplit
from itmatch.files import atomic_write_text

METRIC_LABELS = [
    ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
    ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10"), ("rsum", "rSum"),
    ("map_at_r_i2t", "mAP@R i2t"), ("map_at_r_t2i", "mAP@R t2i"),
    ("rprecision_i2t", "R-P i2t"), ("rprecision_t2i", "R-P t2i"),
    ("twin_acc_i2t", "twin acc i2t"), ("twin_acc_t2i", "twin acc t2i"),
]


def image_file(split: RetrievalSplit, row: int) -> Path | None:
    if split.image_paths is not None:
        return Path(split.image_paths[row])
    candidate = Path(split.root) / "images" / split.name / f"{split.image_ids[row]}.png"
    return candidate if candidate.is_file() else None


def _img_tag(split: RetrievalSplit, row: int, css: str) -> str:
    path = image_file(split, row)
    label = html.escape(str(split.image_ids[row]))
    if path is None or not path.is_file():
        return f'<div class="{css} noimg">{label}</div>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f'<img class="{css}" title="{label}" src="data:{mime};base64,{data}">'


def _is_relevant(split: RetrievalSplit, caption: int, image: int) -> bool:
    if split.relevance is not None:
        return bool(split.relevance[caption, image])
    return int(split.caption_to_image[caption]) == image


def pick_queries(split: RetrievalSplit, n_text: int, n_image: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic sample; half the caption queries come from hard-negative twins when there are any."""
    rng = np.random.default_rng(seed)
    images = rng.choice(split.n_images, size=min(n_image, split.n_images), replace=False)
    captions = list(rng.choice(split.n_captions, size=min(n_text, split.n_captions), replace=False))
    if split.twins is not None and len(split.twins):
        twin_imgs = set(split.twins.ravel().tolist())
        twin_caps = [c for c in range(split.n_captions) if int(split.caption_to_image[c]) in twin_imgs]
        if twin_caps:
            take = rng.choice(twin_caps, size=min(n_text // 2, len(twin_caps)), replace=False)
            captions = list(take) + captions[: n_text - len(take)]
    return np.asarray(captions, dtype=np.int64), images.astype(np.int64)


def render_report(report: dict, sims: np.ndarray, split: RetrievalSplit, curves_png: Path | None = None,
                  n_text: int = 6, n_image: int = 4, k: int = 5, title: str = "itmatch report") -> str:
    captions, images = pick_queries(split, n_text, n_image)
    metrics = report.get("metrics", {})
    shown = [(key, lab) for key, lab in METRIC_LABELS if metrics.get(key) is not None]  # None: undefined here
    head = "".join(f"<th>{lab}</th>" for key, lab in shown)
    row = "".join(f"<td>{metrics[key]:.1f}</td>" for key, lab in shown)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}",
        "table.m{border-collapse:collapse}",
        "table.m td,table.m th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        ".q{margin:14px 0;padding:10px;border:1px solid #e4e4e4;border-radius:6px}",
        ".hit{outline:4px solid #2a9d3a}.miss{outline:4px solid #d0d0d0}.thumb{width:96px;height:96px;margin:6px}",
        ".noimg{display:inline-block;background:#eee;font-size:11px}li.ok::marker{content:'\\2714  ';color:#2a9d3a}",
        "li.no::marker{content:'\\2718  ';color:#b33}.small{color:#666;font-size:13px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='small'>method <b>{html.escape(str(report.get('method', '?')))}</b> &middot; "
        f"data {html.escape(str(report.get('dataset', '')))} / {html.escape(str(report.get('split', '')))} &middot; "
        f"protocol {html.escape(str(report.get('protocol', '')))} &middot; {report.get('n_images', '?')} images, "
        f"{report.get('n_captions', '?')} captions &middot; ties: {html.escape(str(report.get('tie_policy', '')))}</p>",
        f"<table class='m'><tr>{head}</tr><tr>{row}</tr></table>",
    ]
    if curves_png is not None and Path(curves_png).is_file():
        data = base64.b64encode(Path(curves_png).read_bytes()).decode("ascii")
        parts.append(f"<h2>Training</h2><img style='max-width:100%' src='data:image/png;base64,{data}'>")
    parts.append(f"<h2>Text &rarr; image (top {k}; green = the caption is true of the image)</h2>")
    for c in captions:
        top = np.argsort(-sims[:, c], kind="stable")[:k]
        thumbs = "".join(_img_tag(split, int(i), "thumb " + ("hit" if _is_relevant(split, c, int(i)) else "miss"))
                         for i in top)
        parts.append(f"<div class='q'><b>&ldquo;{html.escape(split.captions[c])}&rdquo;</b><br>{thumbs}</div>")
    parts.append(f"<h2>Image &rarr; text (top {k}; &#10004; = true of the image)</h2>")
    for i in images:
        top = np.argsort(-sims[i], kind="stable")[:k]
        items = "".join(f"<li class='{'ok' if _is_relevant(split, int(c), int(i)) else 'no'}'>"
                        f"{html.escape(split.captions[int(c)])}</li>" for c in top)
        thumb = _img_tag(split, int(i), "thumb")
        parts.append(f"<div class='q' style='display:flex;gap:16px'>{thumb}<ol>{items}</ol></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: Path, report: dict, sims: np.ndarray, split: RetrievalSplit, **kwargs) -> Path:
    atomic_write_text(Path(path), render_report(report, sims, split, **kwargs))
    return Path(path)
