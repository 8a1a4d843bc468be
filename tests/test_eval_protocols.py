"""Protocols (plain, f30k-1k, coco-5k, coco-1k folds, scenes) and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from itmatch import __version__
from itmatch.data.split import RetrievalSplit
from itmatch.errors import ItmatchError
from itmatch.evaluation.protocols import evaluate_sims
from itmatch.evaluation.ranking import relevance_ranking, retrieval_metrics, twin_accuracy
from itmatch.evaluation.report import METRIC_KEYS, format_report, write_report
from itmatch.evaluation.scores import embedding_scores

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def make_split(c2i, n_img, **kw) -> RetrievalSplit:
    return RetrievalSplit(name="test", root=Path("."), captions=[f"c{k}" for k in range(len(c2i))],
                          caption_to_image=np.asarray(c2i), image_ids=[str(i) for i in range(n_img)], **kw)


def integer_embeddings(rng, c2i, n_img, dim=8):
    img = torch.as_tensor(rng.integers(-3, 4, size=(n_img, dim)), dtype=torch.float32)
    cap = img[torch.as_tensor(c2i)] + torch.as_tensor(rng.integers(-3, 4, size=(len(c2i), dim)), dtype=torch.float32)
    return img, cap


def test_plain_report_fields_and_values():
    rng = np.random.default_rng(0)
    c2i = rng.permutation(np.repeat(np.arange(30), rng.integers(3, 8, 30)))
    S = rng.standard_normal((30, len(c2i))).astype(np.float32)
    report = evaluate_sims(S, "plain", caption_to_image=c2i, dataset="toy", split_name="dev")
    for key in ("dataset", "split", "protocol", "n_images", "n_captions", "captions_per_image", "tie_policy",
                "elapsed_s", "version", "metrics"):
        assert key in report
    assert report["dataset"] == "toy" and report["split"] == "dev" and report["protocol"] == "plain"
    assert (report["n_images"], report["n_captions"]) == (30, len(c2i))
    assert report["captions_per_image"] is None  # it varies
    assert report["tie_policy"] == "pessimistic" and report["version"] == __version__
    assert set(METRIC_KEYS) <= set(report["metrics"])
    assert report["metrics"] == retrieval_metrics(S, c2i)
    opt = evaluate_sims(S, "plain", caption_to_image=c2i, tie_policy="optimistic")
    assert opt["tie_policy"] == "optimistic"


def test_caption_map_from_split_from_shape_and_errors():
    rng = np.random.default_rng(1)
    S = rng.standard_normal((10, 50)).astype(np.float32)
    inferred = evaluate_sims(S, "plain")  # 5 consecutive captions per image
    assert inferred["captions_per_image"] == 5
    c2i = np.repeat(np.arange(10), 5)
    assert inferred["metrics"] == evaluate_sims(S, "plain", make_split(c2i, 10))["metrics"]
    with pytest.raises(ItmatchError, match="cannot tell which captions"):
        evaluate_sims(S[:, :47], "plain")
    with pytest.raises(ItmatchError, match="split 'test' has 10 images and 45 captions"):
        evaluate_sims(S, "plain", make_split(c2i[:45], 10))
    with pytest.raises(ItmatchError, match="disagrees with split"):
        evaluate_sims(S, "plain", make_split(c2i, 10), caption_to_image=c2i[::-1].copy())
    with pytest.raises(ItmatchError, match="unknown protocol"):
        evaluate_sims(S, "coco-2k")
    with pytest.raises(ItmatchError, match="needs the split's COCO image and caption ids"):
        evaluate_sims(np.zeros((5000, 5000), dtype=np.float16), "eccv", caption_to_image=np.arange(5000))


def test_fixed_size_protocols_check_the_image_count():
    rng = np.random.default_rng(2)
    S = rng.standard_normal((1000, 2000)).astype(np.float32)
    report = evaluate_sims(S, "f30k-1k", caption_to_image=np.repeat(np.arange(1000), 2))
    assert report["metrics"] == retrieval_metrics(S, np.repeat(np.arange(1000), 2))
    with pytest.raises(ItmatchError, match="f30k-1k expects 1000 test images .* 999 image rows"):
        evaluate_sims(S[:999, :1998], "f30k-1k", caption_to_image=np.repeat(np.arange(999), 2))
    for protocol in ("coco-5k", "coco-1k"):
        with pytest.raises(ItmatchError, match=f"{protocol} expects 5000"):
            evaluate_sims(S, protocol, caption_to_image=np.repeat(np.arange(1000), 2))


def test_coco_1k_folds_use_caption_to_image_and_average_correctly():
    rng = np.random.default_rng(3)
    n_img = 5000
    # 1 to 3 captions per image, columns shuffled: fold captions are NOT positions*5
    c2i = rng.permutation(np.repeat(np.arange(n_img), rng.integers(1, 4, n_img)))
    img, cap = integer_embeddings(rng, c2i, n_img)
    report = evaluate_sims(embedding_scores(img, cap), "coco-1k", caption_to_image=c2i)
    assert len(report["folds"]) == 5
    for f, fold in enumerate(report["folds"]):
        rows = np.arange(f * 1000, (f + 1) * 1000)
        cols = np.flatnonzero(np.isin(c2i, rows))
        dense = (img[rows] @ cap[cols].T).numpy()
        assert fold == retrieval_metrics(dense, c2i[cols] - f * 1000)
    m = report["metrics"]
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(np.mean([fold[key] for fold in report["folds"]]))
    # rSum of the averaged folds is the sum of the six averaged recalls (not 6x anything)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in RECALLS))
    assert m["rsum"] <= 600.0
    # the 5K protocol on the same matrix differs (bigger gallery, lower recall)
    five_k = evaluate_sims(embedding_scores(img, cap), "coco-5k", caption_to_image=c2i)["metrics"]
    assert five_k["rsum"] < m["rsum"]


def scenes_split(rng, n_img=24):
    c2i = rng.permutation(np.repeat(np.arange(n_img), rng.integers(3, 6, n_img)))
    n_cap = len(c2i)
    rel = rng.random((n_cap, n_img)) < 0.1
    rel[np.arange(n_cap), c2i] = True
    twins = np.array([[0, 1], [2, 3], [5, 4], [10, 20]])
    return make_split(c2i, n_img, relevance=sp.csr_matrix(rel), twins=twins), rel


def test_scenes_protocol_combines_recalls_relevance_and_twins():
    rng = np.random.default_rng(4)
    split, rel = scenes_split(rng)
    S = rng.integers(0, 5, size=(split.n_images, split.n_captions)).astype(np.float32)
    report = evaluate_sims(S, "scenes", split, chunk_rows=5)
    m = report["metrics"]
    assert {k: m[k] for k in METRIC_KEYS} == retrieval_metrics(S, split.caption_to_image)
    i2t, t2i = relevance_ranking(S, sp.csr_matrix(rel.T), sp.csr_matrix(rel))
    assert m["map_at_r_i2t"] == pytest.approx(i2t.summary()["map_at_r"])
    assert m["map_at_r_t2i"] == pytest.approx(t2i.summary()["map_at_r"])
    assert m["rprecision_i2t"] == pytest.approx(i2t.summary()["rprecision"])
    assert m["rprecision_t2i"] == pytest.approx(t2i.summary()["rprecision"])
    twins = twin_accuracy(S, split.caption_to_image, split.twins, sp.csr_matrix(rel))
    assert m["twin_acc_t2i"] == pytest.approx(twins["twin_acc_t2i"])
    assert m["twin_acc_i2t"] == pytest.approx(twins["twin_acc_i2t"])
    # the ground truth is always relevant, even where a stored matrix forgot it
    rel_missing = rel.copy()
    rel_missing[np.arange(split.n_captions), split.caption_to_image] = False
    split.relevance = sp.csr_matrix(rel_missing)
    assert evaluate_sims(S, "scenes", split)["metrics"] == m
    # a split without twins reports None, a split without relevance is an error
    split.twins = None
    assert evaluate_sims(S, "scenes", split)["metrics"]["twin_acc_t2i"] is None
    split.relevance = None
    with pytest.raises(ItmatchError, match="needs the split's relevance matrix"):
        evaluate_sims(S, "scenes", split)
    split.relevance = sp.csr_matrix(rel[:, :-1])
    with pytest.raises(ItmatchError, match="relevance matrix is"):
        evaluate_sims(S, "scenes", split)


def test_report_json_is_written_atomically_and_table_is_readable(tmp_path):
    rng = np.random.default_rng(5)
    n_img = 5000
    c2i = np.repeat(np.arange(n_img), 2)
    img, cap = integer_embeddings(rng, c2i, n_img, dim=4)
    report = evaluate_sims(embedding_scores(img, cap), "coco-1k", caption_to_image=c2i, dataset="coco")
    out = tmp_path / "report.json"
    out.write_text("old")
    write_report(report, out)
    assert json.loads(out.read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left
    text = format_report(report)
    assert "protocol coco-1k" in text and "rSum" in text and "fold" in text
    assert f"{report['metrics']['i2t_r1']:.1f}" in text
    with pytest.raises(ItmatchError, match="does not exist"):
        write_report(report, tmp_path / "missing" / "r.json")
