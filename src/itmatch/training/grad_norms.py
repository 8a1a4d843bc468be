"""Per-term gradient norms: how hard each named loss term pulls on the trainable parameters.

Loss weights are chosen from these numbers (a term whose gradient is 1% of the ranking loss's does
nothing; one 3x larger drowns it). An objective returns its terms in a dict (see objectives/base.py);
every entry other than "loss" that still carries a gradient is a summand of the loss, already
weighted, and gets a norm here; a regularizer's unweighted components (e.g. `dias_dim`) get their raw
norm, so the weight that gives a wanted share is share * ||g_base|| / ||g_raw||. Detached entries
(logged values) are skipped.

Costs one extra backward per term, so the trainer runs it only every `train.grad_norm_every_steps`.
"""

from __future__ import annotations

import torch


def term_grad_norms(terms: dict, params: list[torch.Tensor]) -> dict[str, float]:
    """{name: ||d term / d params||_2} for every gradient-carrying term except "loss"."""
    params = [p for p in params if p.requires_grad]
    norms: dict[str, float] = {}
    for name, value in terms.items():
        if name == "loss" or not isinstance(value, torch.Tensor) or not value.requires_grad or value.dim() != 0:
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        norms[name] = sq**0.5
    return norms


def log_grad_norms(terms: dict, params: list[torch.Tensor]) -> dict[str, float]:
    """The norms as run-log keys (`gradnorm_<term>`), plus the ratio of each to the first term's
    norm (`gradshare_<term>`): the objective's first term is its ranking loss."""
    norms = term_grad_norms(terms, params)
    out = {f"gradnorm_{k}": v for k, v in norms.items()}
    if norms:
        first = next(iter(norms.values()))
        if first > 0:
            out.update({f"gradshare_{k}": v / first for k, v in list(norms.items())[1:]})
    return out
