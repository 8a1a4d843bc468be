"""Similarity of two sets of embeddings (K unit vectors per item): one module for training,
evaluation and search.

Every similarity starts from the element cosines of each (image set, caption set) pair,
`A[n, m, a, b] = <img[n, a], txt[m, b]>`, and reduces the K_i x K_t matrix to one score:

    maxpair    maximal pair assignment (Maximal Matching, ACL 2025): the one-to-one assignment pi*
               maximising sum_a A[a, pi(a)] (E2), then the scaled matched pairs averaged (E4). The
               assignment is an argmax on detached values: gradient reaches the matched pairs only.
    sinkhorn   the relaxation: a soft assignment from Sinkhorn iterations on A / temperature, and
               the scaled pairs weighted by it (gradient through the plan and the pairs).
    chamfer    smooth-Chamfer of DivE (Kim et al., CVPR 2023), log-sum-exp with temperature tau.
    max        the best pair (MIL, PVSE).
    mean       the average of all pairs.
    topk       the paper's inference shortcut: the k largest pairs, scaled and averaged (no assignment).

Scaling of the values that are averaged (`scaling`): "mean" = the cosine itself, "exp" = e^cos - 1
(a third-party reading of E4; see docs/methods/maxmatch.md).

The exact assignment enumerates the injective maps from the smaller side to the larger one (K!
permutations for equal sizes) as a 0/1 matrix M (K_i*K_t, P): the total of every assignment of every
pair is one matrix product `A.flat @ M`, and the best column's mask picks the matched pairs. Beyond
`MAX_ENUMERATED` assignments the assignment is solved per pair by scipy's linear_sum_assignment on
the detached matrices (slow, a Python loop; exact).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SIMILARITIES = ("maxpair", "sinkhorn", "chamfer", "max", "mean", "topk")
SCALINGS = ("mean", "exp")
# assignments enumerated at most (6! = 720); larger problems go to scipy
MAX_ENUMERATED = 720
# float32 elements one scored tile may hold (cosines + assignment totals): 64 MiB
TILE_ELEMENTS = 2**24
# items on each side from which scoring uses `maxpair_table_scores`: with fewer (a search query is
# one item) its K x K thin products, each re-reading the other side, were 1.5-1.8x slower than the
# single product of the cosine tensor path (benchmarks/bench_sets.py --maxpair-paths, 1 thread)
TABLE_MIN_ITEMS = 64


def element_cosines(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(N, Ki, D) x (M, Kt, D) -> (N, M, Ki, Kt) dot products (cosines of unit elements), one matmul."""
    n, ki, d = img.shape
    m, kt, _ = txt.shape
    flat = img.reshape(n * ki, d) @ txt.reshape(m * kt, d).T  # (N*Ki, M*Kt)
    return flat.view(n, ki, m, kt).permute(0, 2, 1, 3)


def pair_cosines(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(P, Ki, D) x (P, Kt, D) aligned pairs -> (P, Ki, Kt)."""
    return img @ txt.transpose(1, 2)


def scale(values: torch.Tensor, scaling: str) -> torch.Tensor:
    if scaling == "mean":
        return values
    if scaling == "exp":
        return torch.expm1(values)
    raise ValueError(f"unknown scaling {scaling!r} (use {', '.join(SCALINGS)})")


# ------------------------------------------------------------------------------- assignment
def n_assignments(k_rows: int, k_cols: int) -> int:
    small, large = min(k_rows, k_cols), max(k_rows, k_cols)
    return math.perm(large, small)


@lru_cache(maxsize=32)
def _assignment_table(k_rows: int, k_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Every injective map between the rows and the columns of a (k_rows, k_cols) matrix:
    (P, min k) flat indices a * k_cols + b of its matched cells, and the (k_rows*k_cols, P) 0/1 matrix."""
    if k_rows <= k_cols:
        maps = [[a * k_cols + b for a, b in enumerate(cols)] for cols in itertools.permutations(range(k_cols), k_rows)]
    else:
        maps = [[a * k_cols + b for b, a in enumerate(rows)] for rows in itertools.permutations(range(k_rows), k_cols)]
    cells = np.asarray(maps, dtype=np.int64)
    onehot = np.zeros((k_rows * k_cols, len(maps)), dtype=np.float32)
    onehot[cells, np.arange(len(maps))[:, None]] = 1.0
    return cells, onehot


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the assignment totals (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def assignment_mask(cos: torch.Tensor) -> torch.Tensor:
    """(..., Ki, Kt) -> bool mask of the maximal one-to-one assignment (min(Ki, Kt) cells True),
    computed without gradient. Ties go to the first assignment in enumeration order."""
    *lead, ki, kt = cos.shape
    flat = cos.detach().reshape(-1, ki * kt)
    if n_assignments(ki, kt) > MAX_ENUMERATED:
        return _scipy_mask(flat.view(-1, ki, kt)).view(*lead, ki, kt)
    cells, onehot = _assignment_table(ki, kt)
    totals = _wide(flat) @ torch.as_tensor(onehot, device=flat.device, dtype=_wide(flat).dtype)  # (pairs, P)
    best = totals.argmax(1)
    chosen = torch.as_tensor(cells, device=flat.device)[best]  # (pairs, min k)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask.view(*lead, ki, kt)


def _scipy_mask(mats: torch.Tensor) -> torch.Tensor:
    """Hungarian (scipy) per matrix, for sets too large to enumerate."""
    from scipy.optimize import linear_sum_assignment

    arr = mats.float().cpu().numpy()
    mask = np.zeros(arr.shape, dtype=bool)
    for p in range(arr.shape[0]):
        rows, cols = linear_sum_assignment(arr[p], maximize=True)
        mask[p, rows, cols] = True
    return torch.from_numpy(mask).to(mats.device)


def maxpair_scores(cos: torch.Tensor, scaling: str = "mean") -> torch.Tensor:
    """(..., Ki, Kt) -> (...): mean of the scaled matched pairs of the maximal assignment (E2-E4).

    Gradient reaches only the matched cells (the mask is a detached argmax)."""
    *lead, ki, kt = cos.shape
    k = min(ki, kt)
    if n_assignments(ki, kt) <= MAX_ENUMERATED:
        # one product gives every assignment's total; the scaled values of the best one are a
        # second product restricted to its column (gather), so nothing (pairs x P x K) is built
        cells, onehot = _assignment_table(ki, kt)
        flat = cos.reshape(-1, ki * kt)
        scoring_only = scaling == "mean" and not (torch.is_grad_enabled() and cos.requires_grad)
        with torch.no_grad():
            wide = _wide(flat.detach())
            totals = wide @ torch.as_tensor(onehot, device=flat.device, dtype=wide.dtype)
            if scoring_only:
                # scoring only: the best total is the score, no gather needed
                return (totals.amax(1) / k).to(cos.dtype).view(*lead)
            best = totals.argmax(1)
        chosen = torch.as_tensor(cells, device=flat.device)[best]  # (pairs, k)
        matched = scale(flat.gather(1, chosen), scaling)
        return matched.mean(1).view(*lead)
    mask = assignment_mask(cos)
    return (scale(cos, scaling) * mask).sum((-2, -1)) / k


def maxpair_table_scores(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(N, Ki, D) x (M, Kt, D) -> (N, M): `maxpair_scores(element_cosines(img, txt))` with scaling
    "mean" and no gradient (evaluation and search), faster; the same values up to the rounding of the
    products (bit for bit on the 1,000 x 5,000 benchmark).

    The cosines are written element pair by element pair, A[a, b] = img[:, a] @ txt[:, b].T, so the
    (Ki*Kt, N*M) table is already in the layout the assignment product wants: no permuted copy of
    the cosines, and every assignment's total is one (P, Ki*Kt) @ (Ki*Kt, N*M) product whose maximum
    runs over its leading axis (contiguous rows, not a 24-wide row per pair)."""
    n, ki, _ = img.shape
    m, kt, _ = txt.shape
    cos = torch.empty(ki, kt, n, m, dtype=torch.result_type(img, txt), device=img.device)
    for a in range(ki):
        for b in range(kt):
            torch.matmul(img[:, a], txt[:, b].T, out=cos[a, b])
    _, onehot = _assignment_table(ki, kt)
    wide = _wide(cos.view(ki * kt, n * m))
    totals = torch.as_tensor(onehot.T, device=img.device, dtype=wide.dtype) @ wide  # (P, N*M)
    return (totals.amax(0) / min(ki, kt)).to(cos.dtype).view(n, m)


def sinkhorn_plan(cos: torch.Tensor, iterations: int, temperature: float) -> torch.Tensor:
    """(..., Ki, Kt) -> soft assignment with rows summing to 1 and columns to Ki/Kt (log domain)."""
    ki, kt = cos.shape[-2:]
    log_p = cos / temperature
    col_mass = math.log(ki / kt)
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True) + col_mass
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # end on rows: each row sums to 1
    return log_p.exp()


def sinkhorn_scores(cos: torch.Tensor, iterations: int = 10, temperature: float = 0.05,
                    scaling: str = "mean") -> torch.Tensor:
    plan = sinkhorn_plan(cos, iterations, temperature)
    return (plan * scale(cos, scaling)).sum((-2, -1)) / cos.shape[-2]


def chamfer_scores(cos: torch.Tensor, tau: float = 16.0) -> torch.Tensor:
    """Smooth-Chamfer (DivE): the mean over both directions of each element's log-sum-exp over the
    other set, divided by tau."""
    ki, kt = cos.shape[-2:]
    rows = torch.logsumexp(tau * cos, dim=-1).sum(-1) / (ki * tau)
    cols = torch.logsumexp(tau * cos, dim=-2).sum(-1) / (kt * tau)
    return (rows + cols) / 2


def topk_scores(cos: torch.Tensor, k: int, scaling: str = "mean") -> torch.Tensor:
    """Mean of the k largest scaled pairs of the whole Ki x Kt matrix (no one-to-one constraint)."""
    flat = cos.flatten(-2)
    k = max(1, min(k, flat.shape[-1]))
    return scale(flat.topk(k, dim=-1).values, scaling).mean(-1)


# ------------------------------------------------------------------------------- the callable
@dataclass(frozen=True)
class SetSimilarity:
    """One configured set similarity: `sim(img, txt)` -> (N, M), `sim.pairs(img, txt)` -> (P,).

    `topk = 0` means k = min(Ki, Kt), as many pairs as an assignment matches."""

    kind: str = "maxpair"
    scaling: str = "mean"
    tau: float = 16.0  # chamfer
    sinkhorn_iters: int = 10
    sinkhorn_temperature: float = 0.05
    topk: int = 0

    def __post_init__(self):
        if self.kind not in SIMILARITIES:
            raise ValueError(f"unknown set similarity {self.kind!r} (use {', '.join(SIMILARITIES)})")
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r} (use {', '.join(SCALINGS)})")

    def reduce(self, cos: torch.Tensor) -> torch.Tensor:
        """(..., Ki, Kt) element cosines -> (...) set scores."""
        if self.kind == "maxpair":
            return maxpair_scores(cos, self.scaling)
        if self.kind == "sinkhorn":
            return sinkhorn_scores(cos, self.sinkhorn_iters, self.sinkhorn_temperature, self.scaling)
        if self.kind == "chamfer":
            return chamfer_scores(cos, self.tau)
        if self.kind == "max":
            return cos.amax((-2, -1))
        if self.kind == "mean":
            return cos.mean((-2, -1))
        return topk_scores(cos, self.topk or min(cos.shape[-2:]), self.scaling)

    def __call__(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(N, Ki, D) x (M, Kt, D) -> (N, M)."""
        if (self.kind == "maxpair" and self.scaling == "mean" and min(len(img), len(txt)) >= TABLE_MIN_ITEMS
                and n_assignments(img.shape[1], txt.shape[1]) <= MAX_ENUMERATED
                and not (torch.is_grad_enabled() and (img.requires_grad or txt.requires_grad))):
            return maxpair_table_scores(img, txt)  # scoring only: the same values without the permuted copy
        return self.reduce(element_cosines(img, txt))

    def pairs(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(P, Ki, D) x (P, Kt, D) aligned pairs -> (P,), the diagonal of `__call__`."""
        return self.reduce(pair_cosines(img, txt))

    def rerank(self, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Exact scores of one image set (Ki, D) against caption sets (C, Kt, D) -> (C,): one row of
        `__call__`. The sides keep their places: for a caption query use `self(candidates, query[None])[:, 0]`
        (Sinkhorn is not symmetric). The search index scores through `model.similarity`, which does that."""
        return self.reduce(element_cosines(query[None], candidates))[0]

    def elements_per_pair(self, ki: int, kt: int) -> int:
        """float32 intermediates per scored pair, for the tile size."""
        extra = 2 * n_assignments(ki, kt) if self.kind == "maxpair" and n_assignments(ki, kt) <= MAX_ENUMERATED \
            else 3 * ki * kt
        return ki * kt + extra

    def score_block(self, ki: int, kt: int, rows: int = 256) -> tuple[int, int]:
        """(rows, columns) of pairs one call may score within TILE_ELEMENTS intermediates."""
        pairs = max(1, TILE_ELEMENTS // self.elements_per_pair(ki, kt))
        return (min(rows, pairs), max(1, pairs // min(rows, pairs)))


# ------------------------------------------------------------------------------- diagnostics
def within_set_cosine(sets: torch.Tensor) -> torch.Tensor:
    """(N, K, D) unit elements -> (N,) mean cosine of the K(K-1) ordered pairs of distinct elements.
    1 = a collapsed set (all elements equal)."""
    k = sets.shape[1]
    gram = sets @ sets.transpose(1, 2)
    off = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)
    return off / max(1, k * (k - 1))


def circular_variance(sets: torch.Tensor) -> torch.Tensor:
    """(N, K, D) unit elements -> (N,) circular (spherical) variance 1 - ||mean element||, in [0, 1];
    0 = collapsed. For unit vectors ||mean||^2 = 1/K + (1 - 1/K) * within_set_cosine."""
    return 1.0 - sets.mean(1).norm(dim=-1)


def collapse_diagnostics(sets: torch.Tensor) -> dict[str, float]:
    """Means over items: within-set cosine, circular variance and its natural log (the paper reports
    a negative, log-like "circular variance"; its definition is not known, see the docs)."""
    cv = circular_variance(sets.float())
    return {"within_cos": float(within_set_cosine(sets.float()).mean()),
            "circ_var": float(cv.mean()),
            "log_circ_var": float(torch.log(cv.clamp_min(1e-12)).mean())}
