"""SCAN precomp loading: layout, count rules, and every kind of bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse

from itmatch.data.precomp import check_finite, find_nonfinite_rows, find_splits, load_split, read_npy_header
from itmatch.errors import ItmatchError


def make_precomp(root, split="test", n=4, k=5, r=3, f=6, dtype=np.float32, ids=True, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, r, f)).astype(dtype)
    np.save(root / f"{split}_ims.npy", feats)
    caps = [f"caption {c} of image {c // k}" for c in range(n * k)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    if ids:
        (root / f"{split}_ids.txt").write_text("\n".join(f"img{i}" for i in range(n)) + "\n")
    return feats, caps


def test_load_split_maps_features_and_maps_captions(tmp_path):
    feats, caps = make_precomp(tmp_path, n=4, k=5)
    s = load_split(tmp_path, "test")
    assert isinstance(s.features, np.memmap)
    assert not s.features.flags.writeable
    np.testing.assert_array_equal(np.asarray(s.features), feats)
    assert s.captions == caps
    np.testing.assert_array_equal(s.caption_to_image, [c // 5 for c in range(20)])
    assert s.image_ids == ["img0", "img1", "img2", "img3"]
    assert s.caption_ids is None and s.boxes is None and s.relevance is None and s.twins is None
    assert s.captions_per_image == 5
    assert find_splits(tmp_path) == ["test"]


def test_default_ids_and_one_caption_per_image(tmp_path):
    make_precomp(tmp_path, n=3, k=1, ids=False)
    s = load_split(tmp_path, "test")
    assert s.image_ids == ["0", "1", "2"]
    np.testing.assert_array_equal(s.caption_to_image, [0, 1, 2])


def test_features_false_reads_only_the_header(tmp_path, monkeypatch):
    make_precomp(tmp_path, n=4, k=2)
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **kw: opened.append(str(path)) or real_load(path, *a, **kw))
    s = load_split(tmp_path, "test", features=False)
    assert s.features is None and s.n_images == 4
    assert not any(p.endswith("_ims.npy") for p in opened)


def test_features_false_without_ims_counts_images_from_ids(tmp_path):
    make_precomp(tmp_path, n=4, k=2)
    (tmp_path / "test_ims.npy").unlink()
    s = load_split(tmp_path, "test", features=False)
    assert s.n_images == 4 and s.features is None
    with pytest.raises(ItmatchError, match="missing test_ims.npy"):
        load_split(tmp_path, "test")
    (tmp_path / "test_ids.txt").unlink()
    with pytest.raises(ItmatchError, match="cannot count images"):
        load_split(tmp_path, "test", features=False)


def test_missing_files_are_named(tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(ItmatchError, match="missing test_caps.txt, test_ims.npy"):
        load_split(tmp_path / "x", "test")
    with pytest.raises(ItmatchError, match="data folder not found"):
        load_split(tmp_path / "nope", "test")


def test_caption_count_not_a_multiple(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((200, 2, 3), np.float32))
    (tmp_path / "test_caps.txt").write_text("".join(f"c{i}\n" for i in range(1003)))
    with pytest.raises(ItmatchError) as err:
        load_split(tmp_path, "test")
    assert str(err.value) == "1003 captions for 200 images: not a whole number per image; give test_cap2img.txt"


def test_fewer_captions_than_images_needs_cap2img(tmp_path):
    make_precomp(tmp_path, n=4, k=1)
    (tmp_path / "test_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(ItmatchError, match="3 captions for 4 images"):
        load_split(tmp_path, "test")


def test_cap2img_gives_varying_counts(tmp_path):
    make_precomp(tmp_path, n=3, k=1)
    (tmp_path / "test_caps.txt").write_text("a\nb\nc\nd\ne\n")
    (tmp_path / "test_cap2img.txt").write_text("0\n0\n2\n2\n2\n")
    s = load_split(tmp_path, "test")
    np.testing.assert_array_equal(s.caption_to_image, [0, 0, 2, 2, 2])
    assert s.captions_per_image is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("0\n0\n1\n", "has 3 lines for 5 captions"),
        ("0\n0\n1\n3\n1\n", r"line 4: image row out of range 0\.\.2"),
        ("0\nx\n1\n1\n1\n", "line 2: expected an integer"),
    ],
)
def test_bad_cap2img(tmp_path, content, message):
    make_precomp(tmp_path, n=3, k=1)
    (tmp_path / "test_caps.txt").write_text("a\nb\nc\nd\ne\n")
    (tmp_path / "test_cap2img.txt").write_text(content)
    with pytest.raises(ItmatchError, match=message):
        load_split(tmp_path, "test")


def test_wrong_dtype_and_rank(tmp_path):
    make_precomp(tmp_path, n=2, k=1)
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ItmatchError, match="must hold floating point features, got dtype int32"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 12), np.float32))
    with pytest.raises(ItmatchError, match=r"rank 3\), got shape \(2, 12\)"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.float16))
    assert load_split(tmp_path, "test").features.dtype == np.float16


def test_truncated_npy_is_detected_before_mapping(tmp_path):
    make_precomp(tmp_path, n=4, k=1)
    path = tmp_path / "test_ims.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ItmatchError, match="test_ims.npy is truncated: its header declares shape \\(4, 3, 6\\)"):
        load_split(tmp_path, "test")
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(ItmatchError, match="is corrupt"):
        load_split(tmp_path, "test")


@pytest.mark.parametrize("payload", [b"not a numpy file at all", b"\x93NUMPY\x01\x00\x10\x00{'descr': oops"])
def test_corrupt_header(tmp_path, payload):
    make_precomp(tmp_path, n=2, k=1)
    (tmp_path / "test_ims.npy").write_bytes(payload)
    with pytest.raises(ItmatchError, match="not a valid .npy file"):
        load_split(tmp_path, "test")


def test_object_array_is_refused(tmp_path):
    make_precomp(tmp_path, n=2, k=1)
    np.save(tmp_path / "test_boxes.npy", np.array([[None] * 4] * 2, dtype=object), allow_pickle=True)
    with pytest.raises(ItmatchError, match="holds Python objects"):
        read_npy_header(tmp_path / "test_boxes.npy")


def test_non_utf8_line_is_reported(tmp_path):
    make_precomp(tmp_path, n=2, k=2)
    (tmp_path / "test_caps.txt").write_bytes(b"one\ntwo\nthr\xffee\nfour\n")
    with pytest.raises(ItmatchError, match="test_caps.txt line 3 is not valid UTF-8"):
        load_split(tmp_path, "test")


def test_empty_captions_are_reported(tmp_path):
    make_precomp(tmp_path, n=2, k=2)
    (tmp_path / "test_caps.txt").write_text("one\n\nthree\n   \n")
    with pytest.raises(ItmatchError, match="empty caption on line 2, 4"):
        load_split(tmp_path, "test")


def test_crlf_and_unicode_separators_inside_captions(tmp_path):
    make_precomp(tmp_path, n=2, k=1)
    (tmp_path / "test_caps.txt").write_bytes("a dog\u2028runs\r\ncaf\u00e9\r\n".encode("utf-8"))
    s = load_split(tmp_path, "test")
    assert s.captions == ["a dog\u2028runs", "caf\u00e9"]


def test_ids_and_capids_count_mismatch(tmp_path):
    make_precomp(tmp_path, n=3, k=2)
    (tmp_path / "test_ids.txt").write_text("a\nb\n")
    with pytest.raises(ItmatchError, match="test_ids.txt has 2 lines for 3 images"):
        load_split(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("a\nb\nc\n")
    (tmp_path / "test_capids.txt").write_text("1\n2\n3\n")
    with pytest.raises(ItmatchError, match="test_capids.txt has 3 lines for 6 captions"):
        load_split(tmp_path, "test")
    (tmp_path / "test_capids.txt").write_text("".join(f"{100 + i}\n" for i in range(6)))
    assert load_split(tmp_path, "test").caption_ids == [str(100 + i) for i in range(6)]


def test_boxes(tmp_path):
    make_precomp(tmp_path, n=3, k=1, r=5)
    np.save(tmp_path / "test_boxes.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ItmatchError, match=r"test_boxes.npy has shape \(3, 4, 4\), expected \(3, 5, 4\)"):
        load_split(tmp_path, "test")
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (3, 5, 2, 2)), axis=2)  # x1 <= x2, y1 <= y2
    boxes = corners.transpose(0, 1, 3, 2).reshape(3, 5, 4)[..., [0, 2, 1, 3]].astype(np.float32)
    np.save(tmp_path / "test_boxes.npy", boxes)
    s = load_split(tmp_path, "test")
    assert isinstance(s.boxes, np.memmap)
    assert s.image_sizes is None  # relative boxes
    np.testing.assert_array_equal(s.boxes, boxes)


def _boxes_in_pixels(n=3, r=5, w=200.0, h=100.0):
    x = np.sort(np.random.default_rng(1).uniform(0, w, (n, r, 2)), axis=-1)
    y = np.sort(np.random.default_rng(2).uniform(0, h, (n, r, 2)), axis=-1)
    return np.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1).astype(np.float32)


def test_pixel_boxes_need_image_sizes(tmp_path):
    make_precomp(tmp_path, n=3, k=1, r=5)
    boxes = _boxes_in_pixels()
    np.save(tmp_path / "test_boxes.npy", boxes)
    with pytest.raises(ItmatchError, match=r"boxes outside the image in image rows 0, 1, 2 .*test_image_sizes.npy"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_image_sizes.npy", np.array([[200, 100]] * 3))
    s = load_split(tmp_path, "test")
    np.testing.assert_array_equal(s.image_sizes, [[200.0, 100.0]] * 3)
    np.save(tmp_path / "test_image_sizes.npy", np.array([[200, 100], [50, 100], [200, 100]]))
    with pytest.raises(ItmatchError, match=r"boxes outside the image in image rows 1$"):
        load_split(tmp_path, "test")
    for bad, message in ((np.ones((3, 3)), r"must be an \(3, 2\) numeric array"),
                         (np.array([[200, 100], [0, 100], [200, 100]]), "finite and > 0; not so in rows 1")):
        np.save(tmp_path / "test_image_sizes.npy", bad)
        with pytest.raises(ItmatchError, match=message):
            load_split(tmp_path, "test")
    (tmp_path / "test_boxes.npy").unlink()
    with pytest.raises(ItmatchError, match="test_image_sizes.npy is given but test_boxes.npy is missing"):
        load_split(tmp_path, "test")


@pytest.mark.parametrize("row, box, message", [
    (2, [0.5, 0.1, 0.4, 0.2], r"x2 < x1 or y2 < y1 in image rows 2"),
    (1, [0.1, 0.5, 0.2, 0.4], r"x2 < x1 or y2 < y1 in image rows 1"),
    (0, [np.nan, 0.1, 0.2, 0.3], r"NaN or inf in image rows 0"),
    (1, [-0.2, 0.1, 0.2, 0.3], r"outside the image in image rows 1"),
])
def test_bad_boxes_name_their_rows(tmp_path, row, box, message):
    make_precomp(tmp_path, n=3, k=1, r=5)
    boxes = np.tile(np.array([0.1, 0.2, 0.3, 0.4], np.float32), (3, 5, 1))
    boxes[row, 3] = box
    np.save(tmp_path / "test_boxes.npy", boxes)
    with pytest.raises(ItmatchError, match="test_boxes.npy: boxes " + message):
        load_split(tmp_path, "test")


def test_scenes_manifest_gives_the_pixel_unit(tmp_path):
    make_precomp(tmp_path, n=3, k=1, r=5)
    np.save(tmp_path / "test_boxes.npy", _boxes_in_pixels(w=128.0, h=128.0))
    (tmp_path / "scenes.json").write_text('{"format": "itmatch-scenes", "image_size": 128}')
    s = load_split(tmp_path, "test")
    np.testing.assert_array_equal(s.image_sizes, np.full((3, 2), 128.0))


def test_real_scenes_boxes_load_in_pixels(tiny_scenes):
    from itmatch.data.inspect import inspect_split

    s = load_split(tiny_scenes, "train")
    assert s.boxes.shape == (s.n_images, 12, 4) and (s.image_sizes == 128).all()
    assert s.boxes.max() > 1.5  # pixels, not relative
    assert inspect_split(tiny_scenes, "train")["box_unit"] == "pixels"


def test_relevance(tmp_path):
    make_precomp(tmp_path, n=3, k=2)
    scipy.sparse.save_npz(tmp_path / "test_relevance.npz", scipy.sparse.csr_matrix(np.eye(3, dtype=bool)))
    with pytest.raises(ItmatchError, match=r"shape \(3, 3\), expected captions x images = \(6, 3\)"):
        load_split(tmp_path, "test")
    dense = np.zeros((6, 3), dtype=bool)
    dense[np.arange(6), np.arange(6) // 2] = True
    dense[0, 2] = True
    scipy.sparse.save_npz(tmp_path / "test_relevance.npz", scipy.sparse.csr_matrix(dense))
    rel = load_split(tmp_path, "test").relevance
    assert scipy.sparse.issparse(rel) and rel.format == "csr" and rel.dtype == bool
    np.testing.assert_array_equal(rel.toarray(), dense)
    (tmp_path / "test_relevance.npz").write_bytes(b"junk")
    with pytest.raises(ItmatchError, match="not a scipy.sparse .npz"):
        load_split(tmp_path, "test")


def test_twins(tmp_path):
    make_precomp(tmp_path, n=3, k=1)
    np.save(tmp_path / "test_twins.npy", np.array([[0, 1], [2, 3]], dtype=np.int64))
    with pytest.raises(ItmatchError, match=r"out of range 0\.\.2 in twin rows 1"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_twins.npy", np.array([0, 1, 2], dtype=np.int64))
    with pytest.raises(ItmatchError, match="K x 2 integer array"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test_twins.npy", np.array([[0, 1], [2, 0]], dtype=np.int64))
    np.testing.assert_array_equal(load_split(tmp_path, "test").twins, [[0, 1], [2, 0]])


def _slow_nonfinite(a):
    return [i for i in range(a.shape[0]) if not all(np.isfinite(v) for v in a[i].ravel())]


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_find_nonfinite_rows_matches_a_loop(tmp_path, chunk_rows):
    feats, _ = make_precomp(tmp_path, n=20, k=1)
    feats[3, 1, 2] = np.nan
    feats[17, 0, 0] = np.inf
    feats[18, 2, 5] = -np.inf
    np.save(tmp_path / "test_ims.npy", feats)
    mapped = load_split(tmp_path, "test").features
    rows = find_nonfinite_rows(mapped, chunk_rows=chunk_rows)
    assert rows.tolist() == _slow_nonfinite(feats) == [3, 17, 18]
    assert find_nonfinite_rows(np.zeros((0, 2, 2), np.float32)).tolist() == []


def test_check_finite_names_rows_and_file(tmp_path):
    feats, _ = make_precomp(tmp_path, n=20, k=1)
    feats[3, 0, 0] = np.nan
    feats[17, 2, 1] = np.inf
    np.save(tmp_path / "test_ims.npy", feats)
    s = load_split(tmp_path, "test")  # default: no scan
    with pytest.raises(ItmatchError) as err:
        check_finite(s, chunk_rows=4)
    assert str(err.value) == "NaN or inf in rows 3, 17 of test_ims.npy"
    with pytest.raises(ItmatchError, match="NaN or inf in rows 3, 17 of test_ims.npy"):
        load_split(tmp_path, "test", check_finite=True)


def test_nonfinite_scan_memory_is_bounded(tmp_path):
    feats = np.ones((512, 16, 256), np.float32)  # 8 MiB
    feats[500, 3, 3] = np.nan
    np.save(tmp_path / "big.npy", feats)
    del feats
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        rows = find_nonfinite_rows(mapped, chunk_rows=8)  # 128 KiB per chunk
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows.tolist() == [500]
    assert peak < 1 * 2**20, peak
