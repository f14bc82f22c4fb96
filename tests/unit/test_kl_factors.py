"""The ``kl`` factor estimator and the ``eigenvalue`` rule's product ε (kl_shampoo.md §6, §12 tests 2–7)."""

import math
import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt.types import capabilities
from kronopt.bases import QrBasis
from kronopt.factors import KlKronFactors
from kronopt.inner_rules import EigenvalueInner
from kronopt.types import BasisState, Layout, StepContext
from tests.assertions import assert_psd, assert_symmetric
from tests.strategies import SEEDS, generator, orthonormal, randn, spd_matrix


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_state(est, gen, b, m, n):
    """A mid-run state: random SPD factors, random bases and inverse roots."""
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    state = est.init(layout, dtype=torch.float64, device=torch.device("cpu"))
    state = attrs.evolve(
        state,
        L=spd_matrix(gen, b, m),
        R=spd_matrix(gen, b, n),
        s_L=0.5 + torch.rand(b, m, generator=gen, dtype=torch.float64),
        s_R=0.5 + torch.rand(b, n, generator=gen, dtype=torch.float64),
    )
    basis = BasisState(
        Q_L=orthonormal(gen, b, m), Q_R=orthonormal(gen, b, n), lam_L=None, lam_R=None,
        failures=torch.zeros(b, dtype=torch.int64),
    )
    return layout, state, basis


# every source of a Gram operand (KlKronFactors._factor_update): a tall block rotated right first with its
# short side's factor through the sandwich (9 × 4) or through (H s) Qᵀ (5 × 4), a wide one with the left
# side's through the sandwich (4 × 9) or through Q H (4 × 6), a square one, and both bases held narrower
# than the compute dtype (no Q Qᵀ = I: rotated left first, the operands from G itself)
# (the bases None: basis "identity", whose full sides keep factors and roots but are never rotated)
@pytest.mark.parametrize(
    ("m", "n", "exact", "rotated"),
    [(5, 4, True, True), (9, 4, True, True), (4, 9, True, True), (4, 6, True, True), (5, 5, True, True),
     (9, 4, False, True), (4, 9, False, True), (9, 4, True, False)],
)
def test_factor_sandwich_and_statistics_use_the_old_state(gen, m, n, exact, rotated):
    """§12 test 2: S_L's increment is G Q_R diag(s_R²) Q_Rᵀ Gᵀ/n; d_L = diag(Q_Lᵀ G Ŝ_R⁻¹ Gᵀ Q_L)/n; both sides old."""
    b, rho = 2, 0.9
    est = KlKronFactors(beta=rho, clamping=False)
    layout, state, basis = _random_state(est, gen, b, m, n)
    if not exact:  # bases as a bfloat16 storage holds them: orthonormal only to its rounding
        basis = attrs.evolve(basis, Q_L=basis.Q_L.bfloat16().double(), Q_R=basis.Q_R.bfloat16().double())
    G = randn(gen, b, m, n)
    ctx_basis = basis if rotated else attrs.evolve(basis, Q_L=None, Q_R=None)
    if not rotated:
        basis = attrs.evolve(basis, Q_L=torch.eye(m, dtype=G.dtype).expand(b, m, m), Q_R=torch.eye(n, dtype=G.dtype).expand(b, n, n))
    new = est.update(state, G, StepContext(step=3, layout=layout, basis=ctx_basis, exact_basis=exact))
    assert_symmetric(new.L)
    assert_symmetric(new.R)
    inv_R = basis.Q_R @ torch.diag_embed(state.s_R**2) @ basis.Q_R.mT
    inv_L = basis.Q_L @ torch.diag_embed(state.s_L**2) @ basis.Q_L.mT
    torch.testing.assert_close(new.L, rho * state.L + (1 - rho) / n * G @ inv_R @ G.mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.R, rho * state.R + (1 - rho) / m * G.mT @ inv_L @ G, rtol=1e-12, atol=1e-12)
    d_L = torch.diagonal(basis.Q_L.mT @ G @ inv_R @ G.mT @ basis.Q_L, dim1=-2, dim2=-1) / n
    d_R = torch.diagonal(basis.Q_R.mT @ G.mT @ inv_L @ G @ basis.Q_R, dim1=-2, dim2=-1) / m
    lam = lambda s, d: rho / s**2 + (1 - rho) * d  # noqa: E731
    torch.testing.assert_close(new.s_L, lam(state.s_L, d_L).rsqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(new.s_R, lam(state.s_R, d_R).rsqrt(), rtol=1e-12, atol=0)
    # the transposed problem gives the swapped result: neither side sees the other's new values
    t_state = attrs.evolve(state, L=state.R, R=state.L, s_L=state.s_R, s_R=state.s_L)
    t_basis = attrs.evolve(ctx_basis, Q_L=ctx_basis.Q_R, Q_R=ctx_basis.Q_L)
    t_layout = attrs.evolve(layout, m=n, n=m)
    t_new = est.update(t_state, G.mT, StepContext(step=3, layout=t_layout, basis=t_basis, exact_basis=exact))
    torch.testing.assert_close(t_new.L, new.R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_new.s_R, new.s_L, rtol=1e-12, atol=0)


def test_damping_adds_kappa_times_mean_inverse_of_the_other_side(gen):
    """§12 test 4."""
    b, m, n, kappa = 2, 4, 6, 0.3
    plain = KlKronFactors(beta=0.0, clamping=False)
    damped = attrs.evolve(plain, damping=kappa)
    layout, state, basis = _random_state(plain, gen, b, m, n)
    G = randn(gen, b, m, n)
    ctx = StepContext(step=2, layout=layout, basis=basis)
    a, d = plain.update(state, G, ctx), damped.update(state, G, ctx)
    # with beta = 0 the stored root is d^{-1/2}
    torch.testing.assert_close(d.s_L**-2 - a.s_L**-2, kappa * (state.s_R**2).mean(-1, keepdim=True).expand(b, m))
    torch.testing.assert_close(d.s_R**-2 - a.s_R**-2, kappa * (state.s_L**2).mean(-1, keepdim=True).expand(b, n))


def test_nonfinite_and_clamp_handling():
    """§12 test 3: λ = 0 → s = 0, no NaN; s ≤ max(10, min(d, 4000)); a NaN statistic zeroes s."""
    s = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    d = torch.tensor([[0.0, float("nan"), 1e-12, 4.0]], dtype=torch.float64)
    out = linalg.tracked_inverse_root_ema(s, d, 0.0, linalg.kl_clamp_value(4, 4000))
    assert torch.isfinite(out).all()
    assert out[0, 0] == 0 and out[0, 1] == 0  # λ = 0 and a NaN statistic
    assert out[0, 2] == 10.0  # clamped at max(10, min(4, 4000)) = 10
    torch.testing.assert_close(out[0, 3], torch.tensor(0.5, dtype=torch.float64))
    assert linalg.kl_clamp_value(50_000, 4000) == 4000 and linalg.kl_clamp_value(100, 4000) == 100
    # the clamp floors the next λ_prev at 1/c²: a zero statistic with ρ = 0.5 doubles nothing past c
    again = linalg.tracked_inverse_root_ema(out, torch.zeros_like(d), 0.5, 10.0)
    assert (again <= 10.0).all() and torch.isfinite(again).all()
    # a zero eigenvalue (s = 0, i.e. λ = ∞) gives a zero step along its direction, never a NaN
    P = linalg.product_inverse_root_scale(linalg.inverse_square(out[0]), None, -0.5, 1e-8)
    assert torch.isfinite(P).all() and P[0, 0] == 0 and P[1, 0] == 0


def test_product_eps_matches_the_spec_formula(gen):
    lam_L = 10 ** (2 * torch.rand(2, 4, generator=gen, dtype=torch.float64) - 1)
    lam_R = 10 ** (2 * torch.rand(2, 3, generator=gen, dtype=torch.float64) - 1)
    eps = 0.05
    s_L, s_R = lam_L**-0.5, lam_R**-0.5
    expected = s_L.unsqueeze(-1) * s_R.unsqueeze(-2) / (1 + eps * s_L.unsqueeze(-1) * s_R.unsqueeze(-2))
    torch.testing.assert_close(linalg.product_inverse_root_scale(lam_L, lam_R, -0.5, eps), expected, rtol=1e-14, atol=0)


def test_shampoo_eps_placements_are_unchanged():
    rule = EigenvalueInner()
    assert (rule.eps_placement, rule.normalize) == ("inside", False)
    assert kronopt.PRESETS["shampoo"].inner.eps_placement == "inside"


def _kl_cfg(**kw):
    return attrs.evolve(kronopt.PRESETS["kl_shampoo"], **kw)


def test_refresh_keeps_columns_and_roots_and_klsoap_carries_its_moments(gen):
    """§12 test 5: no sorting; s unchanged by a refresh; KL-SOAP's v untouched, m' rotated across."""
    cfg = kronopt.PRESETS["kl_soap"]
    layout = Layout(batch=2, m=5, n=4, left="full", right="full")
    state = compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
    for _ in range(10):  # the first call initialises, then 9 updates
        _, state = compose.step(cfg, layout, state, randn(gen, 2, 5, 4))
    before = state
    # the 10th update refreshes: compare with the same update without the refresh
    G = randn(gen, 2, 5, 4)
    no_refresh = attrs.evolve(cfg, refresh=attrs.evolve(cfg.refresh, every=10**6))
    _, a = compose.step(cfg, layout, before, G)  # refreshes (t = 10)
    _, b = compose.step(no_refresh, layout, before, G)
    assert a.basis.refreshes == b.basis.refreshes + 1
    assert torch.equal(a.factors.s_L, b.factors.s_L) and torch.equal(a.factors.s_R, b.factors.s_R)
    assert torch.equal(a.inner.exp_avg_sq, b.inner.exp_avg_sq)
    m_orig = linalg.unrotate(b.inner.exp_avg, b.basis.Q_L, b.basis.Q_R)
    torch.testing.assert_close(linalg.unrotate(a.inner.exp_avg, a.basis.Q_L, a.basis.Q_R), m_orig, rtol=1e-10, atol=1e-12)
    # the new basis is one power step of the old one, columns in place (no permutation)
    Q_new = linalg.orthonormalize(b.factors.L @ b.basis.Q_L)
    torch.testing.assert_close(a.basis.Q_L.abs(), Q_new.abs(), rtol=1e-10, atol=1e-12)


def test_sorted_refresh_permutes_the_roots_with_the_columns(gen):
    est = KlKronFactors()
    layout, state, basis = _random_state(est, gen, 2, 5, 4)
    perm = torch.stack([torch.randperm(5, generator=gen) for _ in range(2)])
    from kronopt.types import BasisChange

    out = est.on_basis_change(state, BasisChange(old=basis, new=basis, perm_L=perm))
    assert torch.equal(out.s_L, torch.gather(state.s_L, -1, perm)) and torch.equal(out.s_R, state.s_R)


@settings(max_examples=10)
@given(seed=SEEDS, m=st.integers(1, 6), n=st.integers(1, 6), restricted=st.booleans())
def test_factors_stay_symmetric_psd(seed, m, n, restricted):
    cfg = _kl_cfg(refresh=attrs.evolve(kronopt.PRESETS["kl_shampoo"].refresh, every=2))
    if restricted and n >= 2:
        cfg = attrs.evolve(cfg, split=kronopt.PRESETS["pro_kl_shampoo"].split, inner=kronopt.PRESETS["pro_kl_shampoo"].inner)
        (kl, rl), (kr, rr) = cfg.split.sides(m, n, (True, True))
    else:
        (kl, rl), (kr, rr) = ("full", 0), ("full", 0)
    layout = Layout(batch=2, m=m, n=n, left=kl, right=kr, rank_left=rl, rank_right=rr)
    gen = generator(seed)
    state = compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
    for _ in range(7):
        _, state = compose.step(cfg, layout, state, randn(gen, 2, m, n) * 10 ** float(torch.randn(1, generator=gen)))
    f = state.factors
    for X in (f.L, f.R, f.sub_L, f.sub_R):
        if X is not None and X.shape[-1] > 0:  # a rank-0 side keeps a (b 0 0) factor
            assert_symmetric(X)
            assert_psd(X, rel=1e-10)
    for s in (f.s_L, f.s_R):
        assert torch.isfinite(s).all() and (s >= 0).all()


def test_stationary_matrix_normal_preconditioner_approaches_the_inverse_root():
    """§12 test 7: vec G ~ N(0, Σ_L ⊗ Σ_R), f = 1: P_L ⊗ P_R acts like (Σ_L ⊗ Σ_R)^{-1/2}."""
    gen = generator(7)
    m, n, steps = 4, 3, 1500
    S_L, S_R = spd_matrix(gen, 1, m, log10_range=(-0.5, 0.5)), spd_matrix(gen, 1, n, log10_range=(-0.5, 0.5))
    root = lambda A, p: (lambda e: e.eigenvectors @ torch.diag_embed(e.eigenvalues**p) @ e.eigenvectors.mT)(torch.linalg.eigh(A))  # noqa: E731
    A, B = root(S_L, 0.5), root(S_R, 0.5)
    cfg = _kl_cfg(factors=KlKronFactors(beta=0.995), refresh=attrs.evolve(kronopt.PRESETS["kl_shampoo"].refresh, every=1))
    layout = Layout(batch=1, m=m, n=n, left="full", right="full")
    state = compose.init_state(cfg, layout, dtype=torch.float64, device=torch.device("cpu"))
    for _ in range(steps):
        _, state = compose.step(cfg, layout, state, A @ randn(gen, 1, m, n) @ B.mT)
    P_L = state.basis.Q_L @ torch.diag_embed(state.factors.s_L) @ state.basis.Q_L.mT
    P_R = state.basis.Q_R @ torch.diag_embed(state.factors.s_R) @ state.basis.Q_R.mT
    X = randn(gen, 8, m, n)
    ours, truth = P_L @ X @ P_R, root(S_L, -0.5) @ X @ root(S_R, -0.5)
    rel = (ours - truth).norm() / truth.norm()
    assert rel < 0.15, f"relative error of the preconditioner action {rel:.3f}"


def test_first_call_initialises_factors_from_g_alone(gen):
    est = KlKronFactors(beta=0.9)
    layout, state, basis = _random_state(est, gen, 2, 4, 3)
    G = randn(gen, 2, 4, 3)
    new = est.update(state, G, StepContext(step=0, layout=layout, basis=basis))
    torch.testing.assert_close(new.L, 0.1 * G @ G.mT / 3)
    torch.testing.assert_close(new.R, 0.1 * G.mT @ G / 4)
    assert torch.equal(new.s_L, state.s_L) and torch.equal(new.s_R, state.s_R)


@pytest.mark.parametrize("sort", [False, True])
def test_qr_basis_with_sort_false_reports_no_permutation(gen, sort):
    """KL-Shampoo's basis (sort = False) refreshes without reordering, so the roots stay on their columns."""
    b, m, n = 2, 5, 4
    basis = QrBasis(sort=sort)
    assert capabilities(basis).supports_restricted
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    state = basis.init(layout, dtype=torch.float64, device=torch.device("cpu"))
    state, _ = basis.refresh(state, (spd_matrix(gen, b, m), spd_matrix(gen, b, n)), StepContext(step=0, layout=layout, basis=state))
    assert state.refreshes == 1
    Q_L, Q_R = state.Q_L, state.Q_R
    # new factors whose Rayleigh quotients on the current columns come out ascending: 1, 2, …, d
    up = lambda d: torch.arange(1, d + 1, dtype=torch.float64).expand(b, d)  # noqa: E731
    L1 = Q_L @ torch.diag_embed(up(m)) @ Q_L.mT
    R1 = Q_R @ torch.diag_embed(up(n)) @ Q_R.mT
    new, change = basis.refresh(state, (L1, R1), StepContext(step=10, layout=layout, basis=state))
    assert new.refreshes == 2 and change.new is new
    for Q_old, Q_new, lam, perm, d in ((Q_L, new.Q_L, new.lam_L, change.perm_L, m), (Q_R, new.Q_R, new.lam_R, change.perm_R, n)):
        # Q_old diagonalises the new factor, so one power step keeps each column (up to its sign)
        expected_order = torch.arange(d) if not sort else torch.arange(d - 1, -1, -1)
        Q_expected = Q_old[:, :, expected_order]
        signs = torch.sign((Q_new * Q_expected).sum(-2, keepdim=True))
        torch.testing.assert_close(Q_new, Q_expected * signs, rtol=0, atol=1e-10)
        torch.testing.assert_close(lam, up(d)[:, expected_order], rtol=1e-12, atol=1e-12)
        if sort:
            assert torch.equal(perm, expected_order.expand(b, d))
        else:
            assert perm is None
    # the KL estimator then keeps (sort = False) or carries along (sort = True) its roots per column
    est = KlKronFactors()
    _, kl_state, _ = _random_state(est, gen, b, m, n)
    out = est.on_basis_change(kl_state, change)
    if sort:
        assert torch.equal(out.s_L, kl_state.s_L.flip(-1)) and torch.equal(out.s_R, kl_state.s_R.flip(-1))
    else:
        assert torch.equal(out.s_L, kl_state.s_L) and torch.equal(out.s_R, kl_state.s_R)


@pytest.mark.parametrize(("exponent", "eps"), [(-0.5, 1e-3), (-1.0, 1e-8), (-0.5, 0.0)])
@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_product_scale_edge_eigenvalues(sides, exponent, eps):
    """Zero, negative, huge, infinite and NaN eigenvalues on either side, against the spec's rule written
    out per entry: λ ≤ 0 gives s = ∞, λ = ∞ or NaN gives s = 0 (no step), q = s_L s_R with 0·∞ = 0, and
    the scale q / (1 + ε q) (1/ε for q = ∞; ∞ when ε = 0). The step divides by the denominator; both must
    agree. A zero eigenvalue against 1e30 at exponent −1, and ε = 0, are where a floor on the roots went
    wrong."""
    values = [0.0, -1.0, 1e-6, 0.25, 4.0, 1e8, 1e30, math.inf, math.nan]
    lam = torch.tensor(values, dtype=torch.float64)

    def s(x: float) -> float:
        if math.isnan(x) or x == math.inf:
            return 0.0
        return math.inf if x <= 0 else x**exponent

    lam_L = lam.view(1, -1) if sides != "right" else None
    lam_R = lam.flip(0).view(1, -1) if sides != "left" else None
    left = [s(x) for x in values] if lam_L is not None else [1.0]
    right = [s(x) for x in values[::-1]] if lam_R is not None else [1.0]
    expected = torch.empty(1, len(left), len(right), dtype=torch.float64)
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            q = 0.0 if 0.0 in (a, b) else a * b
            if q == math.inf:  # ε = 0: an infinite step, which the guard then skips
                expected[0, i, j] = 1 / eps if eps > 0 else math.inf
            else:
                expected[0, i, j] = q / (1 + eps * q)
    scale = linalg.product_inverse_root_scale(lam_L, lam_R, exponent, eps)
    torch.testing.assert_close(scale.expand_as(expected), expected, rtol=1e-14, atol=0)
    P = torch.full_like(expected, 3.0)
    step = P / linalg.product_inverse_root_denominator(lam_L, lam_R, exponent, eps)
    torch.testing.assert_close(step, 3.0 * expected, rtol=1e-14, atol=0)
    # the step the rule takes: the quotient over the denominator's buffer where it is a whole block
    torch.testing.assert_close(linalg.divide_by_product_inverse_root(P, lam_L, lam_R, exponent, eps), 3.0 * expected, rtol=1e-14, atol=0)
    assert (P == 3.0).all()


def test_product_denominator_mends_zero_times_infinity_from_either_side():
    """A zero root on one side only, against an infinite one on the other: the NaN mend runs whichever side
    holds the zero (a zero step, never NaN)."""
    for lam_L, lam_R in (([1.0, math.inf], [0.0, 2.0]), ([0.0, 2.0], [1.0, math.inf])):
        L = torch.tensor([lam_L], dtype=torch.float64)
        R = torch.tensor([lam_R], dtype=torch.float64)
        denominator = linalg.product_inverse_root_denominator(L, R, -0.5, 1e-8)
        assert not torch.isnan(denominator).any()
        step = linalg.divide_by_product_inverse_root(torch.ones(1, 2, 2, dtype=torch.float64), L, R, -0.5, 1e-8)
        assert torch.isfinite(step).all()
        assert (step[0][denominator[0].isinf()] == 0).all() and denominator[0].isinf().any()


@pytest.mark.parametrize(("p_dtype", "lam_dtype"), [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_divide_by_product_inverse_root_is_the_quotient_and_keeps_its_operands(p_dtype, lam_dtype, gen):
    """Written over the denominator where that is a whole block of the quotient's dtype, else a plain quotient
    (a wider P than the eigenvalues): the same bits either way, and neither P nor the eigenvalues change."""
    P = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).to(p_dtype)
    lam_L = torch.rand(2, 5, generator=gen, dtype=torch.float64).to(lam_dtype) + 0.1
    lam_R = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(lam_dtype) + 0.1
    before = [t.clone() for t in (P, lam_L, lam_R)]
    out = linalg.divide_by_product_inverse_root(P, lam_L, lam_R, -0.5, 1e-8)
    expected = P / linalg.product_inverse_root_denominator(lam_L, lam_R, -0.5, 1e-8)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # independent of the helper: 1 / (√λ_L √λ_R + ε) in float64
    ref = P.double() / ((lam_L.double().sqrt().unsqueeze(-1) * lam_R.double().sqrt().unsqueeze(-2)) + 1e-8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    for t, b in zip((P, lam_L, lam_R), before):
        torch.testing.assert_close(t, b, rtol=0, atol=0)
