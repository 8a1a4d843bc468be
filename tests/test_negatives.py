"""`loss.negatives: relevance`: relevant pairs never serve as negatives, in every loss that picks them.

Each loss is checked against a slow per-pair loop that skips relevant negatives; `ids` (the default)
must give exactly the numbers of the image-id masks alone.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.sparse
import torch

from itmatch.config import load_config
from itmatch.data.batch import ImageBatch, TextBatch, pair_masks, positive_mask
from itmatch.data.datasets import PairDataset, non_negative_matrices, relevance_block
from itmatch.data.precomp import load_split
from itmatch.data.text import WordVocab
from itmatch.errors import ItmatchError
from itmatch.objectives.base import TrainProgress
from itmatch.objectives.contrastive import InfoNCE
from itmatch.objectives.dias import DiasConfig, DIASRegularizer
from itmatch.objectives.ranking import DistanceWeightedTriplet, HingeLoss
from itmatch.similarity.dense import dot_similarity

# Six aligned pairs; images 0 and 3 come twice. rel[c, i]: caption row c relevant to image row i.
IMAGE_OF_ROW = [0, 0, 1, 2, 3, 3]


def relevance_of_rows():
    """(B_txt, B_img) relevance by the data between the batch's caption rows and image rows: every
    caption is relevant to its own image, plus a few other images (both directions represented)."""
    rel = np.array(IMAGE_OF_ROW)[:, None] == np.array(IMAGE_OF_ROW)[None, :]
    for c, i in ((0, 2), (2, 4), (2, 5), (3, 0), (5, 3)):
        rel[c, i] = True
    return torch.from_numpy(rel)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(IMAGE_OF_ROW)
    sims = torch.rand(6, 6, generator=g, dtype=torch.float64) * 2 - 1
    img = ImageBatch(image_index=idx)
    txt = TextBatch(tokens=torch.zeros(6, 1, dtype=torch.long), token_mask=torch.ones(6, 1, dtype=torch.bool),
                    caption_index=torch.arange(6), image_index=idx.clone(),
                    non_negatives=relevance_of_rows().T.contiguous())
    return sims, img, txt


def is_negative(r, c, rel_txt_img):
    """Slow reference: pair (image row r, caption row c) is a negative when the caption is not of the
    row's image and the data does not declare it relevant to that image."""
    return IMAGE_OF_ROW[r] != IMAGE_OF_ROW[c] and not bool(rel_txt_img[c, r])


def hinge_reference(sims, rel, margin, hardest):
    total, n = 0.0, sims.shape[0]
    for r in range(n):
        for c in range(n):
            if IMAGE_OF_ROW[r] != IMAGE_OF_ROW[c]:
                continue
            s = float(sims[r, c])
            row = [max(0.0, margin + float(sims[r, j]) - s) for j in range(n) if is_negative(r, j, rel)]
            col = [max(0.0, margin + float(sims[i, c]) - s) for i in range(n) if is_negative(i, c, rel)]
            total += (max(row, default=0.0) + max(col, default=0.0)) if hardest else (sum(row) + sum(col))
    return total


def test_pair_masks_leave_relevant_pairs_out_of_the_negatives():
    sims, img, txt = batch()
    rel = relevance_of_rows()
    positives, negatives = pair_masks(img, txt)
    assert torch.equal(positives, positive_mask(img.image_index, txt.image_index))
    for r in range(6):
        for c in range(6):
            assert bool(negatives[r, c]) == is_negative(r, c, rel), (r, c)
    assert not (positives & negatives).any()
    # Relevant-but-not-own pairs are not positives either: they are simply left out.
    assert int((~positives & ~negatives).sum()) == 5
    txt.non_negatives = None
    assert torch.equal(pair_masks(img, txt)[1], ~positives)


@pytest.mark.parametrize("hardest", [False, True])
def test_hinge_skips_relevant_negatives(hardest):
    sims, img, txt = batch()
    positives, negatives = pair_masks(img, txt)
    got = HingeLoss(0.2)(sims, positives, max_violation=hardest, negatives=negatives)
    assert float(got) == pytest.approx(hinge_reference(sims, relevance_of_rows(), 0.2, hardest), rel=1e-9)
    # Without relevance the same numbers as the plain image-id hinge, to the bit.
    plain = HingeLoss(0.2)(sims, positives, max_violation=hardest)
    assert torch.equal(HingeLoss(0.2)(sims, positives, max_violation=hardest, negatives=~positives), plain)
    assert float(got) < float(plain)  # the relevant pairs here are violating "negatives"


def test_infonce_skips_relevant_negatives():
    sims, img, txt = batch()
    rel = relevance_of_rows()
    positives, negatives = pair_masks(img, txt)
    got = InfoNCE(temperature=0.1)(sims, positives, negatives=negatives)
    i2t, t2i = [], []
    for r in range(6):
        for c in range(6):
            if IMAGE_OF_ROW[r] != IMAGE_OF_ROW[c]:
                continue
            s = 10 * float(sims[r, c])
            row = [10 * float(sims[r, j]) for j in range(6) if is_negative(r, j, rel)] + [s]
            col = [10 * float(sims[i, c]) for i in range(6) if is_negative(i, c, rel)] + [s]
            i2t.append(math.log(sum(math.exp(v) for v in row)) - s)
            t2i.append(math.log(sum(math.exp(v) for v in col)) - s)
    assert float(got) == pytest.approx((np.mean(i2t) + np.mean(t2i)) / 2, rel=1e-9)
    assert torch.equal(InfoNCE(0.1)(sims, positives, negatives=~positives), InfoNCE(0.1)(sims, positives))


def test_triplet_never_draws_a_relevant_negative():
    sims, img, txt = batch()
    rel = relevance_of_rows()
    positives, negatives = pair_masks(img, txt)
    dwt = DistanceWeightedTriplet(margin=0.2, dim=8, nonzero_loss_cutoff=2.0)
    pos_r, pos_c = positives.nonzero(as_tuple=True)
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        neg_c = dwt.draw(dwt.sampling_logits(sims[pos_r], negatives[pos_r]), g)
        neg_r = dwt.draw(dwt.sampling_logits(sims[:, pos_c].T, negatives[:, pos_c].T), g)
        for k in range(len(pos_r)):
            assert neg_c[k] < 0 or is_negative(int(pos_r[k]), int(neg_c[k]), rel)
            assert neg_r[k] < 0 or is_negative(int(neg_r[k]), int(pos_c[k]), rel)
        # forward draws the same (rows first, then columns) and scores them as the loop does
        loss = dwt(sims, positives, torch.Generator().manual_seed(seed), negatives=negatives)
        ref = 0.0
        for k in range(len(pos_r)):
            s = float(sims[pos_r[k], pos_c[k]])
            if neg_c[k] >= 0:
                ref += max(0.0, 0.2 + float(sims[pos_r[k], neg_c[k]]) - s)
            if neg_r[k] >= 0:
                ref += max(0.0, 0.2 + float(sims[neg_r[k], pos_c[k]]) - s)
        assert float(loss) == pytest.approx(ref, rel=1e-9)
    # ids: identical draws and loss to the positives-only call
    a = dwt(sims, positives, torch.Generator().manual_seed(3))
    b = dwt(sims, positives, torch.Generator().manual_seed(3), negatives=~positives)
    assert torch.equal(a, b)


def test_dias_unmatched_means_not_relevant_either_way():
    g = torch.Generator().manual_seed(0)
    out = {"img": torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1),
           "txt": torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)}
    _, img, txt = batch()
    rel = relevance_of_rows()
    positives, negatives = pair_masks(img, txt)
    reg = DIASRegularizer(DiasConfig(w_dim=0.0, sparsity="none")).double()
    terms = reg(out, positives, negatives)
    x = 1 - out["img"] @ out["txt"].T
    y, z = 1 - out["img"] @ out["img"].T, 1 - out["txt"] @ out["txt"].T
    inter = intra = 0.0
    n_unmatched = 0
    for i in range(6):
        for j in range(6):
            # relation (i, j) is unmatched when neither caption may be matched with the other image
            if is_negative(i, j, rel) and is_negative(j, i, rel):
                n_unmatched += 1
                inter += float(x[i, j] - x[j, i]) ** 2
                intra += float(y[i, j] - z[i, j]) ** 2
    assert n_unmatched < 6 * 6 - 10  # relevance removed relations the image ids alone would keep
    assert terms["inter"].item() == pytest.approx(inter, rel=1e-9)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-9)
    # ids: exactly the historic ~(positives | positives.T)
    ids_terms = reg(out, positives)
    same = reg(out, positives, ~positives)
    assert all(torch.equal(ids_terms[k], same[k]) for k in ids_terms)


DOT_MODEL = types.SimpleNamespace(similarity=dot_similarity)


@pytest.mark.parametrize("method, loss", [("vse", "hinge"), ("vse", "infonce"), ("dias", "triplet")])
def test_objectives_read_the_mask_of_the_batch(method, loss):
    from itmatch.methods.registry import build_objective

    g = torch.Generator().manual_seed(2)
    out = {k: torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
           for k in ("img", "txt")}
    sims, img, txt = batch()
    dias = ["dias.w_dim=0"] if method == "dias" else []  # the section exists only where dias is used
    cfg = load_config(None, [f"model.method={method}", f"loss.name={loss}", *dias, "loss.negatives=relevance"])
    objective = build_objective(cfg, DOT_MODEL).double()
    plain_txt = TextBatch(txt.tokens, txt.token_mask, txt.caption_index, txt.image_index)  # no mask: ids
    progress = TrainProgress(epoch=0)  # the hinge sums over negatives: every relevant pair counts
    torch.manual_seed(0)
    with_rel = objective(out, img, txt, progress)["loss"]
    torch.manual_seed(0)
    ids = objective(out, img, plain_txt, progress)["loss"]
    assert float(with_rel.detach()) != float(ids.detach())
    if loss == "hinge":
        s = out["img"] @ out["txt"].T
        assert float(with_rel) == pytest.approx(hinge_reference(s, relevance_of_rows(), 0.2, False), rel=1e-9)
        positives = positive_mask(img.image_index, txt.image_index)
        assert torch.equal(ids, HingeLoss(0.2)(s, positives, max_violation=False))


def test_unknown_negatives_value_is_a_config_error():

    with pytest.raises(ItmatchError, match="loss.negatives.*'images'.*ids, relevance"):
        load_config(None, ["loss.negatives=images"])  # refused at load time, before any data


# ---------------------------------------------------------------------------- the collate
def split_with_relevance(tmp_path, relevance=True, undetermined=False):
    n, k = 4, 2
    np.save(tmp_path / "train_ims.npy", np.random.default_rng(0).standard_normal((n, 3, 4)).astype(np.float32))
    (tmp_path / "train_caps.txt").write_text("".join(f"caption {c}\n" for c in range(n * k)))
    rel = np.arange(n * k)[:, None] // k == np.arange(n)[None, :]
    rel[0, 3] = rel[5, 0] = True
    if relevance:
        scipy.sparse.save_npz(tmp_path / "train_relevance.npz", scipy.sparse.csr_matrix(rel))
    split = load_split(tmp_path, "train")
    if undetermined:
        und = np.zeros_like(rel)
        und[7, 1] = True
        split.undetermined = scipy.sparse.csr_matrix(und)
    return split, rel


def test_collate_attaches_the_relevance_of_its_rows(tmp_path):
    split, rel = split_with_relevance(tmp_path)
    vocab = WordVocab.build(split.captions)
    caps = [0, 5, 7, 2, 6]
    ds = PairDataset(split, vocab, max_length=8, train=True, negatives="relevance", region_drop=0.5)
    _, txt = ds.collate([ds[c] for c in caps])
    rows = np.arange(8)[caps] // 2
    expected = rel[np.ix_(caps, rows)].T  # (B_img, B_txt)
    np.testing.assert_array_equal(txt.non_negatives.numpy(), expected)
    # ids: no mask, nothing else changes
    ds_ids = PairDataset(split, vocab, max_length=8, train=True, region_drop=0.5)
    img_a, txt_a = ds_ids.collate([ds_ids[c] for c in caps])
    img_b, txt_b = ds.collate([ds[c] for c in caps])
    assert txt_a.non_negatives is None
    assert torch.equal(img_a.regions, img_b.regions) and torch.equal(txt_a.tokens, txt_b.tokens)


def test_undetermined_pairs_are_not_negatives_either(tmp_path):
    split, rel = split_with_relevance(tmp_path, undetermined=True)
    # images 1 and 3 (rows) x captions 7 and 2 (columns): (1, 7) undetermined, (1, 2) and (3, 7) own
    block = relevance_block(non_negative_matrices(split), [7, 2], [1, 3])
    np.testing.assert_array_equal(block, [[True, True], [True, False]])
    del split.undetermined
    block = relevance_block(non_negative_matrices(split), [7, 2], [1, 3])
    np.testing.assert_array_equal(block, [[False, True], [True, False]])


def test_relevance_negatives_without_relevance_is_one_clear_error(tmp_path):
    split, _ = split_with_relevance(tmp_path, relevance=False)
    vocab = WordVocab.build(split.captions)
    with pytest.raises(ItmatchError, match="loss.negatives' is relevance but split 'train'.*train_relevance.npz"):
        PairDataset(split, vocab, max_length=8, train=True, negatives="relevance")
    with pytest.raises(ItmatchError, match="loss.negatives': unknown value 'all'"):
        PairDataset(split, vocab, max_length=8, train=True, negatives="all")
