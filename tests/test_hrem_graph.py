"""HREM's instance level (Sec. 3.3) against slow per-pair references written independently here:
fragment matching (Eq. 7-8), connection and relevance matrices (Eq. 4-6, 9-10), L_reg (Eq. 11) and
both interaction mechanisms (Eq. 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itmatch.objectives.relations.graph import AssociationGraphBuilder, relevance_regularizer
from itmatch.objectives.relations.interaction import FusionLayer, RelationInteraction, StandaloneLayer
from itmatch.similarity.fragment import fragment_matching


def ragged_batch(n, max_len, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, max_len, d, generator=g)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    mask = torch.arange(max_len)[None] < lengths[:, None]
    x = x.masked_fill(~mask[..., None], 7.0)  # padding holds garbage on purpose
    return x, mask


def pair_scores(regions, words, scores):
    """Per pair: (best word of each region, best region of each word), element by element."""
    cos = [[float(F.cosine_similarity(r, w, dim=0)) for w in words] for r in regions]
    nr, nw = len(regions), len(words)
    if scores == "scan":
        cos = [[c if c > 0 else 0.1 * c for c in row] for row in cos]  # LeakyReLU(0.1)
        col_norm = [max(math.sqrt(sum(cos[m][n] ** 2 for m in range(nr))), 1e-12) for n in range(nw)]
        row_norm = [max(math.sqrt(sum(cos[m][n] ** 2 for n in range(nw))), 1e-12) for m in range(nr)]
        # a region's best word: each word's scores normalised over the regions (and vice versa)
        region_best = [max(cos[m][n] / col_norm[n] for n in range(nw)) for m in range(nr)]
        word_best = [max(cos[m][n] / row_norm[m] for m in range(nr)) for n in range(nw)]
    else:
        region_best = [max(cos[m]) for m in range(nr)]
        word_best = [max(cos[m][n] for m in range(nr)) for n in range(nw)]
    return region_best, word_best


def slow_matching(img, img_mask, txt, txt_mask, k, scores):
    """Eq. 7 (p = mean of the best matches) and Eq. 8 (q = their top-K, 0-padded), pair by pair."""
    ni, nt = len(img), len(txt)
    p_i2t, p_t2i = torch.zeros(ni, nt), torch.zeros(nt, ni)
    q_i2t, q_t2i = torch.zeros(ni, nt, k), torch.zeros(nt, ni, k)
    for i in range(ni):
        regions = [img[i, m] for m in range(img.shape[1]) if img_mask[i, m]]
        for j in range(nt):
            words = [txt[j, n] for n in range(txt.shape[1]) if txt_mask[j, n]]
            region_best, word_best = pair_scores(regions, words, scores)
            p_i2t[i, j] = sum(region_best) / len(region_best)
            p_t2i[j, i] = sum(word_best) / len(word_best)
            top = sorted(region_best, reverse=True)[:k]
            q_i2t[i, j, : len(top)] = torch.tensor(top)
            top = sorted(word_best, reverse=True)[:k]
            q_t2i[j, i, : len(top)] = torch.tensor(top)
    return p_i2t, p_t2i, q_i2t, q_t2i


@pytest.mark.parametrize("scores", ["scan", "cosine"])
def test_fragment_matching_matches_per_pair_loops(scores):
    img, img_mask = ragged_batch(4, 5, 8, seed=0)
    txt, txt_mask = ragged_batch(3, 6, 8, seed=1)
    m = fragment_matching(img, img_mask, txt, txt_mask, k=4, scores=scores)
    p_i2t, p_t2i, q_i2t, q_t2i = slow_matching(img, img_mask, txt, txt_mask, 4, scores)
    torch.testing.assert_close(m.p_i2t, p_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.p_t2i, p_t2i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.q_i2t, q_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.q_t2i, q_t2i, atol=1e-5, rtol=1e-5)


def unchunked_maxima(img, img_mask, txt, txt_mask, scores):
    """The implementation before chunking (one (Ni, R, Nt, T) tensor and its copies), kept as a reference."""
    r, c = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    (ni, nr), (nt, nw) = img_mask.shape, txt_mask.shape
    sim = (r.reshape(ni * nr, -1) @ c.reshape(nt * nw, -1).T).view(ni, nr, nt, nw)
    valid = img_mask[:, :, None, None] & txt_mask[None, None, :, :]
    to_regions = to_words = sim
    if scores == "scan":
        sim = F.leaky_relu(sim, 0.1).masked_fill(~valid, 0.0)
        to_regions, to_words = F.normalize(sim, dim=1), F.normalize(sim, dim=3)
    region_best = to_regions.masked_fill(~valid, float("-inf")).amax(3).permute(0, 2, 1)
    word_best = to_words.masked_fill(~valid, float("-inf")).amax(1).permute(1, 0, 2)
    return (region_best.masked_fill(~img_mask[:, None, :], 0.0), word_best.masked_fill(~txt_mask[:, None, :], 0.0))


@pytest.mark.parametrize("scores", ["scan", "cosine"])
def test_chunked_no_grad_matching_equals_the_unchunked_implementation(scores, monkeypatch):
    import itmatch.similarity.fragment as fragment

    img, img_mask = ragged_batch(11, 9, 16, seed=3)
    txt, txt_mask = ragged_batch(13, 7, 16, seed=4)
    monkeypatch.setattr(fragment, "CHUNK_ELEMENTS", 2 * 9 * 13 * 7)  # chunks of 2 images, the last one of 1
    m = fragment_matching(img, img_mask, txt, txt_mask, k=4, scores=scores)
    region_best, word_best = unchunked_maxima(img, img_mask, txt, txt_mask, scores)
    torch.testing.assert_close(m.p_i2t, region_best.sum(-1) / img_mask.sum(1)[:, None], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.p_t2i, word_best.sum(-1) / txt_mask.sum(1)[:, None], atol=1e-6, rtol=1e-6)
    # the autograd path (fragments not detached) gives the same values and a gradient
    img_g = img.clone().requires_grad_(True)
    m_grad = fragment_matching(img_g, img_mask, txt, txt_mask, k=4, scores=scores)
    for name in ("p_i2t", "p_t2i", "q_i2t", "q_t2i"):
        torch.testing.assert_close(getattr(m_grad, name), getattr(m, name), atol=1e-6, rtol=1e-6)
    m_grad.p_i2t.sum().backward()
    assert img_g.grad is not None and img_g.grad[img_mask].abs().sum() > 0
    assert not m.p_i2t.requires_grad


def test_fragment_matching_rejects_unknown_scores():
    from itmatch.errors import ItmatchError

    img, img_mask = ragged_batch(2, 3, 4, seed=0)
    with pytest.raises(ItmatchError, match="hrem.matching"):
        fragment_matching(img, img_mask, img, img_mask, k=2, scores="dot")


def graph_inputs(n=6, seed=0, scores="scan"):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    u = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    img, img_mask = ragged_batch(n, 5, 8, seed + 1)
    txt, txt_mask = ragged_batch(n, 7, 8, seed + 2)
    return v, u, fragment_matching(img, img_mask, txt, txt_mask, k=3, scores=scores)


def test_connection_and_relevance_matrices_follow_eq_4_to_10():
    torch.manual_seed(0)
    v, u, m = graph_inputs()
    n, tau, sigma = len(v), 0.5, 0.7
    builder = AssociationGraphBuilder(k=3, tau=tau, sigma=sigma).requires_grad_(False)
    graph = builder(v, u, m)
    keep = int(math.floor(tau * n))
    assert graph.connection.shape == graph.relevance.shape == (2 * n, 2 * n)
    assert graph.connection.dtype == torch.bool

    def is_first(chosen, scores_row):
        """The tau*N nearest: `keep` of them, none scoring below one left out (ties may go either way)."""
        scores_row = [float(x) for x in scores_row]
        left_out = [scores_row[j] for j in range(n) if j not in chosen]
        return len(chosen) == keep and min(scores_row[j] for j in chosen) >= max(left_out)

    def gauss(a, b):
        return math.exp(-sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)) / sigma)

    for i in range(n):
        row = graph.connection[i]
        assert is_first({j for j in range(n) if row[j]}, [v[i] @ v[j] for j in range(n)])  # Eq. 5, I->I
        assert is_first({j for j in range(n) if row[n + j]}, m.p_i2t[i])  # Eq. 6-7, I->T
        row = graph.connection[n + i]
        assert is_first({j for j in range(n) if row[j]}, m.p_t2i[i])  # T->I
        assert is_first({j for j in range(n) if row[n + j]}, [u[i] @ u[j] for j in range(n)])  # T->T
        for j in range(n):
            # Eq. 10 (the paper swaps the subscripts of S_I->I and S_T->T; images use v)
            assert float(graph.relevance[i, j]) == pytest.approx(gauss(v[i], v[j]), rel=1e-5)
            assert float(graph.relevance[n + i, n + j]) == pytest.approx(gauss(u[i], u[j]), rel=1e-5)
            # Eq. 9: an MLP of q plus p, one MLP per direction: Linear(K,K) -> ReLU -> Linear(K,1)
            for mlp, q, p, got in ((builder.mlp_i2t.net, m.q_i2t[i, j], m.p_i2t[i, j], graph.relevance[i, n + j]),
                                   (builder.mlp_t2i.net, m.q_t2i[i, j], m.p_t2i[i, j], graph.relevance[n + i, j])):
                hidden = [max(0.0, float(mlp[0].bias[a]) + sum(float(mlp[0].weight[a, b]) * float(q[b])
                                                              for b in range(3))) for a in range(3)]
                s = float(mlp[2].bias[0]) + sum(float(mlp[2].weight[0, a]) * hidden[a] for a in range(3)) + float(p)
                assert float(got) == pytest.approx(s, rel=1e-5, abs=1e-6)


def test_relevance_regularizer_is_eq_11_and_trains_the_mlps():
    v, u, m = graph_inputs(seed=3)
    v.requires_grad_(True)
    builder = AssociationGraphBuilder(k=3, tau=0.5, sigma=1.0)
    graph = builder(v, u, m)
    got = relevance_regularizer(v, u, graph, 1.0)
    ref = 0.0
    for s, a, b in ((graph.s_i2t, v, u), (graph.s_t2i, u, v)):
        for i in range(len(a)):
            guide = [math.exp(-sum((float(x) - float(y)) ** 2 for x, y in zip(a[i].detach(), b[j].detach())))
                     for j in range(len(b))]
            z_g = sum(math.exp(x) for x in guide)
            learned = [float(x) for x in s[i].detach()]
            z_s = sum(math.exp(x) for x in learned)
            # KL(softmax(S) || softmax(S^g)), row-averaged
            ref += sum(math.exp(x) / z_s * ((x - math.log(z_s)) - (y - math.log(z_g)))
                       for x, y in zip(learned, guide)) / len(a)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-5)
    got.backward()
    # The relevance MLPs learn from it (AAHR's copy of this code left them without gradient) ...
    for mlp in (builder.mlp_i2t, builder.mlp_t2i):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    # ... while the global embeddings are only the guide.
    assert v.grad is None or float(v.grad.abs().sum()) == 0.0


def slow_attention(block, query, key, connection, relevance, weight):
    """One multi-head attention with Eq. 12 logits, per query and per head, from the block's weights."""
    mha = block.attn
    d, h = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = mha.in_proj_bias.split(d)
    q, k, val = query @ wq.T + bq, key @ wk.T + bk, key @ wv.T + bv
    out = torch.zeros(len(query), d)
    hd = d // h
    for i in range(len(query)):
        for head in range(h):
            sl = slice(head * hd, (head + 1) * hd)
            logits = [float(q[i, sl] @ k[j, sl]) / math.sqrt(hd) + weight * float(relevance[i, j])
                      if connection[i, j] else float("-inf") for j in range(len(key))]
            w = torch.softmax(torch.tensor(logits), 0)
            out[i, sl] = (w[:, None] * val[:, sl]).sum(0)
    out = out @ mha.out_proj.weight.T + mha.out_proj.bias
    return block.norm(query + out)


def slow_ff(block, x):
    lin1, lin2 = block.net[0], block.net[3]
    return block.norm(x + torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias)


def test_fusion_mechanism_matches_slow_eq_12():
    torch.manual_seed(0)
    v, u, m = graph_inputs(seed=5)
    graph = AssociationGraphBuilder(k=3, tau=0.5, sigma=1.0)(v, u, m)
    layer = FusionLayer(dim=8, heads=2, ff_dim=16, dropout=0.0).eval()
    with torch.no_grad():
        v_bar, u_bar = layer(v, u, graph, weight=1.5)
        nodes = torch.cat([v, u])
        ref = slow_ff(layer.ff, slow_attention(layer.attention, nodes, nodes, graph.connection, graph.relevance, 1.5))
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
        # cross-attention on the inter-modal blocks first, then self-attention on the intra-modal ones
        v_cross = slow_attention(layer.cross_img, v, u, a[:n, n:], s[:n, n:], 1.0)
        u_cross = slow_attention(layer.cross_txt, u, v, a[n:, :n], s[n:, :n], 1.0)
        v_ref = slow_ff(layer.ff_img, slow_attention(layer.self_img, v_cross, v_cross, a[:n, :n], s[:n, :n], 1.0))
        u_ref = slow_ff(layer.ff_txt, slow_attention(layer.self_txt, u_cross, u_cross, a[n:, n:], s[n:, n:], 1.0))
    torch.testing.assert_close(v_bar, v_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(u_bar, u_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mechanism", ["fusion", "standalone"])
def test_l_layers_stack(mechanism):
    torch.manual_seed(0)
    v, u, m = graph_inputs(n=8, seed=11)
    graph = AssociationGraphBuilder(k=3, tau=0.25, sigma=1.0)(v, u, m)
    one = RelationInteraction(mechanism, 8, 2, 16, 0.0, layers=1).eval()
    two = RelationInteraction(mechanism, 8, 2, 16, 0.0, layers=2).eval()
    two.layers[0].load_state_dict(one.layers[0].state_dict())
    with torch.no_grad():
        ref = two.layers[1](*one(v, u, graph, 1.0), graph, 1.0)
        twice = two(v, u, graph, 1.0)
    torch.testing.assert_close(twice[0], ref[0])
    torch.testing.assert_close(twice[1], ref[1])


def test_fusion_node_reads_only_its_connected_nodes():
    torch.manual_seed(0)
    v, u, m = graph_inputs(n=8, seed=11)
    n = len(v)
    graph = AssociationGraphBuilder(k=3, tau=0.25, sigma=1.0)(v, u, m)
    layer = RelationInteraction("fusion", 8, 2, 16, 0.0, layers=1).eval()
    far = [j for j in range(2 * n) if not graph.connection[0, j]]
    connected = [j for j in range(1, 2 * n) if graph.connection[0, j]]
    assert far and connected
    nodes = torch.cat([v, u])
    with torch.no_grad():
        before = layer(v, u, graph, 1.0)[0][0]
        changed = nodes.clone()
        changed[far] = torch.randn(len(far), 8)
        after_far = layer(changed[:n], changed[n:], graph, 1.0)[0][0]
        changed = nodes.clone()
        changed[connected] = torch.randn(len(connected), 8)
        after_near = layer(changed[:n], changed[n:], graph, 1.0)[0][0]
    torch.testing.assert_close(after_far, before)  # A masks the unconnected nodes out of image 0's update
    assert not torch.allclose(after_near, before)


def test_no_grad_matching_on_real_words_handles_empty_captions_and_images():
    """The no-grad path packs the real words: a caption without words matches nothing (-inf, as the padded
    formulation gives), an image without regions gets 0 from every word; the rest equals the reference."""
    from itmatch.similarity.fragment import _matching_maxima_nograd

    img, img_mask = ragged_batch(5, 4, 8, seed=5)
    txt, txt_mask = ragged_batch(6, 5, 8, seed=6)
    txt_mask[2] = False
    img_mask[3] = False
    for scores in ("scan", "cosine"):
        region_best, word_best = _matching_maxima_nograd(img, img_mask, txt, txt_mask, scores)
        ref_region, ref_word = unchunked_maxima(img, img_mask, txt, txt_mask, scores)
        assert torch.isneginf(region_best[:, 2][img_mask]).all()
        keep = torch.ones(6, dtype=torch.bool)
        keep[2] = False
        rmask = img_mask[:, None, :].expand(5, 6, 4)
        torch.testing.assert_close(region_best.masked_fill(~rmask, 0.0)[:, keep], ref_region[:, keep])
        real_words = txt_mask[:, None, :].expand(6, 5, 5).clone()
        real_words[:, 3] = False  # the image without regions: no best region (the reference has -inf too)
        torch.testing.assert_close(word_best[real_words], ref_word[real_words])
        assert torch.isneginf(word_best[:, 3][txt_mask]).all()


def test_run_maxima_numpy_and_scatter_paths_agree():
    from itmatch.similarity.fragment import _run_maxima

    values = torch.randn(7, 12)
    starts = torch.tensor([0, 3, 4, 9])
    expected = torch.stack([values[:, 0:3].amax(1), values[:, 3:4].amax(1), values[:, 4:9].amax(1),
                            values[:, 9:].amax(1)], 1)
    torch.testing.assert_close(_run_maxima(values, starts), expected, atol=0, rtol=0)
    half = _run_maxima(values.half(), starts)  # not float32/64: the scatter path
    torch.testing.assert_close(half, expected.half(), atol=0, rtol=0)
