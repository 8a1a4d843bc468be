"""Cost of HREM relative to VSE-infinity, measured in one run on the same batches.

Through the harness (benchmarks/harness.py), alternating the arms in rounds:
  - training step (forward, loss, backward, AdamW) on the scenes shapes (batch 128, 12 regions x
    1280-d, d=256): vse (GPO), hrem's fragment level alone (instance level not yet on), hrem with the
    instance-level graph (fusion, standalone); vse and hrem fusion also as they ran before the CPU fast
    paths (GPO's kernels; the fragment attention and the fragment matching on real fragments only);
  - the same on the paper's shapes (batch 128, 36 regions x 2048-d, 32 words, d=1024, BiGRU) on
    synthetic features: vse vs hrem fusion, plus the instance-level objective alone and the fragment
    matching alone;
  - peak memory of one training step of each paper-shape arm (each in a fresh process, peak RSS above
    the RSS before the step);
  - encoding at inference: a trained hrem model holds no relation module, so encoding with the
    instance level trained on or off is the same model and costs the same; vse for reference.

    python benchmarks/bench_hrem.py [--data scenes:small] [--threads 1] [--rounds 5] [--repeats 3] [--no-paper]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import cycling, encode_rates, make_stepper, training_batches  # noqa: E402
from harness import Bench, add_arguments, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402
from itmatch.config import PACKAGED_CONFIGS, load_config  # noqa: E402
from itmatch.data.batch import ImageBatch, TextBatch  # noqa: E402
from itmatch.data.setup import load_configured_split, resolve_data_root  # noqa: E402
from itmatch.data.text import WordVocab, build_tokenizer  # noqa: E402
from itmatch.methods.registry import build_model, build_objective  # noqa: E402
from itmatch.objectives.base import TrainProgress  # noqa: E402
from itmatch.similarity import fragment  # noqa: E402
from itmatch.similarity.fragment import fragment_matching  # noqa: E402

INSTANCE_ON = "hrem.instance_warmup_steps=0"
INSTANCE_OFF = "hrem.instance_warmup_steps=1000000000"
VOCAB = WordVocab.build([" ".join(f"w{i}" for i in range(2000))])


def paper_batches(n_batches: int, vocab: WordVocab, n: int = 128, regions: int = 36, words: int = 32):
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        idx = torch.arange(b * n, (b + 1) * n)
        feats = torch.randn(n, regions, 2048, generator=g).relu()
        tokens = torch.randint(2, vocab.vocab_size, (n, words), generator=g)
        ones = torch.ones(n, words, dtype=torch.bool)
        img = ImageBatch(idx, feats, torch.ones(n, regions, dtype=torch.bool))
        out.append((img, TextBatch(tokens, ones, idx, idx)))
    return out


def paper_cfg(name, *extra):
    return load_config(PACKAGED_CONFIGS / name, ["sampler.kind=random", *extra])


PAPER_ARMS = {
    "vse (GPO)": ("vse_f30k_precomp_bigru.yaml",),
    "hrem fragment level only": ("hrem_f30k_precomp_bigru.yaml", INSTANCE_OFF),
    "hrem fusion (full)": ("hrem_f30k_precomp_bigru.yaml", INSTANCE_ON),
}


def model_outputs(cfg, batch):
    """The model's training outputs on one batch, detached leaves (gradients stop at the objective)."""
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    objective = build_objective(cfg, model)
    with torch.no_grad():
        out = model(*batch)
    out = {k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v) for k, v in out.items()}
    return objective, out


def objective_arm(cfg, batch):
    """Forward + backward of the HREM objective alone (matching, graph, interaction, losses, L_reg)."""
    objective, out = model_outputs(cfg, batch)
    progress = TrainProgress(epoch=1, step=10**6)
    return lambda: objective(out, *batch, progress)["loss"].backward()


def matching_arm(cfg, batch, former: bool = False):
    """The fragment matching alone, on detached fragments as the objective calls it; `former`: the
    implementation before chunking (the full (N, R, N, T) tensor and its copies, no autograd graph)."""
    _, out = model_outputs(cfg, batch)
    frags = out["img_frag"].detach(), out["img_mask"], out["txt_frag"].detach(), out["txt_mask"]

    def run():
        with former_matching(former):
            fragment_matching(*frags, cfg.hrem.topk, cfg.hrem.matching)
    return run


@torch.no_grad()
def padded_matching_maxima(img_frag, img_mask, txt_frag, txt_mask, scores, eps: float = 1e-12):
    """The no-grad matching before it was packed to the real words (kept here for the before/after arm):
    one (n, R, Nt, T) block of images at a time, updated in place.

    Padded fragments are zeroed before the matmul, so their scores are 0 exactly as the masked_fill
    of the autograd path leaves them, and the norms need no mask. After the norms, padded entries
    become -inf once, so both maxima skip them with no further masks or copies."""
    r = F.normalize(img_frag, dim=-1) * img_mask[..., None]
    c = F.normalize(txt_frag, dim=-1) * txt_mask[..., None]
    ni, nr = r.shape[:2]
    nt, nw = c.shape[:2]
    c_t = c.reshape(nt * nw, -1).T
    region_best = r.new_empty(ni, nt, nr)
    word_best = r.new_empty(nt, ni, nw)
    # Padded slots as flat indices, filled with -inf by index (cheaper than a broadcast boolean mask).
    pad_words = torch.nonzero(~txt_mask.reshape(-1)).squeeze(1)
    pad_regions = torch.nonzero(~img_mask.reshape(-1)).squeeze(1)
    step = max(1, fragment.CHUNK_ELEMENTS // (nr * nt * nw))
    for start in range(0, ni, step):
        stop = min(ni, start + step)
        n = stop - start
        sim = (r[start:stop].reshape(-1, r.shape[-1]) @ c_t).view(n, nr, nt, nw)
        if scores == "scan":
            F.leaky_relu_(sim, 0.1)
            squares = sim.square()
            # the norms F.normalize divides by, from one tensor of squares: across regions, across words
            to_regions = squares.sum(1, keepdim=True).sqrt_().clamp_min_(eps)
            to_words = squares.sum(3, keepdim=True).sqrt_().clamp_min_(eps)
            del squares
        flat = sim.view(n * nr, nt * nw)
        if len(pad_words):
            flat.index_fill_(1, pad_words, float("-inf"))
        rows = pad_regions[(pad_regions >= start * nr) & (pad_regions < stop * nr)] - start * nr
        if len(rows):
            flat.index_fill_(0, rows, float("-inf"))
        if scores == "scan":
            region_best[start:stop] = torch.div(sim, to_regions).amax(3).transpose(1, 2)
            word_best[:, start:stop] = torch.div(sim, to_words).amax(1).transpose(0, 1)
        else:
            region_best[start:stop] = sim.amax(3).transpose(1, 2)
            word_best[:, start:stop] = sim.amax(1).transpose(0, 1)
    return region_best, word_best


class former_matching:
    """Context: route the no-grad matching through a former formulation (when `on`): the unchunked
    autograd one (`on=True`), or `"padded"`: the chunked one on padded captions (before packing)."""

    def __init__(self, on):
        self.on, self.saved = on, fragment._matching_maxima_nograd

    def __enter__(self):
        if self.on == "padded":
            fragment._matching_maxima_nograd = padded_matching_maxima
        elif self.on:
            fragment._matching_maxima_nograd = fragment._matching_maxima_autograd

    def __exit__(self, *exc):
        fragment._matching_maxima_nograd = self.saved


def step_memory(arm: str) -> dict:
    """Peak RSS of a paper-shape training step above the RSS just before it (fresh process, 2nd step)."""
    former = arm.endswith(FORMER)
    batches = paper_batches(2, VOCAB)
    step = make_stepper(paper_cfg(*PAPER_ARMS[arm.removesuffix(FORMER)]), VOCAB)
    with former_matching(former):
        step(*batches[0])  # optimizer state and allocator warm
        reset_peak_rss()
        before = rss_mib()
        step(*batches[1])
    return {"arm": arm, "peak_extra_mib": round(peak_rss_mib() - before, 1)}


FORMER = ", former matching"
BEFORE = ", before the CPU fast paths"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scenes:small")
    ap.add_argument("--batches", type=int, default=6, help="distinct scenes batches the steps cycle through")
    ap.add_argument("--paper-repeats", type=int, default=1, help="calls per round of a paper-shape arm")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-shape measurements (slow on CPU)")
    ap.add_argument("--no-scenes", action="store_true", help="skip the scenes-shape measurements")
    ap.add_argument("--memory-arm", help=argparse.SUPPRESS)
    args = add_arguments(ap, rounds=5, repeats=3).parse_args()
    if args.memory_arm:
        torch.set_num_threads(args.threads)
        print(json.dumps(step_memory(args.memory_arm)))
        return
    bench = Bench("bench_hrem: hrem vs vse", args)

    if not args.no_scenes:
        def cfg(name, *extra):
            return load_config(PACKAGED_CONFIGS / name, [f"data.root={args.data}", "sampler.kind=random", *extra])

        vse = cfg("vse_scenes.yaml")
        root = resolve_data_root(vse.data)
        train = load_configured_split(vse.data, "train", root)
        test = load_configured_split(vse.data, "test", root)
        tok = build_tokenizer(vse.model.text, train.captions)
        batches = training_batches(vse, train, tok, args.batches)
        variants = {
            "vse (GPO)": vse,
            "hrem fragment level only": cfg("hrem_scenes.yaml", INSTANCE_OFF),
            "hrem fusion (full)": cfg("hrem_scenes.yaml", INSTANCE_ON),
            "hrem standalone (full)": cfg("hrem_scenes_standalone.yaml", INSTANCE_ON),
        }
        arms = {name: cycling(make_stepper(c, tok), batches) for name, c in variants.items()}
        # the same steps before the CPU fast paths (GPO's kernels; the fragment attention and the
        # matching on real fragments only)
        arms["vse (GPO)" + BEFORE] = cycling(make_stepper(vse, tok, cpu_kernels=False), batches)
        fusion_before = cycling(make_stepper(variants["hrem fusion (full)"], tok, cpu_kernels=False), batches)

        def before_step():
            with former_matching("padded"):
                fusion_before()
        arms["hrem fusion (full)" + BEFORE] = before_step
        bench.report(bench.compare(arms, warmup=2), baseline="vse (GPO)", rate=(128, "samples/s"),
                     label=f"training step, scenes shapes ({root}): batch 128, 12 regions x 1280-d, d=256")
        enc = {"vse": vse, "hrem (instance level on)": cfg("hrem_scenes.yaml", INSTANCE_ON),
               "hrem (no relation module)": cfg("hrem_scenes.yaml", INSTANCE_OFF)}
        for name, c in enc.items():
            img, txt = encode_rates(c, test, tok, 512)
            n_params = sum(p.numel() for p in build_model(c, tok).parameters())
            bench.record(f"encode {name}", {"images_per_s": round(img), "captions_per_s": round(txt),
                                            "params_M": round(n_params / 1e6, 3)})

    if args.no_paper:
        return
    pb = paper_batches(2, VOCAB)
    label = "paper shapes (synthetic): batch 128, 36 regions x 2048-d, 32 words, d=1024, BiGRU"
    arms = {name: cycling(make_stepper(paper_cfg(*c), VOCAB), pb) for name, c in PAPER_ARMS.items()}
    bench.report(bench.compare(arms, repeats=args.paper_repeats), baseline="vse (GPO)",
                 rate=(128, "samples/s"), label=f"training step, {label}")
    del arms
    parts = {f"instance-level objective ({mech})":
             objective_arm(paper_cfg("hrem_f30k_precomp_bigru.yaml", f"hrem.mechanism={mech}"), pb[0])
             for mech in ("fusion", "standalone")}
    parts["fragment matching (chunked, no_grad)"] = matching_arm(paper_cfg("hrem_f30k_precomp_bigru.yaml"), pb[0])
    parts["fragment matching (former, unchunked)"] = matching_arm(paper_cfg("hrem_f30k_precomp_bigru.yaml"), pb[0],
                                                                  former=True)
    bench.report(bench.compare(parts, repeats=args.paper_repeats), label=f"parts, forward + backward, {label}")
    memory = {}
    for arm in [*PAPER_ARMS, "hrem fusion (full)" + FORMER]:
        out = subprocess.run([sys.executable, __file__, "--memory-arm", arm, "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})  # freed blocks leave RSS
        memory[arm] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    bench.record(f"peak RSS of a training step above the RSS before it (MiB), {label}", memory)


if __name__ == "__main__":
    main()
