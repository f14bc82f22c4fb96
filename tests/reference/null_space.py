"""The basis ``basis.null_space = "canonical"`` gives the directions a factor leaves to rounding, written from its
documentation (kronopt/bases.py, QrBasis; docs/architecture.md, "Degenerate eigenspaces") without kronopt: plain
products and Gram–Schmidt here, where kronopt takes LAPACK's Householder QR.

* First basis: the eigenvectors of the ``c`` eigenvalues within ``4 √max(k, 16)`` ulps of the largest (in size)
  are replaced by the projections onto their span of the last ``c`` columns of a fixed ``k × k`` matrix of
  standard normal draws (float64; column ``j`` from torch's CPU generator seeded with ``k · 2²⁰ + j``),
  orthonormalised after the other columns; a zero factor takes the identity.
* Refresh: the QR of the sorted power product ``X Q_π``; a column whose ``|R_jj|`` is within ``4 max(k, 16)`` ulps
  of the largest ``|R_ii|`` is replaced by its old column ``Q_π[:, j]``, and the QR taken again.
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64


def floor(k: int) -> float:
    """``4 √max(k, 16)`` ulps of float64."""
    return 4.0 * math.sqrt(max(k, 16)) * torch.finfo(DTYPE).eps


def gram_schmidt(X: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt (each column twice, for stability) of X's columns in order: the thin-QR Q with R's diagonal
    positive."""
    Q = torch.zeros_like(X)
    for j in range(X.shape[1]):
        v = X[:, j].clone()
        for _ in range(2):
            v = v - Q[:, :j] @ (Q[:, :j].T @ v)
        Q[:, j] = v / torch.linalg.norm(v)
    return Q


def seeds(k: int) -> torch.Tensor:
    """The fixed ``k × k`` matrix: column ``j`` holds ``k`` standard normal draws of torch's CPU generator seeded with
    ``k · 2²⁰ + j``."""
    return torch.stack([torch.randn(k, generator=torch.Generator().manual_seed(k * 2**20 + j), dtype=DTYPE) for j in range(k)], 1)


def initial_basis(X: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of X, eigenvalues descending; the null span's in the fixed basis above."""
    lam, V = torch.linalg.eigh(X)
    lam, V = lam.flip(0), V.flip(1)
    k = lam.numel()
    c = sum(1 for x in lam.tolist() if abs(x) <= floor(k) * float(lam.abs().max()))
    if c == 0:
        return V
    if c == k:
        return torch.eye(k, dtype=DTYPE)
    N = V[:, k - c :]
    spread = N @ (N.T @ seeds(k)[:, k - c :])
    return torch.cat([V[:, : k - c], gram_schmidt(torch.cat([V[:, : k - c], spread], dim=1))[:, k - c :]], dim=1)


def refresh_side(X: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SOAP's refresh of one side (soap.md §6.8: Rayleigh quotients, sort, one power step and QR), the power
    product's columns of rounding replaced by their old columns. Returns (new basis, permutation)."""
    pi = torch.argsort(torch.diag(Q.T @ X @ Q), descending=True, stable=True)
    Q_sorted = Q[:, pi]
    P = X @ Q_sorted
    Q_new, R = torch.linalg.qr(P)
    size = torch.diagonal(R).abs()
    flagged = size <= 4 * max(P.shape[1], 16) * torch.finfo(DTYPE).eps * float(size.max())
    if not bool(flagged.any()):
        return Q_new, pi
    return gram_schmidt(torch.where(flagged.unsqueeze(0), Q_sorted, P)), pi
