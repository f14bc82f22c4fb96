"""kronopt.factors: EMA Kronecker factors and the empty estimator."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kronopt.factors import EmaKronFactors, KronFactorsState, NoFactors
from kronopt.types import BasisState, Layout, NoState, StepContext, capabilities
from tests.assertions import assert_psd, assert_symmetric
from tests.strategies import SEEDS, dims, generator, randn

F64 = torch.float64
CPU = torch.device("cpu")
SIDES = st.sampled_from(["full", "none"])
BETAS = st.floats(0.0, 1.0, exclude_max=True)


def _ctx(layout, step=1):
    basis = BasisState(Q_L=None, Q_R=None, lam_L=None, lam_R=None, failures=torch.zeros(layout.batch, dtype=torch.int64))
    return StepContext(step=step, layout=layout, basis=basis)


def _run(est, layout, grads, dtype=F64):
    state = est.init(layout, dtype=dtype, device=CPU)
    for t, G in enumerate(grads, start=1):
        state = est.update(state, G, _ctx(layout, t))
    return state


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), beta=BETAS, steps=st.integers(1, 5))
def test_ema_factors_exactly_symmetric_and_psd(seed, m, n, b, beta, steps):
    gen = generator(seed)
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    grads = [randn(gen, b, m, n) for _ in range(steps)]
    L, R = EmaKronFactors(beta=beta).factors(_run(EmaKronFactors(beta=beta), layout, grads))
    assert L.shape == (b, m, m) and R.shape == (b, n, n)
    assert L.dtype == F64 and R.dtype == F64
    assert_symmetric(L)
    assert_symmetric(R)
    assert_psd(L, rel=1e-10)
    assert_psd(R, rel=1e-10)


@given(seed=SEEDS, m=dims(), n=dims(), beta=st.floats(0.0, 0.99))
def test_ema_factors_closed_form(seed, m, n, beta):
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    grads = [randn(gen, 2, m, n) for _ in range(3)]
    L, R = _run(EmaKronFactors(beta=beta), layout, grads).L, _run(EmaKronFactors(beta=beta), layout, grads).R
    L_ref = sum((1 - beta) * beta ** (2 - k) * G @ G.mT for k, G in enumerate(grads))
    R_ref = sum((1 - beta) * beta ** (2 - k) * G.mT @ G for k, G in enumerate(grads))
    torch.testing.assert_close(L, L_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R, R_ref, rtol=1e-12, atol=1e-12)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), warm=st.booleans())
def test_ema_beta_zero_gives_gram_matrices(seed, m, n, b, warm):
    gen = generator(seed)
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    G = randn(gen, b, m, n)
    grads = [randn(gen, b, m, n), G] if warm else [G]  # beta = 0 forgets any history
    state = _run(EmaKronFactors(beta=0.0), layout, grads)
    torch.testing.assert_close(state.L, G @ G.mT, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(state.R, G.mT @ G, rtol=1e-13, atol=1e-13)


@given(seed=SEEDS, m=dims(), n=dims(), beta=BETAS, c=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3))
def test_ema_scaling_gradient_by_c_scales_factors_by_c_squared(seed, m, n, beta, c):
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    grads = [randn(gen, 2, m, n) for _ in range(3)]
    base = _run(EmaKronFactors(beta=beta), layout, grads)
    scaled = _run(EmaKronFactors(beta=beta), layout, [c * G for G in grads])
    scale = base.L.abs().max()
    torch.testing.assert_close(scaled.L / c**2, base.L, rtol=1e-12, atol=1e-13 * scale.item())
    scale = base.R.abs().max()
    torch.testing.assert_close(scaled.R / c**2, base.R, rtol=1e-12, atol=1e-13 * scale.item())


@given(seed=SEEDS, m=dims(), n=dims(), left=SIDES, right=SIDES, beta=BETAS)
def test_ema_none_sides_keep_none(seed, m, n, left, right, beta):
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left=left, right=right)
    est = EmaKronFactors(beta=beta)
    init = est.init(layout, dtype=F64, device=CPU)
    assert (init.L is None) == (left == "none") and (init.R is None) == (right == "none")
    if init.L is not None:
        assert torch.equal(init.L, torch.zeros(2, m, m, dtype=F64))
    if init.R is not None:
        assert torch.equal(init.R, torch.zeros(2, n, n, dtype=F64))
    L, R = est.factors(_run(est, layout, [randn(gen, 2, m, n) for _ in range(2)]))
    assert (L is None) == (left == "none")
    assert (R is None) == (right == "none")


def test_ema_factors_float32_tolerance():
    gen = generator(7)
    layout = Layout(batch=2, m=6, n=4, left="full", right="full")
    grads = [randn(gen, 2, 6, 4) for _ in range(4)]
    est = EmaKronFactors(beta=0.9)
    s32 = _run(est, layout, [G.float() for G in grads], dtype=torch.float32)
    s64 = _run(est, layout, grads)
    assert s32.L.dtype == torch.float32
    assert_symmetric(s32.L)
    assert_symmetric(s32.R)
    assert_psd(s32.L, rel=1e-6)
    assert_psd(s32.R, rel=1e-6)
    torch.testing.assert_close(s32.L.double(), s64.L, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s32.R.double(), s64.R, rtol=1e-5, atol=1e-5)


def test_ema_update_is_pure():
    layout = Layout(batch=1, m=3, n=2, left="full", right="full")
    est = EmaKronFactors(beta=0.5)
    state = est.init(layout, dtype=F64, device=CPU)
    new = est.update(state, torch.ones(1, 3, 2, dtype=F64), _ctx(layout))
    assert isinstance(new, KronFactorsState)
    assert torch.equal(state.L, torch.zeros(1, 3, 3, dtype=F64))
    assert torch.equal(new.L, torch.full((1, 3, 3), 1.0, dtype=F64))  # 0.5 * (G Gᵀ = 2)


@pytest.mark.parametrize("beta,exc", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError), ("0.9", ValueError), ("beta", ValueError), (True, TypeError)])
def test_ema_bad_beta_raises(beta, exc):
    with pytest.raises(exc):
        EmaKronFactors(beta=beta)


def test_no_factors_keeps_nothing():
    layout = Layout(batch=2, m=3, n=4, left="full", right="full")
    est = NoFactors()
    state = est.init(layout, dtype=F64, device=CPU)
    assert isinstance(state, NoState)
    assert est.update(state, torch.ones(2, 3, 4, dtype=F64), _ctx(layout)) is state
    assert est.factors(state) == (None, None)
    assert not capabilities(NoFactors).provides_factors and capabilities(EmaKronFactors).provides_factors
