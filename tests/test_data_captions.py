"""Image-file loaders: Karpathy split json, CSV and JSONL tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from itmatch.data.captions import load_karpathy, load_table
from itmatch.errors import ItmatchError


def png(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def coco_json(tmp_path):
    """Five images: train, restval, val (7 sentences), test, test."""
    images = []
    sentid = 100
    for imgid, (split, n_sent) in enumerate([("train", 2), ("restval", 1), ("val", 7), ("test", 1), ("test", 2)]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        filename = f"COCO_{folder}_{imgid:012d}.jpg"
        png(tmp_path / "images" / folder / filename)
        sentences = []
        for _ in range(n_sent):
            sentences.append({"raw": f" A caption {sentid}. ", "tokens": ["a", "caption"], "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "filename": filename, "split": split, "sentences": sentences,
                       "imgid": imgid, "cocoid": 9000 + imgid})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_coco_splits(tmp_path):
    path = coco_json(tmp_path)
    root = tmp_path / "images"
    train = load_karpathy(path, root, "train")
    assert train.image_ids == ["9000"] and train.captions == ["A caption 100.", "A caption 101."]
    assert train.features is None and train.image_paths[0] == root / "train2014" / "COCO_train2014_000000000000.jpg"
    both = load_karpathy(path, root, "train", include_restval=True)
    assert both.image_ids == ["9000", "9001"]
    np.testing.assert_array_equal(both.caption_to_image, [0, 0, 1])
    dev = load_karpathy(path, root, "dev")
    assert dev.n_captions == 7 and dev.captions_per_image == 7  # every sentence kept
    assert load_karpathy(path, root, "val").image_ids == dev.image_ids
    test = load_karpathy(path, root, "test")
    assert test.image_ids == ["9003", "9004"] and test.caption_ids == ["110", "111", "112"]
    np.testing.assert_array_equal(test.caption_to_image, [0, 1, 1])
    assert test.captions_per_image is None


def test_karpathy_flickr_uses_filename_stem(tmp_path):
    png(tmp_path / "imgs" / "1000092795.jpg")
    data = {"images": [{"filename": "1000092795.jpg", "split": "test", "imgid": 0,
                        "sentences": [{"raw": "Two men.", "tokens": ["two", "men"], "sentid": 0}]}]}
    (tmp_path / "f.json").write_text(json.dumps(data))
    s = load_karpathy(tmp_path / "f.json", tmp_path / "imgs", "test")
    assert s.image_ids == ["1000092795"] and s.image_paths == [tmp_path / "imgs" / "1000092795.jpg"]


def test_karpathy_errors(tmp_path):
    path = coco_json(tmp_path)
    with pytest.raises(ItmatchError, match="unknown Karpathy split 'holdout'"):
        load_karpathy(path, tmp_path / "images", "holdout")
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(ItmatchError, match="1 image files named in .* are missing: .*COCO_val2014_000000000003.jpg"):
        load_karpathy(path, tmp_path / "images", "test")
    (tmp_path / "x.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ItmatchError, match="no 'images' list"):
        load_karpathy(tmp_path / "x.json", tmp_path / "images", "test")
    with pytest.raises(ItmatchError, match="Karpathy json not found"):
        load_karpathy(tmp_path / "missing.json", tmp_path / "images", "test")


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_rows_group_into_images(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "sub" / "b.png")
    table = write_csv(tmp_path / "t.csv",
                      'image,caption,source\na.png,"a red, square",x\nsub/b.png,blue one,y\na.png,another,z\n')
    s = load_table(table)
    assert s.image_ids == ["a.png", "sub/b.png"]
    assert s.image_paths == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert s.captions == ["a red, square", "blue one", "another"]
    np.testing.assert_array_equal(s.caption_to_image, [0, 1, 0])
    assert s.extra["rows"] == [{"source": "x"}, {"source": "y"}, {"source": "z"}]
    assert s.features is None and s.caption_ids is None


def test_csv_image_root_ids_and_split_filter(tmp_path):
    png(tmp_path / "pics" / "a.png")
    png(tmp_path / "pics" / "b.png")
    (tmp_path / "ann").mkdir()
    table = write_csv(tmp_path / "ann" / "t.csv",
                      "image,caption,split,image_id,caption_id\n"
                      "a.png,one,train,11,101\nb.png,two,val,12,102\nb.png,three,val,12,103\na.png,four,test,11,104\n")
    dev = load_table(table, image_root=tmp_path / "pics", split="dev")
    assert dev.image_ids == ["12"] and dev.caption_ids == ["102", "103"] and dev.name == "dev"
    assert dev.image_paths == [tmp_path / "pics" / "b.png"]
    assert load_table(table, image_root=tmp_path / "pics", split="train").captions == ["one"]
    with pytest.raises(ItmatchError, match="no rows with split 'restval' .*found: test, train, val"):
        load_table(table, image_root=tmp_path / "pics", split="restval")


def test_csv_errors(tmp_path):
    png(tmp_path / "a.png")
    with pytest.raises(ItmatchError, match="needs an 'caption' column"):
        load_table(write_csv(tmp_path / "t.csv", "image,text\na.png,x\n"))
    with pytest.raises(ItmatchError, match="row 3: empty caption"):
        load_table(write_csv(tmp_path / "t.csv", "image,caption\na.png,x\na.png,  \n"))
    with pytest.raises(ItmatchError, match="no 'split' column"):
        load_table(write_csv(tmp_path / "t.csv", "image,caption\na.png,x\n"), split="test")
    missing = "".join(f"m{i}.png,cap\n" for i in range(5))
    shown = r"5 image files named in .* are missing: .*m0.png, .*m1.png, .*m2.png \(and 2 more\)"
    with pytest.raises(ItmatchError, match=shown):
        load_table(write_csv(tmp_path / "t.csv", "image,caption\n" + missing))
    with pytest.raises(ItmatchError, match="caption table not found"):
        load_table(tmp_path / "none.csv")
    with pytest.raises(ItmatchError, match="unknown table format"):
        load_table(write_csv(tmp_path / "t.tsv", "image\tcaption\n"))


def test_jsonl(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    lines = [{"image": "a.png", "caption": "one", "score": 3}, {"image": "b.png", "caption": "two", "score": 4},
             {"image": "b.png", "caption": "three", "score": 5}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    s = load_table(tmp_path / "t.jsonl")
    np.testing.assert_array_equal(s.caption_to_image, [0, 1, 1])
    assert s.extra["rows"] == [{"score": 3}, {"score": 4}, {"score": 5}]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": oops}\n')
    with pytest.raises(ItmatchError, match="bad.jsonl line 2 is not valid JSON"):
        load_table(tmp_path / "bad.jsonl")
