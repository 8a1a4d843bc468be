"""Training curves as PNG: loss per step and dev rSum per epoch, one or several runs."""

from __future__ import annotations

from pathlib import Path

from itmatch.training.run_log import read_metrics


def _last_per_step(records: list[dict]) -> list[dict]:
    """A resumed run replays steps after its checkpoint; keep the latest record of each step."""
    by_step = {}
    for r in records:
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(run_dirs: list[Path], out_png: Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(d).name for d in run_dirs]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(run_dir)
        train = _last_per_step([r for r in records if r["kind"] == "train" and "loss" in r])
        dev = _last_per_step([r for r in records if r["kind"] == "dev" and "rsum" in r])
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label, lw=1.2)
        if dev:
            ax_dev.plot([r["epoch"] + 1 for r in dev], [r["rsum"] for r in dev], marker="o", label=label)
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_dev.set(title="dev rSum (model selection)", xlabel="epoch", ylabel="rSum (max 600)")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        if len(run_dirs) > 1 or ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (the first ones average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_NOT_TERMS = {"kind", "step", "epoch", "time", "lr", "samples_per_s"}


def plot_loss_terms(run_dir: Path, out_png: Path, switch_epoch: int | None = None, label: str = "") -> Path:
    """One run: each loss term raw (faint) and smoothed, the warm-up switch marked; dev rSum per epoch.

    A term identical to the total `loss` at every step (a single-term objective) is drawn once. The
    warm-up switch is where the objective changes its loss (VSE-infinity: the sum over negatives
    becomes the hardest negative after `loss.sum_warmup_epochs`), so the loss jumps up there while
    the model keeps improving; the line says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = _last_per_step([r for r in records if r["kind"] == "train" and "loss" in r])
    dev = _last_per_step([r for r in records if r["kind"] == "dev" and "rsum" in r])
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in train]
    terms = [k for k in train[0] if k not in _NOT_TERMS] if train else []
    terms = [k for k in terms if k == "loss" or any(r.get(k) != r["loss"] for r in train)]
    window = max(1, len(train) // 15)
    for term in terms:
        values = [float(r.get(term, float("nan"))) for r in train]
        (line,) = ax_loss.plot(steps, smooth(values, window), lw=1.6, label=f"{term} (mean of {window} records)")
        ax_loss.plot(steps, values, lw=0.6, alpha=0.3, color=line.get_color())
    if switch_epoch and train:
        before = [r["step"] for r in train if r["epoch"] < switch_epoch]
        if before and len(before) < len(train):
            ax_loss.axvline(before[-1], color="#888", ls="--", lw=1)
            ax_loss.annotate("warm-up ends:\nhardest negative only", (before[-1], 0.97),
                             xycoords=("data", "axes fraction"), fontsize=8, va="top", ha="left", xytext=(4, 0),
                             textcoords="offset points")
    if dev:
        ax_dev.plot([r["epoch"] + 1 for r in dev], [r["rsum"] for r in dev], marker="o", label=label or None)
    ax_loss.set(title="training loss per term", xlabel="step", ylabel="loss")
    ax_dev.set(title="dev rSum (model selection)", xlabel="epoch", ylabel="rSum (max 600)")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
