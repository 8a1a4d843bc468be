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
