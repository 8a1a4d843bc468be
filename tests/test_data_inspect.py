"""`itmatch data inspect`: summaries, JSON output, exit codes."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import scipy.sparse

from itmatch.cli import main
from itmatch.data.inspect import inspect_split


def make_folder(root, split="test", n=4, k=5, r=3, f=8):
    root.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(1).standard_normal((n, r, f)).astype(np.float32)
    np.save(root / f"{split}_ims.npy", feats)
    caps = [" ".join(["word"] * (3 + c % 4)) for c in range(n * k)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    (root / f"{split}_ids.txt").write_text("\n".join(str(100 + i) for i in range(n)) + "\n")
    return feats


def test_inspect_prints_counts(tmp_path, capsys):
    make_folder(tmp_path, "test", n=4, k=5)
    make_folder(tmp_path, "dev", n=2, k=1)
    assert main(["data", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "split dev: 2 images, 2 captions (1 per image)" in out
    assert "split test: 4 images, 20 captions (5 per image)" in out
    assert "(4, 3, 8) float32" in out and "words min 3 / mean 4.5 / max 6" in out
    assert "every feature row is finite" in out
    assert main(["data", "inspect", str(tmp_path), "--split", "dev"]) == 0
    assert "split test" not in capsys.readouterr().out


def test_inspect_json_with_varying_counts_and_extras(tmp_path, capsys):
    make_folder(tmp_path, "test", n=3, k=1)
    (tmp_path / "test_caps.txt").write_text("a b\nc\nd e f\ng\n")
    (tmp_path / "test_cap2img.txt").write_text("0\n0\n0\n2\n")
    (tmp_path / "test_capids.txt").write_text("7\n8\n9\n9\n")
    rel = np.zeros((4, 3), dtype=bool)
    rel[[0, 1, 2, 3], [0, 0, 0, 2]] = True
    rel[3, 1] = True
    scipy.sparse.save_npz(tmp_path / "test_relevance.npz", scipy.sparse.csr_matrix(rel))
    np.save(tmp_path / "test_twins.npy", np.array([[0, 1]], dtype=np.int64))
    assert main(["data", "inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (s,) = report["splits"]
    assert s["n_images"] == 3 and s["n_captions"] == 4 and s["cap2img_file"]
    assert s["captions_per_image"] is None
    assert s["captions_per_image_histogram"] == {"0": 1, "1": 1, "3": 1}
    assert s["caption_ids"] == {"present": True, "unique": False}
    assert s["image_ids"] == {"present": True, "unique": True}
    assert s["caption_words"] == {"min": 1, "mean": 1.75, "max": 3}
    assert s["relevance"] == {"nnz": 5, "beyond_own_image": 1}
    assert s["twins"] == 1 and s["boxes"] is None
    assert s["features"]["shape"] == [3, 3, 8] and s["nonfinite_rows"] == {"count": 0, "first": []}


def test_inspect_reports_nonfinite_rows(tmp_path, capsys):
    feats = make_folder(tmp_path, n=30, k=1)
    feats[4, 0, 0] = np.nan
    feats[21, 2, 7] = np.inf
    np.save(tmp_path / "test_ims.npy", feats)
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "NaN or inf in 2 rows: 4, 21" in capsys.readouterr().out
    assert inspect_split(tmp_path, "test", chunk_rows=7)["nonfinite_rows"] == {"count": 2, "first": [4, 21]}


def test_inspect_bad_folders_exit_2(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "inspect", str(tmp_path / "empty")]) == 2
    assert "not a SCAN precomp folder" in capsys.readouterr().err
    make_folder(tmp_path / "bad", n=4, k=5)
    (tmp_path / "bad" / "test_caps.txt").write_text("".join(f"c{i}\n" for i in range(7)))
    assert main(["data", "inspect", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "7 captions for 4 images: not a whole number per image; give test_cap2img.txt" in err
    assert "Traceback" not in err
    make_folder(tmp_path / "trunc", n=4, k=1)
    data = (tmp_path / "trunc" / "test_ims.npy").read_bytes()
    (tmp_path / "trunc" / "test_ims.npy").write_bytes(data[:-4])
    assert main(["data", "inspect", str(tmp_path / "trunc")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_inspect_without_features_file(tmp_path):
    make_folder(tmp_path, n=4, k=2)
    (tmp_path / "test_ims.npy").unlink()
    s = inspect_split(tmp_path, "test")
    assert s["n_images"] == 4 and s["features"] is None and s["nonfinite_rows"] is None


def test_inspect_does_not_load_the_array(tmp_path):
    make_folder(tmp_path, n=256, k=1, r=16, f=256)  # 4 MiB of features
    tracemalloc.start()
    try:
        s = inspect_split(tmp_path, "test", chunk_rows=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s["n_images"] == 256
    assert peak < 1 * 2**20, peak
