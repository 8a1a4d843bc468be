"""DIAS (Ma et al., ACM MM 2024): dimension information alignment + sparse spatial constraints.

Three training-only terms that any method with fragments (regions, words) and global embeddings can
add to its objective (see `docs/methods/dias.md` for the equation-to-code map and every reading of
the paper made here):

- `dimension_correlation` + `dimension_alignment_loss`: the d x d correlation C between image and
  text dimension vectors (Eq. 4) and the row/column-normalised L_dim (Eq. 6);
- `inter_discrepancy` / `intra_discrepancy`: |X - X^T| (Eq. 7-8) and |Y - Z| (Eq. 9-10);
- `SparseSpatialLoss`: the sparse correlation algorithm (Eq. 11-16) with a learnable beta.

`DIASRegularizer` bundles them with the weights of Eq. 17. Everything is computed in at least
float32, even under autocast: C and the row statistics are sums over thousands of entries.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.config import Config, check_values
from itmatch.errors import ItmatchError

Distance = Literal["cosine", "euclidean"]
Sparsity = Literal["soft", "hard", "none", "topk", "l1"]
DimSamples = Literal["pairs", "pooled"]
DimReduction = Literal["sum", "mean"]
TERMS = ("dim", "inter", "intra")
DISTANCES = typing.get_args(Distance)
SPARSITIES = typing.get_args(Sparsity)
DIM_SAMPLES = typing.get_args(DimSamples)
_EPS = 1e-6


@dataclass
class DiasConfig:
    """The `dias:` config section (registered by `itmatch.methods.dias` for the dias method and the
    dias regularizer): the weights of Eq. 17 and the readings of the paper this module offers."""

    # w_dim: calibrated, not the paper's 10 (which goes with dim_reduction "sum" at d = 1024): with the
    # mean over d, w_dim * ||grad L_dim|| is ~11% of the triplet's gradient at initialisation and ~80%
    # on a trained vse model, on fixed scenes batches (benchmarks/dias_grad_shares.py; documented band
    # at initialisation 2-30%, docs/methods/dias.md "Calibration").
    w_dim: float = 100.0
    w_inter: float = 0.05
    w_intra: float = 0.1
    dim_reduction: DimReduction = "mean"  # L_dim over the d dimensions: paper's sum, or the mean (sum / d)
    terms: list[str] = field(default_factory=lambda: list(TERMS))  # which of Eq. 17's regularizers to train
    # w_inter and w_intra grow linearly from 0 to their value over this many steps (0 = from the first
    # step, as the paper): at initialisation the spatial terms' gradient outweighs the triplet's.
    spatial_warmup_steps: int = 0
    distance: Distance = "cosine"
    sparsity: Sparsity = "soft"  # soft (relaxed learnable mask) | hard (binary, Eq. 14) | none | topk | l1
    beta_init: float = 0.0
    mask_temperature: float = 0.05  # relaxation temperature of the soft mask
    topk: int = 10  # sparsity: topk
    l1_weight: float = 0.01  # sparsity: l1
    # Eq. 4's dimension vectors: pairs = every (region, word) of each matched pair; pooled = mean fragments
    dim_samples: DimSamples = "pairs"
    dim_center: bool = False  # centre the dimension vectors first (Pearson instead of the paper's cosine)

    def check(self, cfg: Config | None = None) -> None:
        check_values(self, "dias", [
            ("w_dim", self.w_dim >= 0, ">= 0"),
            ("w_inter", self.w_inter >= 0, ">= 0"),
            ("w_intra", self.w_intra >= 0, ">= 0"),
            ("mask_temperature", self.mask_temperature > 0, "> 0"),
            ("topk", self.topk >= 1, ">= 1"),
            ("l1_weight", self.l1_weight >= 0, ">= 0"),
            ("dim_reduction", self.dim_reduction in typing.get_args(DimReduction), "sum or mean"),
            ("terms", bool(self.terms) and set(self.terms) <= set(TERMS) and len(set(self.terms)) == len(self.terms),
             f"a non-empty list of distinct names among {', '.join(TERMS)}"),
            ("spatial_warmup_steps", self.spatial_warmup_steps >= 0, ">= 0"),
        ])


# --------------------------------------------------------------------- dimension alignment
def _full(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half / bfloat16 under autocast are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked(frag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    frag = _full(frag)
    return frag * mask[..., None].to(frag.dtype)


def dimension_correlation(img_frag: torch.Tensor, img_mask: torch.Tensor, txt_frag: torch.Tensor,
                          txt_mask: torch.Tensor, positives: torch.Tensor | None = None, samples: str = "pairs",
                          center: bool = False) -> torch.Tensor:
    """C[i, j] = cosine between image dimension vector i and text dimension vector j (Eq. 4), (d, d).

    The paper's vectors have different lengths (all N_v regions vs all N_t words of the batch), so
    they are aligned through the matched pairs, the True cells (a, b) of `positives` (image row a,
    caption row b; None = the diagonal, i.e. rows aligned):
      - "pairs": one sample per (region r, word w) of every matched pair, i.e. the image vector
        repeats each region of image a once per word of each of its captions, and the text vector
        each word of caption b once per region of its image. In closed form
        <m_i^V, m_j^T> = sum_ab P_ab S^v_ai S^t_bj with S the masked fragment sums, and the squared
        norms are sums of squares of the real fragments weighted by those repeat counts;
      - "pooled": one sample per matched pair, the mean fragment of each side.
    `center=True` subtracts each expanded vector's mean first (Pearson correlation, not cosine).
    Padding (mask False) never enters any sum.
    """
    if samples not in DIM_SAMPLES:
        raise ItmatchError(f"unknown dimension samples {samples!r} (use {', '.join(DIM_SAMPLES)})")
    v, t = _masked(img_frag, img_mask), _masked(txt_frag, txt_mask)
    n_v = img_mask.sum(1).to(v.dtype)  # (B_img,)
    n_t = txt_mask.sum(1).to(v.dtype)  # (B_txt,)
    pairs = torch.eye(len(n_v), device=v.device, dtype=v.dtype) if positives is None else positives.to(v.dtype)
    t = t.to(v.dtype)
    if samples == "pooled":
        a = v.sum(1) / n_v.clamp_min(1)[:, None]  # (B, d) mean fragments
        b = t.sum(1) / n_t.clamp_min(1)[:, None]
        ia, ib = pairs.nonzero(as_tuple=True)
        a, b = a[ia], b[ib]  # one row per matched pair
        if center:
            a, b = a - a.mean(0), b - b.mean(0)
        return F.normalize(a, dim=0, eps=_EPS).T @ F.normalize(b, dim=0, eps=_EPS)
    w_v = pairs @ n_t  # how often each region of image a is repeated: words over its captions
    w_t = pairs.T @ n_v  # how often each word of caption b is repeated
    if center:
        total = (w_v * n_v).sum().clamp_min(1)
        mean_v = (w_v[:, None] * v.sum(1)).sum(0) / total  # (d,) means of the expanded vectors
        mean_t = (w_t[:, None] * t.sum(1)).sum(0) / total
        v = _masked(v - mean_v, img_mask)
        t = _masked(t - mean_t, txt_mask)
    s_v, s_t = v.sum(1), t.sum(1)  # (B, d)
    norm_v = (w_v[:, None] * (v * v).sum(1)).sum(0).clamp_min(_EPS**2).sqrt()  # (d,)
    norm_t = (w_t[:, None] * (t * t).sum(1)).sum(0).clamp_min(_EPS**2).sqrt()
    return (s_v.T @ pairs @ s_t) / (norm_v[:, None] * norm_t[None, :])


def dimension_alignment_loss(corr: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_dim of Eq. 6: -sum_i (c_ii / sum_j |c_ij| + c_ii / sum_j |c_ji|), or that sum / d ("mean").

    The mean lies in [-2, 2] and keeps w_dim meaningful whatever the embedding size; the paper's sum
    is d times larger (its w_dim = 10 at d = 1024). Which scale, and the weight that goes with it,
    is explicit in the config (`dias.dim_reduction`, `dias.w_dim`).

    The denominators use |c|: cosines can be negative, and a signed row sum near zero (or below it)
    would make the ratio explode or flip sign. With |c| each ratio lies in [-1, 1], reaches 1 only
    when c_ii is positive and every other entry of its row (column) is zero, and equals the paper's
    formula whenever C is non-negative. A negative correlation between two different dimensions is
    redundancy too, so it is pushed towards zero like a positive one.
    """
    diag = corr.diagonal()
    abs_corr = corr.abs()
    rows = abs_corr.sum(1).clamp_min(_EPS)
    cols = abs_corr.sum(0).clamp_min(_EPS)
    ratios = diag / rows + diag / cols
    if reduction not in typing.get_args(DimReduction):
        raise ItmatchError(f"config key 'dias.dim_reduction': unknown value {reduction!r} (use sum, mean)")
    return -(ratios.sum() if reduction == "sum" else ratios.mean())


# ------------------------------------------------------------------------ spatial matrices
def pairwise_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(len(a), len(b)) distances: 1 - cosine, or euclidean (safe gradient at zero distance)."""
    a, b = _full(a), _full(b)
    b = b.to(a.dtype)
    if kind == "cosine":
        return 1.0 - F.normalize(a, dim=-1, eps=_EPS) @ F.normalize(b, dim=-1, eps=_EPS).T
    if kind == "euclidean":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return sq.clamp_min(1e-12).sqrt()  # clamped: sqrt has an infinite gradient at 0
    raise ItmatchError(f"config key 'dias.distance': unknown distance {kind!r} (use {', '.join(DISTANCES)})")


def inter_discrepancy(img: torch.Tensor, txt: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """L_x = |X - X^T| with X_ij = sigma_x(V_i, T_j) (Eq. 7-8), (N, N), symmetric."""
    x = pairwise_distance(img, txt, kind)
    return (x - x.T).abs()


def intra_discrepancy(img: torch.Tensor, txt: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """L_yz = |Y - Z| with Y_ij = sigma_y(V_i, V_j), Z_ij = sigma_z(T_i, T_j) (Eq. 9-10), (N, N)."""
    return (pairwise_distance(img, img, kind) - pairwise_distance(txt, txt, kind)).abs()


# ------------------------------------------------------------------ sparse correlation
def dependency(discrepancy: torch.Tensor) -> torch.Tensor:
    """Eq. 11: p = sigmoid(-|x_ij - x_ji|); larger p = stronger dependency (more consistent pair)."""
    return torch.sigmoid(-discrepancy)


def _masked_stats(p: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of p over the valid entries along `dim`, keepdim."""
    w = valid.to(p.dtype)
    n = w.sum(dim, keepdim=True).clamp_min(1)
    mean = (p * w).sum(dim, keepdim=True) / n
    var = (((p - mean) ** 2) * w).sum(dim, keepdim=True) / n
    return mean, var.sqrt()


def dependency_zscores(p: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p - mu) / theta against each row's and each column's statistics (Eq. 12), detached.

    The threshold kappa = mu + beta * theta is then simply z > beta, so beta is in units of the
    row's (column's) standard deviation, whatever the scale of the distances.
    """
    p = p.detach()
    mu_r, th_r = _masked_stats(p, valid, 1)
    mu_c, th_c = _masked_stats(p, valid, 0)
    return (p - mu_r) / th_r.clamp_min(1e-12), (p - mu_c) / th_c.clamp_min(1e-12)


def relation_mask(discrepancy: torch.Tensor, valid: torch.Tensor, mode: str, beta: torch.Tensor | None = None,
                  temperature: float = 0.05, topk: int = 10) -> torch.Tensor:
    """B of Eq. 13-14 (float, zero outside `valid`): which relations the spatial terms keep.

    A relation (i, j) is kept when its dependency p_ij passes both its row's threshold kappa_i and
    its column's threshold kappa_j, i.e. p_ij > max(kappa_i, kappa_j). Eq. 14 as printed compares
    |x_ij - x_ji| with a threshold built from p values; here both sides are in p space.
      - "hard": the binary mask of Eq. 14 (beta = [row, column] thresholds, no gradient);
      - "soft": sigmoid((z - beta) / temperature) for the row times the same for the column, a
        relaxed AND through which beta gets a gradient; it tends to "hard" as temperature -> 0;
      - "topk": the k most dependent relations of the row AND of the column;
      - "none" and "l1": every valid relation.
    The mask is a selector: it is built from detached discrepancies and never moves the embeddings.
    """
    valid_f = valid.to(_full(discrepancy).dtype)
    if mode in ("none", "l1"):
        return valid_f
    p = dependency(_full(discrepancy.detach()))
    if mode == "topk":
        k = max(1, min(int(topk), p.shape[1]))
        scores = p.masked_fill(~valid, -1.0)
        row_kth = scores.topk(k, dim=1).values[:, -1:]
        col_kth = scores.topk(min(k, p.shape[0]), dim=0).values[-1:, :]
        return ((scores >= row_kth) & (scores >= col_kth) & valid).to(p.dtype)
    z_row, z_col = dependency_zscores(p, valid)
    if beta is None:
        beta = torch.zeros(2, device=p.device)
    if mode == "hard":
        return ((z_row > beta[0]) & (z_col > beta[1]) & valid).to(p.dtype)
    if mode == "soft":
        keep = torch.sigmoid((z_row - beta[0]) / temperature) * torch.sigmoid((z_col - beta[1]) / temperature)
        return keep * valid_f
    raise ItmatchError(f"config key 'dias.sparsity': unknown value {mode!r} (use {', '.join(SPARSITIES)})")


class SparseSpatialLoss(nn.Module):
    """Sparse L_inter (Eq. 15) or L_intra (Eq. 16) on one discrepancy matrix, with its own beta.

    Returns (loss, extras). `loss` = sum_ij b_ij * l_ij^2 over the valid (unmatched) relations.
    With sparsity "soft", beta is an `nn.Parameter` and `extras["drop"]` is the price it pays for
    every dropped relation: sum_ij (1 - b_ij) * mean(l^2), detached. Without a price, the only way
    beta could lower sum b * l^2 is to drop everything, so gradient descent would drive it to
    +inf; with it, beta settles where the relations at the threshold have l^2 equal to the mean
    l^2 of the batch (a truncated quadratic whose truncation point beta learns). "l1" adds
    `l1_weight * sum |l|` (the paper's L1 sparse ablation) to the dense squared sum.
    """

    def __init__(self, mode: str = "soft", beta_init: float = 0.0, temperature: float = 0.05, topk: int = 10,
                 l1_weight: float = 0.01):
        super().__init__()
        if mode not in SPARSITIES:
            raise ItmatchError(f"config key 'dias.sparsity': unknown value {mode!r} (use {', '.join(SPARSITIES)})")
        if mode == "soft" and not temperature > 0:
            raise ItmatchError(f"config key 'dias.mask_temperature' must be > 0, got {temperature}")
        if mode == "topk" and topk < 1:
            raise ItmatchError(f"config key 'dias.topk' must be >= 1, got {topk}")
        self.mode, self.temperature, self.topk, self.l1_weight = mode, float(temperature), int(topk), float(l1_weight)
        init = torch.full((2,), float(beta_init))  # [image/row side, text/column side]
        if mode == "soft":
            self.beta = nn.Parameter(init)
        else:  # a fixed threshold: the binary mask passes no gradient, so beta would never move
            self.register_buffer("beta", init)

    def forward(self, discrepancy: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        b = relation_mask(discrepancy, valid, self.mode, self.beta, self.temperature, self.topk)
        sq = _full(discrepancy) ** 2
        extras: dict[str, torch.Tensor] = {}
        if self.mode == "soft":
            loss = (b.detach() * sq).sum()
            price = (sq.detach() * valid).sum() / valid.sum().clamp_min(1)
            # b carries beta's gradient: d/dbeta sum(b * (l^2 - price)) is zero where the kept and
            # dropped relations at the threshold cost the same.
            extras["drop"] = ((valid.to(b.dtype) - b) * price).sum() + (b * sq.detach()).sum() - (
                b.detach() * sq.detach()).sum()
        else:
            loss = (b * sq).sum()
            if self.mode == "l1":
                extras["l1"] = self.l1_weight * (_full(discrepancy).abs() * valid).sum()
        extras["kept"] = (b.detach().sum() / valid.sum().clamp_min(1))
        return loss, extras


# ------------------------------------------------------------------------ the regularizer
class DIASRegularizer(nn.Module):
    """w_dim * L_dim + w_inter * L_inter + w_intra * L_intra (the regularizers of Eq. 17).

    `forward(out, positives)` reads the model output dict (img, txt, img_frag, img_mask, txt_frag,
    txt_mask; rows of img and txt aligned: row k of both is one pair) and `positives` (B, B), True
    where image row a and caption row b show the same image. It returns the unweighted paper terms
    "dim", "inter", "intra"; "inter_kept"/"intra_kept" (fraction of the unmatched relations the mask
    keeps; logged only); "inter_drop"/"intra_drop" (soft mode: the price beta pays for dropping) or
    "inter_l1"/"intra_l1" (l1 mode); and "loss" = the weighted sum of the gradient-carrying terms.
    A term whose weight is 0 is not computed. Matched relations (the diagonal, and two captions of
    one image) are not "unmatched pairs" and are excluded from both spatial terms; with `negatives`
    (`loss.negatives: relevance`), neither is a pair where either caption is relevant to the other image.
    """

    def __init__(self, cfg: DiasConfig | None = None):
        super().__init__()
        cfg = cfg or DiasConfig()  # its values are checked when the config is loaded (DiasConfig.check)
        dim_samples, dim_center = cfg.dim_samples, cfg.dim_center
        # a term left out of dias.terms is a term of weight 0: never computed
        on = set(cfg.terms)
        self.w_dim, self.w_inter, self.w_intra = (float(w) if t in on else 0.0 for t, w in (
            ("dim", cfg.w_dim), ("inter", cfg.w_inter), ("intra", cfg.w_intra)))
        self.dim_reduction, self.spatial_warmup_steps = cfg.dim_reduction, int(cfg.spatial_warmup_steps)
        self.distance, self.dim_samples, self.dim_center = cfg.distance, dim_samples, bool(dim_center)
        args = dict(mode=cfg.sparsity, beta_init=cfg.beta_init, temperature=cfg.mask_temperature, topk=cfg.topk,
                    l1_weight=cfg.l1_weight)
        self.inter = SparseSpatialLoss(**args)
        self.intra = SparseSpatialLoss(**args)

    def spatial_ramp(self, progress=None) -> float:
        """The factor on w_inter and w_intra: step / spatial_warmup_steps, capped at 1 (1 without progress)."""
        if self.spatial_warmup_steps <= 0 or progress is None:
            return 1.0
        return min(1.0, progress.step / self.spatial_warmup_steps)

    def forward(self, out: dict, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                progress=None) -> dict[str, torch.Tensor]:
        needed = ["img", "txt"] + (["img_frag", "img_mask", "txt_frag", "txt_mask"] if self.w_dim > 0 else [])
        missing = [k for k in needed if out.get(k) is None]
        if missing:
            raise ItmatchError(f"config key 'loss.regularizers': dias needs the model outputs {', '.join(missing)}, "
                               "which this method does not produce (dias.terms without dim drops the fragment term)")
        img, txt = out["img"], out["txt"]
        if img.shape[0] != txt.shape[0] or positives.shape != (img.shape[0], txt.shape[0]):
            raise ItmatchError("dias needs aligned training batches: as many captions as images, row k a pair")
        terms: dict[str, torch.Tensor] = {}
        total = _full(img).new_zeros(())
        if self.w_dim > 0:
            corr = dimension_correlation(out["img_frag"], out["img_mask"], out["txt_frag"], out["txt_mask"],
                                         positives, self.dim_samples, self.dim_center)
            terms["dim"] = dimension_alignment_loss(corr, self.dim_reduction)
            total = total + self.w_dim * terms["dim"]
        # rows are aligned, so relation (i, j) is unmatched when neither (image i, caption j) nor
        # (image j, caption i) may be matched: with image ids alone, when images i and j differ; with
        # `negatives` from relevance, also never when either caption is relevant to the other image.
        negatives = ~positives if negatives is None else negatives
        unmatched = negatives & negatives.T
        ramp = self.spatial_ramp(progress)
        for name, weight, sparse, make in (("inter", self.w_inter, self.inter, inter_discrepancy),
                                           ("intra", self.w_intra, self.intra, intra_discrepancy)):
            if weight <= 0:
                continue
            weight = weight * ramp  # still computed at ramp 0, so beta and the logs see every step
            loss, extras = sparse(make(img, txt, self.distance), unmatched)
            terms[name] = loss
            total = total + weight * loss
            for key, value in extras.items():
                terms[f"{name}_{key}"] = value
                if key != "kept":
                    total = total + weight * value
        terms["loss"] = total
        return terms
