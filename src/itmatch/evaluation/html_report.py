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


SELECTION_NOTE = ("How the examples were chosen: {n_text} caption queries and {n_image} image queries drawn at "
                  "random (seed {seed}) before looking at any score{twins}; captions whose text was already "
                  "drawn are skipped. They are not picked for being right or wrong.")


def _distinct_texts(split: RetrievalSplit, candidates, limit: int, seen: set[str] | None = None) -> list[int]:
    seen = set() if seen is None else seen
    out = []
    for c in candidates:
        text = split.captions[int(c)]
        if text not in seen:
            seen.add(text)
            out.append(int(c))
            if len(out) == limit:
                break
    return out


def pick_queries(split: RetrievalSplit, n_text: int, n_image: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic sample, chosen before any score is seen; half the caption queries come from
    hard-negative twins when there are any; no caption text twice."""
    rng = np.random.default_rng(seed)
    images = rng.choice(split.n_images, size=min(n_image, split.n_images), replace=False)
    order = rng.permutation(split.n_captions)
    seen: set[str] = set()
    captions: list[int] = []
    if split.twins is not None and len(split.twins):
        twin_imgs = set(split.twins.ravel().tolist())
        twin_caps = [int(c) for c in order if int(split.caption_to_image[c]) in twin_imgs]
        captions = _distinct_texts(split, twin_caps, n_text // 2, seen)
    captions += _distinct_texts(split, (c for c in order if int(c) not in set(captions)), n_text - len(captions), seen)
    return np.asarray(captions, dtype=np.int64), images.astype(np.int64)


def _scored_thumb(split: RetrievalSplit, row: int, score: float, right: bool, note: str = "") -> str:
    tag = _img_tag(split, row, "thumb " + ("hit" if right else "miss"))
    return f"<figure class='sc'>{tag}<figcaption>{note}{score:.3f}</figcaption></figure>"


def render_report(report: dict, sims: np.ndarray, split: RetrievalSplit, curves_png: Path | None = None,
                  n_text: int = 6, n_image: int = 4, k: int = 5, title: str = "itmatch report",
                  links: list[tuple[str, str]] | None = None) -> str:
    """`links`: (label, relative href) pairs shown under the title, e.g. the run's config and JSON report."""
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
        "li.no::marker{content:'\\2718  ';color:#b33}.small{color:#666;font-size:13px}",
        "figure.sc{display:inline-block;margin:0;text-align:center;font-size:12px;color:#555}",
        ".sep{display:inline-block;border-left:2px dashed #bbb;height:96px;margin:6px 10px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='small'>method <b>{html.escape(str(report.get('method', '?')))}</b> &middot; "
        f"data {html.escape(str(report.get('dataset', '')))} / {html.escape(str(report.get('split', '')))} &middot; "
        f"protocol {html.escape(str(report.get('protocol', '')))} &middot; {report.get('n_images', '?')} images, "
        f"{report.get('n_captions', '?')} captions &middot; ties: {html.escape(str(report.get('tie_policy', '')))}</p>",
        f"<table class='m'><tr>{head}</tr><tr>{row}</tr></table>",
    ]
    if links:
        parts.insert(-1, "<p class='small'>" + " &middot; ".join(
            f"<a href='{html.escape(href)}'>{html.escape(label)}</a>" for label, href in links) + "</p>")
    if curves_png is not None and Path(curves_png).is_file():
        data = base64.b64encode(Path(curves_png).read_bytes()).decode("ascii")
        parts.append(f"<h2>Training</h2><img style='max-width:100%' src='data:image/png;base64,{data}'>")
    twins = " (half of the captions from images with a hard-negative twin)" if split.twins is not None else ""
    note = SELECTION_NOTE.format(n_text=len(captions), n_image=len(images), seed=0, twins=twins)
    parts.append(f"<p class='small'>{note} Scores are the model's similarities; when no right answer is in "
                 f"the top {k}, the best-ranked right one is shown after the line.</p>")
    parts.append(f"<h2>Text &rarr; image (top {k} with scores; green = the caption is true of the image)</h2>")
    for c in captions:
        order = np.argsort(-sims[:, c], kind="stable")
        thumbs = "".join(_scored_thumb(split, int(i), float(sims[i, c]), _is_relevant(split, c, int(i)))
                         for i in order[:k])
        right = [r for r, i in enumerate(order) if _is_relevant(split, c, int(i))]
        if right and right[0] >= k:
            i = int(order[right[0]])
            thumbs += "<span class='sep'></span>" + _scored_thumb(split, i, float(sims[i, c]), True,
                                                                   f"true image, rank {right[0] + 1}: ")
        parts.append(f"<div class='q'><b>&ldquo;{html.escape(split.captions[c])}&rdquo;</b><br>{thumbs}</div>")
    parts.append(f"<h2>Image &rarr; text (top {k} distinct captions with scores; &#10004; = true of the image)</h2>")
    for i in images:
        order = np.argsort(-sims[i], kind="stable")
        seen: set[str] = set()
        ranked = []  # (rank among distinct texts, caption): a text written for several images is listed once
        for c in order:
            text = split.captions[int(c)]
            if text not in seen:
                seen.add(text)
                ranked.append((len(ranked) + 1, int(c)))
        items = "".join(f"<li class='{'ok' if _is_relevant(split, c, int(i)) else 'no'}'>"
                        f"{html.escape(split.captions[c])} <span class='small'>{sims[i, c]:.3f}</span></li>"
                        for _, c in ranked[:k])
        right = [(r, c) for r, c in ranked if _is_relevant(split, c, int(i))]
        if right and right[0][0] > k:
            r, c = right[0]
            items += (f"</ol><p class='small'>first true caption at rank {r}:</p><ol start='{r}'>"
                      f"<li class='ok'>{html.escape(split.captions[c])} <span class='small'>{sims[i, c]:.3f}</span>"
                      "</li>")
        thumb = _img_tag(split, int(i), "thumb")
        parts.append(f"<div class='q' style='display:flex;gap:16px'>{thumb}<div><ol>{items}</ol></div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(path: Path, report: dict, sims: np.ndarray, split: RetrievalSplit, **kwargs) -> Path:
    atomic_write_text(Path(path), render_report(report, sims, split, **kwargs))
    return Path(path)
