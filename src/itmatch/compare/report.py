"""What `itmatch compare` writes: compare.md (tables), compare.json (everything), compare.png (error bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from itmatch.files import atomic_write_bytes, atomic_write_text

MAX_PLOTTED = 32


def _num(v, digits: int = 1, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _mean_ci(cell: dict) -> str:
    if cell["mean"] is None:
        return "-"
    if cell["half_width"] is None:
        return f"{_num(cell['mean'])} (n={cell['n']})"
    return f"{_num(cell['mean'])} ± {_num(cell['half_width'])}"


def _diff(cell: dict) -> str:
    if cell["mean"] is None:
        return "-"
    mark = "" if cell["method"] == "bootstrap" else " †"
    interval = "" if cell["low"] is None else f" [{_num(cell['low'], sign=True)}, {_num(cell['high'], sign=True)}]"
    frac = "" if cell["frac_positive"] is None else f" ({cell['frac_positive']:.2f})"
    return f"{_num(cell['mean'], sign=True)}{interval}{frac}{mark}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def to_markdown(result: dict) -> str:
    arms, metrics, base = result["arms"], result["metrics"], result["baseline"]
    seeds = result["seeds"]
    overrides = " ".join(f"`{o}`" for o in result["spec"]["overrides"]) or "none"
    lines = [
        f"# itmatch compare: {', '.join(arms)}",
        "",
        f"Split `{result['split']}` ({result['n_images']} images, {result['n_captions']} captions), protocol "
        f"`{result['protocol']}`, seeds {', '.join(map(str, seeds))} ({len(seeds)}), shared overrides: {overrides}.",
    ]
    per_arm = [f"`{a}`: {' '.join(f'`{o}`' for o in result['spec']['arms'][a]['overrides'])}"
               for a in arms if result["spec"]["arms"][a]["overrides"]]
    if per_arm:
        lines.append("Arm overrides: " + "; ".join(per_arm) + ".")
    if len(seeds) < 3:
        lines += ["", f"**{len(seeds)} seed(s): fewer than 3, so these intervals are not evidence.**"]
    lines += ["", "## Mean ± 95% confidence interval over seeds", "",
              "Student t with n-1 degrees of freedom over the per-seed test metrics (percent).", "",
              _row(["metric", *[f"`{a}`" for a in arms]]), _row(["---"] * (len(arms) + 1))]
    for m in metrics:
        lines.append(_row([m, *[_mean_ci(result["summary"][a][m]) for a in arms]]))
    others = [a for a in arms if a != base]
    if others:
        lines += ["", f"## Paired difference to `{base}`", "",
                  "Each cell: mean difference [95% interval] (fraction of resamples with difference > 0). "
                  f"Runs are paired by seed; the interval is a percentile bootstrap over test images "
                  f"({result['bootstrap']['resamples']} resamples, the same resamples for both arms and every "
                  f"metric; rSum is the sum of the six recall differences on each resample). "
                  "† marks metrics without per-query values: the mean of the per-seed differences with its "
                  "Student-t interval, and the fraction of seeds with difference > 0.", "",
                  _row(["metric", *[f"`{a}`" for a in others]]), _row(["---"] * (len(others) + 1))]
        for m in metrics:
            lines.append(_row([m, *[_diff(result["differences"][a][m]) for a in others]]))
    shown = [m for m in ("rsum", "map_at_r_t2i", "twin_acc_t2i") if m in metrics][:3] or metrics[:3]
    lines += ["", "## Runs", "", _row(["run", "seed", "training", "train s", "best dev rSum", *shown]),
              _row(["---"] * (5 + len(shown)))]
    for r in result["runs"]:
        t = r["train"]
        lines.append(_row([f"`{r['label']}`", r["seed"], t["status"], _num(t.get("train_s")),
                           _num(t.get("best_dev_rsum"), 2), *[_num(r["metrics"].get(m), 2) for m in shown]]))
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, metrics = result["arms"], result["metrics"][:MAX_PLOTTED]
    ncols = min(4, max(1, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols) if metrics else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False)
    x = list(range(len(arms)))
    for ax, m in zip(axes.flat, metrics):
        cells = [result["summary"][a][m] for a in arms]
        means = [c["mean"] if c["mean"] is not None else math.nan for c in cells]
        errs = [c["half_width"] if c["half_width"] is not None else 0.0 for c in cells]
        ax.errorbar(x, means, yerr=errs, fmt="o", capsize=4, color="tab:blue")
        for i, c in enumerate(cells):
            vals = [v for v in c["values"] if v is not None]
            ax.scatter([i] * len(vals), vals, s=10, color="tab:gray", alpha=0.7, zorder=3)
        ax.set_title(m, fontsize=9)
        ax.set_xticks(x)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"mean ± 95% CI over {len(result['seeds'])} seeds (grey: single seeds)", fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> list[Path]:
    from itmatch.evaluation.report import _plain

    md, js, png = out / "compare.md", out / "compare.json", out / "compare.png"
    atomic_write_text(js, json.dumps(_plain(result), indent=2, allow_nan=False) + "\n")
    atomic_write_text(md, to_markdown(result))
    plot(result, png)
    return [md, js, png]
