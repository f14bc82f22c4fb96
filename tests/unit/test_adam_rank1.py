"""kronopt.inner_rules.adam_rank1: Adam with a rank-1 second moment l rᵀ (DyKAF spec §7)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kronopt import linalg
from kronopt.inner_rules import AdamInner, AdamRank1Inner
from kronopt.types import BasisChange, BasisState, Layout, StepContext
from tests.strategies import SEEDS, dims, generator, orthonormal, randn

F64 = torch.float64
CPU = torch.device("cpu")


def _basis(Q_L, Q_R, b=2):
    return BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))


def _ctx(layout, basis, step):
    return StepContext(step=step, layout=layout, basis=basis)


@given(seed=SEEDS, m=dims(1, 8), n=dims(1, 8), beta=st.floats(0.0, 0.999))
def test_rank1_integrator_nonnegative_and_exact_on_rank1_data(seed, m, n, beta):
    gen = generator(seed)
    l, r = randn(gen, 2, m).abs(), randn(gen, 2, n).abs()
    D = randn(gen, 2, m, n).square()
    l1, r1 = linalg.rank1_ema_parallel(l, r, D, beta)
    assert (l1 >= 0).all() and (r1 >= 0).all()
    # D = α l rᵀ (same factors): the EMA stays rank one and is tracked exactly
    D1 = 3.0 * l.unsqueeze(-1) * r.unsqueeze(-2)
    l2, r2 = linalg.rank1_ema_parallel(l, r, D1, beta)
    expected = (beta + 3.0 * (1 - beta)) * l.unsqueeze(-1) * r.unsqueeze(-2)
    torch.testing.assert_close(l2.unsqueeze(-1) * r2.unsqueeze(-2), expected, rtol=1e-12, atol=1e-14)


def test_first_step_closed_form_with_identity_basis(gen):
    layout = Layout(batch=2, m=4, n=3, left="none", right="none")
    rule = AdamRank1Inner(betas=(0.9, 0.99), eps=1e-8, eps_placement="before_correction")
    state = rule.init(layout, dtype=F64, device=CPU)
    assert torch.equal(state.l, torch.full((2, 4), 1e-8, dtype=F64))
    G = randn(gen, 2, 4, 3)
    D, new = rule.direction(state, G, _ctx(layout, _basis(None, None), 1))
    l1, r1 = linalg.rank1_ema_parallel(state.l, state.r, G * G, 0.99)
    v = l1.unsqueeze(-1) * r1.unsqueeze(-2)
    expected = (0.1 * G) / (v.sqrt() + 1e-8) * (1 - 0.99) ** 0.5 / (1 - 0.9)
    torch.testing.assert_close(D, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.l, l1, rtol=0, atol=0)


@given(seed=SEEDS, m=dims(1, 6))
def test_rank1_is_exact_for_a_single_column(seed, m):
    """A d × 1 block's second moment is rank one, so adam_rank1 equals adam (up to the 1e-16 start)."""
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=1, left="none", right="none")
    basis = _basis(None, None)
    full, low = AdamInner(eps=1e-8), AdamRank1Inner(eps=1e-8)
    s_full, s_low = full.init(layout, dtype=F64, device=CPU), low.init(layout, dtype=F64, device=CPU)
    for t in range(1, 6):
        G = randn(gen, 2, m, 1)
        G = G.sign() * (0.1 + G.abs())  # entries away from 0, where the 1e-16 start is negligible
        D_full, s_full = full.direction(s_full, G, _ctx(layout, basis, t))
        D_low, s_low = low.direction(s_low, G, _ctx(layout, basis, t))
        torch.testing.assert_close(D_low, D_full, rtol=1e-6, atol=1e-9)


@given(seed=SEEDS, m=dims(2, 6), n=dims(2, 6))
def test_permutation_on_refresh(seed, m, n):
    """Refreshing to the same basis with permuted columns permutes l and r and leaves the next update unchanged."""
    gen = generator(seed)
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    Q_L, Q_R = orthonormal(gen, 2, m), orthonormal(gen, 2, n)
    old = _basis(Q_L, Q_R)
    rule = AdamRank1Inner(betas=(0.9, 0.95))
    state = rule.init(layout, dtype=F64, device=CPU)
    for t in range(1, 4):
        _, state = rule.direction(state, randn(gen, 2, m, n), _ctx(layout, old, t))
    perm_L = torch.stack([torch.randperm(m, generator=gen) for _ in range(2)])
    perm_R = torch.stack([torch.randperm(n, generator=gen) for _ in range(2)])
    new = _basis(linalg.permute_columns(Q_L, perm_L), linalg.permute_columns(Q_R, perm_R))
    moved = rule.on_basis_change(state, BasisChange(old=old, new=new, perm_L=perm_L, perm_R=perm_R))
    assert torch.equal(moved.l, torch.gather(state.l, -1, perm_L))
    assert torch.equal(moved.r, torch.gather(state.r, -1, perm_R))
    G = randn(gen, 2, m, n)
    D_old, _ = rule.direction(state, G, _ctx(layout, old, 4))
    D_new, _ = rule.direction(moved, G, _ctx(layout, new, 4))
    torch.testing.assert_close(D_new, D_old, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "l_scale", "r_scale"),
    [(torch.float64, 1e-31, 1e-31), (torch.float64, 1e-170, 1e100), (torch.float32, 1e-21, 1.0), (torch.float32, 1e-3, 1e-17)],
)
@pytest.mark.parametrize("beta", [0.5, 0.99])
def test_rank1_tracker_of_tiny_vectors_keeps_their_scale(dtype, l_scale, r_scale, beta):
    """A zero increment leaves β·l rᵀ, even where the squares of l's or r's entries underflow (a plain
    norm is then 0, and the normalised vectors came out up to 10⁷⁰ times too long: a fuzz case with
    l ~ 1e-31 in float64 and β₂ ~ 1e-173 returned l ~ 1e33 from a zero gradient)."""
    gen = torch.Generator().manual_seed(4)
    l = (torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5) * l_scale
    r = (torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.5) * r_scale
    l1, r1 = linalg.rank1_ema_parallel(l.to(dtype), r.to(dtype), torch.zeros(2, 3, 4, dtype=dtype), beta)
    expected = beta * l.unsqueeze(-1) * r.unsqueeze(-2)
    got = l1.double().unsqueeze(-1) * r1.double().unsqueeze(-2)
    torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_power_triplet_of_a_tiny_block_is_the_scaled_triplet():
    """Power iteration on 1e-160·G (float64, whose squares underflow) gives 1e-160·σ and G's singular
    vectors (up to sign: the start, built from squared column norms, differs), as the SVD has them."""
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    G[:, 0, 0] += 6.0  # a clear gap σ₁ ≫ σ₂, so 60 iterations converge to float64 precision
    U, S, Vh = torch.linalg.svd(G)
    tiny = linalg.top_singular_triplet_power(G * 1e-160, 60)
    torch.testing.assert_close(tiny.sigma, S[:, 0] * 1e-160, rtol=1e-12, atol=0)
    sign = (tiny.u * U[:, :, 0]).sum(-1, keepdim=True).sign()
    torch.testing.assert_close(tiny.u * sign, U[:, :, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(tiny.v * sign, Vh[:, 0, :], rtol=0, atol=1e-10)


def test_scaled_norm_of_subnormal_zero_and_infinite_vectors():
    """Subnormal entries keep their norm (the divisor is floored at the smallest normal number, the factor
    too); a zero vector has norm 0; an infinite entry gives ∞, not ∞/∞."""
    x = torch.tensor([[1e-40, 1e-40], [0.0, 0.0], [1.0, float("inf")], [3e-39, 4e-39]])
    got = linalg.vector_norm_scaled(x).flatten()
    expected = torch.tensor([2**0.5 * 1e-40, 0.0, float("inf"), 5e-39])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("empty", ["both", "l", "r"])
def test_a_state_whose_norm_reads_zero_starts_again_from_the_fresh_directions(gen, empty):
    """After thousands of zero gradients l and r underflow to 0 in float32; the next nonzero D must start the
    tracker from 𝟙/√m, 𝟙/√n with weight 0 (written out here in float64), not leave V = 0 for good."""
    m, n, beta = 5, 3, 0.95
    D = randn(gen, 2, m, n).square()
    l, r = randn(gen, 2, m).abs(), randn(gen, 2, n).abs()
    if empty in ("both", "l"):
        l = torch.zeros_like(l)
    if empty in ("both", "r"):
        r = torch.zeros_like(r)
    l1, r1 = linalg.rank1_ema_parallel(l, r, D, beta)
    one_m, one_n = torch.full((m,), m**-0.5, dtype=F64), torch.full((n,), n**-0.5, dtype=F64)
    for k in range(2):
        u = D[k] @ one_n
        u = u / u.norm()
        v = D[k].T @ one_m
        v = v / v.norm()
        c = (1 - beta) * (u @ D[k] @ v)
        torch.testing.assert_close(l1[k], c.sqrt() * u, rtol=1e-12, atol=0)
        torch.testing.assert_close(r1[k], c.sqrt() * v, rtol=1e-12, atol=0)
    zero_l, zero_r = linalg.rank1_ema_parallel(l, r, torch.zeros_like(D), beta)
    assert not zero_l.any() and not zero_r.any()  # with no gradient it stays empty, exactly


def test_dykaf_rank1_steps_as_adam_after_its_second_moment_underflowed(gen):
    """The preset after a long zero-gradient gap (its l and r read 0): the first steps back are Adam-sized, not
    m / ε (which stepped 1e7 × lr per entry)."""
    import kronopt

    p = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    opt = kronopt.build([p], "dykaf_rank1", weight_decay=0.0)
    lr = opt.param_groups[0]["lr"]
    for _ in range(20):
        p.grad = torch.randn(16, 8, generator=gen)
        opt.step()
    with torch.no_grad():
        opt.state[p]["inner.l"].zero_()
        opt.state[p]["inner.r"].zero_()
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(16, 8, generator=gen)
        opt.step()
        assert (p.detach() - before).abs().max() < 5 * lr
    assert opt.state[p]["inner.l"].norm() > 0
