"""The maths of SignMomentumInner, called directly (no optimizer around it)."""

import warnings

import pytest
import torch

from kronopt import linalg
from kronopt.registry import Registry
from kronopt.types import CONTRACTS, BasisChange, BasisState, InnerCapabilities, Layout, StepContext, capabilities
from kronopt_example_plugin.inner import SignMomentumInner, SignMomentumState

DT = torch.float64


def _basis(b, Q_L=None, Q_R=None):
    return BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))


def _ctx(layout, basis, step=1):
    return StepContext(step=step, layout=layout, basis=basis)


def _orthonormal(gen, b, d):
    Q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=DT))
    return Q


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240611)


# -- fields ----------------------------------------------------------------------------


def test_default_and_conversion():
    assert SignMomentumInner().momentum == 0.9
    rule = SignMomentumInner(momentum=0)
    assert rule.momentum == 0.0 and isinstance(rule.momentum, float)
    assert SignMomentumInner.capabilities == InnerCapabilities()  # needs no eigenvalues, offers nothing extra


def test_meets_the_typed_inner_contract_without_warnings():
    """kronopt checks the class against the inner slot's Protocol and capabilities when it registers it."""
    reg = Registry("inner", group="kronopt.tests.example", contract=CONTRACTS["inner"], entry_points=lambda: [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning: the capabilities are declared the typed way
        reg.register("sign_momentum", description="sign of the EMA momentum")(SignMomentumInner)
    assert capabilities(SignMomentumInner()) == InnerCapabilities()


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [(1.0, ValueError, "must be < 1.0, got 1.0"), (-0.1, ValueError, "must be ≥ 0.0, got -0.1"),
     (True, TypeError, "must be a number"), ("0.9", TypeError, "must be a number")],
)
def test_momentum_is_validated(value, error, text):
    with pytest.raises(error, match=text):
        SignMomentumInner(momentum=value)


def test_fields_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        SignMomentumInner(0.5)  # type: ignore[misc]
    rule = SignMomentumInner()
    with pytest.raises(AttributeError):
        rule.momentum = 0.5  # type: ignore[misc]


# -- identity basis ----------------------------------------------------------------------


def test_init_is_a_zero_buffer_of_the_bucket_shape():
    state = SignMomentumInner().init(Layout(batch=3, m=4, n=2, left="none", right="none"), dtype=DT, device=torch.device("cpu"))
    assert isinstance(state, SignMomentumState)
    assert state.momentum_buffer.shape == (3, 4, 2) and state.momentum_buffer.dtype == DT
    assert not state.momentum_buffer.any()


def test_identity_basis_matches_the_formula_over_many_steps(gen):
    beta = 0.8
    layout = Layout(batch=2, m=5, n=3, left="none", right="none")
    rule = SignMomentumInner(momentum=beta)
    state = rule.init(layout, dtype=DT, device=torch.device("cpu"))
    B = torch.zeros(2, 5, 3, dtype=DT)
    for t in range(1, 13):
        G = torch.randn(2, 5, 3, generator=gen, dtype=DT)
        D, state = rule.direction(state, G, _ctx(layout, _basis(2), t))
        expected = torch.sign(beta * B + (1 - beta) * G)
        B = beta * B + (1 - beta) * G
        torch.testing.assert_close(state.momentum_buffer, B, rtol=1e-14, atol=1e-15)
        assert torch.equal(D, expected)
        assert set(D.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_first_step_is_the_sign_of_the_gradient_and_zero_stays_zero():
    layout = Layout(batch=1, m=2, n=3, left="none", right="none")
    rule = SignMomentumInner(momentum=0.9)
    G = torch.tensor([[[3.0, -1e-6, 0.0], [-2.5, 7.0, 0.0]]], dtype=DT)
    D, state = rule.direction(rule.init(layout, dtype=DT, device=torch.device("cpu")), G, _ctx(layout, _basis(1)))
    assert torch.equal(D, torch.tensor([[[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]], dtype=DT))
    torch.testing.assert_close(state.momentum_buffer, 0.1 * G)


def test_momentum_keeps_the_direction_against_a_small_opposite_gradient():
    layout = Layout(batch=1, m=1, n=2, left="none", right="none")
    rule = SignMomentumInner(momentum=0.9)
    state = SignMomentumState(torch.tensor([[[1.0, -1.0]]], dtype=DT))
    G = torch.tensor([[[-2.0, 20.0]]], dtype=DT)  # 0.9·1 − 0.1·2 > 0;  −0.9 + 0.1·20 > 0
    D, _ = rule.direction(state, G, _ctx(layout, _basis(1), 5))
    assert torch.equal(D, torch.tensor([[[1.0, 1.0]]], dtype=DT))
    D0, _ = SignMomentumInner(momentum=0.0).direction(state, G, _ctx(layout, _basis(1), 5))
    assert torch.equal(D0, torch.sign(G))  # momentum 0 is plain signSGD: the buffer is ignored


# -- rotated basis -----------------------------------------------------------------------


@pytest.mark.parametrize("sides", [("full", "full"), ("full", "none"), ("none", "full")])
def test_sign_is_taken_in_the_rotated_basis(gen, sides):
    b, m, n = 3, 4, 6
    layout = Layout(batch=b, m=m, n=n, left=sides[0], right=sides[1])
    Q_L = _orthonormal(gen, b, m) if sides[0] == "full" else None
    Q_R = _orthonormal(gen, b, n) if sides[1] == "full" else None
    basis = _basis(b, Q_L, Q_R)
    rule = SignMomentumInner(momentum=0.5)
    prev = torch.randn(b, m, n, generator=gen, dtype=DT)
    G = torch.randn(b, m, n, generator=gen, dtype=DT)
    D, state = rule.direction(SignMomentumState(prev), G, _ctx(layout, basis))
    B = 0.5 * prev + 0.5 * G
    # the buffer stays in the original coordinates
    torch.testing.assert_close(state.momentum_buffer, B, rtol=1e-14, atol=1e-15)
    # in the basis the direction is ±1 and agrees in sign with the rotated momentum
    D_rot = linalg.rotate(D, Q_L, Q_R)
    torch.testing.assert_close(D_rot, torch.sign(linalg.rotate(B, Q_L, Q_R)), rtol=0, atol=1e-12)
    torch.testing.assert_close(D_rot.abs(), torch.ones_like(D_rot), rtol=0, atol=1e-12)
    # an orthonormal map keeps the Frobenius norm: ‖D‖ = √(mn)
    torch.testing.assert_close(D.norm(dim=(-2, -1)), torch.full((b,), (m * n) ** 0.5, dtype=DT))
    # and in the original coordinates it is not a sign vector (the rotation matters)
    assert not torch.allclose(D.abs(), torch.ones_like(D))


def test_refresh_keeps_state_and_re_sorted_columns_change_nothing(gen):
    b, m, n = 2, 5, 4
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    Q_L, Q_R = _orthonormal(gen, b, m), _orthonormal(gen, b, n)
    perm_L = torch.stack([torch.randperm(m, generator=gen) for _ in range(b)])
    perm_R = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
    flips = torch.where(torch.rand(b, 1, n, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    old = _basis(b, Q_L, Q_R)
    new = _basis(b, linalg.permute_columns(Q_L, perm_L), linalg.permute_columns(Q_R, perm_R) * flips)
    rule = SignMomentumInner(momentum=0.7)
    state = SignMomentumState(torch.randn(b, m, n, generator=gen, dtype=DT))
    after = rule.on_basis_change(state, BasisChange(old=old, new=new, perm_L=perm_L, perm_R=perm_R))
    assert after.momentum_buffer is state.momentum_buffer
    G = torch.randn(b, m, n, generator=gen, dtype=DT)
    D_old, _ = rule.direction(state, G, _ctx(layout, old))
    D_new, _ = rule.direction(after, G, _ctx(layout, new))
    torch.testing.assert_close(D_new, D_old, rtol=1e-12, atol=1e-12)


def test_a_bucket_equals_separate_blocks(gen):
    b, m, n = 4, 3, 5
    Q_L, Q_R = _orthonormal(gen, b, m), _orthonormal(gen, b, n)
    rule = SignMomentumInner(momentum=0.6)
    grads = [torch.randn(b, m, n, generator=gen, dtype=DT) for _ in range(6)]
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")
    state = rule.init(layout, dtype=DT, device=torch.device("cpu"))
    for t, G in enumerate(grads, 1):
        D_all, state = rule.direction(state, G, _ctx(layout, _basis(b, Q_L, Q_R), t))
    one = Layout(batch=1, m=m, n=n, left="full", right="full")
    for i in range(b):
        s = rule.init(one, dtype=DT, device=torch.device("cpu"))
        for t, G in enumerate(grads, 1):
            D_i, s = rule.direction(s, G[i : i + 1], _ctx(one, _basis(1, Q_L[i : i + 1], Q_R[i : i + 1]), t))
        torch.testing.assert_close(D_all[i : i + 1], D_i, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(state.momentum_buffer[i : i + 1], s.momentum_buffer, rtol=0, atol=0)
