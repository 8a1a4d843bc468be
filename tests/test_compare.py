"""itmatch compare: the statistics against independent computations, and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from itmatch.compare.stats import (
    betainc,
    paired_bootstrap,
    paired_query_difference,
    resample_counts,
    seed_paired_difference,
    t_cdf,
    t_interval,
    t_ppf,
)


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 50, 1000])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_scipy(df, p):
    assert t_ppf(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)
    assert t_ppf(1 - p, df) == pytest.approx(sps.t.ppf(1 - p, df), rel=1e-9, abs=1e-12)
    assert t_cdf(sps.t.ppf(p, df), df) == pytest.approx(p, abs=1e-12)


def test_closed_forms_of_the_t_distribution():
    # df = 1 is Cauchy, df = 2 has F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))
    for p in (0.7, 0.9, 0.975):
        assert t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(sps.beta.cdf(0.4, 2.0, 3.0), rel=1e-12)


def test_t_interval_against_scipy():
    x = np.array([71.2, 69.8, 73.5, 70.1])
    iv = t_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (iv.mean, iv.low, iv.high) == pytest.approx((x.mean(), lo, hi), rel=1e-10)
    assert iv.n == 4 and iv.std == pytest.approx(x.std(ddof=1))
    # known value: three seeds 1, 2, 3 -> 2 ± 4.302653 / sqrt(3)
    assert t_interval([1, 2, 3]).half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-10)


def test_t_interval_edge_cases():
    one = t_interval([5.0])
    assert one.mean == 5.0 and one.half_width is None and one.n == 1
    assert t_interval([]).mean is None
    assert t_interval([2.0, None, 4.0, float("nan")]).n == 2  # missing values are left out
    same = t_interval([3.0, 3.0, 3.0])
    assert same.half_width == 0.0 and same.low == same.high == 3.0


def test_bootstrap_of_a_constant_difference_is_that_constant():
    d = np.full(50, 2.5)
    r = paired_bootstrap({"m": d}, {"m": None}, 50, n_resamples=500, seed=3)["m"]
    assert (r.mean, r.low, r.high, r.frac_positive) == (2.5, 2.5, 2.5, 1.0)
    zero = paired_bootstrap({"m": np.zeros(50)}, {"m": None}, 50, n_resamples=500)["m"]
    assert (zero.mean, zero.low, zero.high, zero.frac_positive) == (0.0, 0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_for_a_seed_and_varies_with_it():
    d = np.random.default_rng(0).normal(size=300)
    a = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=7)["m"]
    b = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=7)["m"]
    c = paired_bootstrap({"m": d}, {"m": None}, 300, n_resamples=1000, seed=8)["m"]
    assert a == b and (a.low, a.high) != (c.low, c.high)
    # chunking does not change the draws' distribution: every row draws n units
    for counts in resample_counts(300, 1000, 0, chunk=128):
        assert (counts.sum(1) == 300).all()


def test_bootstrap_interval_matches_the_normal_approximation():
    # i.i.d. queries: the bootstrap sd of the mean is sd / sqrt(n); 95% interval ~ mean ± 1.96 sd / sqrt(n)
    n = 4000
    d = np.random.default_rng(1).normal(0.3, 2.0, size=n)
    r = paired_bootstrap({"m": d}, {"m": None}, n, n_resamples=4000, seed=0)["m"]
    half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert r.mean == pytest.approx(d.mean())
    assert r.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r.high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert r.frac_positive == pytest.approx(1 - sps.norm.cdf(0, d.mean(), half / 1.96), abs=0.02)


def test_bootstrap_resamples_units_with_their_queries_and_sums_on_the_same_resamples():
    # 3 images with 2 captions each; caption queries follow their image
    img = np.array([1.0, 0.0, 0.0])
    cap = np.array([0.0, 0.0, 4.0, 4.0, 0.0, 0.0])
    c2i = np.array([0, 0, 1, 1, 2, 2])
    res = paired_bootstrap({"a": img, "b": cap}, {"a": None, "b": c2i}, 3, sums={"ab": ["a", "b"]},
                           n_resamples=2000, seed=0)
    assert res["a"].mean == pytest.approx(1 / 3) and res["b"].mean == pytest.approx(4 / 3)
    assert res["ab"].mean == pytest.approx(5 / 3)
    # each resample is a multiset of images: a and b can never both be 0 unless image 0 and 1 are missed,
    # and the sum lies within the range of the per-metric sums
    assert res["ab"].low >= res["a"].low + res["b"].low - 1e-12
    assert res["ab"].high <= res["a"].high + res["b"].high + 1e-12
    # an independent loop over the same draws
    draws = np.concatenate(list(resample_counts(3, 2000, 0)))
    ab = draws[:, 0] / 3 + draws[:, 1] * 2 * 4 / (2 * 3)
    assert res["ab"].low == pytest.approx(np.percentile(ab, 2.5))
    assert res["ab"].high == pytest.approx(np.percentile(ab, 97.5))
    assert res["ab"].frac_positive == pytest.approx(np.mean(ab > 0))


def test_paired_query_difference_pairs_by_seed_and_keeps_nan():
    arm = np.array([[1.0, 2.0, np.nan], [3.0, 2.0, np.nan]])
    base = np.array([[0.0, 2.0, np.nan], [1.0, 0.0, np.nan]])
    d = paired_query_difference(arm, base)
    assert d[:2].tolist() == [1.5, 1.0] and np.isnan(d[2])
    r = paired_bootstrap({"m": d}, {"m": None}, 3, n_resamples=300)["m"]
    assert r.mean == pytest.approx(1.25)  # the NaN query is left out of every mean


def test_seed_paired_difference_is_a_t_interval_of_per_seed_differences():
    r = seed_paired_difference([50.0, 52.0, 55.0], [49.0, 50.0, 51.0])
    iv = t_interval([1.0, 2.0, 4.0])
    assert (r.mean, r.low, r.high) == pytest.approx((iv.mean, iv.low, iv.high))
    assert r.frac_positive == 1.0 and r.method == "seed-paired t"
    same = seed_paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (same.mean, same.low, same.high, same.frac_positive) == (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------- the command
def test_as_matrix_accepts_arrays_tensors_and_score_sources():
    import torch

    from itmatch.compare.runs import _as_matrix
    from itmatch.errors import ItmatchError

    a = np.arange(6, dtype=np.float32).reshape(2, 3)

    class Source:
        def dense(self):
            return torch.as_tensor(a)

    for sims in (a, torch.as_tensor(a), Source()):
        out = _as_matrix(sims)
        assert isinstance(out, np.ndarray) and np.array_equal(out, a)
    with pytest.raises(ItmatchError):
        _as_matrix([[1.0]])


def test_per_query_values_reproduce_the_report_when_pair_scores_differ_in_the_last_bit():
    """A model's source scores a caption's own image by another kernel than its rows: the report and
    the per-query values both read one materialised matrix, so ties count as the dense matrix says."""
    from types import SimpleNamespace

    import torch

    from itmatch.compare.runs import per_query_arrays, query_metrics
    from itmatch.evaluation.protocols import evaluate_sims
    from itmatch.evaluation.scores import BlockScores

    s = np.array([[0.5, 0.1, 0.2], [0.5, 0.9, 0.3], [0.1, 0.2, 0.8]], dtype=np.float32)  # caption 0 ties
    c2i = np.arange(3)
    nudged = lambda r, c: torch.as_tensor(np.nextafter(s[r, c], np.float32(np.inf)))  # noqa: E731
    source = BlockScores(lambda a, b: torch.as_tensor(s[a:b]), s.shape, pair_fn=nudged)
    report = evaluate_sims(source, "plain", caption_to_image=c2i)["metrics"]
    assert report["t2i_r1"] == pytest.approx(200 / 3)  # pessimistic: caption 0 is behind image 1's tie
    split = SimpleNamespace(caption_to_image=c2i, relevance=None)
    for sims in (source, s):
        per_query = query_metrics(per_query_arrays(sims, split, "plain"))
        assert float(np.mean(per_query["t2i_r1"][0])) == pytest.approx(report["t2i_r1"])


def test_compare_evaluates_on_the_arms_test_split_or_refuses_differing_ones():
    from types import SimpleNamespace

    from itmatch.compare.command import _test_split
    from itmatch.errors import ItmatchError

    def run(label, split):
        data = SimpleNamespace(test_split=split)
        return SimpleNamespace(arm=SimpleNamespace(label=label), cfg=SimpleNamespace(data=data))

    assert _test_split([run("a", "test_set"), run("b", "test_set")]) == "test_set"
    with pytest.raises(ItmatchError, match="'test' \\(a\\), 'test_set' \\(b\\).*--split"):
        _test_split([run("a", "test"), run("b", "test_set"), run("c", "test")])


def test_any_numeric_report_metric_is_ordered_filtered_and_summarised():
    from itmatch.compare.command import analyse, order_metrics
    from itmatch.errors import ItmatchError

    keys = {"t2i_meanr", "twin_acc_t2i_swap_colour", "rsum", "map_at_r_t2i_kind_count", "i2t_r1"}
    assert order_metrics(keys, None) == ["rsum", "i2t_r1", "map_at_r_t2i_kind_count", "twin_acc_t2i_swap_colour",
                                         "t2i_meanr"]
    assert order_metrics(keys, "twin_*,rsum") == ["twin_acc_t2i_swap_colour", "rsum"]
    with pytest.raises(ItmatchError, match="names no metric"):
        order_metrics(keys, "nope")
    runs = [{"label": lab, "seed": s, "metrics": {"twin_acc_t2i_swap_colour": v}, "query_metrics": {},
             "n_images": 3} for lab, s, v in [("a", 0, 50.0), ("a", 1, 60.0), ("b", 0, 55.0), ("b", 1, 70.0)]]
    res = analyse(runs, ["a", "b"], [0, 1], "a", ["twin_acc_t2i_swap_colour"], 200, 0)
    assert res["summary"]["b"]["twin_acc_t2i_swap_colour"]["mean"] == 62.5
    diff = res["differences"]["b"]["twin_acc_t2i_swap_colour"]
    assert diff["method"] == "seed-paired t" and diff["mean"] == 7.5


def _compare_args(data, out, *extra):
    return ["compare", "vse_scenes", "--label", "margin=vse_scenes", "--set-for", "margin:loss.margin=0.05",
            "--baseline", "vse_scenes", "--seed-list", "0,1", "--out", str(out), "--bootstrap", "200",
            "--set", f"data.root={data}", "--set", "train.max_steps=2", "--set", "train.epochs=1",
            "--set", "train.batch_size=32", *extra]


def _call(argv):
    import contextlib
    import io

    from itmatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(tiny_scenes, tmp_path_factory):
    """One comparison of 2 arms x 2 seeds on tiny scenes (each run: 2 steps), made once for this module."""
    import torch

    root = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ITMATCH_CACHE", str(root / "cache"))
            rc, out, err = _call(_compare_args(tiny_scenes, root / "cmp"))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    return root / "cmp", out


def test_compare_writes_tables_json_and_plot(compared):
    out, log = compared
    for name in ("compare.md", "compare.json", "compare.png", "spec.json"):
        assert (out / name).is_file()
    for run in ("vse_scenes-s0", "vse_scenes-s1", "margin-s0", "margin-s1"):
        assert (out / "runs" / run / "best" / "model.safetensors").is_file()
        assert (out / "runs" / run / "finished.json").is_file()
        assert (out / "runs" / run / "eval-test.npz").is_file()
    assert log.count(": training") == 4
    result = json.loads((out / "compare.json").read_text())
    assert result["arms"] == ["vse_scenes", "margin"] and result["seeds"] == [0, 1]
    assert result["metrics"][:3] == ["rsum", "i2t_r1", "i2t_r5"]
    assert {"map_at_r_t2i", "twin_acc_t2i"} <= set(result["metrics"])
    assert len(result["runs"]) == 4 and not result["notes"]
    # the bootstrap serves every metric with per-query values, rSum included
    assert {"rsum", "i2t_r1", "t2i_r10", "map_at_r_i2t", "rprecision_t2i"} <= set(result["bootstrapped"])
    for m in result["metrics"]:
        values = [r["metrics"][m] for r in result["runs"] if r["label"] == "margin"]
        assert result["summary"]["margin"][m]["mean"] == pytest.approx(np.mean(values))
        # a config against itself: exactly zero, zero-width interval
        self_diff = result["differences"]["vse_scenes"][m]
        assert (self_diff["mean"], self_diff["low"], self_diff["high"]) == (0.0, 0.0, 0.0), m
    d = result["differences"]["margin"]["rsum"]
    assert d["method"] == "bootstrap" and d["low"] <= d["mean"] <= d["high"]
    # rSum's observed difference is the difference of the mean rSums (per-query values reproduce the reports)
    s = result["summary"]
    assert d["mean"] == pytest.approx(s["margin"]["rsum"]["mean"] - s["vse_scenes"]["rsum"]["mean"], abs=1e-9)
    # the Markdown: one row per metric in the interval table, one column per arm; one row per run
    md = (out / "compare.md").read_text()
    sections = md.split("## ")
    table = [line for line in sections[1].splitlines() if line.startswith("| ")]
    assert table[0] == "| metric | `vse_scenes` | `margin` |"
    assert [row.split(" | ")[0][2:] for row in table[2:]] == result["metrics"]
    runs_table = [line for line in sections[3].splitlines() if line.startswith("| `")]
    assert len(runs_table) == 4
    assert "fewer than 3" in md


def test_second_call_retrains_and_reevaluates_nothing(compared, tiny_scenes):
    out, _ = compared
    weights = sorted((out / "runs").glob("*/best/model.safetensors"))
    before = [p.stat().st_mtime_ns for p in weights]
    # another device is no other comparison
    rc, log, err = _call(_compare_args(tiny_scenes, out, "--metrics", "rsum,map_at_r_*", "--device", "cpu",
                                       "--set", "train.device=cpu"))
    assert rc == 0, err
    assert log.count("not retrained") == 4 and log.count("evaluation on test cached") == 4
    assert ": training" not in log
    assert [p.stat().st_mtime_ns for p in weights] == before
    assert json.loads((out / "compare.json").read_text())["metrics"] == ["rsum", "map_at_r_i2t", "map_at_r_t2i"]


def test_an_interrupted_run_is_resumed_not_retrained(compared, tiny_scenes):
    out, _ = compared
    (out / "runs" / "margin-s1" / "finished.json").unlink()  # as if killed after its last checkpoint
    rc, log, err = _call(_compare_args(tiny_scenes, out))
    assert rc == 0, err
    assert "margin-s1: interrupted earlier, resuming" in log and log.count("not retrained") == 3
    assert (out / "runs" / "margin-s1" / "finished.json").is_file()
    assert "margin-s1: evaluation on test cached" in log  # best/ did not change


@pytest.mark.parametrize("change, message", [
    (["--set", "train.epochs=2"], "holds a comparison made with --set"),
    (["--set-for", "margin:loss.margin=0.3"], "holds an arm 'margin'"),
])
def test_an_incompatible_earlier_comparison_is_refused_untouched(compared, tiny_scenes, change, message):
    out, _ = compared
    files = {p: p.read_bytes() for p in (out / "compare.md", out / "compare.json", out / "spec.json")}
    rc, log, err = _call(_compare_args(tiny_scenes, out, *change))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert all(p.read_bytes() == b for p, b in files.items())


@pytest.mark.parametrize("argv, message", [
    (["compare", "vse_scenes", "no_such_config"], "config file not found: no_such_config"),
    (["compare", "vse_scenes", "--baseline", "hrem_scenes"], "--baseline 'hrem_scenes' is not among"),
    (["compare", "vse_scenes", "--label", "vse_scenes=dias_scenes"], "duplicate label 'vse_scenes'"),
    (["compare", "vse_scenes", "--set", "train.seed=4"], "must not set train.seed"),
    (["compare", "vse_scenes", "--set", "model.nope=1"], "unknown config key 'model.nope'"),
    (["compare", "vse_scenes", "--set-for", "other:loss.margin=1"], "no arm is labelled 'other'"),
    (["compare", "vse_scenes", "--seed-list", "0,0"], "repeats a seed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, argv, message):
    rc, _, err = _call([*argv, "--out", str(tmp_path / "cmp")])
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_a_folder_that_is_no_comparison_is_refused(tmp_path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    rc, _, err = _call(["compare", "vse_scenes", "--out", str(tmp_path / "cmp")])
    assert rc == 2 and "holds no comparison" in err
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["notes.txt"]


def test_nested_breakdowns_are_flattened_and_split_counts_left_out():
    from itmatch.compare.command import numeric_metrics

    report = {"metrics": {"rsum": 300.0, "pair_acc": None, "twin_acc_t2i": float("nan"),
                          "by_kind": {"relation": {"captions": 583, "map_at_r_t2i": 21.5}},
                          "by_change": {"position": {"twin_pairs": 12, "twin_acc_t2i": 50.0},
                                        "relation_swap": {"minimal_pairs": 295, "pair_acc": 48.0}}}}
    assert numeric_metrics(report) == {"rsum": 300.0, "by_kind.relation.map_at_r_t2i": 21.5,
                                       "by_change.position.twin_acc_t2i": 50.0,
                                       "by_change.relation_swap.pair_acc": 48.0}


@pytest.mark.parametrize("name", ["vse_scenes", "hrem_scenes"])
def test_existing_run_folder_written_by_training_is_compatible(tmp_path, name):
    """A finished run's config.yaml (written without the keys the method ignores, e.g. hrem's
    GPO keys) matches the same run's config; a changed value is still caught."""
    from itmatch.compare.runs import Arm, Run, check_run_compatible, run_config
    from itmatch.config import find_config
    from itmatch.errors import ItmatchError

    arm = Arm(name, name, find_config(name))
    run = Run(arm, 0, tmp_path / f"{name}-s0", run_config(arm, 0, []))
    run.run_dir.mkdir()
    (run.run_dir / "config.yaml").write_text(run.cfg.to_yaml())
    check_run_compatible(run)
    other = run_config(arm, 0, ["optim.lr=0.123"])
    (run.run_dir / "config.yaml").write_text(other.to_yaml())
    with pytest.raises(ItmatchError, match="optim.lr"):
        check_run_compatible(run)
