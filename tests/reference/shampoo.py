"""Naive float64 reference for kronopt's ``shampoo`` preset (spec ``shared/specs/soap.md`` §9).

Shampoo with EMA factors, an eigendecomposition refreshed every f calls (eigenvectors and eigenvalues frozen
in between), a first moment in the original basis, per-side inverse roots and layer-wise Adam grafting.  Written
as a plain per-parameter loop; it must never import kronopt.

Per parameter, call t = 1, 2, ... (every call updates the parameter; there is no first-call skip):

1. L <- rho L + (1-rho) G G^T,  R <- rho R + (1-rho) G^T G   (both start at zero; rho = beta2 by default)
2. m <- b1 m + (1-b1) G;  vg <- gb2 vg + (1-gb2) G*G          (grafting second moment, on the raw gradient)
3. if t % f == 0: (Q, lam) <- eigh(X) for each factored side X, lam clamped at >= 0; kept until the next refresh
4. m_hat = m / (1-b1^t);  A = m_hat / (sqrt(vg / (1-gb2^t)) + graft_eps)
   once a refresh has happened (t >= f):
       P = Q_L diag((lam_L+eps)^p) Q_L^T  m_hat  Q_R diag((lam_R+eps)^p) Q_R^T   (p = exponent)
       D = P * ||A||_F / ||P||_F
   before that: D = A
5. W <- W (1 - lr wd);  W <- W - lr D

Layout as in the SOAP reference: a 2-D parameter is a rows x cols block, a 1-D parameter a d x 1 block.  A side is
factored when the parameter is 2-D and that dimension is <= max_precond_dim; otherwise it is the identity.  1-D
parameters have no factors, so P = m_hat once t >= f (grafted to the Adam norm).  The first grafting beta is not
used: A uses the same first moment m as P (grafting rescales, it does not graft the first moment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.float64

__all__ = ["shampoo_reference", "make_shampoo_hyper", "ShampooHyper", "ShampooState", "shampoo_update"]


@dataclass(frozen=True)
class ShampooHyper:
    lr: float
    beta1: float
    beta2: float
    rho: float  # factor retention
    eps: float  # added to the factor eigenvalues inside the root
    weight_decay: float
    precondition_frequency: int
    exponent: float
    graft_beta2: float
    graft_eps: float
    max_precond_dim: int


@dataclass
class ShampooState:
    """State of one parameter (float64, block layout rows x cols)."""

    t: int = 0
    L: torch.Tensor | None = None  # None on a side that is not factored
    R: torch.Tensor | None = None
    Q_L: torch.Tensor | None = None  # eigenvectors of L at the last refresh
    Q_R: torch.Tensor | None = None
    lam_L: torch.Tensor | None = None  # eigenvalues of L at the last refresh, clamped at >= 0
    lam_R: torch.Tensor | None = None
    has_basis: bool = False  # True once the first refresh (t = f) has happened
    m: torch.Tensor | None = None  # first moment, original basis
    vg: torch.Tensor | None = None  # grafting second moment, original basis


def _block_shape(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1]
    raise ValueError(f"the reference handles only 1-D and 2-D parameters, got shape {tuple(shape)}")


def root_matrix(Q: torch.Tensor, lam: torch.Tensor, eps: float, exponent: float) -> torch.Tensor:
    """Q diag((lam + eps)^exponent) Q^T."""
    return Q @ torch.diag((lam + eps) ** exponent) @ Q.T


def shampoo_update(W: torch.Tensor, G: torch.Tensor, state: ShampooState, hp: ShampooHyper) -> torch.Tensor:
    """Apply one Shampoo call to W with gradient G; mutates ``state`` and returns the new W (float64)."""
    shape = W.shape
    rows, cols = _block_shape(shape)
    W = W.detach().to(DTYPE).reshape(rows, cols).clone()
    G = G.detach().to(DTYPE).reshape(rows, cols)
    is_2d = len(shape) == 2
    left_factored = is_2d and rows <= hp.max_precond_dim
    right_factored = is_2d and cols <= hp.max_precond_dim

    if state.t == 0:
        if left_factored:
            state.L = torch.zeros(rows, rows, dtype=DTYPE)
        if right_factored:
            state.R = torch.zeros(cols, cols, dtype=DTYPE)
        state.m = torch.zeros(rows, cols, dtype=DTYPE)
        state.vg = torch.zeros(rows, cols, dtype=DTYPE)

    state.t += 1
    t = state.t
    b1, _b2, gb2 = hp.beta1, hp.beta2, hp.graft_beta2

    # 1. factor EMAs
    if left_factored:
        state.L = hp.rho * state.L + (1.0 - hp.rho) * (G @ G.T)
    if right_factored:
        state.R = hp.rho * state.R + (1.0 - hp.rho) * (G.T @ G)

    # 2. first moment (original basis) and grafting second moment
    state.m = b1 * state.m + (1.0 - b1) * G
    state.vg = gb2 * state.vg + (1.0 - gb2) * G * G

    # 3. eigendecomposition every f calls, frozen in between
    if t % hp.precondition_frequency == 0:
        if left_factored:
            lam, Q = torch.linalg.eigh(state.L)
            state.lam_L, state.Q_L = torch.clamp(lam, min=0.0), Q
        if right_factored:
            lam, Q = torch.linalg.eigh(state.R)
            state.lam_R, state.Q_R = torch.clamp(lam, min=0.0), Q
        state.has_basis = True

    # 4. Adam grafting direction and the (grafted) Shampoo direction
    m_hat = state.m / (1.0 - b1**t)
    A = m_hat / (torch.sqrt(state.vg / (1.0 - gb2**t)) + hp.graft_eps)
    if state.has_basis:
        P = m_hat
        if left_factored:
            P = root_matrix(state.Q_L, state.lam_L, hp.eps, hp.exponent) @ P
        if right_factored:
            P = P @ root_matrix(state.Q_R, state.lam_R, hp.eps, hp.exponent)
        p_norm = torch.linalg.norm(P)
        if p_norm > 0:
            D = P * (torch.linalg.norm(A) / p_norm)
        else:  # P = 0 only when m_hat = 0, and then A = 0 too
            D = torch.zeros_like(P)
    else:
        D = A

    # 5. decoupled weight decay (before the step), then the step
    W = W * (1.0 - hp.lr * hp.weight_decay)
    W = W - hp.lr * D
    return W.reshape(shape)


def make_shampoo_hyper(
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    factor_beta: float | None = None,
    eps: float = 1e-12,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    exponent: float = -0.25,
    graft_betas: tuple[float, float] | None = None,
    graft_eps: float = 1e-8,
    max_precond_dim: int = 10000,
) -> ShampooHyper:
    beta1, beta2 = betas
    rho = beta2 if factor_beta is None else factor_beta
    _graft_beta1, graft_beta2 = betas if graft_betas is None else graft_betas
    return ShampooHyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        rho=rho,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        exponent=exponent,
        graft_beta2=graft_beta2,
        graft_eps=graft_eps,
        max_precond_dim=max_precond_dim,
    )


def shampoo_reference(
    params,
    grads,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    factor_beta=None,
    eps=1e-12,
    weight_decay=0.0,
    precondition_frequency=10,
    exponent=-0.25,
    graft_betas=None,
    graft_eps=1e-8,
    max_precond_dim=10000,
) -> list[list[torch.Tensor]]:
    """params: initial parameters (1-D or 2-D tensors). grads[k][i]: gradient of param i at call k.
    Returns history with history[k][i] = param i after call k (clones). Everything computed in float64."""
    hp = make_shampoo_hyper(
        lr=lr,
        betas=betas,
        factor_beta=factor_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        exponent=exponent,
        graft_betas=graft_betas,
        graft_eps=graft_eps,
        max_precond_dim=max_precond_dim,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = [ShampooState() for _ in params]
    history: list[list[torch.Tensor]] = []
    for call_grads in grads:
        if len(call_grads) != len(weights):
            raise ValueError("each grads[k] must hold one gradient per parameter")
        for i, g in enumerate(call_grads):
            weights[i] = shampoo_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
