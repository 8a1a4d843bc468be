"""`itmatch compare`: several configs x several seeds, one budget, intervals and paired differences."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import numpy as np

from itmatch.compare.runs import Arm, Run, check_run_compatible, ensure_trained, evaluate_run, query_metrics, run_config
from itmatch.compare.stats import paired_bootstrap, paired_query_difference, seed_paired_difference, t_interval
from itmatch.config import find_config, parse_overrides
from itmatch.errors import ItmatchError

SPEC = "spec.json"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# the table's first rows, in this order; every other numeric metric follows, sorted by name
PRIMARY = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
           "map_at_r_i2t", "map_at_r_t2i", "rprecision_i2t", "rprecision_t2i", "twin_acc_i2t", "twin_acc_t2i")
LAST = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
MIN_SEEDS = 3


# --------------------------------------------------------------------------------- inputs
def parse_seeds(seeds: int | None, seed_list: str | None) -> list[int]:
    if seed_list is not None:
        try:
            out = [int(s) for s in seed_list.split(",") if s.strip() != ""]
        except ValueError:
            raise ItmatchError(f"--seed-list expects comma-separated integers, got {seed_list!r}") from None
        if not out:
            raise ItmatchError("--seed-list is empty")
        if len(set(out)) != len(out):
            raise ItmatchError(f"--seed-list repeats a seed: {seed_list}")
        return out
    n = 3 if seeds is None else seeds
    if n < 1:
        raise ItmatchError(f"--seeds must be at least 1, got {n}")
    return list(range(n))


def build_arms(configs: list[str], labels: list[str], set_for: list[str]) -> list[Arm]:
    """Arms from positional configs (labelled by file stem) and --label NAME=CONFIG, with --set-for NAME:K=V."""
    arms: list[Arm] = []
    for c in configs:
        arms.append(Arm(label=Path(c).stem, config=c, path=find_config(c)))
    for item in labels:
        name, sep, config = item.partition("=")
        if not sep or not name or not config:
            raise ItmatchError(f"--label expects NAME=CONFIG, got {item!r}")
        arms.append(Arm(label=name, config=config, path=find_config(config)))
    if not arms:
        raise ItmatchError("nothing to compare: give at least one CONFIG")
    seen: set[str] = set()
    for arm in arms:
        if not LABEL.match(arm.label):
            raise ItmatchError(f"label {arm.label!r} must be letters, digits and _ . + - (it names run folders)")
        if arm.label in seen:
            raise ItmatchError(f"duplicate label {arm.label!r}: give each arm its own name with --label NAME=CONFIG")
        seen.add(arm.label)
    by_label = {a.label: a for a in arms}
    for item in set_for:
        name, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise ItmatchError(f"--set-for expects LABEL:KEY=VALUE, got {item!r}")
        if name not in by_label:
            raise ItmatchError(f"--set-for {item!r}: no arm is labelled {name!r} (labels: {', '.join(by_label)})")
        by_label[name].overrides.append(kv)
    return arms


def _check_overrides(overrides: list[str], what: str) -> None:
    parsed = parse_overrides(overrides)
    if "seed" in parsed.get("train", {}):
        raise ItmatchError(f"{what} must not set train.seed: the seeds come from --seeds / --seed-list")


def _budget(overrides: list[str]) -> dict:
    """The overrides that define the runs: all but train.device (where a run trains does not change it)."""
    parsed = parse_overrides(overrides)
    parsed.get("train", {}).pop("device", None)
    return {k: v for k, v in parsed.items() if v != {}}


def check_out_dir(out: Path, spec: dict) -> dict:
    """Refuse a folder holding an incompatible earlier comparison; return the spec to write."""
    path = out / SPEC
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ItmatchError(f"{out} exists and holds no comparison ({SPEC} is missing): choose another --out")
        return spec
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_overrides, old_arms = old["overrides"], old["arms"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ItmatchError(f"{path} is damaged: choose another --out") from None
    if _budget(old_overrides) != _budget(spec["overrides"]):
        raise ItmatchError(f"{out} holds a comparison made with --set {' '.join(old_overrides) or '(none)'}, "
                           f"not {' '.join(spec['overrides']) or '(none)'}: choose another --out")
    for label, arm in spec["arms"].items():
        before = old_arms.get(label)
        if before is not None and (before["config"] != arm["config"]
                                   or parse_overrides(before["overrides"]) != parse_overrides(arm["overrides"])):
            raise ItmatchError(f"{out} holds an arm {label!r} made from {before['config']} "
                               f"{' '.join(before['overrides'])}".rstrip() + ": choose another label or --out")
    return {**spec, "arms": {**old_arms, **spec["arms"]}}


# ------------------------------------------------------------------------------- analysis
def numeric_metrics(report: dict) -> dict[str, float]:
    """Every number in the report's metrics; nested breakdowns (the scenes protocol's `by_kind`,
    `by_change`) are flattened with dotted names, e.g. `by_kind.relation.map_at_r_t2i`. Counts of
    captions, pairs and twins describe the split, not the model, and are left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(name + ".", v)
            elif prefix and k in SPLIT_COUNTS:
                continue
            elif not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(float(v)):
                out[name] = float(v)

    walk("", report.get("metrics", {}))
    return out


# counts inside the scenes breakdowns (what a kind or change type holds), not results
SPLIT_COUNTS = ("captions", "twin_pairs", "minimal_pairs")


def order_metrics(keys, selection: str | None) -> list[str]:
    """PRIMARY in order, the rest sorted, ranks last; `selection` (comma-separated, globs allowed) filters."""
    keys = set(keys)
    ordered = ([k for k in PRIMARY if k in keys] + sorted(k for k in keys if k not in PRIMARY and k not in LAST)
               + [k for k in LAST if k in keys])
    if not selection:
        return ordered
    chosen: list[str] = []
    for pattern in (p.strip() for p in selection.split(",")):
        if not pattern:
            continue
        hits = [k for k in ordered if fnmatch.fnmatchcase(k, pattern)]
        if not hits:
            raise ItmatchError(f"--metrics {pattern!r} names no metric of these reports (known: {', '.join(ordered)})")
        chosen += [k for k in hits if k not in chosen]
    return chosen


def analyse(runs: list[dict], arms: list[str], seeds: list[int], baseline: str, metrics: list[str],
            n_resamples: int, bootstrap_seed: int, confidence: float = 0.95) -> dict:
    """Mean ± t interval per arm and metric; paired differences of every arm to the baseline."""
    by = {(r["label"], r["seed"]): r for r in runs}
    summary = {}
    for label in arms:
        summary[label] = {}
        for m in metrics:
            values = [by[label, s]["metrics"].get(m) for s in seeds]
            summary[label][m] = {**t_interval(values, confidence).to_dict(), "values": values}

    # per-query values, one (seeds x queries) array per arm and metric; a metric is bootstrapped
    # only where every run's per-query mean reproduces its report value. rSum needs the six recalls
    # on the same resamples, shown or not.
    notes = []
    candidates = [m for m in metrics if m != "rsum"]
    if "rsum" in metrics:
        candidates += [r for r in RECALLS if r not in candidates]
    boot_metrics, per_arm, units = [], {label: {} for label in arms}, {}
    for m in candidates:
        rows = _query_rows(by, arms, seeds, m, notes)
        if rows is not None:
            boot_metrics.append(m)
            units[m] = by[arms[0], seeds[0]]["query_metrics"][m][1]
            for label in arms:
                per_arm[label][m] = rows[label]
    sums = {"rsum": list(RECALLS)} if "rsum" in metrics and all(r in boot_metrics for r in RECALLS) else {}

    differences = {}
    n_units = int(by[arms[0], seeds[0]]["n_images"]) if boot_metrics else None
    for label in arms:
        diffs = {m: paired_query_difference(per_arm[label][m], per_arm[baseline][m]) for m in boot_metrics}
        boot = (paired_bootstrap(diffs, {m: units[m] for m in boot_metrics}, n_units, sums=sums,
                                 n_resamples=n_resamples, seed=bootstrap_seed, confidence=confidence)
                if boot_metrics else {})
        differences[label] = {}
        for m in metrics:
            if m in boot:
                differences[label][m] = boot[m].to_dict()
            else:
                differences[label][m] = seed_paired_difference(
                    summary[label][m]["values"], summary[baseline][m]["values"], confidence).to_dict()
    return {"summary": summary, "differences": differences, "bootstrapped": sorted(set(boot_metrics) | set(sums)),
            "n_resample_units": n_units, "notes": notes}


def _query_rows(by: dict, arms: list[str], seeds: list[int], m: str, notes: list[str]) -> dict | None:
    """{arm: (seeds x queries) per-query values of metric m}, or None where the bootstrap cannot serve m."""
    rows = {}
    for label in arms:
        per_seed = []
        for s in seeds:
            run = by[label, s]
            qm, reported = run["query_metrics"].get(m), run["metrics"].get(m)
            if qm is None or reported is None:
                return None
            values = qm[0]
            if abs(float(np.nanmean(values)) - reported) > 1e-4 * max(1.0, abs(reported)):
                notes.append(f"{m}: the per-query values of {label}-s{s} do not reproduce its report "
                             f"({np.nanmean(values):.4f} vs {reported:.4f}); seed-paired t used instead")
                return None
            per_seed.append(values)
        rows[label] = np.stack(per_seed)
    return rows


# -------------------------------------------------------------------------------- command
def _test_split(runs: list[Run]) -> str:
    """The arms' data.test_split: one split for every arm, or a clear error."""
    splits = {}
    for run in runs:
        splits.setdefault(run.cfg.data.test_split, run.arm.label)
    if len(splits) > 1:
        named = ", ".join(f"{split!r} ({label})" for split, label in splits.items())
        raise ItmatchError(f"the arms' data.test_split differ: {named}; pass --split to evaluate them on one split")
    return next(iter(splits))


def cmd_compare(args) -> int:
    from itmatch.compare.report import write_outputs
    from itmatch.files import atomic_write_text

    out = Path(args.out)
    seeds = parse_seeds(args.seeds, args.seed_list)
    arms = build_arms(args.configs, args.labels, args.set_for)
    labels = [a.label for a in arms]
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        raise ItmatchError(f"--baseline {baseline!r} is not among the compared configs ({', '.join(labels)})")
    _check_overrides(args.overrides, "--set")
    for arm in arms:
        _check_overrides(arm.overrides, f"--set-for {arm.label}")
    if args.bootstrap < 100:
        raise ItmatchError(f"--bootstrap must be at least 100 resamples, got {args.bootstrap}")
    # every config must load (unknown keys fail here, before anything trains)
    runs = [Run(arm, s, out / "runs" / f"{arm.label}-s{s}", run_config(arm, s, args.overrides))
            for arm in arms for s in seeds]
    spec = {"overrides": list(args.overrides),
            "arms": {a.label: {"config": str(a.path.resolve()), "overrides": list(a.overrides)} for a in arms}}
    spec = check_out_dir(out, spec)
    for run in runs:
        check_run_compatible(run)

    split = args.split or _test_split(runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SPEC, json.dumps(spec, indent=2) + "\n")
    if len(seeds) < MIN_SEEDS:
        print(f"note: {len(seeds)} seed(s): fewer than {MIN_SEEDS}, the intervals are not evidence yet", flush=True)

    records = []
    for i, run in enumerate(runs, 1):
        def say(text: str, i=i) -> None:
            print(f"[{i}/{len(runs)}] {text}", flush=True)

        trained = ensure_trained(run, say, device=args.device if args.device != "auto" else None)
        report, arrays, eval_status = evaluate_run(run, split, args.protocol, args.batch_size, args.device, say)
        records.append({
            "label": run.arm.label, "seed": run.seed, "config": run.arm.config, "run_dir": str(run.run_dir),
            "train": trained, "eval": eval_status, "protocol": report.get("protocol"),
            "n_images": report.get("n_images"), "n_captions": report.get("n_captions"),
            "metrics": numeric_metrics(report), "query_metrics": query_metrics(arrays),
            "caption_to_image": arrays["caption_to_image"],
        })
    protocols = sorted({str(r["protocol"]) for r in records})
    if len(protocols) > 1:
        raise ItmatchError(f"the runs were evaluated under different protocols ({', '.join(protocols)}): "
                           f"pass --protocol")
    shapes = {(r["n_images"], r["n_captions"]) for r in records}
    if len(shapes) > 1 or any(not np.array_equal(r["caption_to_image"], records[0]["caption_to_image"])
                              for r in records):
        raise ItmatchError(f"the runs were evaluated on test sets of different sizes {sorted(shapes)}: "
                           f"pair them on one data.root (--set data.root=...)")
    all_keys = set().union(*(r["metrics"] for r in records))
    metrics = order_metrics(all_keys, args.metrics)
    result = analyse(records, labels, seeds, baseline, metrics, args.bootstrap, args.bootstrap_seed)
    result.update({
        "split": split, "protocol": protocols[0], "seeds": seeds, "baseline": baseline, "arms": labels,
        "metrics": metrics, "confidence": 0.95, "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed},
        "spec": spec, "n_images": records[0]["n_images"], "n_captions": records[0]["n_captions"],
        "runs": [{k: v for k, v in r.items() if k not in ("query_metrics", "caption_to_image")} for r in records],
    })
    paths = write_outputs(result, out)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0
