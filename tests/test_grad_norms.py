"""Per-term gradient norms (training.grad_norms) against closed forms (the trainer's log of them is
checked in test_dias.py's end-to-end run)."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.training.grad_norms import log_grad_norms, term_grad_norms


def test_each_term_gets_the_norm_of_its_own_gradient():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    x = torch.tensor([2.0, 1.0, -1.0])
    a = (w @ x) ** 2  # d/dw = 2 (w.x) x, nothing on v
    b = 3.0 * w.sum() + 4.0 * v.sum()  # d/dw = 3 (each), d/dv = 4
    terms = {"loss": a + b, "a": a, "b": b, "logged": a.detach(), "count": 7}
    norms = term_grad_norms(terms, [w, v])
    wx = float((w @ x).detach())
    assert set(norms) == {"a", "b"}  # "loss", detached and non-tensor entries are skipped
    assert norms["a"] == pytest.approx(2 * abs(wx) * math.sqrt(6.0), rel=1e-6)
    assert norms["b"] == pytest.approx(math.sqrt(3 * 9.0 + 16.0), rel=1e-6)
    assert w.grad is None and v.grad is None  # nothing accumulated into .grad
    logged = log_grad_norms(terms, [w, v])
    assert logged["gradnorm_a"] == pytest.approx(norms["a"])
    assert logged["gradshare_b"] == pytest.approx(norms["b"] / norms["a"])  # relative to the first term
    (a + b).backward()  # the graph is still there for the real step
    assert torch.allclose(w.grad, 2 * wx * x + 3.0)


def test_grad_norm_interval_is_checked():
    from itmatch.config import load_config
    from itmatch.errors import ItmatchError

    with pytest.raises(ItmatchError, match="train.grad_norm_every_steps"):
        load_config(None, ["train.grad_norm_every_steps=-1"])
    assert load_config(None, ["train.log_every_steps=30"]).train.grad_norm_every_steps == 200  # any pair is valid
