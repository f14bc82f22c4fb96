"""Naive float64 reference for Pro-KLShampoo (reconstructed), the ``pro_kl_shampoo`` preset.

Written from ``shared/specs/pro_kl_shampoo.md`` (§3 family, §5 update, §6 per-step updates, §7 refresh) and from
kronopt's documented reconstructed choices in ``docs/kl.md`` (section "Pro-KLShampoo"), one 2-D parameter at a time.
Where docs/kl.md and the spec differ, the default follows docs/kl.md and the spec's reading is an option:

* subspace refresh: Rayleigh–Ritz on the current subspace first, then one power step (docs/kl.md,
  ``subspace_refresh="ritz_then_power"``), or the spec §7 order (power step, re-project, then diagonalise S′,
  ``"power_then_diagonalise"``);
* complement scale: ``"whitened"`` (docs/kl.md's default) — NS(C) rescaled to ‖μ^{-1/2} L̂^{-1/2} C‖_F — or the spec's
  ``"identity"`` √(d − r), ``"muon"`` √max(1, m/n), ``"match_rms_adamw"`` 0.2·√max(m, n), or a number; × mult;
* μ is floored (after its EMA and after a re-projection) at 1/c² with KL-Shampoo's clamp c, or at the smallest
  normal float without clamping (docs/kl.md: "the clamp floor on μ is a kronopt choice").

Everything else is KL-Shampoo (``shared/specs/kl_shampoo.md``): momentum in the original basis without bias
correction, ε on the eigenvalue product, tracked eigenvalue EMA with clamp, first call only initialises, refresh
every ``refresh_every`` updates, decoupled weight decay after the step.

The reference is written densely and naively on purpose: R̂ = U S Uᵀ + μ P⊥ and its inverse are formed as n × n
matrices, the statistics are the diagonals of dense sandwiches, the re-projection is U′ᵀ R̂ U′ — so it shares the
formulas of the spec, not the shortcuts of kronopt's implementation.  It never imports kronopt.

Orientation: the state is kept with the restricted side on the **right**.  A left-restricted block is handled
as its transpose (the spec's "mirrored" case): G and M are transposed on the way in and Δ on the way out; only the
``muon`` complement scale looks at the original shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tests.reference.null_space import gram_schmidt  # Gram–Schmidt twice, R's diagonal positive

DTYPE = torch.float64

__all__ = [
    "KJ",
    "POLAR_EXPRESS",
    "ProKlHyper",
    "ProKlState",
    "complement_scale_factor",
    "newton_schulz",
    "ns_schedule",
    "pro_kl_reference",
    "pro_kl_update",
    "resolve_rank",
    "restricted_side",
    "whitened_norm",
]

# ----------------------------------------------------------------------------------------------------------
# Newton–Schulz, written from muon.md / Keller Jordan's Muon and the Polar Express paper

#: Keller Jordan's quintic (Muon), the same tuple at every iteration.
KJ: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: Polar Express (Amsel et al., arXiv 2505.16932, Algorithm 1, degree 5): the paper's coefficients with its safety
#: factor 1.01 applied to every polynomial but the last (a/1.01, b/1.01³, c/1.01⁵); the last repeats afterwards.
_POLAR_EXPRESS_PAPER = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS: tuple[tuple[float, float, float], ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for (a, b, c) in _POLAR_EXPRESS_PAPER[:-1]
) + (_POLAR_EXPRESS_PAPER[-1],)


def ns_schedule(name_or_list, steps: int) -> list[tuple[float, float, float]]:
    """``steps`` coefficient tuples: ``"kj"`` (KJ every time), ``"polar_express"`` (the last one repeated) or a list
    of tuples (the last one repeated)."""
    if name_or_list == "kj":
        base: tuple = (KJ,)
    elif name_or_list == "polar_express":
        base = POLAR_EXPRESS
    else:
        base = tuple(tuple(t) for t in name_or_list)
    return [base[min(k, len(base) - 1)] for k in range(steps)]


def newton_schulz(X: torch.Tensor, coefficients, *, eps: float = 1e-7) -> torch.Tensor:
    """Quintic Newton–Schulz on one matrix, float64.

    X₀ = X / max(‖X‖_F, eps) (a tall X is transposed first so the Gram matrix is the small one, and transposed back);
    each iteration X ← a X + (b A + c A²) X with A = X Xᵀ.  Zero singular values stay zero; NS(0) = 0.
    """
    Y = X.to(DTYPE)
    tall = Y.shape[0] > Y.shape[1]
    if tall:
        Y = Y.T
    Y = Y / max(float(torch.linalg.norm(Y)), eps)
    for a, b, c in coefficients:
        A = Y @ Y.T
        Y = a * Y + (b * A + c * (A @ A)) @ Y
    return Y.T if tall else Y


# ----------------------------------------------------------------------------------------------------------
# hyperparameters and state


@dataclass(frozen=True)
class ProKlHyper:
    lr: float = 1e-4
    beta1: float = 0.9
    rho: float = 0.98  # factor retention (shampoo_beta, or beta2 when negative)
    eps: float = 1e-8
    weight_decay: float = 0.01
    refresh_every: int = 10
    init_factor: float = 0.1
    damping: float = 0.0  # kappa (= eps with using_damping)
    using_clamping: bool = True
    max_clamp_value: float = 4000.0
    normalize_grads: bool = False  # spec §5: the RMS normalisation applies to the whole Δ
    rank: int | float = 0.25
    max_rank: int = 128
    side: str = "larger"  # "larger" (right when square), "left", "right"
    tracker: str = "power"  # "power" or "sketch"
    complement_scale: str | float = "whitened"
    complement_mult: float = 1.0
    ns_coefficients: object = "kj"
    ns_steps: int = 5
    ns_eps: float = 1e-7
    subspace_refresh: str = "ritz_then_power"  # docs/kl.md; "power_then_diagonalise" is the spec §7 order


@dataclass
class ProKlState:
    initialised: bool = False
    t: int = 0
    transposed: bool = False  # True: the restricted side is the left one and the state holds the transposed block
    m: torch.Tensor | None = None  # momentum, working orientation (restricted side on the right)
    S_L: torch.Tensor | None = None  # full side factor EMA (m x m)
    Q_L: torch.Tensor | None = None  # full side basis
    s_L: torch.Tensor | None = None  # full side tracked inverse roots lambda^{-1/2}
    U: torch.Tensor | None = None  # restricted side: orthonormal n x r
    S: torch.Tensor | None = None  # r x r, U^T R_hat U
    tau: torch.Tensor | None = None  # r tracked inverse roots sigma^{-1/2} attached to U's columns
    mu: float = 0.0  # flat eigenvalue
    B: torch.Tensor | None = None  # power product R_hat_new U (power) or its EMA over the period (sketch)
    history: list = field(default_factory=list)  # optional diagnostics (not used by the algorithm)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DTYPE)


def resolve_rank(rank: int | float, max_rank: int, d: int) -> int:
    """docs/kl.md: an integer is an absolute rank, a float a fraction floor(rank·d); capped at max_rank when > 0."""
    r = rank if isinstance(rank, int) else math.floor(rank * d)
    return min(r, max_rank) if max_rank > 0 else r


def restricted_side(side: str, rows: int, cols: int) -> str:
    """``"left"`` or ``"right"``; ``"larger"`` is the larger side, the right one when square."""
    if side == "larger":
        return "left" if rows > cols else "right"
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'larger', 'left' or 'right', got {side!r}")
    return side


def clamp_value(d: int, hp: ProKlHyper) -> float | None:
    """KL-Shampoo's ceiling on an inverse root of a side of size d (None without clamping)."""
    return max(10.0, min(float(d), hp.max_clamp_value)) if hp.using_clamping else None


def mu_floor(d: int, hp: ProKlHyper) -> float:
    c = clamp_value(d, hp)
    return 1.0 / (c * c) if c is not None else torch.finfo(DTYPE).tiny


def _new_root(s_old: float, d: float, rho: float, clamp: float | None) -> float:
    """KL-Shampoo §6 step 4 for one eigenvalue: λ_prev = 1/s² (non-finite → 0), EMA, s = λ^{-1/2} (non-finite → 0)."""
    lam_prev = 1.0 / (s_old * s_old) if s_old != 0.0 else 0.0
    if not math.isfinite(lam_prev):
        lam_prev = 0.0
    lam = rho * lam_prev + (1.0 - rho) * d
    s = 1.0 / math.sqrt(lam) if lam > 0.0 else 0.0
    if not math.isfinite(s):
        s = 0.0
    if clamp is not None:
        s = min(s, clamp)
    return s


def _cosine_columns(n: int, k: int) -> torch.Tensor:
    """The fixed completion of docs/kl.md: Ω_ij = cos(π (i + 1/2)(j + 1/3) / n)."""
    i = torch.arange(n, dtype=DTYPE)[:, None] + 0.5
    j = torch.arange(k, dtype=DTYPE)[None, :] + 1.0 / 3.0
    return torch.cos(math.pi * i * j / max(n, 1))


def _top_right_singular(G: torch.Tensor, r: int) -> torch.Tensor:
    """Spec §6 first call: the top-r right singular vectors of G, completed by the fixed cosine set when G has fewer
    than r singular vectors (r > min(m, n))."""
    n = G.shape[1]
    if r == 0:
        return torch.zeros(n, 0, dtype=DTYPE)
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)
    k = min(r, Vh.shape[0])
    V = Vh[:k].T
    if k < r:
        V = gram_schmidt(torch.cat([V, _cosine_columns(n, r - k)], dim=1))
    return V


def _eigh_descending(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(A)
    return lam.flip(0), Q.flip(1)


def ritz_then_power(B: torch.Tensor, U: torch.Tensor, delta: float) -> torch.Tensor:
    """docs/kl.md's later subspace refresh from the power product ``B`` (d × r): Rayleigh–Ritz on span(U), then
    orth(B V + δ U V). Ritz values at most 4 √max(r, 16) ulps of the largest count as rounding: their vectors, the
    last c columns of V, are replaced by the basis of their span whose last c rows form a lower triangle with a
    positive diagonal (written here as: orthonormalise the transpose of those rows, Gram–Schmidt, and turn the
    vectors by it), and where such a direction's column of B V is rounding too (norm at most 4 √max(d, 16) δ) it is
    U V's column alone."""
    d, r = U.shape
    lam, V = _eigh_descending((U.T @ B + B.T @ U) / 2)
    eps = torch.finfo(DTYPE).eps
    small = [j for j in range(r) if float(lam[j]) <= 4.0 * math.sqrt(max(r, 16)) * eps * float(lam.max())]
    c = len(small)
    assert small == list(range(r - c, r)), "descending order puts the rounding Ritz values last"
    if c:
        turn = gram_schmidt(V[r - c:, r - c:].T.clone())
        V = torch.cat([V[:, : r - c], V[:, r - c:] @ turn], dim=1)
    UV = U @ V
    W = B @ V + delta * UV
    for j in small:
        if float(torch.linalg.norm(W[:, j])) <= 4.0 * math.sqrt(max(d, 16)) * delta:
            W[:, j] = UV[:, j]
    return gram_schmidt(W)


def complement_scale_factor(hp: ProKlHyper, rows: int, cols: int, d: int, r: int) -> float:
    """The fixed factor c × complement_mult (``whitened``: complement_mult alone, the norm comes per block)."""
    rule = hp.complement_scale
    if rule == "whitened":
        c = 1.0
    elif rule == "identity":
        c = math.sqrt(d - r)
    elif rule == "muon":
        c = math.sqrt(max(1.0, rows / cols))
    elif rule == "match_rms_adamw":
        c = 0.2 * math.sqrt(max(rows, cols))
    else:
        c = float(rule)
    return c * hp.complement_mult


def whitened_norm(C: torch.Tensor, Q_L: torch.Tensor, s_L: torch.Tensor, mu: float) -> float:
    """‖μ^{-1/2} L̂^{-1/2} C‖_F with L̂^{-1/2} = Q_L diag(s_L) Q_Lᵀ (s_L = λ_L^{-1/2}), formed densely."""
    L_inv_half = Q_L @ torch.diag(s_L) @ Q_L.T
    return float(torch.linalg.norm(L_inv_half @ C)) / math.sqrt(mu)


# ----------------------------------------------------------------------------------------------------------
# one call


def _first_call(G: torch.Tensor, state: ProKlState, hp: ProKlHyper, r: int) -> None:
    """Spec §6 first call (and the refresh at the first call): S_L = (1−ρ)GGᵀ/n, Q_L = eigh(S_L) descending,
    U = top-r right singular vectors, S = (1−ρ)UᵀGᵀGU/m, λ_L = σ = μ = init_factor."""
    m, n = G.shape
    rho = hp.rho
    state.S_L = (1.0 - rho) * (G @ G.T) / n
    _, state.Q_L = _eigh_descending(state.S_L)
    state.s_L = torch.full((m,), hp.init_factor**-0.5, dtype=DTYPE)
    state.U = _top_right_singular(G, r)
    state.S = (1.0 - rho) * state.U.T @ G.T @ G @ state.U / m
    state.tau = torch.full((r,), hp.init_factor**-0.5, dtype=DTYPE)
    state.mu = hp.init_factor
    state.B = state.U @ state.S  # sketch: reset to U S at each refresh (here the first one)
    state.m = torch.zeros(m, n, dtype=DTYPE)


def _direction(state: ProKlState, hp: ProKlHyper, rows: int, cols: int, r: int) -> torch.Tensor:
    """Spec §5 / docs/kl.md: Δ = Q_L[(Q_Lᵀ M U) ⊙ P]Uᵀ + c·NS(M − (MU)Uᵀ), working orientation."""
    M, Q_L, s_L, U, tau = state.m, state.Q_L, state.s_L, state.U, state.tau
    n = M.shape[1]
    q = torch.outer(s_L, tau)  # q_ij = s_L,i tau_j
    P = q / (1.0 + hp.eps * q)
    D_sub = Q_L @ ((Q_L.T @ M @ U) * P) @ U.T
    P_perp = _eye(n) - U @ U.T
    C = M @ P_perp
    O = newton_schulz(C, ns_schedule(hp.ns_coefficients, hp.ns_steps), eps=hp.ns_eps)
    if hp.complement_scale == "whitened":
        norm_O = float(torch.linalg.norm(O))
        O = O * (whitened_norm(C, Q_L, s_L, state.mu) / norm_O) if norm_O > 0 else torch.zeros_like(O)
    return D_sub + complement_scale_factor(hp, rows, cols, n, r) * O


def _factor_update(G: torch.Tensor, state: ProKlState, hp: ProKlHyper, r: int) -> None:
    """Spec §6, all from the old state: S_L, λ_L; S, σ, μ (the M-projection of the KL EMA); the power product."""
    m, n = G.shape
    rho = hp.rho
    Q_L, s_L, U, S, tau, mu = state.Q_L, state.s_L, state.U, state.S, state.tau, state.mu
    P_perp = _eye(n) - U @ U.T
    R_hat = U @ S @ U.T + mu * P_perp  # the restricted factor
    R_inv = U @ torch.diag(tau**2) @ U.T + P_perp / mu  # its inverse from the tracked values
    L_inv = Q_L @ torch.diag(s_L**2) @ Q_L.T
    mean_R_inv = float(torch.trace(R_inv)) / n  # damping: kappa * tr(R_inv)/n on the left's statistic
    mean_L_inv = float(torch.trace(L_inv)) / m  # ... and kappa * tr(L_inv)/m on sigma and mu

    # left (full) side
    state.S_L = rho * state.S_L + (1.0 - rho) / n * (G @ R_inv @ G.T)
    d_L = torch.diagonal(Q_L.T @ G @ R_inv @ G.T @ Q_L) / n + hp.damping * mean_R_inv
    c_L = clamp_value(m, hp)
    new_s_L = torch.tensor([_new_root(float(s_L[i]), float(d_L[i]), rho, c_L) for i in range(m)], dtype=DTYPE)

    # right (restricted) side: the whitened second moment X = Gᵀ L̂⁻¹ G / m
    X = G.T @ L_inv @ G / m
    new_S = rho * S + (1.0 - rho) * (U.T @ X @ U)
    d_R = torch.diagonal(U.T @ X @ U) + hp.damping * mean_L_inv
    c_R = clamp_value(n, hp)
    new_tau = torch.tensor([_new_root(float(tau[j]), float(d_R[j]), rho, c_R) for j in range(r)], dtype=DTYPE)
    d_mu = float(torch.trace(P_perp @ X @ P_perp)) / (n - r) + hp.damping * mean_L_inv
    new_mu = rho * mu + (1.0 - rho) * d_mu
    if not math.isfinite(new_mu):
        new_mu = hp.init_factor
    new_mu = max(new_mu, mu_floor(n, hp))

    if hp.tracker == "power":  # one power step on the updated factor: R̂_new U
        state.B = (rho * R_hat + (1.0 - rho) * X) @ U
    elif hp.tracker == "sketch":  # EMA of the increments over the period
        state.B = rho * state.B + (1.0 - rho) * X @ U
    else:
        raise ValueError(f"tracker must be 'power' or 'sketch', got {hp.tracker!r}")
    state.s_L, state.S, state.tau, state.mu = new_s_L, new_S, new_tau, new_mu


def _tracked(state: ProKlState) -> torch.Tensor:
    """The tracked form U diag(σ) Uᵀ + μP⊥ whose re-projection gives σ′ (s = 0 means λ = ∞, counted as 0)."""
    U, tau, mu = state.U, state.tau, state.mu
    sigma = torch.where(tau > 0, 1.0 / tau**2, torch.zeros_like(tau))
    return U @ torch.diag(sigma) @ U.T + mu * (_eye(U.shape[0]) - U @ U.T)


def _roots(sigma: torch.Tensor, n: int, hp: ProKlHyper) -> torch.Tensor:
    """Tracked inverse roots s = σ^{-1/2} (0 for σ = 0), clamped at c(n)."""
    tau = torch.where(sigma > 0, sigma.rsqrt(), torch.zeros_like(sigma))
    c = clamp_value(n, hp)
    return tau if c is None else tau.clamp(max=c)


def _reproject(state: ProKlState, U_new: torch.Tensor, hp: ProKlHyper) -> None:
    """Spec §7 / docs/kl.md: S′ = U′ᵀ R̂ U′, μ′ keeps tr R̂ (floored), σ′ = diag U′ᵀ (U diag(σ) Uᵀ + μP⊥) U′."""
    U, S, mu = state.U, state.S, state.mu
    n, r = U.shape
    R_hat = U @ S @ U.T + mu * (_eye(n) - U @ U.T)
    R_tracked = _tracked(state)
    S_new = U_new.T @ R_hat @ U_new
    mu_new = (float(torch.trace(R_hat)) - float(torch.trace(S_new))) / (n - r)
    if not math.isfinite(mu_new):
        mu_new = hp.init_factor
    mu_new = max(mu_new, mu_floor(n, hp))
    sigma_new = torch.diagonal(U_new.T @ R_tracked @ U_new).clamp(min=0.0)
    state.U, state.S, state.tau, state.mu = U_new, S_new, _roots(sigma_new, n, hp), mu_new


def _refresh(state: ProKlState, hp: ProKlHyper) -> None:
    """Every refresh_every updates: Q_L ← QR(S_L Q_L) (no sort); the restricted side from the power product."""
    state.Q_L, _ = torch.linalg.qr(state.S_L @ state.Q_L)
    U, B = state.U, state.B
    r = U.shape[1]
    if r > 0:
        # a vanishing direction of B keeps the current one (docs/kl.md): add a 1e-16-relative multiple of U
        delta = torch.finfo(DTYPE).eps * float(torch.linalg.norm(B)) + torch.finfo(DTYPE).tiny
        if hp.subspace_refresh == "ritz_then_power":
            # Rayleigh–Ritz on span(U): Uᵀ B = V E Vᵀ (descending), then one power step U′ = orth(B V)
            _reproject(state, ritz_then_power(B, U, delta), hp)
        elif hp.subspace_refresh == "power_then_diagonalise":
            # spec §7: U_new = orth(B), re-project, then diagonalise S′ = V E Vᵀ and rotate U into S′'s eigenbasis;
            # σ′ is the diagonal of the tracked form re-projected onto the final U_new V (not the rotated diagonal)
            R_tracked = _tracked(state)
            _reproject(state, gram_schmidt(B + delta * U), hp)
            E, V = _eigh_descending(state.S)
            state.U, state.S = state.U @ V, torch.diag(E)
            sigma = torch.diagonal(state.U.T @ R_tracked @ state.U).clamp(min=0.0)
            state.tau = _roots(sigma, U.shape[0], hp)
        else:
            raise ValueError(f"unknown subspace_refresh {hp.subspace_refresh!r}")
    state.B = state.U @ state.S  # the sketch restarts from U S; the power tracker overwrites B every step


def pro_kl_update(W: torch.Tensor, G: torch.Tensor, state: ProKlState, hp: ProKlHyper) -> torch.Tensor:
    """One call for one 2-D parameter; mutates ``state`` and returns the new W (float64)."""
    rows, cols = W.shape
    W = W.detach().to(DTYPE).clone()
    G = G.detach().to(DTYPE)
    side = restricted_side(hp.side, rows, cols)
    d = rows if side == "left" else cols
    r = resolve_rank(hp.rank, hp.max_rank, d)
    if not 0 <= r < d:
        raise ValueError(f"the reference needs 0 <= r < d (r >= d is plain KL-Shampoo), got r={r}, d={d}")
    Gw = G.T if side == "left" else G  # working orientation: restricted side on the right

    if not state.initialised:  # first call: initialise, refresh, no parameter update
        state.initialised = True
        state.transposed = side == "left"
        _first_call(Gw, state, hp, r)
        return W

    state.t += 1
    state.m = hp.beta1 * state.m + (1.0 - hp.beta1) * Gw  # momentum, original basis, no bias correction
    D = _direction(state, hp, rows, cols, r)  # old basis, old eigenvalues (factor_update = "after")
    _factor_update(Gw, state, hp, r)
    if state.t % hp.refresh_every == 0:
        _refresh(state, hp)
    if side == "left":
        D = D.T
    if hp.normalize_grads:
        D = D / (1e-30 + torch.sqrt(torch.mean(D * D)))
    W = W - hp.lr * D
    W = W - hp.lr * hp.weight_decay * W
    return W


def pro_kl_reference(
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.98),
    shampoo_beta: float = -1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    refresh_every: int = 10,
    init_factor: float = 0.1,
    using_damping: bool = False,
    using_clamping: bool = True,
    max_clamp_value: float = 4000.0,
    normalize_grads: bool = False,
    rank: int | float = 0.25,
    max_rank: int = 128,
    side: str = "larger",
    tracker: str = "power",
    complement_scale: str | float = "whitened",
    complement_mult: float = 1.0,
    ns_coefficients: object = "kj",
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    subspace_refresh: str = "ritz_then_power",
    states: list[ProKlState] | None = None,
) -> list[list[torch.Tensor]]:
    """history[k][i] = parameter i (2-D) after call k, float64; defaults are the preset's.  ``states``, if given
    (one empty ProKlState per parameter), is filled so tests can inspect the final state."""
    hp = ProKlHyper(
        lr=lr,
        beta1=betas[0],
        rho=betas[1] if shampoo_beta < 0 else shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        refresh_every=refresh_every,
        init_factor=init_factor,
        damping=eps if using_damping else 0.0,
        using_clamping=using_clamping,
        max_clamp_value=max_clamp_value,
        normalize_grads=normalize_grads,
        rank=rank,
        max_rank=max_rank,
        side=side,
        tracker=tracker,
        complement_scale=complement_scale,
        complement_mult=complement_mult,
        ns_coefficients=ns_coefficients,
        ns_steps=ns_steps,
        ns_eps=ns_eps,
        subspace_refresh=subspace_refresh,
    )
    weights = [p.detach().to(DTYPE).clone() for p in params]
    states = states if states is not None else [ProKlState() for _ in params]
    history = []
    for call in grads:
        for i, g in enumerate(call):
            weights[i] = pro_kl_update(weights[i], g, states[i], hp)
        history.append([w.clone() for w in weights])
    return history
