"""Shortlist re-ranking: k = all equals exhaustive scoring; smaller k keeps exact scores on the shortlist,
ranked above every other candidate, and reports its recall."""

from __future__ import annotations

import numpy as np
import torch

from itmatch.evaluation.protocols import evaluate_sims
from itmatch.evaluation.scores import model_scores
from itmatch.evaluation.shortlist import ShortlistScores, mean_pooled, shortlist_pairs, topk_indices
from itmatch.models.contract import Fragments
from itmatch.similarity.fragment import fragment_scores, unit_fragments


def encoded(n, length, dim, seed, centres):
    """Unit fragments around one centre per item group, so that the first stage carries signal."""
    g = torch.Generator().manual_seed(seed)
    x = centres[:, None, :] + 0.8 * torch.randn(n, length, dim, generator=g)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (n,), generator=g)[:, None]
    return Fragments(unit_fragments(x, mask), mask)


def sim(a, b):
    return fragment_scores(a.features, a.mask, b.features, b.mask, normalized=True)


def data():
    centres = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    images = encoded(12, 6, 16, 1, centres)
    captions = encoded(60, 5, 16, 2, centres.repeat_interleave(5, 0))
    return images, captions, np.repeat(np.arange(12), 5)


def test_topk_and_the_union_of_both_directions():
    images, captions, _ = data()
    a, b = mean_pooled(images), mean_pooled(captions)
    full = a @ b.T
    top = topk_indices(a, b, 4)
    assert torch.equal(top, full.topk(4, dim=1).indices)
    pairs = shortlist_pairs(a, b, 4, 2).toarray()
    expected = np.zeros((12, 60), dtype=bool)
    for i in range(12):
        expected[i, full[i].topk(4).indices.numpy()] = True
    for c in range(60):
        expected[full[:, c].topk(2).indices.numpy(), c] = True
    np.testing.assert_array_equal(pairs, expected)


def test_k_all_equals_exhaustive_scoring():
    images, captions, c2i = data()
    exhaustive = model_scores(sim, images, captions, (5, 7))
    short = ShortlistScores(sim, images, captions, mean_pooled(images), mean_pooled(captions), 60, 12)
    assert short.shortlist.nnz == 12 * 60
    np.testing.assert_allclose(short.dense(), exhaustive.dense(), rtol=0, atol=2e-6)
    assert evaluate_sims(short, "plain", caption_to_image=c2i)["metrics"] == \
        evaluate_sims(exhaustive, "plain", caption_to_image=c2i)["metrics"]
    assert short.recall(c2i)["gt_pairs"] == 100.0


def test_small_k_is_exact_on_the_shortlist_and_ranks_it_first():
    images, captions, c2i = data()
    short = ShortlistScores(sim, images, captions, mean_pooled(images), mean_pooled(captions), 5, 2)
    dense, exact = short.dense(), sim(images, captions).numpy()
    listed = short.shortlist.toarray()
    np.testing.assert_allclose(dense[listed], exact[listed], rtol=0, atol=2e-6)
    for i in range(12):  # every query ranks its exact candidates above the others
        assert dense[i, listed[i]].min() > dense[i, ~listed[i]].max()
    for c in range(60):
        assert dense[listed[:, c], c].min() > dense[~listed[:, c], c].max()
    rows, cols = np.array([0, 3, 11, 7]), np.array([0, 59, 2, 35])
    np.testing.assert_allclose(short.pairs(rows, cols).numpy(), dense[rows, cols], rtol=0, atol=1e-6)
    recall = short.recall(c2i)
    assert recall["gt_pairs"] == 100.0 * listed[c2i, np.arange(60)].mean()
    assert recall["i2t"] == 100.0 * np.mean([listed[i, c2i == i].any() for i in range(12)])


def test_itmatch_eval_shortlist_with_k_all_reports_the_exhaustive_metrics(tiny_scenes, tmp_path, capsys):
    import json

    from itmatch.checkpoint import save_pretrained
    from itmatch.cli import main
    from itmatch.config import config_from_dict
    from itmatch.data.precomp import load_split
    from itmatch.data.text import WordVocab
    from itmatch.methods.registry import build_model

    split = load_split(tiny_scenes, "train")
    vocab = WordVocab.build(split.captions)
    cfg = config_from_dict({"model": {"method": "teran", "embed_dim": 16, "image": {"feature_dim": int(
        split.features.shape[-1])}, "text": {"word_dim": 8}}, "teran": {"heads": 2, "ff": 16},
        "data": {"root": str(tiny_scenes)}})
    torch.manual_seed(0)
    save_pretrained(build_model(cfg, vocab).eval(), vocab, cfg, tmp_path / "ckpt")
    reports = {}
    for name, extra in (("exhaustive", []), ("shortlist", ["--shortlist", "100000"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(tmp_path / "ckpt"), "--protocol", "plain", "--output", str(out), *extra]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["shortlist"]["metrics"] == reports["exhaustive"]["metrics"]
    assert reports["shortlist"]["shortlist"]["gt_pairs"] == 100.0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ckpt"), "--shortlist", "0"]) == 2
    assert "itmatch: error: --shortlist must be >= 1" in capsys.readouterr().err
