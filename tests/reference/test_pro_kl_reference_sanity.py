"""Self-checks of the clean-room Pro-KLShampoo reference (``pro_kl_shampoo.py``); nothing here imports kronopt.

Closed forms and limits from shared/specs/pro_kl_shampoo.md §3–§5 and §10, each computed independently of the
reference's own formulas (SVD polar factors, dense matrix roots by eigh, solves, scalar polynomial iterations).
"""

from __future__ import annotations

import math

import pytest
import torch

from .pro_kl_shampoo import (
    KJ,
    ProKlHyper,
    ProKlState,
    _direction,
    _factor_update,
    _refresh,
    newton_schulz,
    ns_schedule,
    pro_kl_reference,
    whitened_norm,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def orthonormal(gen, n, k):
    q, r = torch.linalg.qr(randn(gen, n, n))
    return (q * torch.sign(torch.diag(r)))[:, :k]


def spd(gen, n, lo=-1.0, hi=1.0):
    Q = orthonormal(gen, n, n)
    lam = 10 ** (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64))
    return Q @ torch.diag(lam) @ Q.T


def root(A, p):
    lam, Q = torch.linalg.eigh(A)
    return Q @ torch.diag(lam.clamp(min=0) ** p) @ Q.T


def polar(X):
    P, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return P @ Vh


def assert_orthonormal(U, tol=1e-12):
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=F64), rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------------------------
# Newton–Schulz


def test_newton_schulz_on_a_rank_one_matrix_is_the_composed_scalar_quintic():
    """NS(σ u vᵀ) = p(1) u vᵀ: after Frobenius normalisation the only singular value is 1 (p iterated by hand)."""
    gen = torch.Generator().manual_seed(0)
    u, v = randn(gen, 5), randn(gen, 9)
    x = 1.0
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    X = 3.7 * torch.outer(u, v)
    expected = x * torch.outer(u / u.norm(), v / v.norm())
    torch.testing.assert_close(newton_schulz(X, ns_schedule("kj", 5)), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(newton_schulz(X.T, ns_schedule("kj", 5)), expected.T, rtol=1e-12, atol=1e-14)
    assert ns_schedule("kj", 3) == [KJ] * 3


def test_newton_schulz_polar_express_converges_to_the_polar_factor_and_keeps_zero():
    """Polar Express (8 steps, float64): within the NS tolerance of the SVD polar factor; NS(0) = 0."""
    gen = torch.Generator().manual_seed(1)
    for shape in ((6, 8), (8, 6), (7, 7)):
        X = randn(gen, *shape)
        rel = (newton_schulz(X, ns_schedule("polar_express", 8)) - polar(X)).norm() / polar(X).norm()
        assert rel < 1e-3, (shape, rel)
    assert torch.equal(newton_schulz(torch.zeros(4, 6, dtype=F64), ns_schedule("kj", 5)), torch.zeros(4, 6, dtype=F64))


def test_newton_schulz_is_equivariant_under_orthogonal_maps():
    """NS(A X B) = A NS(X) B for orthogonal A, B (it acts on singular values only)."""
    gen = torch.Generator().manual_seed(2)
    X, A, B = randn(gen, 5, 7), orthonormal(gen, 5, 5), orthonormal(gen, 7, 7)
    sched = ns_schedule("kj", 5)
    torch.testing.assert_close(newton_schulz(A @ X @ B, sched), A @ newton_schulz(X, sched) @ B, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# first call, limits and the first update in closed form


@pytest.mark.parametrize("side", ["left", "right"])
def test_first_call_leaves_w_unchanged_and_initialises(side):
    gen = torch.Generator().manual_seed(3)
    W, G = randn(gen, 6, 9), randn(gen, 6, 9)
    states = [ProKlState()]
    hist = pro_kl_reference([W], [[G]], weight_decay=0.5, rank=2, side=side, init_factor=0.25, states=states)
    assert torch.equal(hist[0][0], W)
    st = states[0]
    assert st.t == 0 and st.mu == 0.25
    assert torch.equal(st.s_L, torch.full_like(st.s_L, 2.0)) and torch.equal(st.tau, torch.full_like(st.tau, 2.0))
    Gw = G.T if side == "left" else G  # restricted side on the right of the working block
    V = torch.linalg.svd(Gw, full_matrices=False).Vh[:2].T
    assert_orthonormal(st.U)
    torch.testing.assert_close(st.U @ st.U.T, V @ V.T, rtol=0, atol=1e-12)
    m = Gw.shape[0]
    torch.testing.assert_close(st.S, 0.02 * st.U.T @ Gw.T @ Gw @ st.U / m, rtol=1e-12, atol=1e-14)


def test_rank_zero_is_muon_up_to_scale():
    """§5 / §10 test 3: r = 0 gives Δ = √n · NS(M); with Polar Express that is √n · polar(M) within NS accuracy."""
    gen = torch.Generator().manual_seed(4)
    m, n, lr, beta1 = 5, 8, 0.1, 0.9
    W = randn(gen, m, n)
    grads = [[randn(gen, m, n)] for _ in range(5)]
    hist = pro_kl_reference(
        [W], grads, lr=lr, weight_decay=0.0, rank=0, side="right", complement_scale="identity",
        ns_coefficients="polar_express", ns_steps=10, refresh_every=2,
    )
    M = torch.zeros(m, n, dtype=F64)
    before = W
    for k in range(1, 5):
        M = beta1 * M + (1 - beta1) * grads[k][0]
        D = (before - hist[k][0]) / lr
        assert ((D - math.sqrt(n) * polar(M)).norm() / (math.sqrt(n) * polar(M)).norm()) < 1e-3
        before = hist[k][0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("r", [0, 2])
def test_first_update_in_closed_form_with_the_whitened_complement(side, r):
    """At the first update every tracked eigenvalue is init_factor: Δ U Uᵀ = q/(1+εq)·M U Uᵀ with q = 1/init, and the
    complement block has norm ‖C‖/init (μ^{-1/2}‖L̂^{-1/2} C‖ with L̂ = μ = init), direction NS(C)."""
    gen = torch.Generator().manual_seed(5)
    init, eps, lr, beta1 = 0.3, 1e-3, 0.5, 0.9
    W, G0, G1 = randn(gen, 6, 8), randn(gen, 6, 8), randn(gen, 6, 8)
    states = [ProKlState()]
    hist = pro_kl_reference(
        [W], [[G0], [G1]], lr=lr, weight_decay=0.0, rank=r, side=side, init_factor=init, eps=eps, states=states
    )
    D = (W - hist[1][0]) / lr
    M = (1 - beta1) * G1
    U0 = torch.linalg.svd(G0.T if side == "left" else G0, full_matrices=False).Vh[:r].T  # first-call subspace
    Pi = U0 @ U0.T
    q = 1 / init
    if side == "left":
        D, M = D.T, M.T
    torch.testing.assert_close(D @ Pi, q / (1 + eps * q) * M @ Pi, rtol=1e-10, atol=1e-12)
    C = M - M @ Pi
    block = D - D @ Pi
    torch.testing.assert_close(block.norm(), C.norm() / init, rtol=1e-12, atol=0)
    O = newton_schulz(C, ns_schedule("kj", 5))
    torch.testing.assert_close(block, O * (C.norm() / init / O.norm()), rtol=1e-10, atol=1e-12)


def test_whitened_norm_is_the_dense_whitened_complement():
    """whitened_norm = μ^{-1/2}‖L^{-1/2} C‖_F, checked as √(tr(Cᵀ L⁻¹ C)/μ) with a solve (no root)."""
    gen = torch.Generator().manual_seed(6)
    L = spd(gen, 5, -2.0, 1.0)
    lam, Q = torch.linalg.eigh(L)
    C, mu = randn(gen, 5, 9), 0.37
    expected = math.sqrt(float(torch.trace(C.T @ torch.linalg.solve(L, C))) / mu)
    assert whitened_norm(C, Q, lam.rsqrt(), mu) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# the family: spike-and-flat identity, M-projection, re-projection


def _state(gen, m, n, r, *, mu, L=None, Sigma=None):
    """A hand-built state: L (full side) and the restricted R̂ = U Σ Uᵀ + μ P⊥ with U in Σ's eigenbasis."""
    L = spd(gen, m) if L is None else L
    lam_L, Q_L = torch.linalg.eigh(L)
    U = orthonormal(gen, n, r)
    Sigma = spd(gen, r, 0.5, 2.0) if Sigma is None else Sigma
    sig, V = torch.linalg.eigh(Sigma)
    st = ProKlState(initialised=True, t=1)
    st.Q_L, st.s_L, st.S_L = Q_L, lam_L.rsqrt(), L.clone()
    st.U, st.S, st.tau, st.mu = U @ V, torch.diag(sig), sig.rsqrt(), mu
    st.m = randn(gen, m, n)
    st.B = st.U @ st.S
    return st, L, U @ Sigma @ U.T + mu * (torch.eye(n, dtype=F64) - U @ U.T)


def test_spike_and_flat_restricted_step_equals_full_kl_shampoo():
    """§3 / §10 test 4: for an exact spike-and-flat R the subspace block + μ^{-1/2} L^{-1/2} M P⊥ is L^{-1/2} M R^{-1/2};
    the reference's whitened complement has exactly that block's norm; with L = L⊥ the block is √(n−r)·polar(M P⊥)."""
    gen = torch.Generator().manual_seed(7)
    m, n, r, mu = 4, 9, 3, 0.7
    st, L, R = _state(gen, m, n, r, mu=mu)
    hp = ProKlHyper(eps=0.0, rank=r, complement_scale="whitened")
    D = _direction(st, hp, m, n, r)
    M, U = st.m, st.U
    P_perp = torch.eye(n, dtype=F64) - U @ U.T
    full = root(L, -0.5) @ M @ root(R, -0.5)
    exact_complement = mu**-0.5 * root(L, -0.5) @ M @ P_perp
    torch.testing.assert_close(D @ U @ U.T + exact_complement, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((D @ P_perp).norm(), exact_complement.norm(), rtol=1e-12, atol=0)
    # the identity (§4): with L := L⊥ = μ⁻¹ M P⊥ Mᵀ/(n−r), μ cancels and the block is the orthogonalized complement
    C = M @ P_perp
    L_perp = C @ C.T / (mu * (n - r))
    torch.testing.assert_close(mu**-0.5 * root(L_perp, -0.5) @ C, math.sqrt(n - r) * polar(C), rtol=1e-10, atol=1e-12)


def _kl(T, R):
    """KL(N(0,T) ‖ N(0,R)) up to a constant in R: ½[log det R + tr(R⁻¹ T)]."""
    return 0.5 * (torch.logdet(R) + torch.trace(torch.linalg.solve(R, T)))


@pytest.mark.parametrize("tracker", ["power", "sketch"])
def test_factor_update_is_the_m_projection_and_preserves_the_trace(tracker):
    """§6: for fixed U, (S, μ) after one update minimise KL(target ‖ U S Uᵀ + μ P⊥) for the target
    T = ρR̂ + (1−ρ) Gᵀ L̂⁻¹ G/m (so tr T = tr S + (n−r)μ); the power product is T U."""
    gen = torch.Generator().manual_seed(8)
    m, n, r = 5, 8, 3
    st, L, R_hat = _state(gen, m, n, r, mu=0.4)
    hp = ProKlHyper(rho=0.8, rank=r, using_clamping=False, tracker=tracker)
    G = randn(gen, m, n)
    U = st.U.clone()
    B_old = st.B.clone()
    L_inv = st.Q_L @ torch.diag(st.s_L**2) @ st.Q_L.T
    T = 0.8 * R_hat + 0.2 * G.T @ L_inv @ G / m
    _factor_update(G, st, hp, r)
    P_perp = torch.eye(n, dtype=F64) - U @ U.T
    torch.testing.assert_close(float(torch.trace(st.S)) + (n - r) * st.mu, float(torch.trace(T)), rtol=1e-12, atol=0)
    best = _kl(T, U @ st.S @ U.T + st.mu * P_perp)
    E = randn(gen, r, r)
    for dS, dmu in ((1e-3 * (E + E.T), 0.0), (0.0, 1e-3), (0.0, -1e-3), (-1e-3 * (E + E.T), 2e-4)):
        assert _kl(T, U @ (st.S + dS) @ U.T + (st.mu + dmu) * P_perp) > best
    if tracker == "power":
        torch.testing.assert_close(st.B, T @ U, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(st.B, 0.8 * B_old + 0.2 * G.T @ L_inv @ G @ U / m, rtol=1e-12, atol=1e-12)
    # the left factor's EMA uses R̂⁻¹ from the tracked values: U diag(τ²) Uᵀ + P⊥/μ (sandwich identity)
    Y = G @ U
    sandwich = Y @ torch.diag(1 / torch.diagonal(U.T @ R_hat @ U)) @ Y.T + (G @ G.T - Y @ Y.T) / 0.4
    torch.testing.assert_close(st.S_L, 0.8 * L + 0.2 / n * sandwich, rtol=1e-10, atol=1e-12)


def test_refresh_keeps_u_orthonormal_the_trace_and_the_subspace():
    """§7 / §10 test 8: the refresh keeps U orthonormal, tr R̂, S SPD, μ > 0; both orders (docs/kl.md's Ritz-then-power
    and the spec's power-then-diagonalise) give U spanning span(B), the same re-projected R̂ and σ′ the tracked
    form's diagonal in the final basis; the spec's leaves S diagonal."""
    m, n, r = 4, 10, 3
    outs = {}
    for order in ("ritz_then_power", "power_then_diagonalise"):
        g = torch.Generator().manual_seed(10)
        st, _, R_hat = _state(g, m, n, r, mu=0.5)
        st.B = R_hat @ st.U + 0.3 * randn(g, n, r)
        B = st.B.clone()
        P_old = torch.eye(n, dtype=F64) - st.U @ st.U.T
        tracked = st.U @ torch.diag(st.tau**-2) @ st.U.T + st.mu * P_old  # U diag(σ) Uᵀ + μP⊥ before the refresh
        _refresh(st, ProKlHyper(rank=r, subspace_refresh=order, using_clamping=False))
        assert_orthonormal(st.U)
        # σ′ is the diagonal of the tracked form seen in the final basis (spec §7), whatever the order
        torch.testing.assert_close(st.tau**-2, torch.diagonal(st.U.T @ tracked @ st.U), rtol=1e-12, atol=0)
        Pi_B = B @ torch.linalg.solve(B.T @ B, B.T)
        torch.testing.assert_close(st.U @ st.U.T, Pi_B, rtol=0, atol=1e-10)
        R_new = st.U @ st.S @ st.U.T + st.mu * (torch.eye(n, dtype=F64) - st.U @ st.U.T)
        assert float(torch.trace(R_new)) == pytest.approx(float(torch.trace(R_hat)), rel=1e-12)
        assert torch.linalg.eigvalsh(st.S).min() > 0 and st.mu > 0
        if order == "power_then_diagonalise":
            torch.testing.assert_close(st.S, torch.diag(torch.diagonal(st.S)), rtol=0, atol=1e-14)
        outs[order] = R_new
    torch.testing.assert_close(outs["ritz_then_power"], outs["power_then_diagonalise"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tracker", ["power", "sketch"])
def test_u_stays_orthonormal_and_finds_the_signal_subspace(tracker):
    """§10 test 7 on the reference: G = A + νZ, rank A = 2 ≤ r: span(U) takes in A's right singular subspace."""
    gen = torch.Generator().manual_seed(11)
    m, n, r, k = 6, 16, 3, 2
    A = randn(gen, m, k) @ randn(gen, k, n)
    V_A = torch.linalg.svd(A, full_matrices=False).Vh[:k].T
    grads = [[randn(gen, m, n)]] + [[A + 0.3 * randn(gen, m, n)] for _ in range(120)]
    states = [ProKlState()]
    pro_kl_reference([randn(gen, m, n)], grads, rank=r, side="right", tracker=tracker,
                     refresh_every=1 if tracker == "power" else 5, states=states)
    U = states[0].U
    assert_orthonormal(U, 1e-10)
    leak = (V_A - U @ (U.T @ V_A)).norm() / math.sqrt(k)
    assert leak < 0.1, leak


def test_transposed_block_with_mirrored_side_is_the_transposed_trajectory():
    """Left-restricted on W equals right-restricted on Wᵀ, transposed (the spec's mirror), shape-free scales."""
    gen = torch.Generator().manual_seed(12)
    W = randn(gen, 6, 8)
    grads = [[randn(gen, 6, 8)] for _ in range(12)]
    grads[0][0][:, 6:] = 0.0  # G₀ᵀG₀ is rank deficient: make its null space exact so both layouts agree on it
    a = pro_kl_reference([W], grads, lr=1e-2, rank=2, side="left", refresh_every=3)
    b = pro_kl_reference([W.T.contiguous()], [[g[0].T.contiguous()] for g in grads], lr=1e-2, rank=2, side="right", refresh_every=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[0], y[0].T, rtol=1e-12, atol=1e-14)
