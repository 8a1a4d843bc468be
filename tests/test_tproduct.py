"""The t-product and its Fourier-domain least squares (HOSA Eq. 1-4, 11) against their definitions."""

from __future__ import annotations

import torch

from itmatch.similarity.tproduct import (
    apply_projector,
    coefficients_to_tensor,
    fit_coefficients,
    reconstruction_projector,
    t_product,
    to_domain,
)


def bcirc(a: torch.Tensor) -> torch.Tensor:
    """Eq. 3 built explicitly: (n*d, nw*d), block (i, j) is the frontal slice A^((i - j) mod d)."""
    n, nw, d = a.shape
    out = torch.zeros(n * d, nw * d, dtype=a.dtype)
    for i in range(d):
        for j in range(d):
            out[i * n:(i + 1) * n, j * nw:(j + 1) * nw] = a[:, :, (i - j) % d]
    return out


def bvec(h: torch.Tensor) -> torch.Tensor:
    """Eq. 4: the frontal slices stacked, (nw*d, m)."""
    return torch.cat([h[:, :, k] for k in range(h.shape[2])], 0)


def fold(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return torch.stack([x[k * n:(k + 1) * n] for k in range(d)], -1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_t_product_equals_the_block_circulant_definition():
    for d in (5, 6):  # odd and even lengths (the Nyquist bin of rfft)
        a, h = rand(3, 4, d, seed=d), rand(4, 2, d, seed=d + 1)
        explicit = fold(bcirc(a) @ bvec(h), 3, d)
        torch.testing.assert_close(t_product(a, h), explicit, rtol=1e-12, atol=1e-12)
        # the tube form of the text: sum over k of circular convolutions
        conv = torch.zeros(3, 2, d, dtype=torch.float64)
        for i in range(3):
            for j in range(2):
                for k in range(4):
                    for t in range(d):
                        conv[i, j, t] += sum(a[i, k, s] * h[k, j, (t - s) % d] for s in range(d))
        torch.testing.assert_close(t_product(a, h), conv, rtol=1e-12, atol=1e-12)


def test_hadamard_variant_is_the_facewise_product():
    a, h = rand(3, 4, 5), rand(4, 2, 5, seed=1)
    expected = torch.stack([a[:, :, k] @ h[:, :, k] for k in range(5)], -1)
    torch.testing.assert_close(t_product(a, h, "hadamard"), expected)


def test_fourier_solve_equals_lstsq_on_the_block_circulant_system():
    n, nw, m, d = 9, 3, 2, 6
    a, b = rand(n, nw, d, seed=2), rand(n, m, d, seed=3)
    h = coefficients_to_tensor(fit_coefficients(a, b, ridge=0.0), d)
    reference = torch.linalg.lstsq(bcirc(a), bvec(b).reshape(d * n, m)).solution  # bvec(B) is (n*d, m)
    torch.testing.assert_close(bvec(h), reference, rtol=1e-6, atol=1e-6)


def test_ridge_solve_equals_lstsq_of_the_augmented_system_per_frequency():
    n, nw, m, d, ridge = 4, 5, 3, 6, 0.3  # fewer pairs than word slots: only the ridge makes it solvable
    a, b = rand(n, nw, d, seed=4), rand(n, m, d, seed=5)
    h = fit_coefficients(a, b, ridge)
    af, bf = to_domain(a, "fourier"), to_domain(b, "fourier")
    for f in range(d // 2 + 1):
        af_f, bf_f = af[:, :, f], bf[:, :, f]
        lam = ridge * (af_f.conj().T @ af_f).diagonal().real.mean() + 1e-6
        stacked = torch.cat([af_f, lam.sqrt() * torch.eye(nw, dtype=af_f.dtype)])
        target = torch.cat([bf_f, torch.zeros(nw, m, dtype=bf_f.dtype)])
        torch.testing.assert_close(h[f], torch.linalg.lstsq(stacked, target).solution, rtol=1e-8, atol=1e-8)


def test_projection_keeps_what_h_reconstructs_and_shrinks_the_rest():
    nw, m, d = 2, 5, 8
    h = rand(nw, m, d, seed=6)
    hf = to_domain(h, "fourier").permute(2, 0, 1)  # (F, nw, m)
    p = reconstruction_projector(hf, ridge=1e-9)
    inside = t_product(rand(3, nw, d, seed=7), h)  # items that H reconstructs exactly
    torch.testing.assert_close(apply_projector(inside, p), inside, rtol=1e-5, atol=1e-5)
    outside = rand(3, m, d, seed=8)
    assert apply_projector(outside, p).norm() < outside.norm()  # rank nw < m: part of it is not reachable


def test_gradients_flow_through_the_fit_and_the_projection():
    n, nw, m, d = 4, 2, 3, 4

    def reconstruct(a, b):
        p = reconstruction_projector(fit_coefficients(a, b, ridge=0.1), ridge=0.1)
        return apply_projector(b, p)

    a = rand(n, nw, d, seed=9).requires_grad_()
    b = rand(n, m, d, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(reconstruct, (a, b), eps=1e-6, atol=1e-5)
    h = rand(nw, m, d, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(t_product, (a, h), eps=1e-6, atol=1e-5)
