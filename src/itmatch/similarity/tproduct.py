"""The t-product of third-order tensors and ridge least squares in its Fourier domain (HOSA Eq. 1-4, 9-11).

For A (n, l, d) and H (l, m, d), the t-product A * H (n, m, d) is `fold(bcirc(A) bvec(H))` (Eq. 2-4):
every output tube is a sum of circular convolutions along the third (embedding) axis,

    (A * H)(i, j, :) = sum_k A(i, k, :) (*) H(k, j, :).

A DFT along that axis turns the block-circulant matrix into d independent frontal slices (Theorem 9.1),
so A * H is one small matrix product per frequency: `ifft(fft(A)^(f) @ fft(H)^(f))`. Real inputs have
conjugate-symmetric spectra, so only the d//2 + 1 frequencies of `rfft` are computed and `irfft`
returns the real result.

`min_H ||B - A * H||_F^2 + ridge` (Eq. 1 and 11) is then one regularised least-squares problem per
frequency, solved from its normal equations `(A^H A + lam I) H = A^H B` with `torch.linalg.solve`,
batched over frequencies, differentiable (complex64 under float32 inputs). The ridge is relative:
`lam = ridge * trace(A^H A) / l` per frequency (plus a tiny floor), so it does not depend on the
scale of the features and keeps the slices of words or regions that no item of a batch fills solvable.

`domain="hadamard"` is HOSA's Hadamard-product ablation (Table 4): the same per-slice products and
solves in the original domain, one per embedding dimension, with no transform.

Layout: items and slots first, the embedding/frequency axis last (n, l, d); the normal equations and
the coefficient tensor are kept as (F, l, m), frequencies first, for batched solves.
"""

from __future__ import annotations

import torch

DOMAINS = ("fourier", "hadamard")
RIDGE_FLOOR = 1e-6


def to_domain(x: torch.Tensor, domain: str) -> torch.Tensor:
    """(..., d) real -> (..., F) spectrum along the last axis (F = d//2 + 1), or x itself (hadamard)."""
    if domain == "fourier":
        return torch.fft.rfft(x, dim=-1)
    if domain == "hadamard":
        return x
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def from_domain(x: torch.Tensor, d: int, domain: str) -> torch.Tensor:
    return torch.fft.irfft(x, n=d, dim=-1) if domain == "fourier" else x


def t_product(a: torch.Tensor, h: torch.Tensor, domain: str = "fourier") -> torch.Tensor:
    """A (n, l, d) * H (l, m, d) -> (n, m, d): the t-product (fourier) or the facewise product (hadamard)."""
    d = a.shape[-1]
    out = torch.einsum("nlf,lmf->nmf", to_domain(a, domain), to_domain(h, domain))
    return from_domain(out, d, domain)


def normal_equations(a: torch.Tensor, b: torch.Tensor, domain: str = "fourier") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency Gram A^H A (F, l, l) and moment A^H B (F, l, m) of the fit B ~ A * H, summed over n."""
    af, bf = to_domain(a, domain), to_domain(b, domain)
    gram = torch.einsum("nkf,nlf->fkl", af.conj(), af)
    moment = torch.einsum("nkf,nmf->fkm", af.conj(), bf)
    return gram, moment


def _ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """lam * I per frequency, lam = ridge * mean diagonal of the Gram (+ floor)."""
    size = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)  # (F,)
    lam = ridge * scale + RIDGE_FLOOR
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    return lam[:, None, None].to(gram.dtype) * eye


def solve_normal_equations(gram: torch.Tensor, moment: torch.Tensor, ridge: float) -> torch.Tensor:
    """H (F, l, m) in the transform domain: (gram + lam I)^-1 moment, one batched solve."""
    return torch.linalg.solve(gram + _ridge(gram, ridge), moment)


def fit_coefficients(a: torch.Tensor, b: torch.Tensor, ridge: float, domain: str = "fourier") -> torch.Tensor:
    """argmin_H ||B - A * H||^2 + ridge, in the transform domain: (F, l, m) (Eq. 1 via Eq. 11)."""
    return solve_normal_equations(*normal_equations(a, b, domain), ridge)


def coefficients_to_tensor(h: torch.Tensor, d: int, domain: str = "fourier") -> torch.Tensor:
    """(F, l, m) transform-domain coefficients -> the real tensor H (l, m, d) of Eq. 1."""
    return from_domain(h.permute(1, 2, 0), d, domain)


def reconstruction_projector(h: torch.Tensor, ridge: float) -> torch.Tensor:
    """(F, m, m) P = H^H (H H^H + lam I)^-1 H per frequency: x P is the ridge least-squares
    reconstruction of a target x (1, m) from the best source code z, argmin ||x - z H||^2 + lam ||z||^2.

    For an item whose fragments H reconstructs exactly (x = z H), x P = x (up to the ridge): the
    projection is how an item is reconstructed when the paired item of the other modality is unknown.
    """
    hh = h @ h.conj().transpose(-1, -2)  # (F, l, l)
    return h.conj().transpose(-1, -2) @ torch.linalg.solve(hh + _ridge(hh, ridge), h)


def apply_projector(x: torch.Tensor, projector: torch.Tensor, domain: str = "fourier") -> torch.Tensor:
    """x (n, m, d) -> x * P (n, m, d): each item reconstructed through the projector (F, m, m)."""
    d = x.shape[-1]
    out = torch.einsum("nif,fij->njf", to_domain(x, domain), projector)
    return from_domain(out, d, domain)
