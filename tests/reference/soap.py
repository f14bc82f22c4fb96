"""Naive float64 reference for the SOAP optimizer.

Written directly from ``shared/specs/soap.md`` (sections 4-8 and 10), one parameter at a time, with plain
matrix products so that it can be read next to the spec.  It must never import kronopt: the point is to have
an independent second implementation to compare the library against.

Layout: every parameter is viewed as a 2-D block ``rows x cols``.  A 2-D parameter is its own block; a 1-D
parameter of size d is a ``d x 1`` block.  The left side (``L``, ``Q_L``, size rows x rows) acts on the rows and
the right side (``R``, ``Q_R``, size cols x cols) on the columns.  A side is *factored* when the parameter is
2-D and that dimension is <= max_precond_dim; otherwise it has no factor and no basis and acts as the identity
(``None`` below).  1-D parameters are never factored (precondition_1d is False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.reference import null_space

DTYPE = torch.float64

__all__ = ["soap_reference", "make_soap_hyper", "SoapHyper", "SoapState", "soap_update"]


@dataclass(frozen=True)
class SoapHyper:
    lr: float
    beta1: float
    beta2: float
    rho: float  # factor retention (shampoo_beta, or beta2 when shampoo_beta < 0)
    eps: float
    weight_decay: float
    precondition_frequency: int
    max_precond_dim: int
    normalize_grads: bool
    correct_bias: bool
    null_space: str = "solver"  # "canonical": tests/reference/null_space.py
    rotations: str = "exact"  # "bfloat16": kronopt's rotation_dtype (rotate_rounded, unrotate_rounded)
    grams: str = "exact"  # "bfloat16": kronopt's factors.product_dtype (gram_rounded)


@dataclass
class SoapState:
    """State of one parameter (all tensors float64, in block layout rows x cols)."""

    initialised: bool = False
    t: int = 0  # number of parameter updates so far (stays 0 on the first call)
    L: torch.Tensor | None = None  # rows x rows factor EMA, None if the left side is not factored
    R: torch.Tensor | None = None  # cols x cols factor EMA, None if the right side is not factored
    Q_L: torch.Tensor | None = None  # rows x rows orthonormal basis (columns ~ descending eigenvalues)
    Q_R: torch.Tensor | None = None  # cols x cols orthonormal basis
    m: torch.Tensor | None = None  # first moment, in the rotated basis
    v: torch.Tensor | None = None  # second moment, in the rotated basis (only ever permuted)


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _block_shape(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1]
    raise ValueError(f"the reference handles only 1-D and 2-D parameters, got shape {tuple(shape)}")


def rotate(X: torch.Tensor, Q_L: torch.Tensor | None, Q_R: torch.Tensor | None) -> torch.Tensor:
    """Q_L^T X Q_R, skipping a side that is None (identity)."""
    if Q_L is not None:
        X = Q_L.T @ X
    if Q_R is not None:
        X = X @ Q_R
    return X


def unrotate(X: torch.Tensor, Q_L: torch.Tensor | None, Q_R: torch.Tensor | None) -> torch.Tensor:
    """Q_L X Q_R^T, skipping a side that is None (identity)."""
    if Q_L is not None:
        X = Q_L @ X
    if Q_R is not None:
        X = X @ Q_R.T
    return X


def _rounded(X: torch.Tensor) -> torch.Tensor:
    """X rounded to the nearest bfloat16, kept in float64."""
    return X.to(torch.bfloat16).to(DTYPE)


def gram_rounded(A: torch.Tensor) -> torch.Tensor:
    """A Aᵀ as kronopt's factors.product_dtype = "bfloat16" defines it: A rounded to bfloat16, the product (its sums
    exact here) rounded to bfloat16."""
    A = _rounded(A)
    return _rounded(A @ A.T)


def _gram(A: torch.Tensor, hp: "SoapHyper") -> torch.Tensor:
    return gram_rounded(A) if hp.grams == "bfloat16" else A @ A.T


def rotate_rounded(X: torch.Tensor, Q_L: torch.Tensor | None, Q_R: torch.Tensor | None) -> torch.Tensor:
    """rotate() as kronopt's rotation_dtype = "bfloat16" defines it: every product's operands and its result rounded
    to bfloat16 (the sums exact here); with two bases the right one first on a tall block (rows > cols), as kronopt
    orders a gradient's rotation. Without a basis nothing is rounded."""
    if Q_L is None and Q_R is None:
        return X
    X = _rounded(X)
    if Q_L is not None and Q_R is not None and X.shape[0] > X.shape[1]:
        return _rounded(_rounded(Q_L).T @ _rounded(X @ _rounded(Q_R)))
    if Q_L is not None:
        X = _rounded(_rounded(Q_L).T @ X)
    if Q_R is not None:
        X = _rounded(X @ _rounded(Q_R))
    return X


def unrotate_rounded(X: torch.Tensor, Q_L: torch.Tensor | None, Q_R: torch.Tensor | None) -> torch.Tensor:
    """unrotate() under rotation_dtype = "bfloat16", the left side first."""
    if Q_L is None and Q_R is None:
        return X
    X = _rounded(X)
    if Q_L is not None:
        X = _rounded(_rounded(Q_L) @ X)
    if Q_R is not None:
        X = _rounded(X @ _rounded(Q_R).T)
    return X


def initial_basis(X: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of X (+1e-30 I) with the columns reversed, so the eigenvalues descend (spec §5.2)."""
    n = X.shape[0]
    _eigenvalues, eigenvectors = torch.linalg.eigh(X + 1e-30 * torch.eye(n, dtype=DTYPE))
    return torch.flip(eigenvectors, dims=[1])


def refresh_side(X: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One refresh of one side (spec §6.8).

    X is the *updated* factor, Q the *old* basis.  Returns (new basis, permutation pi) where pi is the order
    applied to the old columns (and to the second moment along this side's axis).
    """
    rayleigh = torch.diag(Q.T @ X @ Q)
    pi = torch.argsort(rayleigh, descending=True, stable=True)
    Q_sorted = Q[:, pi]
    Q_new, _r = torch.linalg.qr(X @ Q_sorted)
    return Q_new, pi


def _initial_basis(X: torch.Tensor, hp: SoapHyper) -> torch.Tensor:
    return null_space.initial_basis(X) if hp.null_space == "canonical" else initial_basis(X)


def _refresh_side(X: torch.Tensor, Q: torch.Tensor, hp: SoapHyper) -> tuple[torch.Tensor, torch.Tensor]:
    return null_space.refresh_side(X, Q) if hp.null_space == "canonical" else refresh_side(X, Q)


# ----------------------------------------------------------------------------------------------------------
# one call for one parameter


def soap_update(W: torch.Tensor, G: torch.Tensor, state: SoapState, hp: SoapHyper) -> torch.Tensor:
    """Apply one SOAP call to parameter W with gradient G; mutates ``state`` and returns the new W (float64)."""
    shape = W.shape
    rows, cols = _block_shape(shape)
    W = W.detach().to(DTYPE).reshape(rows, cols).clone()
    G = G.detach().to(DTYPE).reshape(rows, cols)
    is_2d = len(shape) == 2
    left_factored = is_2d and rows <= hp.max_precond_dim
    right_factored = is_2d and cols <= hp.max_precond_dim

    # ---- first call: initialise only (spec §5); W is not touched, t stays 0
    if not state.initialised:
        state.initialised = True
        state.t = 0
        if left_factored:
            state.L = (1.0 - hp.rho) * _gram(G, hp)
            state.Q_L = _initial_basis(state.L, hp)
        if right_factored:
            state.R = (1.0 - hp.rho) * _gram(G.T, hp)
            state.Q_R = _initial_basis(state.R, hp)
        state.m = torch.zeros(rows, cols, dtype=DTYPE)
        state.v = torch.zeros(rows, cols, dtype=DTYPE)
        return W.reshape(shape)

    # ---- later calls (spec §6)
    b1, b2 = hp.beta1, hp.beta2
    state.t += 1
    t = state.t

    # 1-2. moments of the gradient rotated with the current (old) basis
    rounded = hp.rotations == "bfloat16"
    G_rot = (rotate_rounded if rounded else rotate)(G, state.Q_L, state.Q_R)
    state.m = b1 * state.m + (1.0 - b1) * G_rot
    state.v = b2 * state.v + (1.0 - b2) * G_rot * G_rot

    # 3. Adam direction in the rotated basis, eps on the un-bias-corrected sqrt(v); back to the original basis
    N = (unrotate_rounded if rounded else unrotate)(state.m / (torch.sqrt(state.v) + hp.eps), state.Q_L, state.Q_R)

    # 4. optional RMS normalisation over the whole tensor
    if hp.normalize_grads:
        N = N / (1e-30 + torch.sqrt(torch.mean(N * N)))

    # 5. step size with the bias correction folded in
    if hp.correct_bias:
        step_size = hp.lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    else:
        step_size = hp.lr

    # 6. parameter step, then decoupled weight decay with the raw lr on the updated W
    W = W - step_size * N
    if hp.weight_decay > 0.0:
        W = W - hp.lr * hp.weight_decay * W

    # 7. factor EMAs with the same gradient
    if left_factored:
        state.L = hp.rho * state.L + (1.0 - hp.rho) * _gram(G, hp)
    if right_factored:
        state.R = hp.rho * state.R + (1.0 - hp.rho) * _gram(G.T, hp)

    # 8-9. basis refresh every f updates; m follows the basis, v is only permuted
    if t % hp.precondition_frequency == 0:
        m_original = unrotate(state.m, state.Q_L, state.Q_R)  # with the old basis
        if left_factored:
            state.Q_L, pi = _refresh_side(state.L, state.Q_L, hp)
            state.v = state.v[pi, :]  # left side acts on the rows
        if right_factored:
            state.Q_R, pi = _refresh_side(state.R, state.Q_R, hp)
            state.v = state.v[:, pi]  # right side acts on the columns
        state.m = rotate(m_original, state.Q_L, state.Q_R)  # with the new basis

    return W.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# public entry point


def make_soap_hyper(
    *,
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.95, 0.95),
    shampoo_beta: float = -1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    null_space: str = "solver",
    rotations: str = "exact",
    grams: str = "exact",
) -> SoapHyper:
    beta1, beta2 = betas
    rho = beta2 if shampoo_beta < 0 else shampoo_beta
    return SoapHyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        rho=rho,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        normalize_grads=normalize_grads,
        correct_bias=correct_bias,
        null_space=null_space,
        rotations=rotations,
        grams=grams,
    )


def soap_reference(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr=3e-3,
    betas=(0.95, 0.95),
    shampoo_beta=-1.0,
    eps=1e-8,
    weight_decay=0.01,
    precondition_frequency=10,
    max_precond_dim=10000,
    normalize_grads=False,
    correct_bias=True,
    null_space="solver",
    rotations="exact",
    grams="exact",
) -> list[list[torch.Tensor]]:
    """params: initial parameters (1-D or 2-D tensors). grads[k][i]: gradient of param i at call k (k = 0..K-1).
    Returns history with history[k][i] = param i after call k (clones). Everything computed in float64."""
    hp = make_soap_hyper(
        lr=lr,
        betas=betas,
        shampoo_beta=shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        normalize_grads=normalize_grads,
        correct_bias=correct_bias,
        null_space=null_space,
        rotations=rotations,
        grams=grams,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = [SoapState() for _ in params]
    history: list[list[torch.Tensor]] = []
    for call_grads in grads:
        if len(call_grads) != len(weights):
            raise ValueError("each grads[k] must hold one gradient per parameter")
        for i, g in enumerate(call_grads):
            weights[i] = soap_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
