"""AAHR: each part against an independent computation, the frozen-encoder sharing, and training on tiny
scenes (learning, and an exact resume of the queues and momentum encoders)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from itmatch.config import PACKAGED_CONFIGS, config_from_dict, load_config
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.data.text import WordVocab
from itmatch.encoders.global_local import CosineAttentionPool, GatedFusion
from itmatch.errors import ItmatchError
from itmatch.methods.registry import build_model, build_objective
from itmatch.objectives.base import StepContext, TrainProgress, call_hooks
from itmatch.objectives.momentum import FeatureQueue, MomentumContrast, queue_infonce
from itmatch.objectives.prototypes import sinkhorn_codes
from itmatch.objectives.relations.high_order import GraphConvolution, HighOrderRelations
from itmatch.similarity.fragment import fragment_matching

CAPTIONS = ["a red circle", "a blue square left of a large star", "two stars", "a red star above a cross",
            "one blue circle", "a small green hexagon"]


def tiny_cfg(**aahr):
    section = {"fragment_heads": 4, "heads": 4, "fragment_ff": 32, "topk": 3, "prototypes": 4,
               "proto_start_steps": 0, "graph_warmup_steps": 0, "queue_size": 6, **aahr}
    return config_from_dict({"model": {"method": "aahr", "embed_dim": 16, "image": {"feature_dim": 12},
                                       "text": {"word_dim": 8}}, "aahr": section})


def tiny_batches(vocab, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, 5, 12, generator=g)
    mask = torch.arange(5)[None] < torch.randint(1, 6, (n,), generator=g)[:, None]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    tokens, tmask = vocab.encode_batch(texts, 16)
    idx = torch.arange(n)
    return ImageBatch(idx, regions, mask), TextBatch(tokens, tmask, idx, idx.clone(), texts=texts)


@pytest.fixture(scope="module")
def vocab():
    return WordVocab.build(CAPTIONS)


# ----------------------------------------------------------------------------- prototypes
def test_sinkhorn_codes_have_the_transport_marginals_and_form():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(24, 6, generator=g), dim=1)
    for iters in (3, 200):
        q = sinkhorn_codes(scores, epsilon=0.1, iterations=iters)
        torch.testing.assert_close(q.sum(1), torch.ones(24))  # every sample's code sums to 1, exactly
        # Sinkhorn scaling form: log q = z / eps + a_b + c_m (a row and a column scaling of exp(z / eps))
        r = (q.double().log() - scores.double() / 0.1).numpy()
        resid = r - r.mean(1, keepdims=True) - r.mean(0, keepdims=True) + r.mean()
        assert np.abs(resid).max() < 1e-6
    # converged, every prototype carries B/M of the mass (equal use within the batch)
    torch.testing.assert_close(q.sum(0), torch.full((6,), 24 / 6), atol=1e-4, rtol=0)
    # 3 iterations are not converged yet: the prototype marginal is only approximately equal
    q3 = sinkhorn_codes(scores, 0.1, 3)
    assert (q3.sum(0) - 4).abs().max() < (sinkhorn_codes(scores, 0.1, 1).sum(0) - 4).abs().max() + 1e-9


def test_prototypes_are_renormalised_after_each_step(vocab):
    cfg = tiny_cfg(moco_weight=0.0)
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    with torch.no_grad():
        objective.prototypes.prototypes.mul_(3.0)
    call_hooks(objective, "after_step", StepContext(model, TrainProgress(step=1)))
    torch.testing.assert_close(objective.prototypes.prototypes.norm(dim=1), torch.ones(4))


# ---------------------------------------------------------------------------------- model
def test_guided_pool_equals_a_per_head_loop():
    torch.manual_seed(0)
    pool = CosineAttentionPool(6, 3)
    x, guide = torch.randn(4, 5, 6), torch.randn(4, 6)
    mask = torch.rand(4, 5) > 0.3
    mask[:, 0] = True
    out = pool(x, mask, guide)
    ref = torch.zeros(4, 6)
    for b in range(4):
        for h in range(3):
            rows = slice(h * 6, (h + 1) * 6)
            q = pool.q.weight[rows] @ guide[b] + pool.q.bias[rows]
            keys = [pool.k.weight[rows] @ x[b, n] + pool.k.bias[rows] for n in range(5) if mask[b, n]]
            vals = [pool.v.weight[rows] @ x[b, n] + pool.v.bias[rows] for n in range(5) if mask[b, n]]
            att = torch.softmax(torch.stack([q @ k / (q.norm() * k.norm()) for k in keys]), 0)
            ref[b] += (att[:, None] * torch.stack(vals)).sum(0) / 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gated_fusion_at_the_gate_extremes():
    fusion = GatedFusion(4)
    local, glob = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.fill_(100.0)  # g = 1
    torch.testing.assert_close(fusion(local, glob), local)
    with torch.no_grad():
        fusion.gate.bias.fill_(-100.0)  # g = 0
    torch.testing.assert_close(fusion(local, glob), glob)
    with torch.no_grad():
        fusion.gate.bias.fill_(0.0)  # g = 1/2
    torch.testing.assert_close(fusion(local, glob), (local + glob) / 2)


def test_frozen_encoders_are_shared_and_never_saved(vocab):
    cfg = tiny_cfg()
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    key = objective.momentum.key_model
    assert key.frozen is model.frozen  # shared, not deep-copied
    frozen_ptrs = {b.data_ptr() for b in model.frozen.buffers()}
    assert frozen_ptrs == {b.data_ptr() for b in key.frozen.buffers()}
    assert not any(k.startswith("frozen.") for k in model.state_dict())
    assert not any(".frozen." in k for k in objective.state_dict())
    assert not any(p.requires_grad for p in key.parameters())
    # the key copy holds exactly the model's trainable parameters, as separate tensors
    assert [n for n, _ in key.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert not ({p.data_ptr() for p in key.parameters()} & {p.data_ptr() for p in model.parameters()})


def test_text_without_captions_is_one_clear_error(vocab):
    model = build_model(tiny_cfg(), vocab)
    _, txt = tiny_batches(vocab)
    txt.texts = None
    with pytest.raises(ItmatchError, match="caption texts"):
        model.encode_text(txt)


def test_open_clip_loader_errors(tmp_path, monkeypatch):
    from itmatch.encoders.frozen import OpenClipEncoder

    with pytest.raises(ItmatchError, match="not found"):
        OpenClipEncoder("ViT-B-32", tmp_path / "missing.bin")
    with pytest.raises(ItmatchError, match="open_clip_weights"):
        OpenClipEncoder("ViT-B-32", None)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as where open_clip (or torchvision) cannot import
    with pytest.raises(ItmatchError, match="open_clip_torch cannot be imported"):
        OpenClipEncoder("ViT-B-32", weights)


# ------------------------------------------------------------------------------ relations
def test_gcn_layer_equals_the_dense_formula():
    torch.manual_seed(0)
    layer = GraphConvolution(5, 3, dropout=0.6, slope=0.2).eval()  # eval: no dropout
    h, adj = torch.randn(7, 5), torch.rand(7, 7)
    w, b = layer.linear.weight.detach().numpy(), layer.linear.bias.detach().numpy()
    hn, an = h.numpy().astype(np.float64), adj.numpy().astype(np.float64)
    ref = np.zeros((7, 3))
    for i in range(7):
        ref[i] = sum(an[i, j] * (w @ hn[j]) for j in range(7)) + b
    ref = np.where(ref > 0, ref, 0.2 * ref)
    np.testing.assert_allclose(layer(h, adj).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    layer.train()  # dropout is active in training
    assert not torch.allclose(layer(h, adj), layer(h, adj))


@pytest.mark.parametrize("relevance", ["learned", "mean"])
def test_relevance_mlps_get_gradient_unless_public_behaviour(relevance):
    from itmatch.objectives.relations.graph import relevance_regularizer

    torch.manual_seed(0)
    n, d = 6, 8
    rel = HighOrderRelations(d, topk=3, relevance=relevance, heads=2)
    v = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    u = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    frag_i, frag_t = torch.randn(n, 4, d), torch.randn(n, 5, d)
    m = fragment_matching(frag_i, torch.ones(n, 4, dtype=torch.bool), frag_t, torch.ones(n, 5, dtype=torch.bool), 3)
    v_enh, u_enh, graph = rel(v, u, m, 1.0)
    loss = (v_enh @ u_enh.T).diagonal().sum() + 10 * relevance_regularizer(v, u, graph, 1.0)
    loss.backward()
    mlp_grads = [p.grad for mlp in (rel.mlp_i2t, rel.mlp_t2i) for p in mlp.parameters()]
    if relevance == "learned":
        assert all(g is not None and g.abs().sum() > 0 for g in mlp_grads)
    else:
        assert all(g is None for g in mlp_grads)
    assert rel.gcn_joint.linear.weight.grad.abs().sum() > 0  # the GCNs train in both settings


# ------------------------------------------------------------------------------ momentum
def test_ema_update_against_a_hand_computation(vocab):
    cfg = tiny_cfg()
    model = build_model(cfg, vocab)
    moco = MomentumContrast(model, 16, queue_size=6, momentum=0.9)
    before = {n: p.detach().clone() for n, p in moco.key_model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    online = {n: p.detach().clone() for n, p in model.named_parameters()}
    moco.after_step(StepContext(model, TrainProgress(step=1)))
    for name, p in moco.key_model.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name])


def test_queue_is_a_ring_and_masks_same_image_entries():
    q = FeatureQueue(5, 3)
    for step in range(3):  # 2 + 2 + 2 entries into 5 slots: the first one is overwritten
        q.push(torch.full((2, 3), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    assert q.full and int(q.ptr) == 1
    assert q.ids.tolist() == [21, 1, 10, 11, 20]
    g = torch.Generator().manual_seed(0)
    q.feats.copy_(torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=1))
    query = torch.nn.functional.normalize(torch.randn(2, 3, generator=g), dim=1)
    key = torch.nn.functional.normalize(torch.randn(2, 3, generator=g), dim=1)
    ids = torch.tensor([10, 99])  # query 0 shows image 10, which has one entry in the queue (slot 2)
    q.feats[2] = query[0]  # that entry is (nearly) the query itself: the false negative masking removes
    loss = queue_infonce(query, key, q, ids, 0.07, mask_same_image=True)
    manual = []
    for i in range(2):
        negs = [q.feats[j] for j in range(5) if int(q.ids[j]) != int(ids[i])]
        logits = torch.stack([query[i] @ key[i]] + [query[i] @ k for k in negs]) / 0.07
        manual.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    unmasked = queue_infonce(query, key, q, ids, 0.07, mask_same_image=False)
    assert unmasked > loss + 1.0  # counted as a negative, the same-image entry dominates query 0's loss


# ------------------------------------------------------------------------------ training
def small_aahr_config(data_root, *overrides):
    base = [f"data.root={data_root}", "model.embed_dim=64", "model.text.glove=null", "model.text.word_dim=32",
            "train.batch_size=64", "train.eval_batch_size=64", "train.log_every_steps=1", "data.max_dev_images=40",
            "aahr.fragment_heads=4", "aahr.heads=4", "aahr.fragment_ff=64", "aahr.prototypes=8",
            "aahr.proto_start_steps=2", "aahr.graph_warmup_steps=4", "aahr.queue_size=128"]
    return load_config(PACKAGED_CONFIGS / "aahr_scenes.yaml", base + list(overrides))


def test_aahr_learns_on_tiny_scenes_and_resume_restores_queues_and_key_encoders(tiny_scenes, tmp_path):
    from itmatch.checkpoint import load_training_state
    from itmatch.training.loop import Trainer
    from itmatch.training.run_log import read_metrics

    common = ["train.epochs=6", "train.checkpoint_every_steps=4", "train.keep_last=3", "optim.decay_epochs=[5]",
              "optim.lr=0.002"]
    full = Trainer(small_aahr_config(tiny_scenes, *common), tmp_path / "full", echo=False)
    result = full.fit()
    assert result["best_rsum"] > 77 + 100, result  # chance rSum on 40 dev images is about 77 (measured: 202)
    train = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    assert {"proto", "gnn_enh_enh", "moco", "reg"} <= set(train[-1])  # every part was on at the end
    assert np.mean([r["base"] for r in train[-4:]]) < np.mean([r["base"] for r in train[:4]])

    Trainer(small_aahr_config(tiny_scenes, *common, "train.max_steps=10"), tmp_path / "cut", echo=False).fit()
    (tmp_path / "cut" / "checkpoints" / "LATEST").write_text("step-00000008\n")
    saved = load_training_state(tmp_path / "cut" / "checkpoints" / "step-00000008")["objective"]
    assert int(saved["momentum.image_queue.pushed"]) == 8 * 64  # the queues are in the training state
    resumed = Trainer(small_aahr_config(tiny_scenes, *common), tmp_path / "cut", resume="latest", echo=False)
    resumed.prepare()
    restored = resumed.objective.state_dict()
    assert set(restored) == set(saved)
    for name, value in saved.items():  # queues, key encoders and prototypes exactly as saved
        assert torch.equal(restored[name], value), name
    resumed.fit()
    final_full, final_cut = full.objective.state_dict(), resumed.objective.state_dict()
    for name in final_full:  # ... and the resumed run ends where the uninterrupted one does
        torch.testing.assert_close(final_cut[name], final_full[name], rtol=1e-5, atol=1e-5, msg=name)


def test_open_clip_wrapper_with_a_stand_in_module(tmp_path, monkeypatch):
    """open_clip_torch cannot be imported beside this torch (see docs/methods/aahr.md), so this checks
    itmatch's side of the loader against a stand-in module with open_clip's three entry points: one
    instance for both sides, weights read from the given file, pixels brought from the grid path's
    ImageNet normalisation to CLIP's, features frozen and unit length."""
    import types

    from itmatch.encoders.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenGlobalEncoders

    class TinyClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3 * 8 * 8, 6)
            self.visual.image_size = 8
            self.words = torch.nn.Embedding(50, 6)
            self.embed_dim = 6

        def encode_image(self, x):
            return self.visual(x.flatten(1))

        def encode_text(self, tokens):
            return self.words(tokens).mean(1)

    torch.manual_seed(0)
    reference = TinyClip()
    weights = tmp_path / "tiny_clip.pt"
    torch.save(reference.state_dict(), weights)
    built = []

    def create_model(name, pretrained=None, load_weights=True, device="cpu"):
        model = TinyClip()
        if load_weights:
            model.load_state_dict(torch.load(pretrained, weights_only=True))
        built.append(name)
        return model

    def get_tokenizer(name):
        return lambda texts: torch.tensor([[ord(c) % 50 for c in t[:6].ljust(6)] for t in texts])

    stub = types.SimpleNamespace(create_model=create_model, get_tokenizer=get_tokenizer,
                                 OPENAI_DATASET_MEAN=(0.5, 0.4, 0.3), OPENAI_DATASET_STD=(0.2, 0.25, 0.3))
    monkeypatch.setitem(sys.modules, "open_clip", stub)
    enc = FrozenGlobalEncoders("open_clip", "open_clip", feature_dim=12, open_clip_model="tiny",
                               open_clip_weights=str(weights))
    assert built == ["tiny"] and enc.image_dim == enc.text_dim == 6  # one model serves both sides
    assert not list(enc.parameters()) and not enc.state_dict()  # frozen, never in a checkpoint
    raw = torch.rand(2, 3, 16, 16)
    pixels = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = enc.image(ImageBatch(torch.arange(2), pixels=pixels))
    small = torch.nn.functional.interpolate(raw, size=(8, 8), mode="bicubic", align_corners=False).clamp(0, 1)
    clip_in = (small - torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1)) / torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(clip_in), dim=-1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    texts = ["a red circle", "two stars"]
    txt = enc.text(TextBatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
                             torch.arange(2), torch.arange(2), texts=texts))
    with torch.no_grad():
        expected_txt = torch.nn.functional.normalize(reference.encode_text(get_tokenizer("tiny")(texts)), dim=-1)
    torch.testing.assert_close(txt, expected_txt)


def test_compare_recognises_a_finished_run_of_a_method_with_ignored_keys(tmp_path):
    """The trainer writes config.yaml without the keys a method ignores; compare must accept it."""
    from itmatch.compare.runs import Run, check_run_compatible

    cfg = load_config(PACKAGED_CONFIGS / "aahr_scenes.yaml", [f"data.root={tmp_path}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    check_run_compatible(Run(arm=None, seed=0, run_dir=tmp_path / "run", cfg=cfg))
    other = load_config(PACKAGED_CONFIGS / "aahr_scenes.yaml", [f"data.root={tmp_path}", "aahr.proto_weight=0"])
    with pytest.raises(ItmatchError, match="aahr.proto_weight"):
        check_run_compatible(Run(arm=None, seed=0, run_dir=tmp_path / "run", cfg=other))
