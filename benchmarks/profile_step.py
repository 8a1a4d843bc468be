"""Where a training step's time goes: vse against hrem (fusion), part by part and op by op.

Through the harness (benchmarks/harness.py), on one batch, alternating in rounds, forward + backward
of each part of the step on its own, with the part's inputs detached (so each part is timed once):
the image encoder (regions -> fragments), the text encoder (tokens -> fragments), the image and text
pooling (GPO for vse; the relation-enhanced pooler with its fragment self-attention for hrem), the
objective (ranking loss; for hrem also the fragment matching, graph, interaction and L_reg), and
AdamW with clipping; then the whole step. The parts' sum and the step differ by what the step has
and the parts lack (the glue between them) and by timing noise. Then the top ops of the whole step
by self CPU time (torch.profiler, a few steps).

    python benchmarks/profile_step.py [--data DIR] [--shapes scenes|paper] [--threads 1] [--rounds 5] [--repeats 2]

Each part's floating-point operations (forward + backward, torch.utils.flop_counter: matmuls and
attention) are counted once, so the shares can be read against the work each part must do.

`--shapes paper` uses bench_hrem's synthetic batch of the paper's shapes (128 x 36 regions x 2048-d,
32 words, d=1024, BiGRU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hrem import INSTANCE_ON, VOCAB, paper_batches, paper_cfg  # noqa: E402
from bench_training import training_batches  # noqa: E402
from harness import Bench, add_arguments  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model, build_objective  # noqa: E402
from itmatch.objectives.base import TrainProgress  # noqa: E402
from itmatch.training.optim import build_optimizer  # noqa: E402


def backward_of(out: torch.Tensor) -> None:
    """Backward of a fixed linear function of `out` (a sum would give every element the same gradient)."""
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()


def part_arms(cfg, tokenizer, batch) -> dict:
    """Forward + backward of each part of `cfg`'s training step alone, and the whole step."""
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).train()
    objective = build_objective(cfg, model)
    opt = build_optimizer(model, objective, cfg.optim)
    progress = TrainProgress(epoch=1, step=10**9)  # hard negatives and, for hrem, the instance level on
    img, txt = batch
    with torch.no_grad():
        out = model(img, txt)
    detached = {k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v)
                for k, v in out.items()}

    def pool(side):
        frag, mask = detached[f"{side}_frag"], out[f"{side}_mask"]
        fn = model.pool_image if side == "img" else model.pool_text
        return lambda: backward_of(fn(frag, mask))

    def step():
        terms = objective(model(img, txt), img, txt, progress)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    step()  # gradients and optimizer state exist, so the optimizer arm times a real update

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    return {"image encoder": lambda: backward_of(model.image_fragments(img)[0]),
            "text encoder": lambda: backward_of(model.text_fragments(txt)[0]),
            "image pooling": pool("img"), "text pooling": pool("txt"),
            "objective": lambda: objective(detached, img, txt, progress)["loss"].backward(),
            "AdamW + clipping": optimizer, "whole step": step}


def gflops(arms: dict) -> dict[str, float]:
    """GFLOP of one call of each part (matmul-like ops, as torch.utils.flop_counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, arm in arms.items():
        with FlopCounterMode(display=False) as counter:
            arm()
        out[name] = round(counter.get_total_flops() / 1e9, 2)
    return out


def top_ops(arms: dict, steps: int = 3, rows: int = 12) -> list[tuple[str, float, float]]:
    """(op, ms per step, share of the step's self CPU time) of the whole step's most expensive ops."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            arms["whole step"]()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return [(e.key, e.self_cpu_time_total / steps / 1e3, e.self_cpu_time_total / total) for e in top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--shapes", choices=("scenes", "paper"), default="scenes")
    ap.add_argument("--no-ops", action="store_true", help="skip the op-level profile")
    args = add_arguments(ap, rounds=5, repeats=2).parse_args()
    bench = Bench(f"profile_step: vse vs hrem fusion, parts of the step, {args.shapes} shapes", args)
    if args.shapes == "scenes":
        def cfg(name, *extra):
            return load_config(PACKAGED_CONFIGS / name, [f"data.root={args.data}", "sampler.kind=random", *extra])

        configs = {"vse": cfg("vse_scenes.yaml"), "hrem fusion": cfg("hrem_scenes.yaml", INSTANCE_ON)}
        train = load_configured_split(configs["vse"].data, "train", resolve_data_root(configs["vse"].data))
        tokenizer = build_tokenizer(configs["vse"].model.text, train.captions)
        batch = training_batches(configs["vse"], train, tokenizer, 1)[0]
    else:
        configs = {"vse": paper_cfg("vse_f30k_precomp_bigru.yaml"),
                   "hrem fusion": paper_cfg("hrem_f30k_precomp_bigru.yaml", INSTANCE_ON)}
        tokenizer, batch = VOCAB, paper_batches(1, VOCAB)[0]
    for name, c in configs.items():
        arms = part_arms(c, tokenizer, batch)
        record = bench.report(bench.compare(arms), baseline="whole step",
                              label=f"{name}: forward + backward of each part alone ({args.shapes} shapes, batch 128)")
        parts = sum(row["min"] for part, row in record["arms"].items() if part != "whole step")
        step_ms = 1e3 * record["arms"]["whole step"]["min"]
        bench.record(f"{name}: sum of the parts' minima vs the whole step",
                     {"parts_ms": round(1e3 * parts, 1), "step_ms": round(step_ms, 1)})
        bench.record(f"{name}: GFLOP per call, forward + backward", gflops(arms))
        if not args.no_ops:
            ops = top_ops(arms)
            print(f"-- {name}: top ops of the whole step (self CPU, torch.profiler, 3 steps)")
            for op, ms, share in ops:
                print(f"   {op:40s} {ms:9.1f} ms  {100 * share:5.1f}%")
            bench.record(f"{name}: top ops", {"ops": [[op, round(ms, 2), round(share, 4)] for op, ms, share in ops]})


if __name__ == "__main__":
    main()
