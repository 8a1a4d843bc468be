"""Pooling, encoders and ranking losses against slow independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itmatch.encoders.image import GridEncoder, RegionEncoder
from itmatch.encoders.pooling import GPO, MaxKPool, MeanPool
from itmatch.encoders.text import GRUTextEncoder
from itmatch.objectives.contrastive import InfoNCE
from itmatch.objectives.ranking import DistanceWeightedTriplet, HingeLoss

torch.manual_seed(0)


def ragged(b=5, max_len=9, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (b,), generator=g)
    lengths[0] = max_len
    x = torch.randn(b, max_len, d, generator=g)
    mask = torch.arange(max_len)[None] < lengths[:, None]
    return x, mask, lengths


def reference_pe(n, dim):
    pe = np.zeros((n, dim))
    for pos in range(n):
        for i in range(0, dim, 2):
            angle = pos / (10000 ** (i / dim))
            pe[pos, i] = math.sin(angle)
            if i + 1 < dim:
                pe[pos, i + 1] = math.cos(angle)
    return torch.tensor(pe, dtype=torch.float32)


def gpo_reference(gpo: GPO, x, lengths):
    out = []
    for b in range(x.shape[0]):
        n = int(lengths[b])
        items = x[b, :n]
        sorted_items = torch.stack([items[:, d].sort(descending=True).values for d in range(items.shape[1])], 1)
        h, _ = gpo.gru(reference_pe(n, gpo.pe_dim).unsqueeze(0))
        h = (h[0, :, : gpo.hidden] + h[0, :, gpo.hidden :]) / 2
        w = torch.softmax(gpo.score(h).squeeze(-1) / 0.1, 0)
        out.append((sorted_items * w[:, None]).sum(0))
    return torch.stack(out)


def test_gpo_matches_per_sample_reference_and_ignores_padding():
    gpo = GPO(pe_dim=8, hidden=6)
    x, mask, lengths = ragged()
    with torch.no_grad():
        got, weights = gpo(x, mask, return_weights=True)
        torch.testing.assert_close(got, gpo_reference(gpo, x, lengths), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights.sum(1), torch.ones(len(x)))
        assert (weights[~mask[:, : weights.shape[1]]] == 0).all()
        # Extra padded positions full of garbage change nothing.
        garbage = torch.cat([x, 1e3 * torch.randn(x.shape[0], 4, x.shape[2])], 1)
        padded_mask = torch.cat([mask, torch.zeros(x.shape[0], 4, dtype=torch.bool)], 1)
        torch.testing.assert_close(gpo(garbage, padded_mask), got)


def test_maxk_and_mean_pool_match_loops():
    x, mask, lengths = ragged(d=4)
    for k in (1, 2, 3):
        got = MaxKPool(k)(x, mask)
        for b in range(len(x)):
            n = int(lengths[b])
            top = x[b, :n].sort(0, descending=True).values[: min(k, n)]
            torch.testing.assert_close(got[b], top.mean(0))
    got = MeanPool()(x, mask)
    for b in range(len(x)):
        torch.testing.assert_close(got[b], x[b, : int(lengths[b])].mean(0))


def batch_with_repeats():
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(6, 6, generator=g) * 2 - 1
    image_of_caption = torch.tensor([0, 0, 1, 2, 3, 3])  # two images appear twice
    image_of_row = torch.tensor([0, 0, 1, 2, 3, 3])
    positives = image_of_row[:, None] == image_of_caption[None, :]
    return sims, positives


def hinge_reference(sims, positives, margin, hardest):
    total = 0.0
    n_img, n_txt = sims.shape
    for r in range(n_img):
        for c in range(n_txt):
            if not positives[r, c]:
                continue
            row = [max(0.0, margin + float(sims[r, j]) - float(sims[r, c])) for j in range(n_txt) if not positives[r, j]]
            col = [max(0.0, margin + float(sims[i, c]) - float(sims[r, c])) for i in range(n_img) if not positives[i, c]]
            if hardest:
                total += (max(row) if row else 0.0) + (max(col) if col else 0.0)
            else:
                total += sum(row) + sum(col)
    return total


@pytest.mark.parametrize("hardest", [False, True])
def test_hinge_matches_loop_with_repeated_images(hardest):
    sims, positives = batch_with_repeats()
    got = HingeLoss(0.2, max_violation=hardest)(sims, positives)
    assert float(got) == pytest.approx(hinge_reference(sims, positives, 0.2, hardest), rel=1e-5)


def test_distance_weighted_weights_closed_form_and_loss_given_negatives():
    dwt = DistanceWeightedTriplet(margin=0.2, dim=16, cutoff=0.5, nonzero_loss_cutoff=1.4)
    sims = torch.tensor([[0.9, 0.5, -0.2, 0.1]])
    negatives = torch.tensor([[False, True, True, True]])
    logits = dwt.sampling_logits(sims, negatives)[0]
    for j, s in enumerate([0.9, 0.5, -0.2, 0.1]):
        d = math.sqrt(2 - 2 * s)
        if j == 0 or d >= 1.4:
            assert logits[j] == float("-inf")
        else:
            d = max(d, 0.5)
            expected = -((16 - 2) * math.log(d) + (13 / 2) * math.log(1 - d * d / 4))
            assert float(logits[j]) == pytest.approx(expected, rel=1e-5)
    # Loss for fixed negatives against a loop.
    sims, positives = batch_with_repeats()
    pos_r, pos_c = positives.nonzero(as_tuple=True)
    assert len(pos_r) == 10
    neg_c = torch.tensor([2, 3, 2, 5, 1, 2, 0, 0, -1, 3])  # -1: no allowed negative for that anchor
    neg_r = torch.tensor([3, 2, 4, 0, -1, 1, 1, 2, 0, 0])
    got = dwt.loss_given_negatives(sims, pos_r, pos_c, sims[pos_r, pos_c], neg_c, neg_r)
    ref = 0.0
    for k in range(len(pos_r)):
        s = float(sims[pos_r[k], pos_c[k]])
        if neg_c[k] >= 0:
            ref += max(0.0, 0.2 + float(sims[pos_r[k], neg_c[k]]) - s)
        if neg_r[k] >= 0:
            ref += max(0.0, 0.2 + float(sims[neg_r[k], pos_c[k]]) - s)
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_distance_weighted_sampling_follows_its_weights():
    dwt = DistanceWeightedTriplet(dim=8, cutoff=0.5, nonzero_loss_cutoff=1.9)
    sims = torch.tensor([[1.0, 0.6, 0.2, -0.1, 0.4]]).repeat(20000, 1)
    negatives = torch.tensor([[False, True, True, True, True]]).repeat(20000, 1)
    logits = dwt.sampling_logits(sims, negatives)
    draws = dwt.draw(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.softmax(logits[0].masked_fill(~negatives[0], float("-inf")), 0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert freq[0] == 0  # never the positive


def test_infonce_matches_loop():
    sims, positives = batch_with_repeats()
    got = InfoNCE(temperature=0.1)(sims, positives)
    terms_i2t, terms_t2i = [], []
    for r in range(6):
        for c in range(6):
            if positives[r, c]:
                row = [10 * float(sims[r, j]) for j in range(6) if not positives[r, j]] + [10 * float(sims[r, c])]
                col = [10 * float(sims[i, c]) for i in range(6) if not positives[i, c]] + [10 * float(sims[r, c])]
                terms_i2t.append(math.log(sum(math.exp(v) for v in row)) - 10 * float(sims[r, c]))
                terms_t2i.append(math.log(sum(math.exp(v) for v in col)) - 10 * float(sims[r, c]))
    assert float(got) == pytest.approx((np.mean(terms_i2t) + np.mean(terms_t2i)) / 2, rel=1e-5)


def test_region_encoder_ignores_padded_regions_in_training_mode():
    enc = RegionEncoder(10, 8).train()
    x, mask, _ = ragged(b=4, max_len=5, d=10)
    a = enc(x, mask)
    y = x.clone()
    y[~mask] = 1e4
    b = enc(y, mask)
    torch.testing.assert_close(a, b)
    assert (a[~mask] == 0).all()


def test_gru_encoder_is_padding_invariant():
    enc = GRUTextEncoder(vocab_size=30, word_dim=8, embed_dim=6).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = tokens != 0
    with torch.no_grad():
        full = enc(tokens, mask)
        alone = enc(tokens[:1, :3], mask[:1, :3])
    torch.testing.assert_close(full[0, :3], alone[0])


def test_bert_encoder_loads_local_minilm():
    from itmatch.data.text import HFTokenizer, default_bert_path
    from itmatch.encoders.text import BertTextEncoder

    tok = HFTokenizer(default_bert_path())
    enc = BertTextEncoder(default_bert_path(), embed_dim=16).eval()
    tokens, mask = tok.encode_batch(["a red circle left of a blue square", "two stars"], 32)
    with torch.no_grad():
        a, b = enc(tokens, mask), enc(tokens, mask)
    assert a.shape == (2, tokens.shape[1], 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_grid_encoder_loads_pretrained_cnn():
    enc = GridEncoder(embed_dim=8).eval()
    with torch.no_grad():
        frag, mask = enc(torch.randn(2, 3, 64, 64))
    assert frag.shape == (2, 4, 8) and mask.all()
    # Real weights: the stem is not at its random initialisation (BatchNorm stats are loaded).
    assert not torch.allclose(enc.backbone._bn0.running_var, torch.ones_like(enc.backbone._bn0.running_var))


def test_vse_model_end_to_end_and_gradients_reach_both_encoders():
    from itmatch.config import config_from_dict
    from itmatch.data.batch import ImageBatch, TextBatch
    from itmatch.data.text import WordVocab
    from itmatch.methods.registry import build_model, build_objective
    from itmatch.training.loop import TrainProgress

    vocab = WordVocab.build(["a red circle", "a blue square left of a star", "two stars"])
    cfg = config_from_dict({"model": {"embed_dim": 16, "image": {"feature_dim": 10}, "text": {"word_dim": 8}}})
    model, objective = build_model(cfg, vocab), build_objective(cfg)
    x, mask, _ = ragged(b=3, max_len=4, d=10)
    tokens, tmask = vocab.encode_batch(["a red circle", "a blue square left of a star", "two stars"], 16)
    idx = torch.arange(3)
    img_b = ImageBatch(image_index=idx, regions=x, region_mask=mask)
    txt_b = TextBatch(tokens=tokens, token_mask=tmask, caption_index=idx, image_index=idx)
    out = model(img_b, txt_b)
    torch.testing.assert_close(out["img"].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model.similarity(out["img"], out["txt"]), out["img"] @ out["txt"].T)
    terms = objective(out, img_b, txt_b, TrainProgress(epoch=0))
    assert set(terms) == {"loss", "hinge"} and terms["loss"].requires_grad
    terms["loss"].backward()
    assert model.image_encoder.fc.weight.grad.abs().sum() > 0
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0
    # Eval mode is deterministic and matches the separate encoders.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img_b), model.encode_image(img_b))
        torch.testing.assert_close(model(img_b, txt_b)["txt"], model.encode_text(txt_b))
