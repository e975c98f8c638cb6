"""Triton batched Jacobi eigensolver vs ``torch.linalg.eigh``, and the closed-form fit on it.

Eigenvectors are compared through what does not depend on their sign or on a rotation within a
repeated eigenvalue: eigenvalues, ``V diag(w) V^T = A`` and ``V^T V = I``. Outputs are poisoned
(NaN) by the kernel's wrapper only through ``torch.empty``; every element is checked.
"""

import pytest
import torch

from tests.ops.triton_env import CPU_OK, DEVICE  # noqa: F401  (sets TRITON_INTERPRET first)

triton = pytest.importorskip("triton")

from megatron_dsv.ops.eigh import batched_eigh  # noqa: E402


def spd(b, n, kind, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    if kind == "wishart":
        a = x @ x.mT
    else:
        q, _ = torch.linalg.qr(x)
        if kind == "graded":  # eigenvalues over 12 decades
            w = torch.logspace(0, -12, n, dtype=torch.float64)
        elif kind == "repeated":  # one eigenvalue three times, and a zero one
            w = torch.linspace(1, 2, n, dtype=torch.float64)
            w[:3], w[-1] = 1.5, 0.0
        else:  # indefinite
            w = torch.linspace(-1, 1, n, dtype=torch.float64)
        a = q @ torch.diag_embed(w.expand(b, n)) @ q.mT
    return (0.5 * (a + a.mT)).to(DEVICE, dtype)


def check(a, w, v, rtol):
    want = torch.linalg.eigh(a.double().cpu()).eigenvalues
    w, v, a = w.double().cpu(), v.double().cpu(), a.double().cpu()
    scale = a.flatten(1).norm(dim=-1).view(-1, 1)
    assert bool(torch.isfinite(w).all() & torch.isfinite(v).all())
    assert float(((w - want).abs() / scale).max()) < rtol
    assert bool((w[:, 1:] >= w[:, :-1]).all())  # ascending, as torch.linalg.eigh
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    assert float((v.mT @ v - eye).abs().max()) < 10 * rtol
    assert float(((v @ torch.diag_embed(w) @ v.mT - a).flatten(1).norm(dim=-1) / scale[:, 0]).max()) < 10 * rtol


@CPU_OK
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("kind", ["wishart", "graded", "repeated", "indefinite"])
def test_jacobi_matches_eigh(n, kind):
    if kind == "repeated" and n < 4:
        pytest.skip("needs 4 eigenvalues")
    a = spd(3, n, kind, seed=n)
    w, v = batched_eigh(a, backend="triton")
    check(a, w, v, rtol=1e-13)


@CPU_OK
def test_jacobi_reads_the_lower_triangle_fp32_and_padding():
    """n = 5 pads to 8 (padded rows must stay decoupled); garbage in the upper triangle is
    ignored, as by torch.linalg.eigh; fp32 in, fp32 out (fp64 inside)."""
    a = spd(2, 5, "wishart", seed=1)
    garbage = a + torch.triu(torch.full_like(a, 7.0), diagonal=1)
    w, v = batched_eigh(garbage, backend="triton")
    check(a, w, v, rtol=1e-13)
    w32, v32 = batched_eigh(a.float(), backend="triton")
    assert w32.dtype == v32.dtype == torch.float32
    check(a, w32, v32, rtol=1e-6)
    z = torch.zeros(1, 4, 4, dtype=torch.float64, device=DEVICE)
    w, v = batched_eigh(z, backend="triton")
    assert bool((w == 0).all()) and torch.equal(v.cpu(), torch.eye(4, dtype=torch.float64)[None])


def test_batched_eigh_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, n, n\]"):
        batched_eigh(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="fp32 or fp64"):
        batched_eigh(torch.zeros(1, 3, 3, dtype=torch.bfloat16))


@CPU_OK
def test_batched_eigh_rejects_matrices_the_kernel_cannot_hold():
    with pytest.raises(ValueError, match="up to 128"):
        batched_eigh(torch.zeros(1, 129, 129, dtype=torch.float64, device=DEVICE), backend="triton")


@CPU_OK
def test_closed_form_fit_on_the_jacobi_kernel_equals_the_reference_eigensolver():
    """The fit's Rayleigh-Ritz step on the kernel (CUDA's path) gives the reference's weights
    (the sign convention makes them comparable) and residual."""
    from megatron_dsv.layers.predictor import reduced_rank_fit

    h, d, r = 2, 8, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h, d, 3 * d, generator=g, dtype=torch.float64)
    c_q, c_k = (m @ m.mT for m in x)
    start = torch.randn(h, d, r, generator=g, dtype=torch.float64)
    want = reduced_rank_fit(c_q, c_k, start, backend="reference")
    got = reduced_rank_fit(c_q.to(DEVICE), c_k.to(DEVICE), start.to(DEVICE), backend="triton")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
