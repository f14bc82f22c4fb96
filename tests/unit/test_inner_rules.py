"""kronopt.inner_rules: Adam (in a basis), eigenvalue scaling, orthogonalization, SGD."""

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kronopt import linalg
from kronopt.bases import EighBasis
from kronopt.inner_rules import AdamInner, EigenvalueInner, OrthogonalizeInner, SgdInner
from kronopt.types import BasisChange, BasisState, Layout, NoState, StepContext
from tests.reference import newton_schulz as ns_ref
from tests.strategies import SEEDS, dims, generator, orthonormal, randn, spd_matrix

F64 = torch.float64
CPU = torch.device("cpu")
BETA = st.floats(0.0, 0.999)
SIDES = st.sampled_from(["full", "none"])


def close(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def identity_basis(b):
    return BasisState(Q_L=None, Q_R=None, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))


def random_basis(gen, b, m, n, left=True, right=True):
    return BasisState(
        Q_L=orthonormal(gen, b, m) if left else None,
        Q_R=orthonormal(gen, b, n) if right else None,
        lam_L=torch.rand(b, m, generator=gen, dtype=F64) if left else None,
        lam_R=torch.rand(b, n, generator=gen, dtype=F64) if right else None,
        failures=torch.zeros(b, dtype=torch.int64),
        refreshes=1,
    )


def ctx(layout, basis, step):
    """The step context a pipeline would build: the basis and its eigenvalue estimates."""
    extra = {}
    if "eigvals" in attrs.fields_dict(StepContext):
        extra["eigvals"] = (None, None) if basis is None else (basis.lam_L, basis.lam_R)
    return StepContext(step=step, layout=layout, basis=basis, **extra)


def run(rule, layout, basis, grads, state=None, start=1):
    state = rule.init(layout, dtype=F64, device=CPU) if state is None else state
    D = None
    for t, G in enumerate(grads, start=start):
        D, state = rule.direction(state, G, ctx(layout, basis, t))
    return D, state


# -- Adam -------------------------------------------------------------------------------------


@given(seed=SEEDS, m=dims(), n=dims(), b1=BETA, b2=BETA, eps=st.floats(0.0, 1e-2))
def test_adam_first_step_closed_form_after_correction(seed, m, n, b1, b2, eps):
    # m₁ = (1−β₁)G, v₁ = (1−β₂)G²; m̂ = G, √v̂ = |G|, so D = G / (|G| + ε).
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    D, state = run(AdamInner(betas=(b1, b2), eps=eps), layout, identity_basis(2), [G])
    close(D, G / (G.abs() + eps))
    close(state.exp_avg, (1 - b1) * G)
    close(state.exp_avg_sq, (1 - b2) * G * G)


@given(seed=SEEDS, m=dims(), n=dims(), b1=BETA, b2=BETA, eps=st.floats(0.0, 1e-2))
def test_adam_first_step_closed_form_before_correction(seed, m, n, b1, b2, eps):
    # SOAP: D = √(1−β₂)/(1−β₁) · (1−β₁)G / (√(1−β₂)|G| + ε) = G / (|G| + ε/√(1−β₂)).
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    rule = AdamInner(betas=(b1, b2), eps=eps, eps_placement="before_correction")
    D, _ = run(rule, layout, identity_basis(2), [G])
    close(D, G / (G.abs() + eps / math.sqrt(1 - b2)))


@given(seed=SEEDS, m=dims(), n=dims(), b1=BETA, b2=BETA, eps=st.floats(0.0, 1e-2))
def test_adam_first_step_without_bias_correction(seed, m, n, b1, b2, eps):
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    rule = AdamInner(betas=(b1, b2), eps=eps, bias_correction=False)
    D, _ = run(rule, layout, identity_basis(2), [G])
    close(D, (1 - b1) * G / (math.sqrt(1 - b2) * G.abs() + eps))


@given(seed=SEEDS, m=dims(), n=dims(), left=st.booleans(), right=st.booleans())
def test_adam_first_step_in_a_basis_is_rotated_sign_like(seed, m, n, left, right):
    gen = generator(seed)
    G = randn(gen, 2, m, n)
    basis = random_basis(gen, 2, m, n, left, right)
    layout = Layout(batch=2, m=m, n=n, left="full" if left else "none", right="full" if right else "none")
    D, _ = run(AdamInner(eps=1e-8), layout, basis, [G])
    Gr = linalg.rotate(G, basis.Q_L, basis.Q_R)
    close(D, linalg.unrotate(Gr / (Gr.abs() + 1e-8), basis.Q_L, basis.Q_R))


@given(seed=SEEDS, m=dims(), n=dims())
def test_adam_with_zero_betas_and_eps_is_sign(seed, m, n):
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    rule = AdamInner(betas=(0.0, 0.0), eps=0.0)
    state = rule.init(layout, dtype=F64, device=CPU)
    for t in (1, 2, 3):
        D, state = rule.direction(state, G * t, ctx(layout, identity_basis(2), t))
        # g / √(g²) is ±1 up to the last bit: torch's vectorised float64 √ need not be correctly
        # rounded (on one CPU it returned |g| one ulp off for g = 3 × 0.2378)
        torch.testing.assert_close(D, torch.sign(G), rtol=0, atol=4 * torch.finfo(D.dtype).eps)


@given(
    seed=SEEDS,
    m=dims(),
    n=dims(),
    rotated=st.booleans(),
    placement=st.sampled_from(["after_correction", "before_correction"]),
    c=st.floats(1e-4, 1e4),
)
def test_adam_scale_invariant_when_eps_is_zero(seed, m, n, rotated, placement, c):
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    basis = random_basis(gen, 2, m, n) if rotated else identity_basis(2)
    grads = [randn(gen, 2, m, n) for _ in range(4)]
    rule = AdamInner(betas=(0.9, 0.99), eps=0.0, eps_placement=placement)
    D, _ = run(rule, layout, basis, grads)
    Dc, _ = run(rule, layout, basis, [c * G for G in grads])
    close(Dc, D, rtol=1e-9, atol=1e-9)


@given(seed=SEEDS, m=dims(), n=dims(), rotated=st.booleans())
def test_adam_normalize_gives_unit_rms_before_scale(seed, m, n, rotated):
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    basis = random_basis(gen, 2, m, n) if rotated else identity_basis(2)
    rule = AdamInner(betas=(0.9, 0.95), eps=1e-8, eps_placement="before_correction", normalize=True)
    grads = [randn(gen, 2, m, n) for _ in range(3)]
    D, _ = run(rule, layout, basis, grads)
    scale = math.sqrt(1 - 0.95**3) / (1 - 0.9**3)
    rms = D.square().mean(dim=(-2, -1)).sqrt()
    close(rms, torch.full((2,), scale, dtype=F64), rtol=1e-10, atol=0)


def _adam_history(gen, b, m, n, basis, steps=3):
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    rule = AdamInner(betas=(0.9, 0.95), eps=1e-8, eps_placement="before_correction")
    grads = [randn(gen, b, m, n) for _ in range(steps)]
    _, state = run(rule, layout, basis, grads)
    return rule, layout, state


def _with_bases(basis, Q_L, Q_R, lam_L=None, lam_R=None):
    return BasisState(
        Q_L=Q_L,
        Q_R=Q_R,
        lam_L=basis.lam_L if lam_L is None else lam_L,
        lam_R=basis.lam_R if lam_R is None else lam_R,
        failures=basis.failures,
        refreshes=basis.refreshes + 1,
    )


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3))
def test_adam_refresh_to_permuted_basis_leaves_next_direction_unchanged(seed, m, n, b):
    gen = generator(seed)
    old = random_basis(gen, b, m, n)
    rule, layout, state = _adam_history(gen, b, m, n, old)
    perm_L = torch.stack([torch.randperm(m, generator=gen) for _ in range(b)])
    perm_R = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
    new = _with_bases(
        old,
        linalg.permute_columns(old.Q_L, perm_L),
        linalg.permute_columns(old.Q_R, perm_R),
        torch.gather(old.lam_L, -1, perm_L),
        torch.gather(old.lam_R, -1, perm_R),
    )
    moved = rule.on_basis_change(state, BasisChange(old=old, new=new, perm_L=perm_L, perm_R=perm_R))
    G = randn(gen, b, m, n)
    D_old, _ = rule.direction(state, G, ctx(layout, old, 4))
    D_new, _ = rule.direction(moved, G, ctx(layout, new, 4))
    close(D_new, D_old, rtol=1e-10, atol=1e-12)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), data=st.data())
def test_adam_basis_column_sign_flip_leaves_next_direction_unchanged(seed, m, n, b, data):
    gen = generator(seed)
    old = random_basis(gen, b, m, n)
    rule, layout, state = _adam_history(gen, b, m, n, old)
    sL = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=m, max_size=m)), dtype=F64)
    sR = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n)), dtype=F64)
    new = _with_bases(old, old.Q_L * sL, old.Q_R * sR)
    moved = rule.on_basis_change(state, BasisChange(old=old, new=new))
    G = randn(gen, b, m, n)
    D_old, _ = rule.direction(state, G, ctx(layout, old, 4))
    D_new, _ = rule.direction(moved, G, ctx(layout, new, 4))
    close(D_new, D_old, rtol=1e-10, atol=1e-12)


@given(seed=SEEDS, m=dims(), n=dims())
def test_adam_on_basis_change_rotates_m_and_keeps_v(seed, m, n):
    gen = generator(seed)
    old = random_basis(gen, 2, m, n)
    rule, _, state = _adam_history(gen, 2, m, n, old)
    new = _with_bases(old, orthonormal(gen, 2, m), orthonormal(gen, 2, n))
    moved = rule.on_basis_change(state, BasisChange(old=old, new=new))
    close(moved.exp_avg, linalg.rotate(linalg.unrotate(state.exp_avg, old.Q_L, old.Q_R), new.Q_L, new.Q_R))
    assert torch.equal(moved.exp_avg_sq, state.exp_avg_sq)  # v is never rotated (soap.md §6.9)


# -- eigenvalue (Shampoo) ------------------------------------------------------------------------


def _dense_power(A, p):
    """A^p of an SPD batch via torch.linalg.eigh directly (independent of kronopt)."""
    w, V = torch.linalg.eigh(A)
    return (V * w.pow(p).unsqueeze(-2)) @ V.mT


@given(seed=SEEDS, m=dims(), n=dims(), exponent=st.sampled_from([-0.25, -0.5]))
def test_eigenvalue_rule_equals_dense_matrix_powers(seed, m, n, exponent):
    gen = generator(seed)
    b = 2
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    L = spd_matrix(gen, b, m, log10_range=(-2.0, 2.0))
    R = spd_matrix(gen, b, n, log10_range=(-2.0, 2.0))
    basis_stage = EighBasis()
    basis = basis_stage.init(layout, dtype=F64, device=CPU)
    basis, _ = basis_stage.refresh(basis, (L, R), ctx(layout, basis, 1))
    G = randn(gen, b, m, n)
    rule = EigenvalueInner(momentum=0.0, exponent=exponent, eps=0.0)
    D, _ = run(rule, layout, basis, [G])
    expected = _dense_power(L, exponent) @ G @ _dense_power(R, exponent)
    close(D, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    # and the dense power is what it claims: (L^p)^(1/p) = L
    close(_dense_power(_dense_power(L, exponent), 1 / exponent), L, rtol=1e-8, atol=1e-8 * L.abs().max().item())


@given(seed=SEEDS, m=dims(), n=dims(), beta=st.floats(0.0, 0.99), left=SIDES, right=SIDES)
def test_eigenvalue_rule_with_momentum_and_one_sided_layouts(seed, m, n, beta, left, right):
    gen = generator(seed)
    b = 2
    layout = Layout(batch=b, m=m, n=n, left=left, right=right)
    L = spd_matrix(gen, b, m, log10_range=(-2.0, 2.0)) if left == "full" else None
    R = spd_matrix(gen, b, n, log10_range=(-2.0, 2.0)) if right == "full" else None
    basis_stage = EighBasis()
    basis = basis_stage.init(layout, dtype=F64, device=CPU)
    basis, _ = basis_stage.refresh(basis, (L, R), ctx(layout, basis, 1))
    grads = [randn(gen, b, m, n) for _ in range(3)]
    eps = 1e-6
    D, state = run(EigenvalueInner(momentum=beta, exponent=-0.25, eps=eps), layout, basis, grads)
    mom = torch.zeros_like(grads[0])
    for G in grads:
        mom = beta * mom + (1 - beta) * G
    m_hat = mom / (1 - beta**3)
    close(state.momentum_buffer, mom)
    expected = m_hat
    if L is not None:
        expected = _dense_power(L + eps * torch.eye(m, dtype=F64), -0.25) @ expected
    if R is not None:
        expected = expected @ _dense_power(R + eps * torch.eye(n, dtype=F64), -0.25)
    close(D, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_eigenvalue_rule_eps_outside_the_root():
    gen = generator(1)
    layout = Layout(batch=1, m=3, n=2, left="full", right="none")
    L = spd_matrix(gen, 1, 3)
    stage = EighBasis()
    basis, _ = stage.refresh(stage.init(layout, dtype=F64, device=CPU), (L, None), ctx(layout, None, 1))
    G = randn(gen, 1, 3, 2)
    eps = 0.1
    D, _ = run(EigenvalueInner(momentum=0.0, exponent=-0.25, eps=eps, eps_placement="outside"), layout, basis, [G])
    w, V = torch.linalg.eigh(L)
    expected = (V * (1 / (w.pow(0.25) + eps)).unsqueeze(-2)) @ V.mT @ G
    close(D, expected, rtol=1e-10, atol=1e-12)


def test_eigenvalue_rule_before_first_refresh_is_momentum():
    layout = Layout(batch=1, m=3, n=2, left="full", right="full")
    basis = EighBasis().init(layout, dtype=F64, device=CPU)
    assert not basis.ready
    grads = [randn(generator(2), 1, 3, 2) for _ in range(2)]
    D, _ = run(EigenvalueInner(momentum=0.5), layout, basis, grads)
    m = 0.5 * (0.5 * grads[0]) + 0.5 * grads[1]
    close(D, m / (1 - 0.25))


# -- orthogonalize (Muon) -------------------------------------------------------------------------


@given(
    seed=SEEDS,
    m=dims(),
    n=dims(),
    coefficients=st.sampled_from(["kj", "polar_express", "quintic", "cans", "deepseekv4"]),
    steps=st.integers(1, 10),
    scale=st.sampled_from(linalg.MUON_SCALES),
    extra=st.floats(0.1, 10.0),
)
def test_orthogonalize_without_momentum_is_scaled_newton_schulz(seed, m, n, coefficients, steps, scale, extra):
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    rule = OrthogonalizeInner(
        momentum=0.0, coefficients=coefficients, steps=steps, ns_dtype="float64", scale=scale, extra_scale=extra
    )
    D, _ = run(rule, layout, identity_basis(2), [G])
    # the naive float64 NS with the spec's coefficients and shape factors (tests/reference/newton_schulz.py)
    ns = ns_ref.newton_schulz(G, ns_ref.coefficients(coefficients, steps))
    close(D, ns * (ns_ref.SHAPE_SCALES[scale](m, n) * extra), rtol=1e-10, atol=1e-12)


@given(seed=SEEDS, m=dims(), n=dims(), sigma=st.floats(1e-2, 1e2))
def test_orthogonalize_rank_one_gradient_closed_form(seed, m, n, sigma):
    # KellerJordan's quintic (a, b, c) = (3.4445, −4.7750, 2.0315), 5 steps; σ u vᵀ normalises to singular
    # value 1, so D = s · p⁵(1) · u vᵀ with s = √max(1, m/n) (muon.md §5 "original")
    gen = generator(seed)
    u, v = randn(gen, m), randn(gen, n)
    u, v = u / u.norm(), v / v.norm()
    x = 1.0
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    layout = Layout(batch=1, m=m, n=n, left="none", right="none")
    rule = OrthogonalizeInner(momentum=0.0, ns_dtype="float64")
    D, _ = run(rule, layout, identity_basis(1), [(sigma * torch.outer(u, v))[None]])
    close(D[0], math.sqrt(max(1.0, m / n)) * x * torch.outer(u, v), rtol=1e-10, atol=1e-12)


@given(seed=SEEDS, m=dims(), n=dims())
def test_orthogonalize_output_is_nearly_semi_orthogonal(seed, m, n):
    G = randn(generator(seed), 1, m, n)
    layout = Layout(batch=1, m=m, n=n, left="none", right="none")
    rule = OrthogonalizeInner(momentum=0.0, ns_dtype="float64", scale="none", coefficients="polar_express", steps=10)
    D, _ = run(rule, layout, identity_basis(1), [G])
    sv = torch.linalg.svdvals(D)
    normalized = torch.linalg.svdvals(G) / torch.linalg.vector_norm(G)
    # σ/‖G‖_F ≥ 1e-3 is mapped to 1 ± 1e-4 (muon.md §4), anything smaller stays in [0, 1.0001]
    assert (sv <= 1 + 1e-4).all()
    assert ((sv - 1).abs()[normalized >= 1e-3] <= 1e-4).all()


@given(seed=SEEDS, m=dims(), n=dims(), beta=st.floats(0.0, 0.99), nesterov=st.booleans(), form=st.sampled_from(["ema", "classic"]))
def test_orthogonalize_momentum_forms(seed, m, n, beta, nesterov, form):
    gen = generator(seed)
    grads = [randn(gen, 1, m, n) for _ in range(3)]
    layout = Layout(batch=1, m=m, n=n, left="none", right="none")
    rule = OrthogonalizeInner(momentum=beta, nesterov=nesterov, momentum_form=form, ns_dtype="float64", scale="none")
    D, state = run(rule, layout, identity_basis(1), grads)
    B = torch.zeros_like(grads[0])
    for G in grads:
        B = beta * B + (1 - beta) * G if form == "ema" else beta * B + G
    G = grads[-1]
    if form == "ema":
        U = (1 - beta) * G + beta * B if nesterov else B
    else:
        U = G + beta * B if nesterov else B
    close(state.momentum_buffer, B)
    # the default schedule is KellerJordan's quintic, 5 steps (muon.md §6)
    expected = ns_ref.newton_schulz(U, [(3.4445, -4.7750, 2.0315)] * 5)
    close(D, expected, rtol=1e-9, atol=1e-10)


@given(seed=SEEDS, m=dims(), n=dims())
def test_orthogonalize_is_rotation_equivariant(seed, m, n):
    gen = generator(seed)
    G = randn(gen, 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    rule = OrthogonalizeInner(momentum=0.0, ns_dtype="float64")
    D_rot, _ = run(rule, layout, random_basis(gen, 2, m, n), [G])
    D_id, _ = run(rule, layout, identity_basis(2), [G])
    close(D_rot, D_id, rtol=1e-9, atol=1e-10)


def test_orthogonalize_custom_schedule():
    with pytest.raises(ValueError, match="custom_coefficients"):
        OrthogonalizeInner(coefficients="custom")
    rule = OrthogonalizeInner(coefficients="custom", custom_coefficients=[[2.0, -1.5, 0.5]], steps=3, custom_beyond="cycle")
    assert rule.schedule() == [(2.0, -1.5, 0.5)] * 3
    # ... and the rule runs it: the cubic-in-disguise x ← 2x − 1.5x³ + 0.5x⁵ three times on the normalized
    # singular values of G (orthonormal rows/cols scaled by ‖G‖_F), nothing else
    G = randn(generator(4), 1, 3, 5)
    P, S, Vh = torch.linalg.svd(G[0], full_matrices=False)
    x = S / G.norm()
    for _ in range(3):
        x = 2.0 * x - 1.5 * x**3 + 0.5 * x**5
    layout = Layout(batch=1, m=3, n=5, left="none", right="none")
    rule = attrs.evolve(rule, momentum=0.0, ns_dtype="float64", scale="none")
    D, _ = run(rule, layout, identity_basis(1), [G])
    close(D[0], P @ torch.diag(x) @ Vh, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ns_dtype", ["bfloat16", "float32"])
def test_orthogonalize_low_precision_returns_gradient_dtype(ns_dtype):
    G = randn(generator(3), 2, 5, 3, dtype=torch.float32)
    layout = Layout(batch=2, m=5, n=3, left="none", right="none")
    rule = OrthogonalizeInner(momentum=0.0, ns_dtype=ns_dtype, scale="none")
    state = rule.init(layout, dtype=torch.float32, device=CPU)
    D, _ = rule.direction(state, G, ctx(layout, identity_basis(2), 1))
    assert D.dtype == torch.float32
    ref = ns_ref.newton_schulz(G.double(), [(3.4445, -4.7750, 2.0315)] * 5).float()  # default: kj, 5 steps
    tol = 5e-2 if ns_dtype == "bfloat16" else 1e-5
    torch.testing.assert_close(D, ref, rtol=tol, atol=tol)


# -- SGD ---------------------------------------------------------------------------------------------


@given(seed=SEEDS, m=dims(), n=dims())
def test_sgd_without_momentum_is_identity(seed, m, n):
    G = randn(generator(seed), 2, m, n)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    rule = SgdInner()
    state = rule.init(layout, dtype=F64, device=CPU)
    assert isinstance(state, NoState)
    D, new = rule.direction(state, G, ctx(layout, random_basis(generator(seed), 2, m, n), 1))
    assert torch.equal(D, G) and new is state


@given(seed=SEEDS, m=dims(), n=dims(), mu=st.floats(0.01, 0.99), nesterov=st.booleans())
def test_sgd_momentum_matches_torch_convention(seed, m, n, mu, nesterov):
    gen = generator(seed)
    grads = [randn(gen, 2, m, n) for _ in range(4)]
    layout = Layout(batch=2, m=m, n=n, left="none", right="none")
    D, _ = run(SgdInner(momentum=mu, nesterov=nesterov), layout, identity_basis(2), grads)
    B = torch.zeros_like(grads[0])
    for G in grads:
        B = mu * B + G
    close(D, grads[-1] + mu * B if nesterov else B)


def test_sgd_nesterov_without_momentum_raises():
    with pytest.raises(ValueError, match="momentum > 0"):
        SgdInner(nesterov=True)


@pytest.mark.parametrize("rule", [SgdInner(momentum=0.9), EigenvalueInner(), OrthogonalizeInner()])
def test_rules_without_rotated_state_ignore_basis_changes(rule):
    layout = Layout(batch=1, m=2, n=2, left="none", right="none")
    state = rule.init(layout, dtype=F64, device=CPU)
    change = BasisChange(old=identity_basis(1), new=identity_basis(1))
    assert rule.on_basis_change(state, change) is state
