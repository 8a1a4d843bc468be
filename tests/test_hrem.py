"""HREM: the association graph, both interaction mechanisms and the objective against slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itmatch.config import config_from_dict
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.fragments import RelationEnhancedPool
from itmatch.objectives.relations.graph import AssociationGraphBuilder, relevance_regularizer
from itmatch.objectives.relations.interaction import FusionLayer, StandaloneLayer
from itmatch.objectives.relations.matching import fragment_matching


def ragged_batch(n, max_len, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, max_len, d, generator=g)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    mask = torch.arange(max_len)[None] < lengths[:, None]
    x = x.masked_fill(~mask[..., None], 7.0)  # padding holds garbage on purpose
    return x, mask


def slow_matching(img, img_mask, txt, txt_mask, k):
    """Per pair, in plain loops: Eq. 7 (p) and Eq. 8 (q) on cosine similarities of real fragments."""
    ni, nt = len(img), len(txt)
    p_i2t, p_t2i = torch.zeros(ni, nt), torch.zeros(nt, ni)
    q_i2t, q_t2i = torch.zeros(ni, nt, k), torch.zeros(nt, ni, k)
    for i in range(ni):
        regions = [img[i, m] for m in range(img.shape[1]) if img_mask[i, m]]
        for j in range(nt):
            words = [txt[j, n] for n in range(txt.shape[1]) if txt_mask[j, n]]
            cos = torch.tensor([[float(F.cosine_similarity(r, w, dim=0)) for w in words] for r in regions])
            best_word = cos.max(1).values
            best_region = cos.max(0).values
            p_i2t[i, j] = best_word.mean()
            p_t2i[j, i] = best_region.mean()
            top = sorted(best_word.tolist(), reverse=True)[:k]
            q_i2t[i, j, : len(top)] = torch.tensor(top)
            top = sorted(best_region.tolist(), reverse=True)[:k]
            q_t2i[j, i, : len(top)] = torch.tensor(top)
    return p_i2t, p_t2i, q_i2t, q_t2i


def test_fragment_matching_matches_per_pair_loops():
    img, img_mask = ragged_batch(4, 5, 8, seed=0)
    txt, txt_mask = ragged_batch(3, 6, 8, seed=1)
    m = fragment_matching(img, img_mask, txt, txt_mask, k=4)
    p_i2t, p_t2i, q_i2t, q_t2i = slow_matching(img, img_mask, txt, txt_mask, k=4)
    torch.testing.assert_close(m.p_i2t, p_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.p_t2i, p_t2i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.q_i2t, q_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.q_t2i, q_t2i, atol=1e-5, rtol=1e-5)


def graph_inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    u = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    img, img_mask = ragged_batch(n, 5, 8, seed + 1)
    txt, txt_mask = ragged_batch(n, 7, 8, seed + 2)
    return v, u, fragment_matching(img, img_mask, txt, txt_mask, k=3)


def test_connection_and_relevance_matrices_follow_eq_5_to_10():
    torch.manual_seed(0)
    v, u, m = graph_inputs()
    n, tau, sigma = len(v), 0.5, 1.0
    builder = AssociationGraphBuilder(k=3, tau=tau, sigma=sigma).requires_grad_(False)
    graph = builder(v, u, m)
    keep = int(math.floor(tau * n))
    assert graph.connection.shape == (2 * n, 2 * n)

    def first(scores_row):
        return set(sorted(range(len(scores_row)), key=lambda j: -float(scores_row[j]))[:keep])

    for i in range(n):
        row = graph.connection[i]
        assert {j for j in range(n) if row[j]} == first([float(v[i] @ v[j]) for j in range(n)])  # Eq. 5, I->I
        assert {j for j in range(n) if row[n + j]} == first(m.p_i2t[i])  # Eq. 6-7, I->T
        row = graph.connection[n + i]
        assert {j for j in range(n) if row[j]} == first(m.p_t2i[i])  # T->I
        assert {j for j in range(n) if row[n + j]} == first([float(u[i] @ u[j]) for j in range(n)])  # T->T
        for j in range(n):
            # Eq. 10 (the paper's subscripts of S_I->I and S_T->T are swapped; images use v)
            assert float(graph.relevance[i, j]) == pytest.approx(math.exp(-float(((v[i] - v[j]) ** 2).sum()) / sigma), rel=1e-5)
            assert float(graph.relevance[n + i, n + j]) == pytest.approx(math.exp(-float(((u[i] - u[j]) ** 2).sum()) / sigma), rel=1e-5)
            # Eq. 9: MLP of q plus p, one MLP per direction
            s_it = float(builder.mlp_i2t.net(m.q_i2t[i, j]).squeeze()) + float(m.p_i2t[i, j])
            s_ti = float(builder.mlp_t2i.net(m.q_t2i[i, j]).squeeze()) + float(m.p_t2i[i, j])
            assert float(graph.relevance[i, n + j]) == pytest.approx(s_it, rel=1e-5, abs=1e-6)
            assert float(graph.relevance[n + i, j]) == pytest.approx(s_ti, rel=1e-5, abs=1e-6)


def test_relevance_regularizer_is_eq_11_and_trains_the_mlps():
    v, u, m = graph_inputs(seed=3)
    builder = AssociationGraphBuilder(k=3, tau=0.5, sigma=1.0)
    graph = builder(v, u, m)
    got = relevance_regularizer(v, u, graph, 1.0)
    ref = 0.0
    for s, a, b in ((graph.s_i2t, v, u), (graph.s_t2i, u, v)):
        for i in range(len(a)):
            target = torch.softmax(torch.tensor([math.exp(-float(((a[i] - b[j]) ** 2).sum())) for j in range(len(b))]), 0)
            learned = torch.softmax(s[i].detach(), 0)
            ref += float((target * (target.log() - learned.log())).sum()) / len(a)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    got.backward()
    assert builder.mlp_i2t.net[0].weight.grad.abs().sum() > 0
    assert builder.mlp_t2i.net[0].weight.grad.abs().sum() > 0


def slow_attention(layer_attn, query, key, connection, relevance, weight):
    """One multi-head attention with Eq. 12 logits, per query and per head, from the layer's weights."""
    mha = layer_attn.attn
    d, h = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = mha.in_proj_bias.split(d)
    q, k, val = query @ wq.T + bq, key @ wk.T + bk, key @ wv.T + bv
    out = torch.zeros(len(query), d)
    hd = d // h
    for i in range(len(query)):
        for head in range(h):
            sl = slice(head * hd, (head + 1) * hd)
            logits = []
            for j in range(len(key)):
                if connection[i, j]:
                    logits.append(float(q[i, sl] @ k[j, sl]) / math.sqrt(hd) + weight * float(relevance[i, j]))
                else:
                    logits.append(float("-inf"))
            w = torch.softmax(torch.tensor(logits), 0)
            out[i, sl] = (w[:, None] * val[:, sl]).sum(0)
    out = out @ mha.out_proj.weight.T + mha.out_proj.bias
    return layer_attn.norm(query + out)


def test_fusion_mechanism_matches_slow_eq_12():
    torch.manual_seed(0)
    v, u, m = graph_inputs(seed=5)
    graph = AssociationGraphBuilder(k=3, tau=0.5, sigma=1.0)(v, u, m)
    layer = FusionLayer(dim=8, heads=2, ff_dim=16, dropout=0.0).eval()
    with torch.no_grad():
        v_bar, u_bar = layer(v, u, graph, weight=1.5)
        nodes = torch.cat([v, u])
        ref = layer.ff(slow_attention(layer.attention, nodes, nodes, graph.connection, graph.relevance, 1.5))
    torch.testing.assert_close(torch.cat([v_bar, u_bar]), ref, atol=1e-5, rtol=1e-4)


def test_standalone_mechanism_matches_slow_blocks():
    torch.manual_seed(0)
    v, u, m = graph_inputs(seed=7)
    n = len(v)
    graph = AssociationGraphBuilder(k=3, tau=0.5, sigma=1.0)(v, u, m)
    layer = StandaloneLayer(dim=8, heads=2, ff_dim=16, dropout=0.0).eval()
    a, s = graph.connection, graph.relevance
    with torch.no_grad():
        v_bar, u_bar = layer(v, u, graph, weight=1.0)
        v_cross = slow_attention(layer.cross_img, v, u, a[:n, n:], s[:n, n:], 1.0)
        u_cross = slow_attention(layer.cross_txt, u, v, a[n:, :n], s[n:, :n], 1.0)
        v_ref = layer.ff_img(slow_attention(layer.self_img, v_cross, v_cross, a[:n, :n], s[:n, :n], 1.0))
        u_ref = layer.ff_txt(slow_attention(layer.self_txt, u_cross, u_cross, a[n:, n:], s[n:, n:], 1.0))
    torch.testing.assert_close(v_bar, v_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(u_bar, u_ref, atol=1e-5, rtol=1e-4)


def test_relation_pool_is_eq_2_and_ignores_padding():
    pool = RelationEnhancedPool(dim=8, beta=0.8, k=1, heads=2, ff_dim=16, dropout=0.0).eval()
    x, mask = ragged_batch(3, 6, 8, seed=2)
    with torch.no_grad():
        got = pool(x, mask)
        enhanced = pool.attention(x, mask)
        for b in range(3):
            n = int(mask[b].sum())
            ref = 0.8 * x[b, :n].max(0).values + 0.2 * enhanced[b, :n].mean(0)
            torch.testing.assert_close(got[b], ref)
            alone = pool(x[b : b + 1, :n], mask[b : b + 1, :n])
            torch.testing.assert_close(alone[0], got[b], atol=1e-5, rtol=1e-5)


def hrem_setup(mechanism):
    from itmatch.data.text import WordVocab
    from itmatch.methods.registry import build_model, build_objective

    captions = ["a red circle", "a blue square left of a star", "two stars", "a green cross above a circle"]
    vocab = WordVocab.build(captions)
    cfg = config_from_dict({
        "model": {"method": "hrem", "embed_dim": 16, "image": {"feature_dim": 10}, "text": {"word_dim": 8}},
        "loss": {"name": "triplet"},
        "hrem": {"mechanism": mechanism, "heads": 2, "fragment_heads": 2, "fragment_ff": 16, "topk": 3,
                 "instance_warmup_steps": 5, "dropout": 0.0},
    })
    torch.manual_seed(0)
    model, objective = build_model(cfg, vocab), build_objective(cfg)
    regions, mask = ragged_batch(4, 5, 10, seed=9)
    tokens, tmask = vocab.encode_batch(captions, 16)
    idx = torch.arange(4)
    return model, objective, ImageBatch(idx, regions, mask), TextBatch(tokens, tmask, idx, idx)


@pytest.mark.parametrize("mechanism", ["fusion", "standalone"])
def test_instance_terms_switch_on_and_send_gradients_to_both_encoders(mechanism):
    from itmatch.training.loop import TrainProgress

    model, objective, img_b, txt_b = hrem_setup(mechanism)
    out = model(img_b, txt_b)
    early = objective(out, img_b, txt_b, TrainProgress(epoch=0, step=0))
    assert set(early) == {"loss", "base"}
    late = objective(out, img_b, txt_b, TrainProgress(epoch=1, step=5))
    assert {"base", "enh_enh", "enh_base", "base_enh", "reg", "loss"} <= set(late)
    instance_only = late["loss"] - late["base"]  # Eq. 14 without L(v, u), plus L_reg
    model.zero_grad()
    instance_only.backward()
    assert model.image_encoder.fc.weight.grad.abs().sum() > 0
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0
    assert objective.graph.mlp_i2t.net[0].weight.grad.abs().sum() > 0


def test_trained_model_carries_no_relation_module():
    model, objective, img_b, txt_b = hrem_setup("fusion")
    model_keys = set(model.state_dict())
    objective_params = {id(p) for p in objective.parameters()}
    assert not objective_params & {id(p) for p in model.parameters()}
    assert not any("interaction" in k or "mlp_i2t" in k or "graph" in k for k in model_keys)
    # At inference, encoding is the model alone: same outputs with or without the objective around.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(img_b), model(img_b, txt_b)["img"])
