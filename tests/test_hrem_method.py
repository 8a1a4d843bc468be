"""The `hrem` method: fragment-level pooling (Eq. 2-3), the objective (Eq. 14 + L_reg), gradients, and a
model that carries no instance-level module."""

from __future__ import annotations

import types

import pytest
import torch

from itmatch.config import config_from_dict
from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.encoders.fragments import RelationEnhancedPool
from itmatch.errors import ItmatchError


def ragged_batch(n, max_len, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, max_len, d, generator=g)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    mask = torch.arange(max_len)[None] < lengths[:, None]
    return x.masked_fill(~mask[..., None], 7.0), mask


@pytest.mark.parametrize("k", [1, 2])
def test_relation_pool_is_eq_2_and_ignores_padding(k):
    pool = RelationEnhancedPool(dim=8, beta=0.8, k=k, heads=2, ff_dim=16, dropout=0.0).eval()
    x, mask = ragged_batch(3, 6, 8, seed=2)
    with torch.no_grad():
        got = pool(x, mask)
        enhanced = pool.attention(x, mask)
        for b in range(3):
            n = int(mask[b].sum())
            top = x[b, :n].sort(0, descending=True).values[: min(k, n)].mean(0)  # MaxK over real fragments
            ref = 0.8 * top + 0.2 * enhanced[b, :n].mean(0)
            torch.testing.assert_close(got[b], ref)
            alone = pool(x[b : b + 1, :n], mask[b : b + 1, :n])  # no padding at all
            torch.testing.assert_close(alone[0], got[b], atol=1e-5, rtol=1e-5)


def test_relation_pool_without_fragment_layers_is_max_plus_mean_of_initial():
    pool = RelationEnhancedPool(dim=8, beta=0.6, k=1, heads=2, ff_dim=16, dropout=0.0, layers=0)
    x, mask = ragged_batch(3, 5, 8, seed=4)
    got = pool(x, mask)
    for b in range(3):
        n = int(mask[b].sum())
        torch.testing.assert_close(got[b], 0.6 * x[b, :n].max(0).values + 0.4 * x[b, :n].mean(0))


CAPTIONS = ["a red circle", "a blue square left of a star", "two stars", "a green cross above a circle",
            "a star", "a blue circle right of a red square"]


def hrem_cfg(regularizers=(), extra=None, **hrem):
    base = {"heads": 2, "fragment_heads": 2, "fragment_ff": 16, "topk": 3, "instance_warmup_steps": 5,
            "dropout": 0.0}
    return config_from_dict({
        "model": {"method": "hrem", "embed_dim": 16, "image": {"feature_dim": 10}, "text": {"word_dim": 8}},
        "loss": {"name": "triplet", "regularizers": list(regularizers)},
        "hrem": {**base, **hrem},
        **(extra or {}),
    })


def hrem_setup(cfg=None, **hrem):
    from itmatch.data.text import WordVocab
    from itmatch.methods.registry import build_model, build_objective

    vocab = WordVocab.build(CAPTIONS)
    cfg = cfg or hrem_cfg(**hrem)
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    n = len(CAPTIONS)
    regions, mask = ragged_batch(n, 5, 10, seed=9)
    tokens, tmask = vocab.encode_batch(CAPTIONS, 16)
    idx = torch.arange(n)
    return model, objective, ImageBatch(idx, regions, mask), TextBatch(tokens, tmask, idx, idx)


def progress(step):
    from itmatch.objectives.base import TrainProgress

    return TrainProgress(epoch=1, step=step)


@pytest.mark.parametrize("mechanism", ["fusion", "standalone"])
def test_instance_terms_switch_on_and_send_gradients_to_both_encoders(mechanism):
    model, objective, img_b, txt_b = hrem_setup(mechanism=mechanism)
    out = model(img_b, txt_b)
    early = objective(out, img_b, txt_b, progress(4))
    assert set(early) == {"loss", "base"}
    torch.manual_seed(1)
    late = objective(out, img_b, txt_b, progress(5))
    terms = ("base", "enh_enh", "enh_base", "base_enh", "reg")
    assert set(terms) <= set(late)
    # Eq. 14 + reg_weight * L_reg: the loss is the sum of the named terms ("reg" is already weighted).
    assert float(late["loss"].detach()) == pytest.approx(sum(float(late[t].detach()) for t in terms), rel=1e-5)
    assert float(late["reg"].detach()) > 0
    # The triplet's negative sampling is random: replay it to get the same terms with a graph attached.
    torch.manual_seed(1)
    v_bar, u_bar, graph = objective.enhance(out)
    from itmatch.data.batch import positive_mask

    pos = positive_mask(img_b.image_index, txt_b.image_index)
    instance_only = (objective.ranking(v_bar @ u_bar.T, pos, progress(5))
                     + objective.ranking(v_bar @ out["txt"].T, pos, progress(5))
                     + objective.ranking(out["img"] @ u_bar.T, pos, progress(5)))
    model.zero_grad()
    instance_only.backward()  # the terms only the instance level adds, without L(v, u)
    assert model.image_encoder.fc.weight.grad.abs().sum() > 0
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0
    assert model.image_pool.attention.encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
    assert objective.graph.mlp_i2t.net[0].weight.grad.abs().sum() > 0  # through S in the attention logits
    assert objective.graph.mlp_t2i.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_detach_fragments_decides_whether_matching_trains_the_encoders(detach):
    model, objective, img_b, txt_b = hrem_setup(detach_fragments=detach)
    out = model(img_b, txt_b)
    _, _, graph = objective.enhance(out)
    from itmatch.objectives.relations.graph import relevance_regularizer

    model.zero_grad()
    relevance_regularizer(out["img"], out["txt"], graph, 1.0).backward()
    grad = model.image_encoder.fc.weight.grad
    reached = grad is not None and float(grad.abs().sum()) > 0
    assert reached is (not detach)
    assert objective.graph.mlp_i2t.net[0].weight.grad.abs().sum() > 0


def test_trained_model_carries_no_relation_module():
    model, objective, img_b, txt_b = hrem_setup()
    keys = set(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"image_encoder", "text_encoder", "image_pool", "text_pool"}
    assert not {id(p) for p in objective.parameters()} & {id(p) for p in model.parameters()}
    objective_keys = set(objective.state_dict())
    assert any(k.startswith("graph.mlp_i2t") for k in objective_keys)
    assert any(k.startswith("interaction.") for k in objective_keys)
    # The instance-level settings change the objective only: the model is the same in both mechanisms.
    other, _, _, _ = hrem_setup(mechanism="standalone", layers=2, tau=0.3)
    assert set(other.state_dict()) == keys
    # At inference, encoding is the model alone and each side is encoded independently.
    model.eval()
    with torch.no_grad():
        out = model(img_b, txt_b)
        torch.testing.assert_close(model.encode_image(img_b), out["img"])
        torch.testing.assert_close(model.encode_text(txt_b), out["txt"])
        half = ImageBatch(img_b.image_index[:2], img_b.regions[:2], img_b.region_mask[:2])
        torch.testing.assert_close(model.encode_image(half), out["img"][:2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key, value", [("tau", 0.0), ("tau", 1.5), ("topk", 0), ("sigma", 0.0), ("beta", 1.2),
                                        ("mechanism", "both"), ("matching", "dot"), ("heads", 3), ("maxk", 0)])
def test_bad_hrem_values_are_one_clear_error(key, value):
    from itmatch.methods.registry import build_objective

    with pytest.raises(ItmatchError, match=f"hrem.{key}"):  # refused when the config is read
        build_objective(hrem_cfg(**{key: value}), types.SimpleNamespace(similarity=None))


def test_packaged_hrem_configs_load_with_paper_defaults():
    from itmatch.config import PACKAGED_CONFIGS, load_config

    lambdas = {}
    for name in ("f30k_precomp_bigru", "f30k_precomp_bert", "coco_precomp_bigru", "coco_precomp_bert", "scenes",
                 "scenes_standalone"):
        cfg = load_config(PACKAGED_CONFIGS / f"hrem_{name}.yaml")
        h = cfg.hrem
        assert cfg.model.method == "hrem" and cfg.loss.name == "triplet" and cfg.loss.margin == 0.2
        assert (h.beta, h.tau, h.topk, h.sigma) == (0.8, 0.5, 10, 1.0)
        assert cfg.sampler.clusters_per_batch * cfg.sampler.images_per_cluster == cfg.train.batch_size
        lambdas[name] = h.relevance_weight
        if "precomp" in name:
            assert cfg.model.embed_dim == 1024 and cfg.train.epochs == 30 and cfg.optim.decay_epochs == [15, 25]
            assert cfg.train.batch_size == (256 if "coco" in name else 128)
    assert lambdas["coco_precomp_bert"] == 1.5 and lambdas["f30k_precomp_bert"] == 1.0


def test_dias_regularizer_composes_with_hrem():
    """`loss.regularizers: [dias]` on hrem: HREM's terms and DIAS's add up, and DIAS reaches HREM's fragments."""
    from itmatch.objectives.dias import DIASRegularizer

    cfg = hrem_cfg(regularizers=["dias"], extra={"dias": {"sparsity": "hard"}})  # hard: deterministic terms
    model, objective, img_b, txt_b = hrem_setup(cfg)
    idx = img_b.image_index
    out = model(img_b, txt_b)
    terms = objective(out, img_b, txt_b, progress(5))
    assert {"base", "enh_enh", "reg", "dias", "dias_dim", "dias_inter", "dias_intra"} <= set(terms)
    from itmatch.data.batch import positive_mask

    reg = DIASRegularizer(cfg.dias)(out, positive_mask(idx, idx))
    hrem_part = sum(float(torch.as_tensor(terms[t]).detach())
                    for t in ("base", "enh_enh", "enh_base", "base_enh", "reg"))
    assert terms["loss"].item() == pytest.approx(hrem_part + reg["loss"].item(), rel=1e-4)
    model.zero_grad()
    reg["loss"].backward()  # the DIAS terms alone reach HREM's fragment-level attention
    assert model.image_pool.attention.encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_graph_is_built_in_float32_from_bf16_inputs_under_autocast():
    """bf16 similarities tie at the tau*N-th value; the graph must be float32 whatever autocast does."""
    from itmatch.objectives.relations.graph import AssociationGraphBuilder
    from itmatch.similarity.fragment import fragment_matching

    model, objective, img_b, txt_b = hrem_setup()
    with torch.no_grad():
        out = model(img_b, txt_b)
    half = {k: (v.bfloat16() if torch.is_floating_point(v) else v) for k, v in out.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # what the graph would be without the float32 block: bf16 matching values
        assert fragment_matching(half["img_frag"], half["img_mask"], half["txt_frag"], half["txt_mask"],
                                 3).p_i2t.dtype == torch.bfloat16
        _, _, graph = objective.enhance(half)
    assert graph.relevance.dtype == torch.float32 and graph.s_i2t.dtype == torch.float32
    # reference: the same bf16 values, upcast, with no autocast anywhere
    full = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in half.items()}
    m = fragment_matching(full["img_frag"], full["img_mask"], full["txt_frag"], full["txt_mask"], 3)
    builder: AssociationGraphBuilder = objective.graph
    ref = builder(full["img"], full["txt"], m)
    assert torch.equal(graph.connection, ref.connection)
    torch.testing.assert_close(graph.relevance, ref.relevance, rtol=0, atol=0)
