"""Naive float64 reference for KL-Shampoo and KL-SOAP.

Written from ``shared/specs/kl_shampoo.md`` (§5 first call, §6 KL-Shampoo, §7 KL-SOAP, §8 the kronopt extension of a
side that is not factored), one 2-D parameter at a time, with plain loops over matrix entries where the spec writes
sums, so that it reads next to the spec.  It never imports kronopt.

Layout: a 2-D parameter is a ``rows x cols`` block.  A side is factored when its size is <= max_precond_dim; a side
that is not factored has no factor and no basis and acts as the identity with s = 1 (spec §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPE = torch.float64

__all__ = ["KlHyper", "KlState", "kl_reference", "kl_update"]


@dataclass(frozen=True)
class KlHyper:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.98
    rho: float = 0.98  # factor retention (shampoo_beta, or beta2 when shampoo_beta < 0)
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    init_factor: float = 0.1
    damping: float = 0.0  # kappa; the reference sets it to eps with using_damping
    using_clamping: bool = True
    max_clamp_value: float = 4000.0
    normalize_grads: bool = False
    klsoap: bool = False
    max_precond_dim: int = 10000
    grams: str = "exact"  # "bfloat16": kronopt's factors.product_dtype (_gram)


@dataclass
class KlState:
    initialised: bool = False
    t: int = 0
    S: list = field(default_factory=lambda: [None, None])  # S_L (rows x rows), S_R (cols x cols), None if not factored
    Q: list = field(default_factory=lambda: [None, None])  # bases
    s: list = field(default_factory=lambda: [None, None])  # tracked inverse roots lambda^{-1/2}
    m: torch.Tensor | None = None  # momentum (KL-Shampoo: original basis; KL-SOAP: rotated basis)
    v: torch.Tensor | None = None  # KL-SOAP second moment (rotated basis)


def _gram(A: torch.Tensor, hp: KlHyper) -> torch.Tensor:
    """A Aᵀ; under grams = "bfloat16" as kronopt's factors.product_dtype defines it: the operand rounded to bfloat16,
    the product (its sums exact here) rounded to bfloat16."""
    if hp.grams != "bfloat16":
        return A @ A.T
    A = A.to(torch.bfloat16).to(DTYPE)
    return (A @ A.T).to(torch.bfloat16).to(DTYPE)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DTYPE)


def _first_basis(S: torch.Tensor) -> torch.Tensor:
    """§5 step 2: eigenvectors of S + 1e-30 I, columns reversed to descending eigenvalues."""
    _, vecs = torch.linalg.eigh(S + 1e-30 * _eye(S.shape[0]))
    return torch.flip(vecs, dims=[1])


def _basis(state: KlState, k: int, size: int) -> torch.Tensor:
    return state.Q[k] if state.Q[k] is not None else _eye(size)


def _roots(state: KlState, k: int, size: int) -> torch.Tensor:
    return state.s[k] if state.s[k] is not None else torch.ones(size, dtype=DTYPE)


def _new_root(s_old: float, d: float, rho: float, clamp: float | None) -> float:
    """§6 step 4 for one eigenvalue: lambda_prev = 1/s^2 (non-finite -> 0), EMA, s = 1/sqrt(lambda) (non-finite -> 0)."""
    lam_prev = 1.0 / (s_old * s_old) if s_old != 0.0 else math.inf
    if not math.isfinite(lam_prev):
        lam_prev = 0.0
    lam = rho * lam_prev + (1.0 - rho) * d
    s = 1.0 / math.sqrt(lam) if lam > 0.0 else math.inf
    if not math.isfinite(s):
        s = 0.0
    if clamp is not None:
        s = min(s, clamp)
    return s


def kl_update(W: torch.Tensor, G: torch.Tensor, state: KlState, hp: KlHyper) -> torch.Tensor:
    """One call for one 2-D parameter; mutates ``state`` and returns the new W."""
    rows, cols = W.shape
    W = W.detach().to(DTYPE).clone()
    G = G.detach().to(DTYPE)
    factored = [rows <= hp.max_precond_dim, cols <= hp.max_precond_dim]
    rho = hp.rho

    # ---- §5: first call initialises only
    if not state.initialised:
        state.initialised = True
        if factored[0]:
            state.S[0] = (1.0 - rho) * _gram(G, hp) / cols
            state.Q[0] = _first_basis(state.S[0])
            state.s[0] = torch.full((rows,), hp.init_factor**-0.5, dtype=DTYPE)
        if factored[1]:
            state.S[1] = (1.0 - rho) * _gram(G.T, hp) / rows
            state.Q[1] = _first_basis(state.S[1])
            state.s[1] = torch.full((cols,), hp.init_factor**-0.5, dtype=DTYPE)
        state.m = torch.zeros(rows, cols, dtype=DTYPE)
        state.v = torch.zeros(rows, cols, dtype=DTYPE)
        return W

    state.t += 1
    Q_L, Q_R = _basis(state, 0, rows), _basis(state, 1, cols)
    s_L, s_R = _roots(state, 0, rows), _roots(state, 1, cols)

    # ---- direction with the OLD basis and roots
    if hp.klsoap:  # §7
        Gr = Q_L.T @ G @ Q_R
        state.m = hp.beta1 * state.m + (1.0 - hp.beta1) * Gr
        state.v = hp.beta2 * state.v + (1.0 - hp.beta2) * Gr * Gr
        D = Q_L @ (state.m / (torch.sqrt(state.v) + hp.eps)) @ Q_R.T
    else:  # §6 steps 1-2
        state.m = hp.beta1 * state.m + (1.0 - hp.beta1) * G
        Hm = Q_L.T @ state.m @ Q_R
        q = torch.outer(s_L, s_R)  # q_ij = s_L,i s_R,j
        P = q / (1.0 + hp.eps * q)
        D = Q_L @ (Hm * P) @ Q_R.T

    # ---- §6 step 3: factors with the other side's inverse from the tracked roots (both from the old state)
    inv_R = Q_R @ torch.diag(s_R**2) @ Q_R.T
    inv_L = Q_L @ torch.diag(s_L**2) @ Q_L.T
    # (grams = "bfloat16": as the Gram product of G Q_R diag(s_R), which rounds that operand and the product, _gram)
    rounded = hp.grams == "bfloat16"
    if factored[0]:
        inc = _gram(G @ Q_R @ torch.diag(s_R), hp) if rounded else G @ inv_R @ G.T
        state.S[0] = rho * state.S[0] + (1.0 - rho) / cols * inc
    if factored[1]:
        inc = _gram(G.T @ Q_L @ torch.diag(s_L), hp) if rounded else G.T @ inv_L @ G
        state.S[1] = rho * state.S[1] + (1.0 - rho) / rows * inc

    # ---- §6 step 4: eigenvalue statistics in the old basis, damping with the old roots
    H = Q_L.T @ G @ Q_R
    mean_sR2 = float((s_R**2).mean())
    mean_sL2 = float((s_L**2).mean())
    new_s = [None, None]
    if factored[0]:
        clamp = max(10.0, min(float(rows), hp.max_clamp_value)) if hp.using_clamping else None
        d_L = (H**2 * (s_R**2)[None, :]).sum(dim=1) / cols + hp.damping * mean_sR2  # sum over j
        out = torch.tensor([_new_root(float(s_L[i]), float(d_L[i]), rho, clamp) for i in range(rows)], dtype=DTYPE)
        new_s[0] = out
    if factored[1]:
        clamp = max(10.0, min(float(cols), hp.max_clamp_value)) if hp.using_clamping else None
        d_R = (H**2 * (s_L**2)[:, None]).sum(dim=0) / rows + hp.damping * mean_sL2  # sum over i
        out = torch.tensor([_new_root(float(s_R[j]), float(d_R[j]), rho, clamp) for j in range(cols)], dtype=DTYPE)
        new_s[1] = out
    state.s = new_s

    # ---- §6 step 5: refresh, one power step + QR, no sorting; s stays with its column
    if state.t % hp.precondition_frequency == 0:
        m_orig = Q_L @ state.m @ Q_R.T if hp.klsoap else None
        for k in range(2):
            if factored[k]:
                state.Q[k], _ = torch.linalg.qr(state.S[k] @ state.Q[k])
        if hp.klsoap:  # m' out with the old basis, back in with the new one; v untouched
            state.m = _basis(state, 0, rows).T @ m_orig @ _basis(state, 1, cols)

    # ---- §6 step 6
    if hp.normalize_grads:
        D = D / (1e-30 + torch.sqrt(torch.mean(D * D)))
    W = W - hp.lr * D
    W = W - hp.lr * hp.weight_decay * W
    return W


def kl_reference(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.98),
    shampoo_beta: float = -1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    init_factor: float = 0.1,
    using_damping: bool = False,
    using_clamping: bool = True,
    max_clamp_value: float = 4000.0,
    normalize_grads: bool = False,
    using_klsoap: bool = False,
    max_precond_dim: int = 10000,
    grams: str = "exact",
) -> list[list[torch.Tensor]]:
    """history[k][i] = parameter i (2-D) after call k, in float64 (reference constructor defaults)."""
    hp = KlHyper(
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        rho=betas[1] if shampoo_beta < 0 else shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        init_factor=init_factor,
        damping=eps if using_damping else 0.0,
        using_clamping=using_clamping,
        max_clamp_value=max_clamp_value,
        normalize_grads=normalize_grads,
        klsoap=using_klsoap,
        max_precond_dim=max_precond_dim,
        grams=grams,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = [KlState() for _ in params]
    history = []
    for call in grads:
        for i, g in enumerate(call):
            weights[i] = kl_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
