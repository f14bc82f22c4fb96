"""Sanity checks of the Pro-DyKAF reference itself (``tests/reference/pro_dykaf.py``), against hand formulas and
the dense KSL of ``tests/reference/dykaf.py``; nothing here imports kronopt."""

import math

import torch

from tests.reference.dykaf import ksl_dense
from tests.reference.pro_dykaf import (
    ProDykafState,
    dense_restricted,
    ksl_restricted,
    project_flat,
    pro_dykaf_reference,
)
from tests.reference.null_space import gram_schmidt
from tests.reference.pro_kl_shampoo import newton_schulz, ns_schedule

F64 = torch.float64


def test_first_call_is_the_kron_start_and_rank_zero_is_the_orthogonalized_momentum():
    """First call: W unchanged, L₀ ⊗ R₀ with L₀ = s u₁u₁ᵀ and R₀'s projection keeping tr R₀ = s (s = √(1−β)σ₁).
    r = 0: the step is √(mn)·NS(M)/‖NS(M)‖ (complement only, RMS 1), whatever the factors."""
    gen = torch.Generator().manual_seed(1)
    m, n, beta = 5, 7, 0.95
    W0 = torch.randn(m, n, generator=gen, dtype=F64)
    G1, G2 = (torch.randn(m, n, generator=gen, dtype=F64) for _ in range(2))
    states = [ProDykafState()]
    hist = pro_dykaf_reference([W0], [[G1]], rank=2, side="right", states=states)
    assert torch.equal(hist[0][0], W0)
    st = states[0]
    u, sv, vh = torch.linalg.svd(G1, full_matrices=False)
    s = math.sqrt(1 - beta) * sv[0].item()
    torch.testing.assert_close(st.L, s * torch.outer(u[:, 0], u[:, 0]), rtol=1e-12, atol=1e-14)
    assert abs(torch.trace(st.S).item() + (n - 2) * st.mu - s) < 1e-12 * s  # trace kept by the projection
    torch.testing.assert_close(st.U.T @ st.U, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close((st.U @ st.U.T) @ vh[:2].T, vh[:2].T, rtol=0, atol=1e-12)  # U spans the top-2

    hist = pro_dykaf_reference([W0], [[G1], [G2]], lr=0.1, weight_decay=0.0, rank=0, side="right")
    M = 0.05 * G2
    O = newton_schulz(M, ns_schedule("kj", 5))
    step = (W0 - hist[1][0]) / 0.1
    torch.testing.assert_close(step, math.sqrt(m * n) * O / O.norm(), rtol=1e-12, atol=1e-14)
    assert abs(step.square().mean().sqrt().item() - 1.0) < 1e-12


def test_restricted_step_is_the_dense_ksl_step_then_projected():
    """The factor step equals dykaf.py's KSL on the explicit m² × n² rearrangement (torch.kron), applied to the dense
    R = U S Uᵀ + μ P⊥, then R' M-projected onto the family: equal as Kronecker products L ⊗ R."""
    gen = torch.Generator().manual_seed(2)
    m, n, r, beta = 4, 6, 2, 0.9
    A = torch.randn(m, m, generator=gen, dtype=F64)
    L = A @ A.T
    U = gram_schmidt(torch.randn(n, r, generator=gen, dtype=F64))
    B = torch.randn(r, r, generator=gen, dtype=F64)
    S, mu = B @ B.T, 0.7
    G = torch.randn(m, n, generator=gen, dtype=F64)
    L1, S1, mu1, P1 = ksl_restricted(L, U, S, mu, G, beta)
    L_d, R_d = ksl_dense(L, dense_restricted(U, S, mu), G, beta)
    S_d, mu_d = project_flat(R_d, U)
    ours = torch.kron(L1, dense_restricted(U, S1, mu1))
    torch.testing.assert_close(ours, torch.kron(L_d, dense_restricted(U, S_d, mu_d)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L1.norm(), dense_restricted(U, S1, mu1).norm(), rtol=1e-12, atol=0)  # balanced
    # the power product is the unprojected R̂ U, on the same scale as (S, μ): P·‖L‖ = R̂ U
    torch.testing.assert_close(P1 * L1.norm(), R_d @ U * L_d.norm(), rtol=1e-12, atol=1e-14)


def test_exact_kronecker_stream_is_tracked_exactly():
    """G_t = α_t u_t vᵀ (fixed v): F_t = (Σ w α² u uᵀ) ⊗ v vᵀ is exactly Kronecker, R ∝ v vᵀ lies in the family
    (v spans U from the first call), so after 30 calls with refreshes L ⊗ R = F_t to round-off."""
    gen = torch.Generator().manual_seed(3)
    m, n, r, beta, steps = 4, 6, 2, 0.95, 30
    v = torch.randn(n, generator=gen, dtype=F64)
    v = v / v.norm()
    grads = []
    for _ in range(steps):
        u = torch.randn(m, generator=gen, dtype=F64)
        grads.append([torch.outer(u, v) * (0.5 + torch.rand(1, generator=gen, dtype=F64).item())])
    L_target = torch.zeros(m, m, dtype=F64)
    for k, (g,) in enumerate(grads):
        gg = g @ g.T
        L_target = (1 - beta) * gg if k == 0 else beta * L_target + (1 - beta) * gg
    F = torch.kron(L_target, torch.outer(v, v))
    states = [ProDykafState()]
    pro_dykaf_reference([torch.zeros(m, n, dtype=F64)], grads, rank=r, side="right", precondition_frequency=3,
                        weight_decay=0.0, states=states)
    st = states[0]
    ours = torch.kron(st.L, dense_restricted(st.U, st.S, st.mu))
    assert (ours - F).norm() <= 1e-12 * F.norm()
