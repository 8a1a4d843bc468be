"""Augmentation statistics, datasets and collate, the resumable epoch order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from itmatch.data.augment import (
    DELETE,
    KEEP,
    MASK,
    RANDOM,
    apply_token_noise,
    augment_tokens,
    drop_regions,
    plan_token_noise,
)
from itmatch.data.captions import load_table
from itmatch.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CaptionDataset,
    EpochSampler,
    ImageDataset,
    MappedArray,
    PairDataset,
    epoch_order,
    image_transform,
    make_loader,
)
from itmatch.data.precomp import load_split
from itmatch.data.text import WordVocab
from itmatch.errors import ItmatchError

SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, mask in the synthetic vocab below
PAD, CLS, SEP, MASK_ID = 0, 1, 2, 3


def synthetic_batch(b=400, t=60, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, t - 2, (b,), generator=g)
    tokens = torch.randint(len(SPECIAL), vocab, (b, t), generator=g)
    pos = torch.arange(t)[None, :]
    tokens[:, 0] = CLS
    tokens = torch.where(pos == lengths[:, None] + 1, SEP, tokens)
    mask = pos <= lengths[:, None] + 1
    return tokens.masked_fill(~mask, PAD), mask


def test_token_noise_fractions_and_specials():
    tokens, mask = synthetic_batch(b=800)
    actions = plan_token_noise(tokens, mask, 0.2, SPECIAL, torch.Generator().manual_seed(1))
    eligible = mask & ~torch.isin(tokens, torch.tensor(SPECIAL))
    n = int(eligible.sum())
    assert n > 20000
    frac = {a: float((actions[eligible] == a).sum()) / n for a in (MASK, RANDOM, DELETE)}
    assert abs(frac[MASK] - 0.10) < 0.01
    assert abs(frac[RANDOM] - 0.02) < 0.005
    assert abs(frac[DELETE] - 0.08) < 0.01
    assert (actions[~eligible] == KEEP).all()  # [CLS], [SEP], padding untouched


def test_apply_token_noise_matches_a_loop():
    tokens, mask = synthetic_batch(b=50, t=30, seed=3)
    actions = plan_token_noise(tokens, mask, 0.5, SPECIAL, torch.Generator().manual_seed(4))
    random_ids = torch.arange(len(SPECIAL), 1000)
    out, out_mask = apply_token_noise(tokens, mask, actions, mask_id=MASK_ID, pad_id=PAD,
                                      random_ids=random_ids, generator=torch.Generator().manual_seed(5))
    assert out.shape[1] == int(out_mask.sum(1).max())
    for i in range(tokens.shape[0]):
        expect = []
        for j in range(tokens.shape[1]):
            if not mask[i, j] or actions[i, j] == DELETE:
                continue
            expect.append(MASK_ID if actions[i, j] == MASK else int(tokens[i, j]))
        got = out[i][out_mask[i]].tolist()
        assert len(got) == len(expect)
        for e, g, a in zip(expect, got, [a for a, m in zip(actions[i], mask[i]) if m and a != DELETE]):
            if a == RANDOM:
                assert g >= len(SPECIAL)  # a random non-special token
            else:
                assert g == e
        assert (out[i][~out_mask[i]] == PAD).all()
    assert out[:, 0].eq(CLS).all()


def test_word_pieces_share_their_word_decision():
    vocab = 100
    continuation = torch.zeros(vocab, dtype=torch.bool)
    continuation[50:] = True  # ids >= 50 are "##" pieces
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (300, 40), generator=g)
    tokens[:, 0] = 4  # each row starts with a word head
    mask = torch.ones_like(tokens, dtype=torch.bool)
    actions = plan_token_noise(tokens, mask, 0.3, SPECIAL, torch.Generator().manual_seed(2), continuation)
    is_cont = continuation[tokens]
    for i in range(tokens.shape[0]):
        for j in range(1, tokens.shape[1]):
            if is_cont[i, j]:
                assert actions[i, j] == actions[i, j - 1]
    # Decisions are drawn per word: the altered fraction of words is near p.
    heads = ~is_cont
    assert abs(float((actions[heads] != KEEP).float().mean()) - 0.3) < 0.02


def test_augment_tokens_is_seeded():
    vocab = WordVocab.build(["a b c d e f g h i j k"] * 3)
    tokens, mask = vocab.encode_batch(["a b c d e f g h i j k"] * 40, 64)
    one = augment_tokens(tokens, mask, vocab, 0.2, torch.Generator().manual_seed(7))
    two = augment_tokens(tokens, mask, vocab, 0.2, torch.Generator().manual_seed(7))
    three = augment_tokens(tokens, mask, vocab, 0.2, torch.Generator().manual_seed(8))
    assert torch.equal(one[0], two[0]) and not torch.equal(one[0], three[0])
    kept = one[0][one[1]]
    assert (one[0][:, 0] == vocab.start_id).all() and (kept == vocab.end_id).sum() == 40
    assert not torch.equal(one[0], tokens)
    assert augment_tokens(tokens, mask, vocab, 0.0, torch.Generator())[0] is tokens


def test_drop_regions_statistics_and_compaction():
    b, r, f = 500, 36, 2
    regions = torch.arange(b * r, dtype=torch.float32).view(b, r, 1).expand(b, r, f).clone() + 1
    mask = torch.ones(b, r, dtype=torch.bool)
    mask[:10, 30:] = False  # some rows already padded
    out, out_mask = drop_regions(regions, mask, 0.2, torch.Generator().manual_seed(0))
    kept = out_mask.sum(1)
    assert (kept >= 1).all()
    assert abs(float(kept.sum()) / float(mask.sum()) - 0.8) < 0.01
    for i in range(b):
        ids = (out[i, out_mask[i], 0] - 1).long() - i * r
        assert (ids[1:] > ids[:-1]).all()  # original order, no repeats
        assert mask[i, ids].all()  # never resurrects padding
        assert (out[i, ~out_mask[i]] == 0).all()
    heavy, heavy_mask = drop_regions(regions, mask, 0.99, torch.Generator().manual_seed(1))
    assert (heavy_mask.sum(1) >= 1).all() and heavy.shape[1] == int(heavy_mask.sum(1).max())


# ------------------------------------------------------------------------- datasets
def precomp_split(tmp_path, n=6, k=2, r=5, f=4):
    feats = np.random.default_rng(0).standard_normal((n, r, f)).astype(np.float32)
    np.save(tmp_path / "train_ims.npy", feats)
    caps = [f"a thing number {c} near item {c % 3}" for c in range(n * k)]
    (tmp_path / "train_caps.txt").write_text("\n".join(caps) + "\n")
    return load_split(tmp_path, "train"), feats


def test_pair_dataset_eval_collate_is_aligned(tmp_path):
    split, feats = precomp_split(tmp_path)
    vocab = WordVocab.build(split.captions)
    ds = PairDataset(split, vocab, max_length=32, train=False)
    assert len(ds) == 12
    img, txt = ds.collate([ds[i] for i in (3, 0, 7)])
    assert img.regions.shape == (3, 5, 4) and img.region_mask.all()
    torch.testing.assert_close(img.regions, torch.from_numpy(feats[[1, 0, 3]]))
    assert img.image_index.tolist() == [1, 0, 3] and txt.image_index.tolist() == [1, 0, 3]
    assert txt.caption_index.tolist() == [3, 0, 7]
    ref_tokens, ref_mask = vocab.encode_batch([split.captions[i] for i in (3, 0, 7)], 32)
    assert torch.equal(txt.tokens, ref_tokens) and torch.equal(txt.token_mask, ref_mask)


def test_pair_dataset_train_augmentation_is_seeded_per_epoch(tmp_path):
    split, _ = precomp_split(tmp_path, n=40, k=2, r=10)
    vocab = WordVocab.build(split.captions)

    def batch(seed, epoch):
        ds = PairDataset(split, vocab, max_length=32, train=True, token_noise=0.3, region_drop=0.3, seed=seed)
        ds.set_epoch(epoch)
        return ds.collate([ds[i] for i in range(0, 80, 2)])

    a, b, c = batch(0, 1), batch(0, 1), batch(0, 2)
    assert torch.equal(a[1].tokens, b[1].tokens) and torch.equal(a[0].regions, b[0].regions)
    assert not torch.equal(a[1].tokens, c[1].tokens)
    assert (a[0].region_mask.sum(1) >= 1).all() and a[0].regions.shape[1] <= 10
    assert a[0].region_mask.sum() < 40 * 10  # some regions were dropped
    assert len(a[0]) == len(a[1]) == 40


def test_pair_dataset_rejects_bad_values(tmp_path):
    split, _ = precomp_split(tmp_path)
    vocab = WordVocab.build(split.captions)
    with pytest.raises(ItmatchError, match="model.text.token_noise"):
        PairDataset(split, vocab, max_length=8, train=True, token_noise=1.5)
    with pytest.raises(ItmatchError, match="has no image files"):
        PairDataset(split, vocab, max_length=8, train=True, image_transform=image_transform(8, True))


def test_eval_datasets_cover_the_split_in_order(tmp_path):
    split, feats = precomp_split(tmp_path, n=7, k=3)
    vocab = WordVocab.build(split.captions)
    images = list(make_loader(ImageDataset(split), batch_size=3))
    assert [len(b) for b in images] == [3, 3, 1]
    assert torch.cat([b.image_index for b in images]).tolist() == list(range(7))
    torch.testing.assert_close(torch.cat([b.regions for b in images]), torch.from_numpy(feats))
    texts = list(make_loader(CaptionDataset(split, vocab, max_length=16), batch_size=8))
    assert torch.cat([b.caption_index for b in texts]).tolist() == list(range(21))
    assert torch.cat([b.image_index for b in texts]).tolist() == [c // 3 for c in range(21)]
    assert all(b.tokens.shape == b.token_mask.shape for b in texts)


def test_memmapped_features_pickle_by_reference(tmp_path):
    split, feats = precomp_split(tmp_path, n=64, k=1, r=36, f=64)  # 590 KiB of features
    vocab = WordVocab.build(split.captions)
    ds = PairDataset(split, vocab, max_length=16, train=False)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[5][3], feats[5])
    sliced = MappedArray(split.features[10:20])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sliced)).array, feats[10:20])
    plain = MappedArray(np.ones((2, 3, 4), np.float32))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(plain)).array, np.ones((2, 3, 4)))


def test_worker_processes_give_the_same_batches(tmp_path):
    split, _ = precomp_split(tmp_path, n=16, k=2)
    vocab = WordVocab.build(split.captions)
    ds = PairDataset(split, vocab, max_length=16, train=True, seed=3)
    ds.set_epoch(2)

    def run(workers):
        sampler = EpochSampler(len(ds), 3, 8)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate, num_workers=workers)
        return [(i.regions, t.tokens) for i, t in loader]

    for (r0, t0), (r1, t1) in zip(run(0), run(1)):
        assert torch.equal(r0, r1) and torch.equal(t0, t1)


# ------------------------------------------------------------------------ grid path
def test_image_transform_and_grid_dataset(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 51)).save(tmp_path / "a.png")
    gradient = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    Image.fromarray(gradient).save(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("image,caption\na.png,red\nb.png,ramp\nb.png,ramp again\n")
    split = load_table(tmp_path / "t.csv")
    batch = ImageDataset(split, image_transform(16, train=False)).collate(
        [ImageDataset(split, image_transform(16, train=False))[i] for i in (0, 1)])
    assert batch.pixels.shape == (2, 3, 16, 16) and batch.regions is None
    expect = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch.pixels[0].mean(dim=(1, 2)), expect, atol=1e-4, rtol=0)
    # Same-size square image: evaluation transform is plain to-tensor + normalisation.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    direct = (torch.from_numpy(gradient).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(batch.pixels[1], direct, atol=1e-5, rtol=0)

    train = image_transform(16, train=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    x = train(img, torch.Generator().manual_seed(1))
    assert torch.equal(x, train(img, torch.Generator().manual_seed(1))) and x.shape == (3, 16, 16)
    assert not torch.equal(x, train(img, torch.Generator().manual_seed(2)))

    vocab = WordVocab.build(split.captions)
    pairs = PairDataset(split, vocab, max_length=8, train=True, image_transform=train, seed=0)
    img_b, txt_b = pairs.collate([pairs[i] for i in range(3)])
    assert img_b.pixels.shape == (3, 3, 16, 16) and img_b.image_index.tolist() == [0, 1, 1]


# ------------------------------------------------------------------------ epoch order
def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, seed=5, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, 5, 0))
    assert not np.array_equal(a, epoch_order(100, 5, 1))
    assert not np.array_equal(a, epoch_order(100, 6, 0))
    assert sorted(epoch_order(10, -3, 2).tolist()) == list(range(10))


def test_epoch_sampler_resume_replays_the_remaining_batches():
    full = EpochSampler(103, seed=1, batch_size=10)
    assert len(full) == 10  # drop_last: the 3 leftover captions wait for another epoch
    full.set_epoch(4)
    uninterrupted = list(full)
    order = epoch_order(103, 1, 4)
    assert uninterrupted == [order[i * 10:(i + 1) * 10].tolist() for i in range(10)]

    resumed = EpochSampler(103, seed=1, batch_size=10)
    resumed.set_epoch(4)
    resumed.skip_batches(6)
    assert list(resumed) == uninterrupted[6:]
    resumed.set_epoch(5)  # a new epoch starts from its first batch again
    assert len(list(resumed)) == 10
    with pytest.raises(ValueError):
        resumed.skip_batches(11)

    assert len(EpochSampler(103, 1, 10, drop_last=False)) == 11
    small = EpochSampler(7, 0, 10)
    assert len(small) == 1 and sorted(next(iter(small))) == list(range(7))


def test_make_loader_shuffle_is_deterministic(tmp_path):
    split, _ = precomp_split(tmp_path, n=10, k=1)
    one = [b.image_index.tolist() for b in make_loader(ImageDataset(split), 4, shuffle=True, seed=9)]
    two = [b.image_index.tolist() for b in make_loader(ImageDataset(split), 4, shuffle=True, seed=9)]
    assert one == two and sorted(sum(one, [])) == list(range(10))
    assert one != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
