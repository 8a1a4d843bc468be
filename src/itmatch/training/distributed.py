"""Training on several processes (`torchrun`), each process one rank with one slice of the global batch.

What the trainer asks of this module, and why the result is the single-process objective:
- `Distributed.from_env` joins the process group torchrun describes in the environment (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when training on CUDA (one GPU per local rank),
  gloo on the CPU. Without WORLD_SIZE > 1 it is the single process, and nothing below communicates.
- The sampler yields *global* batches (`train.batch_size` is the effective batch); each rank trains on
  its contiguous slice (`data.samplers.RankSlices`), so concatenating the slices in rank order gives
  back the global batch exactly as one process would see it.
- `gather_step` collects the model outputs and the batch ids of all ranks, embeddings and fragments
  through `GatherRows`, an all-gather whose backward sends every row's gradient back to the rank
  that made it. Every rank then computes the same global loss L with the unmodified objective.
- Gradient scale: every rank backpropagates the same L, so the backward of the gather sums W equal
  contributions: rank r holds W * dL/d(rows of r). DistributedDataParallel averages over the W ranks,
  (1/W) * sum_r W * dL/dtheta|_r = dL/dtheta: exactly the single-process gradient, with no extra
  scaling. The objective's own parameters (HREM's interaction, learned temperatures) see the full L on
  every rank; `average_gradients` keeps them identical.
- Random numbers: the global generators are seeded alike on every rank and restored alike on resume;
  the objective draws from them (the same draws on every rank, so every rank computes the same L). The
  model's forward draws from a per-rank generator seeded by (seed, rank, step) (`model_rng`), so model
  dropout differs between the ranks' slices as it would between the rows of one batch.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from itmatch.data.batch import ImageBatch, TextBatch
from itmatch.data.datasets import mix_seed
from itmatch.device import resolve_device
from itmatch.errors import ItmatchError
from itmatch.objectives.base import StepContext, TrainingHooks

# Rank 0 evaluates while the others wait in a barrier: give a COCO-sized dev evaluation time.
TIMEOUT = timedelta(minutes=60)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> tuple[Distributed, torch.device]:
        """The rank torchrun started, with its device; joins the process group (once per process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device_name)
        if world <= 1:
            return cls(), device
        try:
            rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise ItmatchError("WORLD_SIZE > 1 but RANK is not set: start several processes with torchrun "
                               "(or itmatch train --nproc N)") from None
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ItmatchError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                                   "use --nproc_per_node <= the number of GPUs")
            device = torch.device("cuda", local)  # one GPU per local rank, whatever train.device named
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=TIMEOUT)
        return cls(rank, world, local), device

    # -- random numbers -------------------------------------------------------------------------
    def model_rng(self, seed: int, step: int, device: torch.device):
        """The context of the model's forward on several ranks: each rank draws its own random numbers
        (dropout), seeded by (seed, rank, step), so a rank's run is reproducible and resumable. Outside it
        the global generators stay the same on every rank (seeded alike, restored alike on resume), and
        the objective draws from them (distance-weighted negatives, HREM's interaction dropout): every
        rank computes the same global loss, with the draws of a single process whose model draws nothing.
        """
        if not self.enabled:
            return contextlib.nullcontext()
        return _seeded(mix_seed(seed, self.rank, step, 17), device)

    # -- data -----------------------------------------------------------------------------------
    def shard_sampler(self, sampler):
        """This rank's slice of every global batch of `sampler` (the sampler itself when alone)."""
        if not self.enabled:
            return sampler
        from itmatch.data.samplers import RankSlices

        size = sampler.batch_size
        if size % self.world:
            raise ItmatchError(f"the global batch of {size} pairs does not split over {self.world} processes: "
                               "make train.batch_size (neighbour sampling: sampler.clusters_per_batch x "
                               "sampler.images_per_cluster) a multiple of the number of processes")
        return RankSlices(sampler, self.rank, self.world)

    # -- model and parameters -------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel around the model (it broadcasts rank 0's weights now and averages the
        gradients in backward); the model itself when alone."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        for m in model.modules():  # batch statistics of the global batch (encoders.image.MaskedBatchNorm1d)
            if hasattr(type(m), "sync_sum"):
                m.sync_sum = all_reduce_sum

        # find_unused_parameters: a model may hold trainable parameters its forward never uses (a BERT's
        # pooler: the text encoder reads the last hidden state); DDP would wait for their gradients.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (the objective is not wrapped in DDP)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                if isinstance(t, torch.Tensor):
                    dist.broadcast(t, 0)

    def average_gradients(self, params) -> None:
        """Average the gradients of parameters DDP does not own (the objective's), in one all-reduce."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- the global batch -----------------------------------------------------------------------
    def gather_step(self, out: dict, img_batch: ImageBatch, txt_batch: TextBatch, non_negatives=None):
        """(out, img_batch, txt_batch) of the global batch, rows in rank order.

        Every tensor of `out` with one row per pair is gathered (floating ones with gradient, padded to
        the longest fragment sequence of any rank; padding is masked out). The batches keep what
        objectives read: the ids, the tokens and masks; region features and pixels stay local.
        `non_negatives(caption_index, image_index)` rebuilds the relevance block of the global pairs
        (a rank only holds its diagonal block).
        """
        if not self.enabled:
            return out, img_batch, txt_batch
        rows = len(txt_batch)
        local = {f"out.{k}": v for k, v in out.items() if _is_rows(v, rows)}
        local["img.image_index"] = img_batch.image_index
        for f in fields(TextBatch):
            v = getattr(txt_batch, f.name)
            if f.name != "non_negatives" and _is_rows(v, rows):
                local[f"txt.{f.name}"] = v
        shapes = [None] * self.world
        dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in local.items()})
        if any(s.keys() != shapes[0].keys() or s["img.image_index"] != shapes[0]["img.image_index"] for s in shapes):
            raise ItmatchError("the ranks got batches of different sizes or outputs: every rank must train on "
                               "an equal slice of the global batch")
        gathered = {}
        for key, v in local.items():
            target = [max(s[key][d] for s in shapes) for d in range(1, v.dim())]
            gathered[key] = gather_rows(_pad_to(v, target))
        out = {**out, **{k[4:]: v for k, v in gathered.items() if k.startswith("out.")}}
        img = ImageBatch(image_index=gathered["img.image_index"])
        txt_fields = {k[4:]: v for k, v in gathered.items() if k.startswith("txt.")}
        txt = replace(txt_batch, **txt_fields, non_negatives=None)
        if txt_batch.non_negatives is not None:
            if non_negatives is None:
                raise ItmatchError("loss.negatives: relevance needs the dataset's relevance to build the "
                                   "global batch's negatives")
            block = non_negatives(txt.caption_index.cpu().tolist(), txt.image_index.cpu().tolist())
            txt.non_negatives = torch.as_tensor(block).to(txt_batch.non_negatives.device)
        return out, img, txt

    # -- run control ----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's value of `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # Every rank finishes its pending collectives before any tears gloo down: a rank that
            # destroyed the group while its peer still had work in flight died with SIGABRT
            # ("terminate called without an active exception") after a successful run. Unreachable
            # DDP wrappers (a reducer holds the group) are freed first, here, not later on whichever
            # thread drops the group's last reference.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ the all-gather
class GatherRows(torch.autograd.Function):
    """Concatenate equal-shaped (rows, ...) tensors of all ranks in rank order; backward hands each
    rank the gradient of its own rows summed over every rank's loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        total = grad.clone()  # gloo has no reduce-scatter: sum everything, keep our rows
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks on every rank; backward: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.detach().clone().contiguous()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone().contiguous()
        dist.all_reduce(total)
        return total


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x`; differentiable for floating tensors that need a gradient."""
    if x.is_floating_point() and x.requires_grad:
        return GatherRows.apply(x)
    if x.dtype == torch.bool:  # not every backend reduces bools: gather bytes
        return gather_rows(x.to(torch.uint8)).bool()
    parts = [torch.empty_like(x.contiguous()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _is_rows(v, rows: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows


def _pad_to(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Zero-pad dims 1.. of `x` up to `sizes` (fragment and token lengths differ between ranks)."""
    pad = []
    for d in reversed(range(1, x.dim())):
        pad += [0, sizes[d - 1] - x.shape[d]]
    if not any(pad):
        return x
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), pad).bool()
    return F.pad(x, pad)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class SamplerSync(TrainingHooks):
    """After the neighbour sampler re-clusters at an epoch's start, every rank takes rank 0's clusters: the
    ranks must agree on the global batches exactly, and k-means on embeddings that differ in the last
    bit (GPU kernels) could disagree."""

    def __init__(self, sampler, dist_ctx: Distributed):
        self.sampler, self.dist = sampler, dist_ctx

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.sampler.load_state_dict(self.dist.broadcast_object(self.sampler.state_dict()))
        self.sampler.set_epoch(ctx.progress.epoch)


class NullLog:
    """What ranks other than 0 log to: nothing (only rank 0 writes logs, checkpoints and reports)."""

    interactive = False

    def line(self, text: str) -> None:
        pass

    def progress_due(self) -> bool:
        return False

    def record(self, kind: str, step: int, epoch: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass
