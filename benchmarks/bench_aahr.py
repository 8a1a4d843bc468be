"""Cost of AAHR relative to VSE-infinity and HREM, measured in one run on the same batches.

  - training step (forward, loss, backward, clipping, AdamW, the objective's after-step hooks) at batch
    128 on the scenes shapes (12 regions x 1280-d, d=256): vse (GPO), hrem (fusion, instance level on),
    aahr with every part on (prototypes, graph, momentum contrast with full queues), aahr without the
    momentum encoders; the arms alternate in rounds, the median round is reported;
  - memory: the momentum (key) encoders, the queues, and the frozen global encoders, which one copy
    serves the model and its momentum copy (the public code holds several copies of CLIP).

  - with `--grad-shares`: the gradient norm each weighted loss term sends into the model's parameters,
    on one batch (from a trained checkpoint with `--checkpoint`), the measurement loss weights are
    read against.

    python benchmarks/bench_aahr.py [--data scenes:small] [--rounds 3] [--steps 4] [--grad-shares [--checkpoint C]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import training_batches  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model, build_objective  # noqa: E402
from itmatch.objectives.base import StepContext, TrainProgress, call_hooks  # noqa: E402
from itmatch.training.optim import build_optimizer  # noqa: E402

AAHR_ON = ["aahr.proto_start_steps=0", "aahr.graph_warmup_steps=0"]
CLIP_VIT_B32_PARAMS = 151_277_313  # OpenCLIP ViT-B-32 (image + text towers), for the arithmetic below


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Arm:
    """A model, its objective and optimizer, stepping as the trainer does (hooks included)."""

    def __init__(self, cfg, tokenizer, warm_batches):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = build_model(cfg, tokenizer)
        self.objective = build_objective(cfg, self.model)
        self.opt = build_optimizer(self.model, self.objective, cfg.optim)
        self.model.train()
        self.objective.train()
        self.progress = TrainProgress(epoch=1, step=10**6)  # past every warm-up
        momentum = getattr(self.objective, "momentum", None)
        if momentum is not None:  # fill the queues with real keys, so the MoCo term runs in the timed steps
            while not momentum.image_queue.full:
                for img, txt in warm_batches:
                    with torch.no_grad():
                        k_img, k_txt = momentum.keys(self.model(img, txt), img, txt)
                    momentum.image_queue.push(k_img, img.image_index)
                    momentum.text_queue.push(k_txt, txt.image_index)
                    if momentum.image_queue.full:
                        break

    def step(self, img, txt) -> None:
        terms = self.objective(self.model(img, txt), img, txt, self.progress)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                       self.cfg.optim.grad_clip)
        self.opt.step()
        call_hooks(self.objective, "after_step", StepContext(self.model, self.progress))


WEIGHTS = {"base": ("base_weight",), "proto": ("proto_weight",), "gnn (3 terms)": ("gnn_weight",),
           "reg": ("reg_weight",), "moco": ("moco_weight",)}


def grad_shares(cfg, tok, batches, checkpoint: str | None) -> None:
    """Gradient norm of each weighted term alone w.r.t. the model's parameters, on one batch."""
    from safetensors.torch import load_file

    arm = Arm(cfg, tok, batches)
    if checkpoint:
        arm.model.load_state_dict(load_file(str(Path(checkpoint) / "model.safetensors")))
        arm.objective.momentum.update_keys(arm.model)
    a = arm.objective.cfg
    configured = {k: getattr(a, k) for keys in WEIGHTS.values() for k in keys}
    img, txt = batches[0]
    norms = {}
    for name, keys in WEIGHTS.items():
        for k, w in configured.items():
            setattr(a, k, w if k in keys else 0.0)
        torch.manual_seed(0)
        arm.model.zero_grad(set_to_none=True)
        arm.objective(arm.model(img, txt), img, txt, arm.progress)["loss"].backward()
        grads = [p.grad.norm() for p in arm.model.parameters() if p.grad is not None]
        norms[name] = float(torch.stack(grads).norm()) if grads else 0.0
    for k, w in configured.items():
        setattr(a, k, w)
    total = sum(norms.values())
    print("gradient norm into the model per weighted term (share of the sum of norms): " + "; ".join(
        f"{n} {v:.3g} ({100 * v / total:.0f}%)" for n, v in norms.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    ap.add_argument("--grad-shares", action="store_true", help="only measure per-term gradient norms")
    ap.add_argument("--checkpoint", default=None, help="an aahr_scenes checkpoint folder for --grad-shares")
    args = ap.parse_args()

    def cfg(name, *extra):
        return load_config(PACKAGED_CONFIGS / name, [f"data.root={args.data}", "sampler.kind=random", *extra])

    vse = cfg("vse_scenes.yaml")
    root = resolve_data_root(vse.data)
    train = load_configured_split(vse.data, "train", root)
    tok = build_tokenizer(vse.model.text, train.captions)
    batches = training_batches(vse, train, tok, args.steps + 1)
    if args.grad_shares:
        if args.checkpoint:
            from itmatch.data.text import load_tokenizer

            tok = load_tokenizer(Path(args.checkpoint) / "tokenizer")
            batches = training_batches(vse, train, tok, args.steps + 1)
        grad_shares(cfg("aahr_scenes.yaml", *AAHR_ON), tok, batches, args.checkpoint)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; scenes shapes ({root}): batch 128, "
          f"12 regions x 1280-d, d=256; {args.rounds} rounds x {args.steps} steps per arm")
    arms = {
        "vse (GPO)": Arm(vse, tok, batches),
        "hrem fusion (full)": Arm(cfg("hrem_scenes.yaml", "hrem.instance_warmup_steps=0"), tok, batches),
        "aahr (full)": Arm(cfg("aahr_scenes.yaml", *AAHR_ON), tok, batches),
        "aahr without momentum": Arm(cfg("aahr_scenes.yaml", *AAHR_ON, "aahr.moco_weight=0"), tok, batches),
    }
    for arm in arms.values():  # warm-up step (also fills the frozen text cache for these captions)
        arm.step(*batches[0])
    per_step = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            t0 = time.perf_counter()
            for img, txt in batches[1 : 1 + args.steps]:
                arm.step(img, txt)
            per_step[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: statistics.median(ts) for name, ts in per_step.items()}
    for name, t in med.items():
        print(f"train {name:24s} {1000 * t:8.0f} ms/step  {128 / t:6.0f} samples/s  "
              f"vs vse {t / med['vse (GPO)']:5.2f}x  vs hrem {t / med['hrem fusion (full)']:5.2f}x  "
              f"(rounds: {', '.join(f'{1000 * x:.0f}' for x in per_step[name])} ms)", flush=True)

    full = arms["aahr (full)"]
    momentum = full.objective.momentum
    key_bytes = tensor_bytes(momentum.key_model.parameters()) + tensor_bytes(
        b for n, b in momentum.key_model.named_buffers() if not n.startswith("frozen."))
    queue_bytes = tensor_bytes(momentum.image_queue.buffers()) + tensor_bytes(momentum.text_queue.buffers())
    model_bytes = tensor_bytes(full.model.parameters())
    frozen_bytes = tensor_bytes(full.model.frozen.buffers())
    shared = {b.data_ptr() for b in full.model.frozen.buffers()} == {
        b.data_ptr() for b in momentum.key_model.frozen.buffers()}
    print(f"memory: trainable model {mib(model_bytes):.1f} MiB; momentum encoders {mib(key_bytes):.1f} MiB; "
          f"queues 2 x {len(momentum.image_queue.feats)} x {momentum.image_queue.feats.shape[1]} "
          f"{mib(queue_bytes):.2f} MiB")
    print(f"frozen global encoders (MiniLM sentence embedding) {mib(frozen_bytes):.1f} MiB, one copy shared by "
          f"the model and its momentum copy: {shared}; the public code's five instances (image encoder, text "
          f"encoder, training loop, two momentum encoders) would hold {mib(5 * frozen_bytes):.1f} MiB")
    clip = CLIP_VIT_B32_PARAMS * 4
    print(f"arithmetic for OpenCLIP ViT-B/32 ({CLIP_VIT_B32_PARAMS / 1e6:.1f}M params, fp32): one copy "
          f"{mib(clip):.0f} MiB; the public code's image, text, training and two momentum instances "
          f"{mib(5 * clip):.0f} MiB; sharing saves {mib(4 * clip):.0f} MiB")


if __name__ == "__main__":
    main()
