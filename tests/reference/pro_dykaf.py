"""Naive float64 reference for Pro-DyKAF, the ``pro_dykaf`` preset (new in kronopt: ``docs/pro.md``).

Written from ``docs/pro.md`` and ``shared/specs/dykaf.md`` §3/§5, one 2-D parameter at a time; it never imports
kronopt.  Pro-DyKAF is Pro-SOAP (``tests/reference/pro_soap.py``: qr basis, Adam in the rotated m × r block with the
first moment in the original coordinates, ``lowrank_flat`` complement at the subspace block's RMS) whose factors are
DyKAF's projector-splitting (KSL) tracker instead of EMAs.  Everything but the factor step is pro_soap's, imported.

Factors (working orientation: restricted side on the right, rank r, U orthonormal n × r, P⊥ = I − U Uᵀ; the
restricted factor is R = U S Uᵀ + μ P⊥, formed **densely** here):

* first call (``init = "kron"``): (σ₁, u₁, v₁) the top singular triplet of G, s = √(1−β) σ₁; L₀ = s u₁u₁ᵀ,
  R₀ = s v₁v₁ᵀ (the nearest Kronecker product of (1−β) vec G vec Gᵀ, G not fed again); the power product is
  U₀ = top-r right singular vectors of G, the basis's first refresh makes U = orth(U₀) and (S₀, μ₀) is the
  M-projection of R₀ onto {U S Uᵀ + μ P⊥}: S₀ = Uᵀ R₀ U, μ₀ = tr(P⊥ R₀)/(n − r) (≥ 0).
* later calls, with the current U: the dense KSL step of dykaf.md §3 on (√β L, √β R, √(1−β) G):
  ρ = ‖R‖_F, R̄ = R/ρ, K = ρL + G R̄ Gᵀ, U_L = K/‖K‖_F, S̃ = ρ⟨U_L, L⟩, R̂ = S̃ R̄ + Gᵀ U_L G; then R̂ is
  M-projected onto the family for the same U: S′ = Uᵀ R̂ U, μ′ = max(tr(P⊥ R̂)/(n − r), 0); the power product
  for the basis is R̂ U (the unprojected R̂); finally the balance uses the projected R′ = U S′ Uᵀ + μ′ P⊥:
  σ = ‖R′‖_F, L ← √σ U_L, (S, μ, R̂U) ← (S′, μ′, R̂U)/√σ.
* refresh (first call, then every ``precondition_frequency`` updates): as pro_soap (full side: sorted power step +
  QR, v permuted; restricted side: Rayleigh–Ritz + one power step from the power product, then (S, μ)
  re-projected with the trace kept).
"""

from __future__ import annotations

import math

import torch

from tests.reference.pro_kl_shampoo import _top_right_singular, resolve_rank, restricted_side
from tests.reference.pro_soap import (
    ProSoapHyper,
    ProSoapState,
    _restricted_refresh,
    adam_subspace_step,
)
from tests.reference.soap import initial_basis, refresh_side

DTYPE = torch.float64

__all__ = ["ProDykafState", "ksl_restricted", "pro_dykaf_reference", "pro_dykaf_update", "project_flat"]

ProDykafState = ProSoapState  # same fields: L is DyKAF's full factor, (U, S, mu, P) the restricted side


def project_flat(R: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, float]:
    """M-projection of a dense symmetric R onto {U S Uᵀ + μ P⊥} for fixed U: (Uᵀ R U, max(tr(P⊥ R)/(n − r), 0))."""
    n, r = U.shape
    S = U.T @ R @ U
    P_perp = torch.eye(n, dtype=DTYPE) - U @ U.T
    mu = max(float(torch.trace(P_perp @ R)) / (n - r), 0.0)
    return S, mu


def dense_restricted(U: torch.Tensor, S: torch.Tensor, mu: float) -> torch.Tensor:
    n = U.shape[0]
    return U @ S @ U.T + mu * (torch.eye(n, dtype=DTYPE) - U @ U.T)


def ksl_restricted(
    L: torch.Tensor, U: torch.Tensor, S: torch.Tensor, mu: float, G: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """One KSL step (dykaf.md §3) on the dense R = U S Uᵀ + μ P⊥, its R̂ projected back; returns (L, S, μ, P)."""
    L = math.sqrt(beta) * L
    R = math.sqrt(beta) * dense_restricted(U, S, mu)
    G = math.sqrt(1.0 - beta) * G
    rho = float(torch.linalg.norm(R))
    R_bar = R / rho
    K = rho * L + G @ R_bar @ G.T
    U_L = K / torch.linalg.norm(K)
    S_tilde = rho * float((U_L * L).sum())
    R_hat = S_tilde * R_bar + G.T @ U_L @ G
    S_new, mu_new = project_flat(R_hat, U)
    P = R_hat @ U
    sigma = float(torch.linalg.norm(dense_restricted(U, S_new, mu_new)))
    root = math.sqrt(sigma)
    return root * U_L, S_new / root, mu_new / root, P / root


def pro_dykaf_update(W: torch.Tensor, G: torch.Tensor, state: ProSoapState, hp: ProSoapHyper) -> torch.Tensor:
    """One call for one 2-D parameter; mutates ``state`` and returns the new W (float64)."""
    rows, cols = W.shape
    W = W.detach().to(DTYPE).clone()
    side = restricted_side(hp.side, rows, cols)
    d = rows if side == "left" else cols
    r = resolve_rank(hp.rank, hp.max_rank, d)
    if not 0 <= r < d:
        raise ValueError(f"the reference needs 0 <= r < d (r >= d is plain DyKAF), got r={r}, d={d}")
    G = G.detach().to(DTYPE)
    G = G.T if side == "left" else G  # working orientation
    m, n = G.shape
    beta = hp.rho
    if not state.initialised:  # first call: kron start and the first refresh only
        state.initialised = True
        Usvd, sv, Vh = torch.linalg.svd(G, full_matrices=False)
        s = math.sqrt(1.0 - beta) * float(sv[0])
        state.L = s * torch.outer(Usvd[:, 0], Usvd[:, 0])
        R0 = s * torch.outer(Vh[0], Vh[0])
        state.Q_L = initial_basis(state.L)
        state.P = _top_right_singular(G, r)
        state.U = torch.eye(n, dtype=DTYPE)[:, :r]  # the basis's fresh coordinate subspace
        _restricted_refresh(state, first=True)  # U = orth(U₀)
        state.S, state.mu = project_flat(R0, state.U)
        state.M = torch.zeros(m, n, dtype=DTYPE)
        state.v = torch.zeros(m, r, dtype=DTYPE)
        return W

    W = adam_subspace_step(W, G, state, hp, r, side)
    t, U = state.t, state.U

    state.L, state.S, state.mu, state.P = ksl_restricted(state.L, U, state.S, state.mu, G, beta)
    if t % hp.precondition_frequency == 0:
        state.Q_L, pi = refresh_side(state.L, state.Q_L)
        state.v = state.v[pi, :]
        _restricted_refresh(state, first=False)
    return W


def pro_dykaf_reference(
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
    """history[k][i] = parameter i (2-D) after call k, float64; defaults are the preset's (configs/pro_dykaf.toml).
    ``states``, if given (one empty ProDykafState per parameter), is filled so tests can inspect the final state."""
    hp = ProSoapHyper(
        lr=lr, beta1=betas[0], beta2=betas[1], rho=betas[1] if shampoo_beta < 0 else shampoo_beta, eps=eps,
        weight_decay=weight_decay, precondition_frequency=precondition_frequency, rank=rank, max_rank=max_rank,
        side=side, complement_mult=complement_mult, ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_eps=ns_eps,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = states if states is not None else [ProDykafState() for _ in params]
    history = []
    for call in grads:
        for i, g in enumerate(call):
            weights[i] = pro_dykaf_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
