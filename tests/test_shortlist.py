"""Shortlist re-ranking: k = all equals exhaustive scoring; smaller k keeps exact scores on the shortlist,
ranked above every other candidate, and reports its recall."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
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
    # restricted to some captions, with a relevance matrix (captions x images): counted directly
    sub = np.array([0, 5, 17, 42, 59])
    relevance = np.random.default_rng(0).random((60, 12)) < 0.3
    part = short.recall(c2i, captions=sub, relevance=sp.csr_matrix(relevance))
    assert part["gt_pairs"] == 100.0 * listed[c2i[sub], sub].mean()
    assert part["i2t"] == 100.0 * np.mean([listed[i, sub[c2i[sub] == i]].any() for i in np.unique(c2i[sub])])
    assert part["relevant_pairs"] == 100.0 * listed.T[sub][relevance[sub]].mean()


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
    assert reports["shortlist"]["shortlist"]["relevant_pairs"] == 100.0  # scenes: main captions, relevance
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ckpt"), "--shortlist", "0"]) == 2
    assert "itmatch: error: --shortlist must be >= 1" in capsys.readouterr().err


def test_candidate_scores_equal_the_sharded_scorer_for_every_aggregation():
    """The re-ranking path (real words only, gathered in chunks) against `model_scores` tiles of
    `fragment_scores`: masks with holes, an image without regions, a caption without words."""
    from itmatch.similarity.fragment import CaptionWords, candidate_fragment_scores

    images, captions, _ = data()
    g = torch.Generator().manual_seed(3)
    img_mask = images.mask & (torch.rand(images.mask.shape, generator=g) > 0.2)
    img_mask[4] = False
    txt_mask = captions.mask & (torch.rand(captions.mask.shape, generator=g) > 0.2)
    txt_mask[7] = False
    images = Fragments(images.features.masked_fill(~img_mask[..., None], 0.0), img_mask)
    captions = Fragments(captions.features.masked_fill(~txt_mask[..., None], 0.0), txt_mask)
    words = CaptionWords(captions.features, captions.mask)
    candidates = torch.tensor([59, 7, 0, 31, 30, 0, 12])  # any order, repeats allowed
    for region_reduce in ("max", "sum"):
        for word_reduce in ("sum", "mean"):
            def tiled(a, b, region_reduce=region_reduce, word_reduce=word_reduce):
                return fragment_scores(a.features, a.mask, b.features, b.mask, region_reduce, word_reduce,
                                       normalized=True)

            sharded = model_scores(tiled, images, captions, (5, 7)).dense()
            for chunk_rows in (None, 3):
                for i in range(len(images)):
                    got = candidate_fragment_scores(images.features[i], images.mask[i], words, candidates,
                                                    region_reduce, word_reduce, chunk_rows=chunk_rows)
                    np.testing.assert_allclose(got.numpy(), sharded[i, candidates.numpy()], rtol=0, atol=2e-6)
    # an independent loop: each real word's best real region, summed over the words
    i, j = int(images.mask.sum(1).argmax()), int(captions.mask.sum(1).argmax())
    r, c = images.features[i][images.mask[i]], captions.features[j][captions.mask[j]]
    loop = sum(max(float(r[a] @ c[w]) for a in range(len(r))) for w in range(len(c)))
    got = candidate_fragment_scores(images.features[i], images.mask[i], words, torch.tensor([j]))
    assert len(r) > 1 and len(c) > 1 and abs(float(got[0]) - loop) < 1e-5


def test_teran_shortlist_uses_the_candidate_scorer_and_stays_exact(tiny_scenes):
    from itmatch.config import config_from_dict
    from itmatch.data.precomp import load_split
    from itmatch.data.text import WordVocab
    from itmatch.evaluation.encode import encode_captions, encode_images
    from itmatch.evaluation.scores import score_model
    from itmatch.methods.registry import build_model

    split = load_split(tiny_scenes, "test")
    vocab = WordVocab.build(split.captions)
    cfg = config_from_dict({"model": {"method": "teran", "embed_dim": 16, "image": {"feature_dim": int(
        split.features.shape[-1])}, "text": {"word_dim": 8}}, "teran": {"heads": 2, "ff": 16}})
    torch.manual_seed(0)
    model = build_model(cfg, vocab).eval()
    images, captions = encode_images(model, split, model.cfg), encode_captions(model, split, vocab, model.cfg)
    calls = []
    make = model.candidate_scorer

    def counting(txt):
        scorer = make(txt)
        return lambda img, cols: calls.append(len(cols)) or scorer(img, cols)

    model.candidate_scorer = counting
    short = ShortlistScores.for_model(model, images, captions, 3)
    exhaustive = score_model(model, images, captions).dense()
    listed = short.shortlist.toarray()
    assert sum(calls) == short.shortlist.nnz and 0 < short.shortlist.nnz < listed.size
    np.testing.assert_allclose(short.dense()[listed], exhaustive[listed], rtol=1e-6, atol=1e-6)  # sums of ~15
