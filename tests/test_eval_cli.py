"""`itmatch eval-sims` through `itmatch.cli.main`: good runs write JSON, bad input exits 2 with one line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from itmatch.cli import main
from itmatch.data.split import RetrievalSplit
from itmatch.evaluation.protocols import evaluate_sims


@pytest.fixture
def sims(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 100)).astype(np.float32)
    b = rng.standard_normal((20, 100)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return tmp_path, a, b


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_good_run_prints_table_and_writes_json(sims, capsys):
    tmp, a, _ = sims
    out_file = tmp / "report.json"
    code, out, err = run(["eval-sims", str(tmp / "a.npy"), "--protocol", "plain", "--output", str(out_file)], capsys)
    assert code == 0, err
    report = json.loads(out_file.read_text())
    assert report["metrics"] == evaluate_sims(a, "plain", caption_to_image=np.repeat(np.arange(20), 5))["metrics"]
    assert report["captions_per_image"] == 5 and report["sims_files"] == [str(tmp / "a.npy")]
    assert "rSum" in out and "report written" in out


def test_ensemble_is_the_mean_and_captions_per_image_is_used(sims, capsys):
    tmp, a, b = sims
    out_file = tmp / "ens.json"
    code, _, err = run(["eval-sims", str(tmp / "a.npy"), str(tmp / "b.npy"), "--protocol", "plain",
                        "--captions-per-image", "5", "--output", str(out_file)], capsys)
    assert code == 0, err
    expected = evaluate_sims((a + b) / 2, "plain", caption_to_image=np.repeat(np.arange(20), 5))["metrics"]
    assert json.loads(out_file.read_text())["metrics"] == expected
    # four captions per image: 25 images x 100 captions
    np.save(tmp / "c.npy", np.random.default_rng(1).standard_normal((25, 100)).astype(np.float32))
    code, _, err = run(["eval-sims", str(tmp / "c.npy"), "--protocol", "plain", "--captions-per-image", "4"], capsys)
    assert code == 0, err


def test_data_split_is_loaded_and_checked(sims, capsys, monkeypatch):
    tmp, a, _ = sims
    rng = np.random.default_rng(2)
    c2i = rng.permutation(np.repeat(np.arange(20), 5))
    rel = np.zeros((100, 20), dtype=bool)
    rel[np.arange(100), c2i] = True
    split = RetrievalSplit(name="test", root=tmp, captions=[""] * 100, caption_to_image=c2i,
                           image_ids=[str(i) for i in range(20)], relevance=sp.csr_matrix(rel),
                           twins=np.array([[0, 1], [2, 3]]))
    calls = []

    def load_split(root, name, *, features=True):
        calls.append((Path(root), name, features))
        return split

    # the real loader lives in itmatch.data.precomp; a stand-in keeps this test about eval-sims
    monkeypatch.setitem(sys.modules, "itmatch.data.precomp", types.SimpleNamespace(load_split=load_split))
    out_file = tmp / "scenes.json"
    code, out, err = run(["eval-sims", str(tmp / "a.npy"), "--protocol", "scenes", "--data", str(tmp),
                          "--split", "test", "--output", str(out_file)], capsys)
    assert code == 0, err
    assert calls == [(tmp, "test", False)]
    report = json.loads(out_file.read_text())
    assert report["metrics"] == evaluate_sims(a, "scenes", split)["metrics"]
    assert report["split"] == "test" and report["metrics"]["twin_acc_t2i"] is not None
    assert "map_at_r" in out and "twin_acc" in out
    np.save(tmp / "small.npy", a[:, :90])
    code, _, err = run(["eval-sims", str(tmp / "small.npy"), "--protocol", "plain", "--data", str(tmp)], capsys)
    assert code == 2 and "is 20 x 90 but split 'test'" in err


@pytest.mark.parametrize("case, message", [
    ("missing", "similarity file not found"),
    ("mismatch", "shape mismatch"),
    ("pickled", "pickled Python objects"),
    ("pickle_file", "pickled Python objects"),
    ("nan", "NaN or infinite score in row(s) 3"),
    ("columns", "with 5 captions per image it needs 100 caption columns"),
    ("one_d", "expected a 2-D images x captions matrix"),
    ("same_output", "is one of the input matrices"),
])
def test_bad_input_exits_2_with_one_line(sims, capsys, case, message):
    tmp, a, _ = sims
    args = ["eval-sims", str(tmp / "a.npy"), "--protocol", "plain"]
    if case == "missing":
        args[1] = str(tmp / "nope.npy")
    elif case == "mismatch":
        np.save(tmp / "wide.npy", np.zeros((20, 105), dtype=np.float32))
        args.insert(2, str(tmp / "wide.npy"))
    elif case == "pickled":
        np.save(tmp / "obj.npy", np.array([{"npts": 5000, "sims": a}], dtype=object), allow_pickle=True)
        args[1] = str(tmp / "obj.npy")
    elif case == "pickle_file":
        import pickle

        (tmp / "res.npy").write_bytes(pickle.dumps({"npts": 20, "sims": a}))
        args[1] = str(tmp / "res.npy")
    elif case == "nan":
        bad = a.copy()
        bad[3, 7] = np.nan
        np.save(tmp / "nan.npy", bad)
        args[1] = str(tmp / "nan.npy")
    elif case == "columns":
        np.save(tmp / "odd.npy", a[:, :99])
        args[1] = str(tmp / "odd.npy")
    elif case == "one_d":
        np.save(tmp / "flat.npy", a.ravel())
        args[1] = str(tmp / "flat.npy")
    elif case == "same_output":
        args += ["--output", str(tmp / "a.npy")]
    before = (tmp / "a.npy").read_bytes()
    code, out, err = run(args, capsys)
    assert code == 2
    assert err.startswith("itmatch: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp / "a.npy").read_bytes() == before  # user data untouched
