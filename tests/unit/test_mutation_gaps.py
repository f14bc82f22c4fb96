"""Tests for mutations of kronopt that no other test caught (the mutation audit of the fifty-seventh session).

Each test names the mutation it kills. Its expected values come from hand computation (float64, the formula of the
stage's docstring) or from ``tests/reference/`` (which never imports kronopt), never from kronopt's own functions.
"""

import math

import pytest
import torch

import kronopt
from kronopt.factors import EmaKronFactors
from kronopt.inner_rules import EigenvalueInner
from kronopt.splits import LowRankFlatSplit
from kronopt.types import BasisState, Layout, StepContext
from tests.reference import newton_schulz as ns_ref
from tests.strategies import generator, orthonormal, randn

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
CPU = torch.device("cpu")


def _basis(Q_L, Q_R, lam_L, lam_R, b=1):
    return BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=lam_L, lam_R=lam_R, failures=torch.zeros(b, dtype=torch.int64), refreshes=1)


# -- eigenvalue rule: negative eigenvalue estimates (mutation C5: ``lam.clamp(min=0.0)`` removed) ------------------


@pytest.mark.parametrize(("placement", "eps"), [("inside", 1e-12), ("outside", 1e-3)])
def test_eigenvalue_rule_takes_a_negative_eigenvalue_estimate_as_zero(placement, eps):
    """float32 ``eigh`` of a rank-deficient factor returns its null eigenvalues as about ``-1e-7·λ_max``; the rule's
    docstring scales by ``s = (max(λ, 0) + ε)^p`` (inside) or ``1/(max(λ, 0)^{-p} + ε)`` (outside), so such a
    direction gets the scale of λ = 0, finite, where the root of a negative number is NaN."""
    m, n, p = 3, 2, -0.25
    gen = generator(5)
    Q_L, Q_R = orthonormal(gen, 1, m), orthonormal(gen, 1, n)
    lam_L = [4.0, 1.0, -4e-7]  # the last: float32 rounding of a null eigenvalue of a factor of scale 4
    lam_R = [2.0, -2e-7]
    G = randn(gen, 1, m, n)
    layout = Layout(batch=1, m=m, n=n, left="full", right="full")
    basis = _basis(Q_L, Q_R, torch.tensor([lam_L], dtype=F64), torch.tensor([lam_R], dtype=F64))
    rule = EigenvalueInner(momentum=0.0, exponent=p, eps=eps, eps_placement=placement, bias_correction=False)
    state = rule.init(layout, dtype=F64, device=CPU)
    D, _ = rule.direction(state, G, StepContext(step=1, layout=layout, basis=basis, eigvals=(basis.lam_L, basis.lam_R)))

    def scale(lam):
        lam = max(lam, 0.0)
        return (lam + eps) ** p if placement == "inside" else 1.0 / (lam ** (-p) + eps)

    S = torch.tensor([[scale(a) * scale(b) for b in lam_R] for a in lam_L], dtype=F64)
    H = Q_L[0].T @ G[0] @ Q_R[0]  # the momentum (= G at β = 0) in the basis
    expected = Q_L[0] @ (H * S) @ Q_R[0].T
    assert torch.isfinite(D).all()
    torch.testing.assert_close(D[0], expected, rtol=1e-12, atol=1e-15)


# -- eigenvalue rule, ε on the product, no rotated side (mutation C11: ``P / (1 + eps)`` → ``P``) -------------------


def test_eigenvalue_rule_product_eps_without_a_rotated_side_divides_by_one_plus_eps():
    """``eps_placement = "product"``: :math:`P_{ij} = s_{L,i} s_{R,j}/(1 + ε s_{L,i} s_{R,j})`, and a side that is
    not rotated scales by s = 1, so with neither side rotated the step is the momentum over 1 + ε."""
    m, n, beta, eps = 4, 3, 0.5, 0.25
    gen = generator(8)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    basis = _basis(None, None, None, None, b=2)
    rule = EigenvalueInner(momentum=beta, exponent=-0.5, eps=eps, eps_placement="product", bias_correction=False)
    state = rule.init(layout, dtype=F64, device=CPU)
    grads = [randn(gen, 2, m, n) for _ in range(2)]
    for t, G in enumerate(grads, start=1):
        D, state = rule.direction(state, G, StepContext(step=t, layout=layout, basis=basis, eigvals=(None, None)))
    M = 0.5 * (0.5 * grads[0]) + 0.5 * grads[1]  # β M₁ + (1 − β) G₂ with M₁ = (1 − β) G₁
    torch.testing.assert_close(D, M / 1.25, rtol=1e-14, atol=0)


# -- ema factors, restricted side: complement energy floor (mutation C12: floor raised to 1e-6 · total) ---------------


def test_ema_restricted_flat_eigenvalue_keeps_a_small_complement_energy():
    """A gradient with 1e-4 of its norm outside the subspace U (1e-8 of its energy, far above float64's rounding of
    ‖G‖² − ‖GU‖², 1e-15 of it): μ = (1 − β)‖G P⊥‖²/(n − r) from μ = 0, with ‖G P⊥‖² by hand, not taken as rounding."""
    m, n, r, beta, delta = 4, 7, 2, 0.9, 1e-4
    gen = generator(21)
    Q = orthonormal(gen, 1, n)
    U, W = Q[..., :r], Q[..., r:]  # the subspace and an orthonormal basis of its complement
    A, B = randn(gen, 1, m, r), randn(gen, 1, m, n - r)
    B = B / B.norm() * A.norm()  # ‖B‖ = ‖A‖: the complement part is δ of the subspace part
    G = A @ U.mT + delta * (B @ W.mT)
    energy = delta**2 * float(B.square().sum())  # ‖G P⊥‖² = δ²‖B Wᵀ‖² = δ²‖B‖² (W orthonormal)
    total = float(A.square().sum()) + energy
    assert 5e-9 < energy / total < 2e-8  # between the rounding floor and 1e-6 of the total
    est = EmaKronFactors(beta=beta)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    state = est.init(layout, dtype=F64, device=CPU)
    basis = _basis(orthonormal(gen, 1, m), U, None, None)
    new = est.update(state, G, StepContext(step=3, layout=layout, basis=basis, refresh_follows=False))
    expected = (1 - beta) * energy / (n - r)
    torch.testing.assert_close(new.mu_R, torch.tensor([expected], dtype=F64), rtol=1e-6, atol=0)


# -- lowrank_flat: max_rank = 1 (mutation P4: ``max_rank > 0`` → ``> 1``) ------------------------------------------


def test_max_rank_one_caps_the_rank_at_one():
    assert LowRankFlatSplit(rank=0.5, max_rank=1).resolve_rank(8) == 1  # ⌊0.5 · 8⌋ = 4, capped at 1
    assert LowRankFlatSplit(rank=5, max_rank=1).resolve_rank(8) == 1
    assert LowRankFlatSplit(rank=5, max_rank=2).resolve_rank(8) == 2
    assert LowRankFlatSplit(rank=5, max_rank=0).resolve_rank(8) == 5  # 0: no cap
    assert LowRankFlatSplit(rank=0.5, max_rank=1, side="right").sides(6, 8, (True, True)) == (("full", 0), ("restricted", 1))
    assert LowRankFlatSplit(rank=0.5, max_rank=1, side="left").sides(6, 8, (True, True)) == (("restricted", 1), ("full", 0))


# -- lowrank_flat at rank 0: the step against the reference Newton–Schulz ----------------------------------------


def test_rank_zero_step_is_sqrt_n_times_the_reference_newton_schulz_of_the_momentum(gen):
    """pro_kl_shampoo.md §5 and §10 test 3: r = 0 gives c·NS(M), c = √n with ``complement_scale = "identity"``;
    NS from ``tests/reference/newton_schulz.py`` (Polar Express typed from muon.md, float64), the momentum
    M = β₁M + (1 − β₁)G (no bias correction) by hand. (test_lowrank_flat.py's version takes NS from kronopt.)"""
    m, n, lr, beta1 = 5, 8, 0.1, 0.9
    W = torch.nn.Parameter(randn(gen, m, n))
    opt = kronopt.build(
        [("blocks.0.weight", W)], "pro_kl_shampoo",
        **{
            "lr": lr, "weight_decay": 0.0, "state_dtype": "float64", "inner.momentum": beta1,
            "inner.bias_correction": False, "split.rank": 0, "split.complement_scale": "identity",
            "split.complement_mult": 1.0, "split.ns_coefficients": "polar_express", "split.ns_steps": 8,
            "split.ns_dtype": "float64", "split.ns_eps": 1e-7,
        },
    )
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    coefficients = ns_ref.coefficients("polar_express", 8)
    M = torch.zeros(m, n, dtype=F64)
    for call in range(4):
        G = randn(gen, m, n)
        before = W.detach().clone()
        W.grad = G
        opt.step()
        if call == 0:  # the first call builds the state only
            assert torch.equal(W, before)
            continue
        M = beta1 * M + (1 - beta1) * G
        D = (before - W.detach()) / lr
        expected = math.sqrt(n) * ns_ref.newton_schulz(M, coefficients, eps=1e-7)
        torch.testing.assert_close(D, expected, rtol=1e-10, atol=1e-12)
