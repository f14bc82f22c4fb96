"""Self-checks of the KL-Shampoo float64 reference (tests/reference/kl_shampoo.py); never imports kronopt.

Closed forms a misreading of kl_shampoo.md would break: the first call only builds factors from G; with an
identity other side the factor update is the plain (1−ρ) G Gᵀ/n EMA; with a stationary basis the tracked
eigenvalues are the diagonal of Qᵀ L Q up to the decayed start; a 1×1 block is a scalar recursion (with the
ε-product placement q/(1 + εq)); clamping caps the roots at max(10, min(d, 4000)).
"""

from __future__ import annotations

import math

import pytest
import torch

from .kl_shampoo import KlHyper, KlState, kl_reference, kl_update

F64 = torch.float64


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def hyper(**kw):
    base = dict(lr=0.1, beta1=0.9, beta2=0.98, rho=0.9, eps=1e-8, weight_decay=0.0, precondition_frequency=10**6,
                init_factor=0.1, damping=0.0, using_clamping=False)  # fmt: skip
    base.update(kw)
    return KlHyper(**base)


def test_first_call_builds_factors_from_g_alone_and_leaves_w():
    gen = torch.Generator().manual_seed(0)
    W, G = randn(gen, 5, 3), randn(gen, 5, 3)
    hp, state = hyper(weight_decay=0.5), KlState()
    out = kl_update(W, G, state, hp)
    assert torch.equal(out, W)
    torch.testing.assert_close(state.S[0], 0.1 * G @ G.T / 3, rtol=1e-14, atol=0)
    torch.testing.assert_close(state.S[1], 0.1 * G.T @ G / 5, rtol=1e-14, atol=0)
    assert torch.equal(state.s[0], torch.full((5,), 0.1**-0.5, dtype=F64))
    for S, Q in zip(state.S, state.Q):  # first basis: eigenvectors, eigenvalues descending
        e = torch.diagonal(Q.T @ S @ Q)
        assert (e[:-1] >= e[1:] - 1e-14).all()
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=F64), rtol=0, atol=1e-12)
    history = kl_reference([W], [[G]], weight_decay=0.5)
    assert torch.equal(history[0][0], W)


def test_identity_other_side_gives_the_plain_factor_ema():
    # an initialised state with identity bases, unit roots and zero factors: one update makes
    # S_L = (1−ρ) G Gᵀ/n, S_R = (1−ρ) Gᵀ G/m, and λ = ρ·1 + (1−ρ) diag(G Gᵀ)/n
    gen = torch.Generator().manual_seed(1)
    m, n, rho = 4, 6, 0.8
    G = randn(gen, m, n)
    state = KlState(initialised=True, S=[torch.zeros(m, m, dtype=F64), torch.zeros(n, n, dtype=F64)],
                    Q=[torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)],
                    s=[torch.ones(m, dtype=F64), torch.ones(n, dtype=F64)],
                    m=torch.zeros(m, n, dtype=F64), v=torch.zeros(m, n, dtype=F64))  # fmt: skip
    kl_update(torch.zeros(m, n, dtype=F64), G, state, hyper(rho=rho))
    torch.testing.assert_close(state.S[0], (1 - rho) * G @ G.T / n, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(state.S[1], (1 - rho) * G.T @ G / m, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(state.s[0], (rho + (1 - rho) * (G * G).sum(1) / n).rsqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(state.s[1], (rho + (1 - rho) * (G * G).sum(0) / m).rsqrt(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_stationary_basis_eigenvalues_are_the_diagonal_of_qt_l_q(shape):
    # with the basis never refreshed, no clamping and no damping, λ and diag(Qᵀ S Q) are EMAs of the same
    # statistic (diag(Qᵀ G Ŝ⁻¹ Gᵀ Q)/n with the same old roots), so they differ only by the decayed start:
    # λ_t − diag(Qᵀ S_t Q) = ρᵗ (init_factor − diag(Qᵀ S₀ Q))
    gen = torch.Generator().manual_seed(2)
    m, n = shape
    rho, init = 0.9, 0.1
    hp, state = hyper(rho=rho, init_factor=init), KlState()
    W = randn(gen, m, n)
    W = kl_update(W, randn(gen, m, n), state, hp)
    start = [torch.diagonal(Q.T @ S @ Q) for S, Q in zip(state.S, state.Q)]
    for t in range(1, 31):
        W = kl_update(W, randn(gen, m, n), state, hp)
        for k in range(2):
            lam = state.s[k] ** -2
            diag = torch.diagonal(state.Q[k].T @ state.S[k] @ state.Q[k])
            torch.testing.assert_close(lam - diag, rho**t * (init - start[k]), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_one_by_one_block_is_a_scalar_recursion(eps):
    # Q = ±1, so with q = s_L s_R: m ← β₁m + (1−β₁)g, w ← w − lr·m·q/(1 + εq) − lr·wd·w,
    # λ_L ← ρλ_L + (1−ρ) g² s_R², λ_R ← ρλ_R + (1−ρ) g² s_L² (both from the old roots)
    gen = torch.Generator().manual_seed(3)
    lr, b1, rho, wd, init = 0.05, 0.9, 0.8, 0.01, 0.1
    gs = [float(randn(gen, 1)) for _ in range(12)]
    history = kl_reference([torch.tensor([[0.7]], dtype=F64)], [[torch.tensor([[g]], dtype=F64)] for g in gs],
                           lr=lr, betas=(b1, 0.98), shampoo_beta=rho, eps=eps, weight_decay=wd, init_factor=init,
                           using_clamping=False)  # fmt: skip
    w, mom, lam_L, lam_R = 0.7, 0.0, init, init
    assert history[0][0].item() == w
    for k, g in enumerate(gs[1:], start=1):
        s_L, s_R = lam_L**-0.5, lam_R**-0.5
        mom = b1 * mom + (1 - b1) * g
        q = s_L * s_R
        w = w - lr * mom * q / (1 + eps * q)
        w = w - lr * wd * w
        lam_L, lam_R = rho * lam_L + (1 - rho) * g * g * s_R**2, rho * lam_R + (1 - rho) * g * g * s_L**2
        assert history[k][0].item() == pytest.approx(w, rel=1e-12, abs=1e-15)


def test_clamping_caps_the_roots_of_a_vanishing_gradient():
    # after the first call, zero gradients give λ_t = ρᵗ·init, s = λ^{-1/2} until it reaches the clamp
    # c = max(10, min(d, 4000)) = 10 for a 3×2 block
    rho, init = 0.5, 0.1
    hp = hyper(rho=rho, init_factor=init, using_clamping=True)
    state = KlState()
    W = kl_update(torch.ones(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64), state, hp)
    for t in range(1, 12):
        W = kl_update(W, torch.zeros(3, 2, dtype=F64), state, hp)
        expected = min((rho**t * init) ** -0.5, 10.0)
        for s in state.s:
            torch.testing.assert_close(s, torch.full_like(s, expected), rtol=1e-13, atol=0)
    assert all((s == 10.0).all() for s in state.s)
    assert torch.isfinite(W).all()
    # the cap is min(d, 4000) for d > 10: a 12-row side goes to 12 rather than 10, the 2-column side to 10
    state = KlState()
    W = kl_update(torch.ones(12, 2, dtype=F64), torch.ones(12, 2, dtype=F64), state, hp)
    for _ in range(12):
        W = kl_update(W, torch.zeros(12, 2, dtype=F64), state, hp)
    assert (state.s[0] == 12.0).all() and (state.s[1] == 10.0).all()
    assert math.isfinite(float(W.sum()))
