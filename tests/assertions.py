"""Matrix assertions shared by the test suites (STYLE.md §2.7)."""

import torch
from torch import Tensor


def assert_symmetric(A: Tensor, *, atol: float = 0.0) -> None:
    """``A == Aᵀ`` per block; exactly (bit for bit) when ``atol == 0``."""
    if atol == 0.0:
        bad = (A != A.mT).sum().item()
        assert bad == 0, f"not exactly symmetric: {bad} entries differ from their transpose"
    else:
        err = (A - A.mT).abs().max().item()
        assert err <= atol, f"not symmetric: max |A - Aᵀ| = {err:.3e} > {atol:.1e}"


def assert_psd(A: Tensor, *, rel: float = 1e-10) -> None:
    """Every eigenvalue ``≥ −rel · max|λ|`` (computed in float64), per block."""
    lam = torch.linalg.eigvalsh(A.to(torch.float64))
    scale = lam.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float64).tiny)
    worst = (lam.amin(dim=-1) / scale).min().item()
    assert worst >= -rel, f"not PSD: min λ / max |λ| = {worst:.3e} < -{rel:.1e}"


def assert_close_to_identity(M: Tensor, *, diag_atol: float, offdiag_atol: float) -> None:
    """``M ≈ I`` per block with separate tolerances on the diagonal and off it."""
    n = M.shape[-1]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    diag_err = (torch.diagonal(M, dim1=-2, dim2=-1) - 1).abs().max().item() if n else 0.0
    off = (M - M * eye).abs().max().item() if n else 0.0
    assert diag_err <= diag_atol, f"diagonal deviates from 1 by {diag_err:.3e} > {diag_atol:.1e}"
    assert off <= offdiag_atol, f"off-diagonal entry of size {off:.3e} > {offdiag_atol:.1e}"


def assert_orthonormal(Q: Tensor, *, atol: float) -> None:
    """``Qᵀ Q ≈ I`` per block."""
    assert_close_to_identity(Q.mT @ Q, diag_atol=atol, offdiag_atol=atol)


def assert_nearly_diagonal(A: Tensor, *, rtol: float) -> None:
    """Off-diagonal entries ``≤ rtol · max|A|`` per block."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    off = (A - A * eye).abs().amax(dim=(-2, -1))
    scale = A.abs().amax(dim=(-2, -1)).clamp(min=torch.finfo(A.dtype).tiny)
    worst = (off / scale).max().item()
    assert worst <= rtol, f"not diagonal: off-diagonal / max = {worst:.3e} > {rtol:.1e}"


def assert_is_permutation(perm: Tensor) -> None:
    """Each row of ``perm (b k)`` is a permutation of ``0 .. k-1``."""
    k = perm.shape[-1]
    expected = torch.arange(k, device=perm.device).expand_as(perm)
    assert torch.equal(perm.sort(dim=-1).values, expected), f"not a permutation: {perm.tolist()}"


def assert_descending(x: Tensor, *, atol: float = 0.0) -> None:
    """Each row of ``x (b k)`` is non-increasing (up to ``atol``)."""
    if x.shape[-1] < 2:
        return
    rise = (x[..., 1:] - x[..., :-1]).max().item()
    assert rise <= atol, f"not descending: an entry rises by {rise:.3e}"
