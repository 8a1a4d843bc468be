"""The training engine: it learns, checkpoints round-trip, resume is exact, bad input is one error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from itmatch.checkpoint import from_pretrained
from itmatch.cli import main
from itmatch.config import PACKAGED_CONFIGS, load_config
from itmatch.training.loop import Trainer
from itmatch.training.run_log import read_metrics


def small_config(data_root, *overrides):
    base = [
        f"data.root={data_root}",
        "model.embed_dim=64",
        "model.text.glove=null",
        "model.text.word_dim=32",
        "train.batch_size=32",
        "train.eval_batch_size=64",
        "train.log_every_steps=1",
        "data.max_dev_images=40",
    ]
    return load_config(PACKAGED_CONFIGS / "vse_scenes.yaml", base + list(overrides))


def chance_rsum(n_images: int, caps_per_image: int) -> float:
    """Expected rSum of random scores: i2t hits any of k positives among n*k, t2i the one image among n."""
    n_caps = n_images * caps_per_image
    i2t = [100 * (1 - np.prod([(n_caps - caps_per_image - j) / (n_caps - j) for j in range(k)])) for k in (1, 5, 10)]
    t2i = [100 * k / n_images for k in (1, 5, 10)]
    return float(sum(i2t) + sum(t2i))


def test_training_learns_far_above_chance(tiny_scenes, tmp_path):
    cfg = small_config(tiny_scenes, "train.epochs=10", "optim.decay_epochs=[8]", "optim.lr=0.002")
    result = Trainer(cfg, tmp_path / "run", echo=False).fit()
    chance = chance_rsum(40, 5)  # about 77
    assert result["best_rsum"] > chance + 200, (result["best_rsum"], chance)
    dev = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "dev"]
    assert dev[-1]["rsum"] > dev[0]["rsum"] - 1e-6
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    # What a run folder must hold.
    run = tmp_path / "run"
    for name in ("config.yaml", "out.log", "metrics.jsonl", "curves.png", "best/model.safetensors",
                 "best/config.json", "best/dev_metrics.json", "checkpoints/LATEST"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())


def test_checkpoint_round_trip_gives_identical_similarities(tiny_scenes, tmp_path):
    from itmatch.data.setup import load_configured_split
    from itmatch.evaluation.encode import split_scores

    cfg = small_config(tiny_scenes, "train.max_steps=4")
    trainer = Trainer(cfg, tmp_path / "run", echo=False)
    trainer.fit()
    split = load_configured_split(cfg.data, "test")
    before = split_scores(trainer.model, split, trainer.tokenizer, cfg.model, 64).dense()
    model, tokenizer, cfg2 = from_pretrained(tmp_path / "run" / "best")
    after = split_scores(model, split, tokenizer, cfg2.model, 64).dense()
    np.testing.assert_array_equal(before, after)
    assert cfg2.to_dict() == cfg.to_dict()
    # the public entry: a run folder gives its best model, no image transform for region features
    import itmatch

    loaded, transform, tok = itmatch.load(tmp_path / "run")
    assert transform is None and not loaded.training and tok.words == tokenizer.words
    np.testing.assert_array_equal(split_scores(loaded, split, tok, batch_size=64).dense(), before)


def test_resumed_run_matches_uninterrupted_step_for_step(tiny_scenes, tmp_path):
    # 3 epochs of 600 // 64 = 9 steps; the interrupted run stops mid-epoch 2.
    common = ["train.batch_size=64", "train.epochs=3", "train.checkpoint_every_steps=4", "optim.decay_epochs=[2]"]
    Trainer(small_config(tiny_scenes, *common), tmp_path / "full", echo=False).fit()

    Trainer(small_config(tiny_scenes, *common, "train.max_steps=13"), tmp_path / "cut", echo=False).fit()
    # The run was "killed" after step 13; its last checkpoint is step 12. Resume from it with the full budget.
    marker = tmp_path / "cut" / "checkpoints" / "LATEST"
    marker.write_text("step-00000012\n")
    resumed_cfg = small_config(tiny_scenes, *common)
    Trainer(resumed_cfg, tmp_path / "cut", resume="latest", echo=False).fit()

    def losses(run):
        by_step = {}
        for r in read_metrics(run):
            if r["kind"] == "train":
                by_step[r["step"]] = r["loss"]
        return by_step

    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut)
    for step in full:
        assert full[step] == pytest.approx(cut[step], abs=1e-6, rel=1e-6), step
    last = (tmp_path / "full" / "checkpoints" / "LATEST").read_text().strip()
    assert last == (tmp_path / "cut" / "checkpoints" / "LATEST").read_text().strip()
    a, _, _ = from_pretrained(tmp_path / "full" / "checkpoints" / last)
    b, _, _ = from_pretrained(tmp_path / "cut" / "checkpoints" / last)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_train_eval_and_bad_inputs(tiny_scenes, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "vse_scenes", "--out", str(run), "--set", f"data.root={tiny_scenes}",
            "--set", "model.embed_dim=32", "--set", "model.text.glove=null", "--set", "model.text.word_dim=16",
            "--set", "train.max_steps=3", "--set", "train.batch_size=32", "--set", "data.test_split=dev"]
    assert main(args) == 0
    # Without --split, eval reads the run's data.test_split.
    default_path = tmp_path / "default-split.json"
    assert main(["eval", str(run), "--output", str(default_path)]) == 0
    default_report = json.loads(default_path.read_text())
    dev_captions = len((tiny_scenes / "dev_caps.txt").read_text(encoding="utf-8").splitlines())
    assert default_report["split"] == "dev" and default_report["n_captions"] == dev_captions
    # A second train into the same folder must not overwrite it.
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err

    report_path = tmp_path / "report.json"
    sims_path = tmp_path / "sims.npy"
    assert main(["eval", str(run), "--split", "test", "--output", str(report_path), "--save-sims", str(sims_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["protocol"] == "scenes" and report["n_images"] == 40
    assert set(["i2t_r1", "t2i_r10", "rsum", "map_at_r_i2t", "twin_acc_t2i"]) <= set(report["metrics"])
    sims = np.load(sims_path)
    n_captions = len((tiny_scenes / "test_caps.txt").read_text(encoding="utf-8").splitlines())
    assert sims.shape == (40, n_captions) and n_captions > 200  # 5 per image, plus the minimal-pair foils
    # eval-sims on the saved matrix gives the same numbers.
    report2_path = tmp_path / "report2.json"
    assert main(["eval-sims", str(sims_path), "--protocol", "scenes", "--data", str(tiny_scenes),
                 "--split", "test", "--output", str(report2_path)]) == 0
    r2 = json.loads(report2_path.read_text())
    for key in ("rsum", "i2t_r1", "t2i_r5", "map_at_r_t2i"):
        assert r2["metrics"][key] == pytest.approx(report["metrics"][key], abs=1e-9)

    # Unknown config key: one clear line, exit 2.
    capsys.readouterr()
    assert main(["train", "--config", "vse_scenes", "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "Traceback" not in err

    # A corrupt checkpoint: one clear line, exit 2.
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "corrupt checkpoint" in err and "Traceback" not in err

    # A missing checkpoint and a missing config file.
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_grid_path_trains_end_to_end_on_image_files(tiny_scenes, tmp_path):
    """vse_scenes_grid: the pretrained CNN runs on the rendered PNGs listed in {split}.csv, its
    weights move (at the backbone's lower learning rate), and the run evaluates like any other."""
    from safetensors.torch import load_file

    from itmatch.encoders.image import GridEncoder

    run = tmp_path / "grid"
    args = ["train", "--config", "vse_scenes_grid", "--out", str(run), "--set", f"data.root={tiny_scenes}",
            "--set", "model.embed_dim=32", "--set", "model.text.glove=null", "--set", "model.text.word_dim=16",
            "--set", "model.image.image_size=64", "--set", "train.max_steps=3", "--set", "train.batch_size=16",
            "--set", "train.eval_batch_size=40", "--set", "data.max_dev_images=20"]
    assert main(args) == 0
    weights = load_file(str(run / "best" / "model.safetensors"))
    reference = GridEncoder(32, mlp=True).state_dict()  # the packaged ImageNet weights
    backbone_keys = [k for k in weights if k.startswith("image_encoder.backbone.") and k.endswith("weight")]
    assert backbone_keys, "the checkpoint holds the CNN"
    moved = [k for k in backbone_keys if not torch.equal(weights[k], reference[k.removeprefix("image_encoder.")])]
    assert moved, "fine-tuning changed no backbone weight"
    report_path = tmp_path / "grid.json"
    assert main(["eval", str(run), "--split", "test", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n_images"] == 40 and report["n_captions"] == 200 and np.isfinite(report["metrics"]["rsum"])


class _HookedObjective(torch.nn.Module):
    """VSE's objective plus state that only hooks change: a step count, the epochs started, and an
    EMA of the image encoder's first weight (what a momentum encoder keeps)."""

    def __init__(self, cfg, model):
        from itmatch.objectives.base import TrainingHooks
        from itmatch.objectives.vse import VSEObjective

        super().__init__()
        self.base = VSEObjective(cfg.loss, model.similarity)

        class Counter(torch.nn.Module, TrainingHooks):
            def __init__(self):
                super().__init__()
                self.register_buffer("steps", torch.zeros((), dtype=torch.long))
                self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
                first = next(model.parameters())
                self.register_buffer("ema", first.detach().clone())

            def on_epoch_start(self, ctx):
                if ctx.progress.batch_in_epoch == 0:
                    self.epochs += 1

            def after_step(self, ctx):
                self.steps += 1
                self.ema.mul_(0.9).add_(next(ctx.model.parameters()).detach(), alpha=0.1)

        self.counter = Counter()

    def forward(self, out, img_batch, txt_batch, progress):
        return self.base(out, img_batch, txt_batch, progress)


class _Hooked:
    @staticmethod
    def build_model(cfg, tokenizer):
        from itmatch.models.backbone import VSEModel

        return VSEModel(cfg.model, tokenizer)

    @staticmethod
    def build_objective(cfg, model):
        return _HookedObjective(cfg, model)


def test_objective_hooks_run_and_their_state_survives_resume(tiny_scenes, tmp_path):
    from itmatch.checkpoint import load_training_state
    from itmatch.methods.registry import register_method, unregister_method

    register_method("toy_hooked")(_Hooked)
    try:
        common = ["model.method=toy_hooked", "train.batch_size=64", "train.epochs=2", "train.checkpoint_every_steps=4"]
        full = Trainer(small_config(tiny_scenes, *common), tmp_path / "full", echo=False)
        full.fit()
        assert int(full.objective.counter.steps) == full.step == 18
        assert int(full.objective.counter.epochs) == 2
        Trainer(small_config(tiny_scenes, *common, "train.max_steps=6"), tmp_path / "cut", echo=False).fit()
        (tmp_path / "cut" / "checkpoints" / "LATEST").write_text("step-00000004\n")
        resumed = Trainer(small_config(tiny_scenes, *common), tmp_path / "cut", resume="latest", echo=False)
        resumed.fit()
        assert int(resumed.objective.counter.steps) == 18 and int(resumed.objective.counter.epochs) == 2
        torch.testing.assert_close(resumed.objective.counter.ema, full.objective.counter.ema, rtol=1e-5, atol=1e-6)
        state = load_training_state(tmp_path / "cut" / "checkpoints" / "step-00000018")
        assert int(state["objective"]["counter.steps"]) == 18  # the objective's buffers are in the checkpoint
    finally:
        unregister_method("toy_hooked")


def test_print_every_steps_thins_the_console_not_the_records(tiny_scenes, tmp_path):
    cfg = small_config(tiny_scenes, "train.max_steps=8", "train.print_every_steps=4")
    Trainer(cfg, tmp_path / "run", echo=False).fit()
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # a record every step (log_every_steps=1)
    lines = (tmp_path / "run" / "out.log").read_text().splitlines()
    printed = [int(line.split(" step ")[1].split("/")[0]) for line in lines if "samples/s" in line]
    assert printed == [4, 8]
