"""Training samples/s with 1 and with N processes (gloo on the CPU), the same global batch.

Each arm starts its processes (torch.multiprocessing, the env torchrun would set), builds the trainer,
runs `--warmup` steps untimed, then times `--steps` steps; rank 0 reports global samples/s. The arms
alternate in `--rounds` rounds, so a machine that gets busier or quieter affects both alike; the
ratio N/1 of the medians is printed. Threads per process: `--threads` (default 1). With
`--device cuda` each rank takes one GPU (NCCL) and rank 0 also reports its peak GPU memory;
`--nproc 1` then measures one GPU alone.

    PYTHONPATH=src python benchmarks/bench_distributed.py --data /work/data/scenes-small --method vse
    PYTHONPATH=src python benchmarks/bench_distributed.py --data DIR --method hrem --device cuda --nproc 1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from itmatch.config import PACKAGED_CONFIGS, load_config


def _run(rank: int, world: int, port: int, args, queue) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from itmatch.objectives.base import TrainProgress
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import first_epoch_trainer

    cfg = load_config(PACKAGED_CONFIGS / f"{args.method}_scenes.yaml", [
        f"data.root={args.data}", f"train.batch_size={args.batch}", f"train.device={args.device}", "data.num_workers=0",
        f"sampler.clusters_per_batch={args.batch // 8}", "sampler.images_per_cluster=8",
        *(["hrem.instance_warmup_steps=0"] if args.method == "hrem" else [])])
    with tempfile.TemporaryDirectory() as tmp:
        trainer, loader = first_epoch_trainer(cfg, tmp)
        batches = iter(loader)
        progress = TrainProgress(0, 0, trainer.total_steps)
        for _ in range(args.warmup):
            trainer._train_step(*next(batches), progress)
        trainer.dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer._train_step(*next(batches), progress)
        trainer.dist.barrier()
        elapsed = time.perf_counter() - t0
    if rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        queue.put((args.steps * args.batch / elapsed, peak))
    trainer.dist.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args) -> tuple[float, float]:
    """(global samples/s, rank 0's peak GPU memory in GiB or nan) of one arm."""
    import queue as queues

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queues.Empty:
            if any(p.exitcode for p in procs):  # a rank died: its peers may wait forever
                for p in procs:
                    p.kill()
                sys.exit("a rank failed; see its error above")
    for p in procs:
        p.join()
        if p.exitcode:
            sys.exit(f"rank failed with exit code {p.exitcode}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a scenes folder (itmatch data scenes)")
    ap.add_argument("--method", default="vse", choices=["vse", "hrem"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    rates: dict[int, list[float]] = {1: [], args.nproc: []}
    for r in range(args.rounds):
        for world in sorted(rates) if r % 2 == 0 else sorted(rates, reverse=True):
            rate, peak = measure(world, args)
            rates[world].append(rate)
            print(f"round {r + 1}: {world} process(es): {rate:.0f} samples/s"
                  + (f", rank 0 peak GPU memory {peak:.2f} GiB" if args.device == "cuda" else ""), flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.nproc])
    print(f"{args.method}, global batch {args.batch}, {args.threads} thread(s) per process: "
          f"1 process {one:.0f} samples/s, {args.nproc} processes {many:.0f} samples/s, ratio {many / one:.2f}")


if __name__ == "__main__":
    main()
