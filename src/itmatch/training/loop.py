"""The training engine shared by every method.

One `Trainer` runs any registered method: it builds the model and its objective from the config,
iterates epochs of caption-image pairs in a seed-determined order, validates on `dev` (never on
`test`) and keeps the best checkpoint by dev rSum. Checkpoints carry the full training state, so
`--resume latest` continues a killed run exactly where its last checkpoint left it: same batches,
same augmentation, same random numbers, hence the same weights step for step.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from itmatch import checkpoint as ckpt
from itmatch.config import Config
from itmatch.data.setup import check_split_fits, load_configured_split, resolve_data_root, take_images
from itmatch.errors import ItmatchError
from itmatch.files import atomic_write_text
from itmatch.objectives.base import StepContext, TrainProgress, call_hooks
from itmatch.run_lock import RunLock
from itmatch.training.distributed import Distributed, NullLog, SamplerSync
from itmatch.training.hooks import NeighbourRefresh
from itmatch.training.interrupt import StopRequest, TrainingInterrupted
from itmatch.training.optim import build_optimizer, lr_multiplier, set_learning_rates
from itmatch.training.resume import find_resumable, resume_command, truncate_metrics
from itmatch.training.rng import capture_rng, restore_rng
from itmatch.training.run_log import RunLog

LATEST = "LATEST"  # the name of the marker file; see training/resume.py


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of the run that verifies (see training/resume.py)."""
    return find_resumable(run_dir)[0]


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: str | Path | None = None, echo: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume_from = None
        self.resume_notes: list[str] = []  # e.g. a damaged latest checkpoint that was skipped
        self.resume_hint: str | None = None  # how to continue after Ctrl-C, when not `itmatch train --resume`
        if resume is not None:
            if str(resume) == "latest":
                self.resume_from, self.resume_notes = find_resumable(self.run_dir)
            else:
                self.resume_from = Path(resume)
        # One process, or one rank of a torchrun launch (docs/distributed.md); picks the rank's GPU.
        self.dist, self.device = Distributed.from_env(cfg.train.device)
        self.echo = echo

    # ------------------------------------------------------------------------------- setup
    def prepare(self) -> None:
        """Build data, tokenizer, model, objective, sampler and optimizer without training; `fit` calls it.
        Benchmarks and tests call it to probe single steps of a fully configured run. Idempotent."""
        if getattr(self, "_prepared", False):
            return
        from itmatch.data.datasets import PairDataset, image_transform
        from itmatch.data.text import build_tokenizer, load_tokenizer
        from itmatch.methods.registry import build_model, build_objective

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.data_root = resolve_data_root(cfg.data)
        # The full NaN/inf scan (bounded memory) runs before any run folder exists: bad data leaves nothing behind.
        self.train_split = load_configured_split(cfg.data, cfg.data.train_split, self.data_root, check_finite=True)
        dev = load_configured_split(cfg.data, cfg.data.dev_split, self.data_root, check_finite=True)
        self.dev_split = take_images(dev, cfg.data.max_dev_images)
        check_split_fits(cfg, self.train_split, training=True)
        check_split_fits(cfg, self.dev_split)
        if self.resume_from is not None:
            self.tokenizer = load_tokenizer(self.resume_from / ckpt.TOKENIZER)
        else:
            self.tokenizer = build_tokenizer(cfg.model.text, self.train_split.captions)
        self.model = build_model(cfg, self.tokenizer).to(self.device)
        self.objective = build_objective(cfg, self.model).to(self.device)

        transform = (image_transform(cfg.model.image.image_size, train=True, flip=cfg.model.image.hflip)
                     if cfg.model.image.kind == "grid" else None)
        self.dataset = PairDataset(
            self.train_split, self.tokenizer, max_length=cfg.model.text.max_length, train=True,
            token_noise=cfg.model.text.token_noise, region_drop=cfg.model.image.region_drop,
            image_transform=transform, seed=cfg.train.seed, negatives=cfg.loss.negatives,
        )
        self.sampler = self.dist.shard_sampler(self._build_sampler())
        self.hooks = [NeighbourRefresh(self.sampler)] if hasattr(self.sampler, "needs_embeddings") else []
        if self.hooks and self.dist.enabled:
            self.hooks.append(SamplerSync(self.sampler, self.dist))
        self.total_steps = 0
        for epoch in range(cfg.train.epochs):  # batches per epoch may change (neighbour sampling)
            self.sampler.set_epoch(epoch)
            self.total_steps += len(self.sampler)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.optimizer = build_optimizer(self.model, self.objective, cfg.optim)
        self.dist.broadcast_module(self.objective)
        self.train_model = self.dist.wrap(self.model, self.device)  # DDP on several ranks

        self.amp_dtype = None
        if cfg.train.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.step, self.epoch, self.batch_in_epoch, self.best_rsum = 0, 0, 0, -1.0
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        self._prepared = True

    def _build_sampler(self):
        from itmatch.data.datasets import EpochSampler

        sc = self.cfg.sampler
        if sc.kind == "random":
            return EpochSampler(len(self.dataset), self.cfg.train.seed, self.cfg.train.batch_size)
        if sc.kind == "neighbour":
            from itmatch.data.samplers import NeighbourBatchSampler

            return NeighbourBatchSampler(
                self.train_split.caption_to_image, self.cfg.train.seed, sc.clusters_per_batch,
                sc.images_per_cluster, n_clusters=sc.clusters, start_epoch=sc.start_epoch,
                refresh_epochs=sc.refresh_epochs)
        raise ItmatchError(f"config key 'sampler.kind': unknown sampler {sc.kind!r} (use random, neighbour)")

    def _encode_train_images(self) -> torch.Tensor:
        """(N, D) embeddings of every training image under the current weights, in eval mode."""
        from itmatch.evaluation.encode import encode_images

        was_training = self.model.training
        self.model.eval()
        try:
            return encode_images(self.model, self.train_split, self.cfg.model, self.cfg.train.eval_batch_size,
                                 self.device)
        finally:
            self.model.train(was_training)

    def _call_hooks(self, hook: str, progress: TrainProgress) -> None:
        """The trainer's own hooks (neighbour refresh), then every hooked part of the objective."""
        ctx = StepContext(self.model, progress, self._encode_train_images)
        for h in self.hooks:
            getattr(h, hook)(ctx)
        call_hooks(self.objective, hook, ctx)

    def _load_state(self, folder: Path) -> None:
        ckpt.verify_checkpoint(folder, training_state=True)
        state = ckpt.load_training_state(folder)
        ckpt.load_weights(self.model, folder)
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("sampler") and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        if "scaler" in state and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.best_rsum = int(state["batch_in_epoch"]), float(state["best_rsum"])
        restore_rng(state["rng"])

    # ------------------------------------------------------------------------- checkpoints
    def _training_state(self) -> dict:
        return {
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_rsum": self.best_rsum,
            "rng": capture_rng(),
        }

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:  # the checkpoint is rank-independent: rank 0 writes it
            return None
        folder = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        ckpt.save_pretrained(self.model, self.tokenizer, self.cfg, folder, self._training_state())
        atomic_write_text(folder.parent / LATEST, folder.name + "\n")
        steps = sorted(p for p in folder.parent.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - max(1, self.cfg.train.keep_last))]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    # -------------------------------------------------------------------------- validation
    def validate(self) -> dict:
        from itmatch.evaluation.encode import split_scores
        from itmatch.evaluation.protocols import evaluate_sims

        was_training = self.model.training
        try:
            scores = split_scores(self.model, self.dev_split, self.tokenizer, self.cfg.model,
                                  self.cfg.train.eval_batch_size, self.device)
            protocol = "scenes" if self.dev_split.relevance is not None else "plain"
            report = evaluate_sims(scores, protocol, self.dev_split, dataset=str(self.cfg.data.root),
                                   split_name=self.cfg.data.dev_split)
        finally:
            self.model.train(was_training)
        return report["metrics"]

    # ----------------------------------------------------------------------------- the loop
    def _train_step(self, img_batch, txt_batch, progress: TrainProgress) -> dict:
        if img_batch.regions is not None and not torch.isfinite(img_batch.regions).all():
            # A backstop: setup scans the whole file. One image appears once per caption in a batch.
            bad = sorted(set(img_batch.image_index[~torch.isfinite(img_batch.regions).flatten(1).all(1)].tolist()))
            name = Path(self.train_split.extra.get("features_file", "the training features")).name
            raise ItmatchError(f"NaN or inf in rows {', '.join(map(str, bad[:10]))} of {name}")
        img_batch, txt_batch = img_batch.to(self.device), txt_batch.to(self.device)
        autocast = (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            with self.dist.model_rng(self.cfg.train.seed, self.step, self.device):  # per rank (dropout)
                out = self.train_model(img_batch, txt_batch)
            # Several ranks: the objective sees the global batch (docs/distributed.md).
            out, img_batch, txt_batch = self.dist.gather_step(out, img_batch, txt_batch, self._non_negatives)
            terms = self.objective(out, img_batch, txt_batch, progress)
        loss = terms["loss"]
        every, log_every = self.cfg.train.grad_norm_every_steps, self.cfg.train.log_every_steps
        if every and (self.step + 1) % (max(1, every // log_every) * log_every) == 0:  # on a logged step
            from itmatch.training.grad_norms import log_grad_norms

            terms = {**terms, **log_grad_norms(terms, [p for g in self.optimizer.param_groups for p in g["params"]])}
        if not torch.isfinite(loss):
            raise ItmatchError(f"the loss became {loss.item()} at step {self.step}: lower optim.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.dist.average_gradients(self.objective.parameters())  # DDP averages the model's
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}

    def fit(self) -> dict:
        self.prepare()
        if self.resume_from is not None and (self.step >= self.total_steps or self.epoch >= self.cfg.train.epochs):
            return {"best_rsum": self.best_rsum, "run_dir": str(self.run_dir), "steps": self.step,
                    "nothing_to_do": True}
        # Only now, with config and data checked, does the run folder appear; only rank 0 writes it, and one
        # process at a time. A graceful Ctrl-C needs every rank to stop at one step: single process only.
        lock = RunLock(self.run_dir) if self.dist.is_main else contextlib.nullcontext()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with lock, StopRequest(enabled=not self.dist.enabled) as stop:
            self._stop = stop
            self._lock_note = lock.stale if self.dist.is_main else None
            if self.dist.is_main:  # a writer killed mid-save (kill -9, OOM) leaves its temporary folder
                self.resume_notes += [f"removed the unfinished checkpoint write {p.name}"
                                      for p in ckpt.remove_partial_saves(self.run_dir)]
            try:
                return self._fit()
            except ItmatchError as exc:  # the terminal gets one (possibly cut) line; the log keeps it whole
                if self.dist.is_main:
                    with open(self.run_dir / "out.log", "a", encoding="utf-8") as f:
                        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] error: {exc}\n")
                raise

    def _interrupted(self, log: RunLog) -> TrainingInterrupted:
        folder = self.save_checkpoint()
        msg = (f"interrupted ({self._stop.requested}) at step {self.step}: saved {folder}; "
               f"continue with: {self.resume_hint or resume_command(self.run_dir)}")
        log.line(msg)
        log.close()
        return TrainingInterrupted(msg)

    def _fit(self) -> dict:
        cfg = self.cfg
        log = NullLog()
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            if self.resume_from is not None:  # the replayed steps must not be recorded twice
                truncate_metrics(self.run_dir, self.step)
            log = RunLog(self.run_dir, echo=self.echo,
                         purge_step=self.step + 1 if self.resume_from is not None else None)
        for note in ([f"warning: {self._lock_note}; taking the folder over"] if self._lock_note else []) + \
                self.resume_notes:
            log.line(note)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.line(f"method {cfg.model.method} | {n_params / 1e6:.2f}M parameters | device {self.device} | "
                 f"{len(self.dataset)} pairs, {self.total_steps} steps in {cfg.train.epochs} epochs")
        if self.dist.enabled:
            log.line(f"{self.dist.world} processes, {cfg.train.batch_size // self.dist.world} pairs each of a "
                     f"global batch of {cfg.train.batch_size}")
        if self.resume_from is not None:
            log.line(f"resumed from {self.resume_from} at step {self.step} (epoch {self.epoch + 1}, "
                     f"batch {self.batch_in_epoch})")
        bar = None
        if log.interactive and self.echo:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        every = cfg.train.checkpoint_every_steps
        progress = TrainProgress(self.epoch, self.step, self.total_steps)
        t_window, n_window = time.perf_counter(), 0
        try:
            while self.epoch < cfg.train.epochs and self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                progress.epoch, progress.step, progress.batch_in_epoch = self.epoch, self.step, self.batch_in_epoch
                self._call_hooks("on_epoch_start", progress)
                self.sampler.skip_batches(self.batch_in_epoch)
                self.model.train()
                self.objective.train()
                # A private generator: creating the loader must not draw from the global RNG,
                # or a resumed run would diverge from an uninterrupted one.
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.sampler, collate_fn=self.dataset.collate,
                    num_workers=cfg.data.num_workers,
                    generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + self.epoch))
                for img_batch, txt_batch in loader:
                    progress.epoch, progress.step = self.epoch, self.step
                    epoch_progress = self.epoch + self.batch_in_epoch / max(1, len(self.sampler))
                    set_learning_rates(self.optimizer, lr_multiplier(
                        self.step, epoch_progress, cfg.optim, cfg.train.epochs))
                    terms = self._train_step(img_batch, txt_batch, progress)
                    self.step += 1
                    self.batch_in_epoch += 1
                    progress.step, progress.batch_in_epoch = self.step, self.batch_in_epoch
                    self._call_hooks("after_step", progress)
                    n_window += len(txt_batch) * self.dist.world  # samples/s of the whole run
                    if self.step % cfg.train.log_every_steps == 0 or self.step == self.total_steps:
                        rate = n_window / max(1e-9, time.perf_counter() - t_window)
                        lr = self.optimizer.param_groups[0]["lr"]
                        log.record("train", self.step, self.epoch, {**terms, "lr": lr, "samples_per_s": rate})
                        if bar is None and (not cfg.train.print_every_steps or self.step == self.total_steps
                                            or self.step % cfg.train.print_every_steps == 0):
                            log.line(f"epoch {self.epoch + 1} step {self.step}/{self.total_steps} "
                                     f"loss {terms['loss']:.4f} lr {lr:.2e} {rate:.0f} samples/s")
                        t_window, n_window = time.perf_counter(), 0
                    elif bar is None and log.progress_due():  # long silences in a log file look like a hang
                        log.line(f"epoch {self.epoch + 1} step {self.step}/{self.total_steps} "
                                 f"loss {terms['loss']:.4f}")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{terms['loss']:.3f}", epoch=self.epoch + 1)
                    if every and self.step % every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                    if self._stop.requested:  # at the last step the run just finishes instead
                        raise self._interrupted(log)
                epoch_done = self.batch_in_epoch >= len(self.sampler)
                if epoch_done:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if epoch_done and (self.epoch % cfg.train.eval_every_epochs == 0 or self.epoch == cfg.train.epochs):
                    self._validate_and_keep_best(log)
                elif self.step >= self.total_steps:
                    self._validate_and_keep_best(log)
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        from itmatch.training.plots import plot_runs

        if self.dist.is_main:
            plot_runs([self.run_dir], self.run_dir / "curves.png", labels=[cfg.model.method])
        log.line(f"done: best dev rSum {self.best_rsum:.2f}; best checkpoint {self.run_dir / 'best'}")
        log.close()
        self.best_rsum = self.dist.broadcast_object(self.best_rsum)
        self.dist.close()
        return {"best_rsum": self.best_rsum, "run_dir": str(self.run_dir), "steps": self.step}

    def _validate_and_keep_best(self, log: RunLog) -> None:
        if not self.dist.is_main:  # rank 0 evaluates; the others wait for it
            self.dist.barrier()
            return
        self._validate_on_this_rank(log)
        self.dist.barrier()

    def _non_negatives(self, caption_rows: list[int], image_rows: list[int]):
        from itmatch.data.datasets import relevance_block

        return relevance_block(self.dataset.non_negative_matrices, caption_rows, image_rows)

    def _validate_on_this_rank(self, log: RunLog) -> None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # validation never changes training's random numbers
            metrics = self.validate()
        log.record("dev", self.step, max(0, self.epoch - 1), metrics)
        improved = metrics["rsum"] > self.best_rsum
        log.line(f"dev after epoch {self.epoch}: rSum {metrics['rsum']:.2f} (i2t R@1 {metrics['i2t_r1']:.1f}, "
                 f"t2i R@1 {metrics['t2i_r1']:.1f}) in {time.perf_counter() - t0:.1f}s"
                 + (" - new best" if improved else ""))
        if improved:
            self.best_rsum = float(metrics["rsum"])
            best = ckpt.save_pretrained(self.model, self.tokenizer, self.cfg, self.run_dir / "best")
            atomic_write_text(best / "dev_metrics.json",
                                   json.dumps({"step": self.step, "epoch": self.epoch, **metrics}, indent=2))
