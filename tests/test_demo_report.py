"""The demo's report: scores, the rank of a true answer outside the top 5, distinct caption texts,
how the examples were chosen, links; the smoothed per-term loss plot marks the warm-up switch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from itmatch.data.split import RetrievalSplit
from itmatch.evaluation.html_report import pick_queries, render_report
from itmatch.training.plots import plot_loss_terms, smooth


def toy_split(n_images=10) -> RetrievalSplit:
    # 2 captions per image; images 0 and 1 share the text "a red cube" (a duplicate text).
    captions = []
    for i in range(n_images):
        captions += ["a red cube" if i < 2 else f"picture {i} first", f"picture {i} second"]
    rows = np.repeat(np.arange(n_images), 2)
    return RetrievalSplit(name="test", root=Path("."), captions=captions, caption_to_image=rows,
                          image_ids=[str(i) for i in range(n_images)])


def test_report_shows_scores_true_rank_distinct_texts_selection_and_links():
    split = toy_split()
    sims = np.zeros((10, 20), dtype=np.float32)
    # caption 5 (image 2): its image ranks 7th, below images 3..8 (scores 0.9 .. 0.4)
    for rank, img in enumerate([3, 4, 5, 6, 7, 8]):
        sims[img, 5] = 0.9 - 0.1 * rank
    sims[2, 5] = 0.25
    page = render_report({"metrics": {"rsum": 100.0}}, sims, split, n_text=20, n_image=10, k=5,
                         links=[("config", "config.yaml"), ("JSON report", "test_report.json")])
    assert "true image, rank 7: 0.250" in page
    assert "0.900" in page  # the top image's score
    assert "How the examples were chosen" in page and "not picked for being right or wrong" in page
    assert "<a href='config.yaml'>config</a>" in page and "<a href='test_report.json'>JSON report</a>" in page
    queries = re.findall(r"<b>&ldquo;(.*?)&rdquo;</b>", page)
    assert len(queries) == len(set(queries)) == 19  # 20 captions, one duplicate text dropped
    # image -> text: "a red cube" (captions 0 and 2) is listed once per image
    for block in re.findall(r"<ol>(.*?)</ol>", page, re.S):
        texts = re.findall(r"<li class='\w+'>(.*?) <span", block)
        assert len(texts) == len(set(texts))
    captions, images = pick_queries(split, 20, 10)
    assert len({split.captions[c] for c in captions}) == len(captions)


def test_loss_plot_smooths_each_term_and_marks_the_warmup(tmp_path):
    values = [5.0, 1.0, 3.0, 7.0, 2.0]
    reference = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(smooth(values, 3), reference)
    records = [{"kind": "train", "step": s, "epoch": s // 10, "loss": 1.0 + (s >= 10), "triplet": 1.0 + (s >= 10),
                "contrast": 0.5, "lr": 1e-3} for s in range(1, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen["labels"] = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        seen["vlines"] = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot_loss_terms(tmp_path, tmp_path / "curves.png", switch_epoch=1)
    finally:
        plt.Figure.savefig = original
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert [lab.split(" ")[0] for lab in seen["labels"]] == ["loss", "contrast"]  # triplet == loss: drawn once
    assert seen["vlines"] == [9]  # the last step of the warm-up epoch
