"""Naive float64 reference for the DyKAF optimizer.

Written from ``shared/specs/dykaf.md`` (§3-§8) on top of the SOAP step of ``soap.md`` (§5-§6), one parameter at
a time. It never imports kronopt. To stay independent of the library's cheap sandwich formulas, the projector
splitting is done here on the *dense* rearranged matrices: the state Y = vec L vec Rᵀ (m² × n²) and the increment
ΔA = (1 − β) G ⊗ G (torch.kron), with the K-, S- and L-steps of §3 (or the Galerkin form of §4) written as plain
matrix-vector products. This is only usable for small blocks, which is all the tests need.

vec is row-major (``X.reshape(-1)``), so the rearrangement of vec G vec Gᵀ is ``torch.kron(G, G)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64

__all__ = ["dykaf_reference", "ksl_dense", "ksl_sandwich", "parallel_dense", "parallel_sandwich"]


@dataclass(frozen=True)
class Hyper:
    lr: float
    beta1: float
    beta2: float
    rho: float
    eps: float
    weight_decay: float
    precondition_frequency: int
    max_precond_dim: int
    variant: str
    init: str
    one_sided: str
    rank1: bool
    grams: str = "exact"  # "bfloat16": kronopt's factors.product_dtype (ksl_sandwich(rounded=True), _gram)


@dataclass
class State:
    initialised: bool = False
    t: int = 0
    L: torch.Tensor | None = None
    R: torch.Tensor | None = None
    Q_L: torch.Tensor | None = None
    Q_R: torch.Tensor | None = None
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None  # full second moment
    l: torch.Tensor | None = None  # rank-1 second moment l rᵀ
    r: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# projector splitting on the dense rearranged matrix


def ksl_dense(L: torch.Tensor, R: torch.Tensor, G: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """§3 on explicit m²×n² matrices: K-step, backward S-step, L-step with the new U."""
    m, n = L.shape[0], R.shape[0]
    dA = (1.0 - beta) * torch.kron(G, G)  # m² × n²
    U0 = L.reshape(-1) / torch.linalg.norm(L)
    V0 = R.reshape(-1) / torch.linalg.norm(R)
    S0 = beta * torch.linalg.norm(L) * torch.linalg.norm(R)
    K = U0 * S0 + dA @ V0
    S_hat = torch.linalg.norm(K)
    U1 = K / S_hat
    S_tilde = S_hat - U1 @ dA @ V0
    L_tilde = V0 * S_tilde + dA.T @ U1
    S1 = torch.linalg.norm(L_tilde)
    V1 = L_tilde / S1
    L_new = math.sqrt(S1) * U1.reshape(m, m)
    R_new = math.sqrt(S1) * V1.reshape(n, n)
    return (L_new + L_new.T) / 2, (R_new + R_new.T) / 2


def _rounded(X: torch.Tensor) -> torch.Tensor:
    """X rounded to the nearest bfloat16, kept in float64."""
    return X.to(torch.bfloat16).to(DTYPE)


def ksl_sandwich(
    L: torch.Tensor, R: torch.Tensor, G: torch.Tensor, beta: float, *, rounded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """§3's proj_split_ksl as its pseudo-code writes it, on m×m and n×n matrices (the same step as ksl_dense).

    rounded: kronopt's factors.product_dtype = "bfloat16": each of the four products (G R̄, then (G R̄) Gᵀ; U G, then
    Gᵀ (U G)) reads its operands rounded to bfloat16 (G, R̄ = R/‖R‖, U = K/‖K‖ and the product before) and its
    result is rounded (the sums exact here); the EMA's weights (√β on the state, √(1−β) on G: 1 − β on a product of
    two G) are applied outside the products, the rest in float64."""
    rnd = _rounded if rounded else (lambda X: X)
    r = math.sqrt(beta) * torch.linalg.norm(R)  # ‖√β R‖
    R_bar = R / torch.linalg.norm(R)
    G_ = rnd(G)
    C = rnd(rnd(G_ @ rnd(R_bar)) @ G_.T)
    C = (1.0 - beta) * (C + C.T) / 2  # G R̄ Gᵀ of √(1−β) G
    K = r * math.sqrt(beta) * L + C  # r · (√β L) + C
    U = K / torch.linalg.norm(K)
    S_tilde = r * math.sqrt(beta) * (U * L).sum()  # r ⟨U, √β L⟩
    D = rnd(G_.T @ rnd(rnd(U) @ G_))
    R_hat = S_tilde * R_bar + (1.0 - beta) * (D + D.T) / 2
    S = torch.linalg.norm(R_hat)
    return math.sqrt(S) * U, R_hat / math.sqrt(S)


def parallel_sandwich(
    L: torch.Tensor, R: torch.Tensor, G: torch.Tensor, beta: float, *, rounded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """§4's proj_split_parallel as its pseudo-code writes it (the same step as parallel_dense); rounded as
    ksl_sandwich's: each sandwich's two products read their operands rounded to bfloat16 (G, the middle, the
    product before) and round their results, the weight 1 − β (√(1−β) on each G) outside them."""
    rnd = _rounded if rounded else (lambda X: X)
    G_ = rnd(G)

    def sand(X):  # G X Gᵀ of √(1−β) G
        P = rnd(rnd(G_ @ rnd(X)) @ G_.T)
        return (1.0 - beta) * (P + P.T) / 2

    def sand_t(Y):  # Gᵀ Y G of √(1−β) G
        P = rnd(rnd(G_.T @ rnd(Y)) @ G_)
        return (1.0 - beta) * (P + P.T) / 2

    ell, r = math.sqrt(beta) * torch.linalg.norm(L), math.sqrt(beta) * torch.linalg.norm(R)
    S0 = ell * r
    L_bar, R_bar = L / torch.linalg.norm(L), R / torch.linalg.norm(R)
    U = S0 * L_bar + sand(R_bar)
    U = U / torch.linalg.norm(U)
    V = S0 * R_bar + sand_t(L_bar)  # V from the OLD L̄
    V = V / torch.linalg.norm(V)
    S1 = S0 * (L_bar * U).sum() * (R_bar * V).sum() + (U * sand(V)).sum()
    return math.sqrt(S1) * U, math.sqrt(S1) * V


def _gram(G: torch.Tensor, hp: "Hyper") -> torch.Tensor:
    """G Gᵀ; under grams = "bfloat16" G and the product rounded to bfloat16 (kronopt's product_dtype)."""
    if hp.grams == "bfloat16":
        G_ = _rounded(G)
        return _rounded(G_ @ G_.T)
    return G @ G.T


def parallel_dense(L: torch.Tensor, R: torch.Tensor, G: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """§4 on explicit matrices: U ∝ A V₀, V ∝ Aᵀ U₀, S₁ = Uᵀ A V with A = βY₀ + (1−β) G⊗G."""
    m, n = L.shape[0], R.shape[0]
    A = beta * torch.outer(L.reshape(-1), R.reshape(-1)) + (1.0 - beta) * torch.kron(G, G)
    U0 = L.reshape(-1) / torch.linalg.norm(L)
    V0 = R.reshape(-1) / torch.linalg.norm(R)
    U = A @ V0
    U = U / torch.linalg.norm(U)
    V = A.T @ U0
    V = V / torch.linalg.norm(V)
    S1 = U @ A @ V
    L_new = math.sqrt(S1) * U.reshape(m, m)
    R_new = math.sqrt(S1) * V.reshape(n, n)
    return (L_new + L_new.T) / 2, (R_new + R_new.T) / 2


def kron_init(G: torch.Tensor, beta: float, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """§5: top singular triplet of G; σ₁√(1−β) per factor (kron) or √σ₁ (kron_reference)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    u, s, v = U[:, 0], S[0], Vh[0, :]
    scale = math.sqrt(1.0 - beta) * s if how == "kron" else torch.sqrt(s)
    return scale * torch.outer(u, u), scale * torch.outer(v, v)


def rank1_update(l, r, D, beta):
    """§7, literally."""
    a, b = torch.linalg.norm(l), torch.linalg.norm(r)
    lb, rb, S0 = l / a, r / b, a * b
    l1 = beta * S0 * lb + (1 - beta) * D @ rb
    r1 = beta * S0 * rb + (1 - beta) * D.T @ lb
    l1, r1 = l1 / torch.linalg.norm(l1), r1 / torch.linalg.norm(r1)
    c = beta * S0 * (l1 @ lb) * (r1 @ rb) + (1 - beta) * l1 @ D @ r1
    return math.sqrt(c) * l1, math.sqrt(c) * r1


# ----------------------------------------------------------------------------------------------------------
# SOAP helpers (as in tests/reference/soap.py)


def rotate(X, Q_L, Q_R):
    if Q_L is not None:
        X = Q_L.T @ X
    if Q_R is not None:
        X = X @ Q_R
    return X


def unrotate(X, Q_L, Q_R):
    if Q_L is not None:
        X = Q_L @ X
    if Q_R is not None:
        X = X @ Q_R.T
    return X


def initial_basis(X):
    _lam, vecs = torch.linalg.eigh(X)
    return torch.flip(vecs, dims=[1])


def refresh_side(X, Q):
    rayleigh = torch.diag(Q.T @ X @ Q)
    pi = torch.argsort(rayleigh, descending=True, stable=True)
    Q_new, _ = torch.linalg.qr(X @ Q[:, pi])
    return Q_new, pi


# ----------------------------------------------------------------------------------------------------------
# one call


def _factors(state: State, G: torch.Tensor, hp: Hyper, *, first: bool) -> None:
    """Update L and R with G (§6 for two factored sides, §8 for one)."""
    rho = hp.rho
    if state.L is not None and state.R is not None:
        if hp.grams == "bfloat16":
            step = functools.partial(ksl_sandwich if hp.variant == "ksl" else parallel_sandwich, rounded=True)
        else:
            step = ksl_dense if hp.variant == "ksl" else parallel_dense

        if first:
            if hp.init in ("kron", "kron_reference"):
                state.L, state.R = kron_init(G, rho, hp.init)
            elif hp.init == "eps":
                m, n = G.shape
                state.L = 1e-3 * torch.eye(m, dtype=DTYPE) / math.sqrt(m)
                state.R = 1e-3 * torch.eye(n, dtype=DTYPE) / math.sqrt(n)
            else:  # sum
                state.L, state.R = G @ G.T, G.T @ G
            if hp.init == "kron":
                return  # the kron start already is the EMA's first term
        state.L, state.R = step(state.L, state.R, G, rho)
        return
    for side in ("L", "R"):
        X = getattr(state, side)
        if X is None:
            continue
        GG = _gram(G, hp) if side == "L" else _gram(G.T, hp)
        if hp.one_sided == "ema":
            X = rho * X + (1 - rho) * GG
        else:
            X = X + GG
        setattr(state, side, X)


def dykaf_update(W: torch.Tensor, G: torch.Tensor, state: State, hp: Hyper) -> torch.Tensor:
    shape = W.shape
    rows, cols = (shape[0], 1) if len(shape) == 1 else (shape[0], shape[1])
    W = W.detach().to(DTYPE).reshape(rows, cols).clone()
    G = G.detach().to(DTYPE).reshape(rows, cols).clone()
    is_2d = len(shape) == 2
    left = is_2d and rows <= hp.max_precond_dim
    right = is_2d and cols <= hp.max_precond_dim

    if not state.initialised:
        state.initialised = True
        if left:
            state.L = torch.zeros(rows, rows, dtype=DTYPE) if hp.one_sided == "ema" or right else (
                1e-3 * torch.eye(rows, dtype=DTYPE) / math.sqrt(rows)
            )
        if right:
            state.R = torch.zeros(cols, cols, dtype=DTYPE) if hp.one_sided == "ema" or left else (
                1e-3 * torch.eye(cols, dtype=DTYPE) / math.sqrt(cols)
            )
        _factors(state, G, hp, first=True)
        state.Q_L = initial_basis(state.L) if left else None
        state.Q_R = initial_basis(state.R) if right else None
        state.m = torch.zeros(rows, cols, dtype=DTYPE)
        state.v = torch.zeros(rows, cols, dtype=DTYPE)
        state.l = torch.full((rows,), 1e-8, dtype=DTYPE)
        state.r = torch.full((cols,), 1e-8, dtype=DTYPE)
        return W.reshape(shape)

    b1, b2 = hp.beta1, hp.beta2
    state.t += 1
    t = state.t
    Gr = rotate(G, state.Q_L, state.Q_R)
    state.m = b1 * state.m + (1 - b1) * Gr
    if hp.rank1:
        state.l, state.r = rank1_update(state.l, state.r, Gr * Gr, b2)
        v = torch.outer(state.l, state.r)
    else:
        state.v = b2 * state.v + (1 - b2) * Gr * Gr
        v = state.v
    N = unrotate(state.m / (torch.sqrt(v) + hp.eps), state.Q_L, state.Q_R)
    step_size = hp.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    W = W - step_size * N
    if hp.weight_decay > 0:
        W = W - hp.lr * hp.weight_decay * W
    _factors(state, G, hp, first=False)
    if t % hp.precondition_frequency == 0:
        m_orig = unrotate(state.m, state.Q_L, state.Q_R)
        if left:
            state.Q_L, pi = refresh_side(state.L, state.Q_L)
            state.v, state.l = state.v[pi, :], state.l[pi]
        if right:
            state.Q_R, pi = refresh_side(state.R, state.Q_R)
            state.v, state.r = state.v[:, pi], state.r[pi]
        state.m = rotate(m_orig, state.Q_L, state.Q_R)
    return W.reshape(shape)


def dykaf_reference(
    params,
    grads,
    *,
    lr=3e-3,
    betas=(0.95, 0.95),
    shampoo_beta=-1.0,
    eps=1e-8,
    weight_decay=0.01,
    precondition_frequency=10,
    max_precond_dim=10000,
    variant="ksl",
    init="kron",
    one_sided="ema",
    rank1=False,
    grams="exact",
):
    """history[k][i] = param i after call k, in float64 (like ``soap_reference``)."""
    hp = Hyper(
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        rho=betas[1] if shampoo_beta < 0 else shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        variant=variant,
        init=init,
        one_sided=one_sided,
        rank1=rank1,
        grams=grams,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = [State() for _ in params]
    history = []
    for call in grads:
        for i, g in enumerate(call):
            weights[i] = dykaf_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
