"""`itmatch demo`: the embedded end-to-end run on a fresh machine.

Generates the scenes benchmark (cached after the first run), trains the VSE-infinity baseline with
the packaged `vse_scenes` config, evaluates the best dev checkpoint on the test split and writes a
JSON report and an HTML page of retrieval examples next to the run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from itmatch.config import PACKAGED_CONFIGS, load_config
from itmatch.errors import ItmatchError
from itmatch.files import atomic_write_text

MARKER = "demo.json"


def _check_run_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ItmatchError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and (not (out / MARKER).is_file() or not force):
        _claim_run_dir(out, force)  # raises the matching refusal


def _claim_run_dir(out: Path, force: bool = False) -> None:
    """An earlier demo is replaced only with `force`; any other non-empty folder is never touched."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ItmatchError(f"{out} exists and was not written by `itmatch demo`: choose another --out")
        if not force:
            raise ItmatchError(f"{out} holds an earlier demo: pass --force to replace it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"started": time.time()}) + "\n")


def run_demo(out: Path, data: Path | None = None, size: str = "small", epochs: int | None = None,
             force: bool = False) -> dict:
    from itmatch.data.scenes import generate_scenes, preset_sizes
    from itmatch.data.setup import scenes_cache_dir
    from itmatch.evaluation.commands import evaluate_checkpoint
    from itmatch.evaluation.html_report import write_html_report
    from itmatch.evaluation.report import format_report, write_report
    from itmatch.training.loop import Trainer

    _check_run_dir(out, force)  # refuse before minutes of data generation, not after
    t0 = time.perf_counter()
    data = data or scenes_cache_dir(size)
    n_train, n_dev, n_test = preset_sizes(size)
    print(f"[1/3] scenes data ({size}: {n_train}/{n_dev}/{n_test} images) in {data}", flush=True)
    generate_scenes(data, seed=0, n_train=n_train, n_dev=n_dev, n_test=n_test)
    t_data = time.perf_counter() - t0

    # records every 5 steps: enough points for a smoothed loss curve; a console line every 50
    overrides = [f"data.root={data}", "train.log_every_steps=5", "train.print_every_steps=50"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", overrides)
    _claim_run_dir(out, force)
    print(f"[2/3] training vse for {cfg.train.epochs} epochs -> {out}", flush=True)
    Trainer(cfg, out).fit()
    t_train = time.perf_counter() - t0 - t_data

    print("[3/3] evaluating the best dev checkpoint on test", flush=True)
    report, scores, split = evaluate_checkpoint(out / "best", str(data), "test", "scenes", cfg.train.eval_batch_size)
    report["timings_s"] = {"data": round(t_data, 1), "train": round(t_train, 1),
                           "total": round(time.perf_counter() - t0, 1)}
    write_report(report, out / "test_report.json")
    from itmatch.training.plots import plot_loss_terms

    plot_loss_terms(out, out / "curves.png", switch_epoch=cfg.loss.sum_warmup_epochs, label="vse")
    write_html_report(out / "report.html", report, scores.dense(), split, curves_png=out / "curves.png",
                      title="itmatch demo: VSE-infinity on scenes",
                      links=[("config (config.yaml)", "config.yaml"), ("JSON report (test_report.json)",
                                                                       "test_report.json")])
    print(format_report(report))
    print(f"report: {out / 'report.html'} | JSON: {out / 'test_report.json'} | "
          f"total {report['timings_s']['total']:.0f}s (data {t_data:.0f}s, training {t_train:.0f}s)")
    _demo_search(out / "best", data, out / "index", split)
    return report


def _demo_search(checkpoint: Path, data: Path, index_dir: Path, split) -> None:
    """Index the test images and captions with the trained model and run one text query."""
    from itmatch.retrieval.collection import read_collection
    from itmatch.retrieval.commands import format_table
    from itmatch.retrieval.encoder import ModelHandle
    from itmatch.retrieval.index import build

    t0 = time.perf_counter()
    index = build(ModelHandle(checkpoint), read_collection(data, "test"), index_dir, batch_size=256, progress=False)
    query = split.captions[0]
    hits = index.search_text(query, 5)
    index.close()
    truth = split.image_ids[int(split.caption_to_image[0])]
    print(f"search index of the test split: {index_dir} ({time.perf_counter() - t0:.1f}s)")
    print(f'top 5 images for "{query}" (its image: {truth}):')
    print(format_table(hits))
    print(f"serve it: itmatch serve {index_dir}   (web page and API on http://127.0.0.1:8000/)")


def cmd_demo(args) -> int:
    run_demo(out=Path(args.out), data=Path(args.data) if args.data else None, size=args.size, epochs=args.epochs,
             force=getattr(args, "force", False))
    return 0
