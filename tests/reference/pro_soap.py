"""Naive float64 reference for Pro-SOAP, the ``pro_soap`` preset (new in kronopt: ``docs/pro.md``).

Written from the description of issue 11 item 2 and ``docs/pro.md``, one 2-D parameter at a time.  It never imports
kronopt; the SOAP pieces (first basis, the sorted power-step refresh of the full side) are ``tests/reference/soap.py``'s
and the low-rank pieces (Gram–Schmidt, top singular vectors, Newton–Schulz, rank and side resolution) those of
``tests/reference/pro_kl_shampoo.py``.

Pro-SOAP is SOAP whose larger side (right when square) is kept as R̂ = U S Uᵀ + μ P⊥ (U orthonormal d × r):

* factors (EMA, retention ρ): the full side L ← ρL + (1−ρ)GGᵀ; on the restricted side, with Y = G U,
  S ← ρS + (1−ρ)YᵀY, μ ← ρμ + (1−ρ) max(‖G‖² − ‖Y‖², 0)/(d − r) (the M-projection of the EMA for fixed U), and the
  power product P = ρ U S_old + (1−ρ) Gᵀ Y.  First call: U₀ = top-r right singular vectors of G, the same rule from
  zero (so P = (1−ρ) GᵀG U₀).
* refresh (first call, then every ``precondition_frequency`` updates): the full side as SOAP (eigh on the first
  call, then the sorted power step + QR; v permuted with it); the restricted side: first U = orth(P), later
  Rayleigh–Ritz Uᵀ P = V E Vᵀ (descending) and one power step U′ = orth(P V) (a 1e-16-relative multiple of U V added,
  so a vanishing direction keeps the current one).  After a later refresh (S, μ) are re-projected: S′ = U′ᵀ R̂ U′,
  μ′ = (tr R̂ − tr S′)/(d − r), floored at 0 (R̂ formed densely here).
* inner (Adam, SOAP's conventions): the first moment M in the original coordinates, M ← β₁M + (1−β₁)G; the second
  moment in the rotated m × r block, v ← β₂v + (1−β₂)(Q_Lᵀ G U)²; D = c_t Q_L [(Q_Lᵀ M U)/(√v + ε)] Uᵀ with
  c_t = √(1−β₂ᵗ)/(1−β₁ᵗ).  On a refresh M stays; v follows the full side's permutation only.
* complement: C = M − M U Uᵀ, O = NS(C), rescaled to ν = ‖D‖_F √((d − r)/r) (the subspace block's per-entry RMS;
  √(mn) when r = 0), times ``complement_mult``; step W ← W − lr (D + ν O/‖O‖), then W ← W − lr·wd·W.

Orientation: the state keeps the restricted side on the **right**; a left-restricted block runs on its transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.reference.null_space import gram_schmidt
from tests.reference.pro_kl_shampoo import (
    _top_right_singular,
    newton_schulz,
    ns_schedule,
    resolve_rank,
    restricted_side,
    ritz_then_power,
)
from tests.reference.soap import initial_basis, refresh_side

DTYPE = torch.float64

__all__ = ["ProSoapHyper", "ProSoapState", "pro_soap_reference", "pro_soap_update"]


@dataclass(frozen=True)
class ProSoapHyper:
    lr: float
    beta1: float
    beta2: float
    rho: float
    eps: float
    weight_decay: float
    precondition_frequency: int
    rank: int | float
    max_rank: int
    side: str
    complement_mult: float
    ns_coefficients: object
    ns_steps: int
    ns_eps: float


@dataclass
class ProSoapState:
    """One parameter, in the working orientation (restricted side on the right), float64."""

    initialised: bool = False
    t: int = 0
    L: torch.Tensor | None = None  # full side's EMA (rows × rows)
    Q_L: torch.Tensor | None = None
    U: torch.Tensor | None = None  # d × r
    S: torch.Tensor | None = None  # r × r
    mu: float = 0.0
    P: torch.Tensor | None = None  # power product d × r
    M: torch.Tensor | None = None  # first moment, original coordinates
    v: torch.Tensor | None = None  # second moment, rows × r


def _factor_update(G: torch.Tensor, state: ProSoapState, rho: float, U: torch.Tensor) -> None:
    n, r = U.shape
    Y = G @ U
    S_old = state.S
    state.S = rho * S_old + (1.0 - rho) * (Y.T @ Y)
    energy = max(float((G * G).sum()) - float((Y * Y).sum()), 0.0)
    state.mu = rho * state.mu + (1.0 - rho) * energy / (n - r)
    state.P = rho * (U @ S_old) + (1.0 - rho) * (G.T @ Y)


def _restricted_refresh(state: ProSoapState, *, first: bool) -> None:
    U, P = state.U, state.P
    n, r = U.shape
    if r == 0:
        return
    delta = torch.finfo(DTYPE).eps * float(torch.linalg.norm(P)) + torch.finfo(DTYPE).tiny
    if first:
        state.U = gram_schmidt(P + delta * U)
        return  # (S, μ) already live in the first call's subspace
    U_new = ritz_then_power(P, U, delta)
    R_hat = U @ state.S @ U.T + state.mu * (torch.eye(n, dtype=DTYPE) - U @ U.T)
    S_new = U_new.T @ R_hat @ U_new
    state.mu = max((float(torch.trace(R_hat)) - float(torch.trace(S_new))) / (n - r), 0.0)
    state.U, state.S = U_new, S_new


def complement_block(C: torch.Tensor, D: torch.Tensor, r: int, hp: ProSoapHyper) -> torch.Tensor:
    """ν · NS(C)/‖NS(C)‖ with ν = ‖D‖_F √((d − r)/r) (√(rows·d) at r = 0), × complement_mult (working orientation)."""
    rows, d = C.shape
    O = newton_schulz(C, ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
    nu = math.sqrt(rows * d) if r == 0 else float(torch.linalg.norm(D)) * math.sqrt((d - r) / r)
    norm_O = float(torch.linalg.norm(O))
    return torch.zeros_like(C) if norm_O == 0.0 else hp.complement_mult * nu * O / norm_O


def adam_subspace_step(W: torch.Tensor, G: torch.Tensor, state: "ProSoapState", hp: "ProSoapHyper", r: int,
                       side: str) -> torch.Tensor:
    """One parameter update (shared by pro_soap and pro_dykaf): momentum M of G (original coordinates), Adam's v in
    the rotated m×r block, D = c_t Q_L [(Q_Lᵀ M U)/(√v + ε)] Uᵀ plus the complement block, then the step and the
    decoupled weight decay after it.  ``G`` is in the working orientation (restricted side on the right)."""
    b1, b2 = hp.beta1, hp.beta2
    state.t += 1
    t = state.t
    Q_L, U = state.Q_L, state.U
    state.M = b1 * state.M + (1.0 - b1) * G
    G_rot = Q_L.T @ G @ U
    state.v = b2 * state.v + (1.0 - b2) * G_rot * G_rot
    c_t = math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    D = c_t * (Q_L @ ((Q_L.T @ state.M @ U) / (torch.sqrt(state.v) + hp.eps)) @ U.T)
    C = state.M - state.M @ U @ U.T
    D = D + complement_block(C, D, r, hp)
    if side == "left":
        D = D.T
    W = W - hp.lr * D
    return W - hp.lr * hp.weight_decay * W


def pro_soap_update(W: torch.Tensor, G: torch.Tensor, state: ProSoapState, hp: ProSoapHyper) -> torch.Tensor:
    """One call for one 2-D parameter; mutates ``state`` and returns the new W (float64)."""
    rows, cols = W.shape
    W = W.detach().to(DTYPE).clone()
    side = restricted_side(hp.side, rows, cols)
    d = rows if side == "left" else cols
    r = resolve_rank(hp.rank, hp.max_rank, d)
    if not 0 <= r < d:
        raise ValueError(f"the reference needs 0 <= r < d (r >= d is plain SOAP), got r={r}, d={d}")
    G = G.detach().to(DTYPE)
    G = G.T if side == "left" else G  # working orientation
    m, n = G.shape
    if not state.initialised:  # first call: factors and the first refresh only
        state.initialised = True
        state.L = (1.0 - hp.rho) * (G @ G.T)
        state.Q_L = initial_basis(state.L)
        U0 = _top_right_singular(G, r)
        state.S = torch.zeros(r, r, dtype=DTYPE)
        state.mu = 0.0
        _factor_update(G, state, hp.rho, U0)
        state.U = torch.eye(n, dtype=DTYPE)[:, :r]  # the basis's fresh coordinate subspace
        _restricted_refresh(state, first=True)
        state.M = torch.zeros(m, n, dtype=DTYPE)
        state.v = torch.zeros(m, r, dtype=DTYPE)
        return W

    W = adam_subspace_step(W, G, state, hp, r, side)
    t, U = state.t, state.U

    state.L = hp.rho * state.L + (1.0 - hp.rho) * (G @ G.T)
    _factor_update(G, state, hp.rho, U)
    if t % hp.precondition_frequency == 0:
        state.Q_L, pi = refresh_side(state.L, state.Q_L)
        state.v = state.v[pi, :]
        _restricted_refresh(state, first=False)
    return W


def pro_soap_reference(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.95, 0.95),
    shampoo_beta: float = -1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    rank: int | float = 0.25,
    max_rank: int = 128,
    side: str = "larger",
    complement_mult: float = 1.0,
    ns_coefficients: object = "kj",
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    states: list[ProSoapState] | None = None,
) -> list[list[torch.Tensor]]:
    """history[k][i] = parameter i (2-D) after call k, float64; defaults are the preset's.  ``states``, if given
    (one empty ProSoapState per parameter), is filled so tests can inspect the final state."""
    hp = ProSoapHyper(
        lr=lr, beta1=betas[0], beta2=betas[1], rho=betas[1] if shampoo_beta < 0 else shampoo_beta, eps=eps,
        weight_decay=weight_decay, precondition_frequency=precondition_frequency, rank=rank, max_rank=max_rank,
        side=side, complement_mult=complement_mult, ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_eps=ns_eps,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = states if states is not None else [ProSoapState() for _ in params]
    history = []
    for call in grads:
        for i, g in enumerate(call):
            weights[i] = pro_soap_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
