"""The ``eigenvalue`` rule's momentum (KL-Shampoo's) updated in its stack where a CPU step is proven finite
beforehand (``KronOptimizer._momentum_run`` / ``_momentum_proof``, ``compose.momentum_in_place_step``,
``compose.eigen_momentum_is_safe``, the carried ``_MomentumBounds``).

In place or not, a step takes the same bits: ``lerp_`` writes over the momentum what ``lerp`` writes into a new
tensor, and the factor update, run before the direction on this path, reads nothing the direction writes. What the
path must never do is lose the old momentum of a block the guard skips: it is taken only where every gradient was
read finite, no refresh is due, the factor update's new tensors and the direction's eigenvalue estimates are read
finite, and bounds on the momentum (carried while its stack is untouched, else read) prove the new momentum and the
direction finite. Each test names the mistake it would catch.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module
from tests.unit.test_rotated_moments_in_place import _step as _step_with
from tests.unit.test_rotated_moments_in_place import _step_in_turn_to_the_same_bits, _steps_at_jumping_scales

#: a block stepped alone (more than _SMALL_TOGETHER_MAX entries, past _IN_PLACE_MIN), a small one, a vector
SHAPES = [(160, 130), (12, 7), (130,)]
KEY = {"eigen": "inner.momentum_eigen", "original": "inner.momentum_buffer"}

#: kl_shampoo as shipped, and the other settings the proof bounds otherwise (the momentum's basis, where ε sits,
#: the bias correction)
CASES = {
    "kl_shampoo": {},
    "original": {"inner.momentum_basis": "original"},
    "inside": {"inner.eps_placement": "inside", "inner.bias_correction": True},
    "outside": {"inner.eps_placement": "outside", "inner.momentum_basis": "original"},
}


def _grads(gen, scale=0.01, shapes=SHAPES):
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def _build(flag, monkeypatch, shapes=SHAPES, **overrides):
    monkeypatch.setattr(optimizer_module, "_MOMENTUM_IN_PLACE", flag)
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build(params, "kl_shampoo", **{"refresh.every": 4, **overrides})
    return params, opt


def _step(params, opt, grads, flag, monkeypatch):
    _step_with(params, opt, grads, flag, monkeypatch, switch="_MOMENTUM_IN_PLACE")


def _spy(monkeypatch):
    """The updates of the calls made in place, and of those :func:`compose.momentum_in_place_step` made with a new
    momentum, by ``(m, n)`` of the bucket."""
    made = {"in_place": [], "new": []}
    real = compose.momentum_in_place_step

    def spy(cfg, layout, state, G, defer, prove):
        old = optimizer_module._momentum_of(state.inner)
        D, new = real(cfg, layout, state, G, defer, prove)
        made["in_place" if optimizer_module._momentum_of(new.inner) is old else "new"].append((layout.m, layout.n))
        return D, new

    monkeypatch.setattr(compose, "momentum_in_place_step", spy)
    return made


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_in_place_momentum_takes_the_same_bits_as_a_new_one(case, monkeypatch):
    """20 calls with a refresh every 4, in place and not, stepped in turn: equal parameters and state, bit for bit,
    and the path taken on every plain update of the large block and on no other (a mistake in the in-place
    arithmetic, in the order of the factor update and the direction, or in which calls take it, shows here)."""
    runs = {flag: _build(flag, monkeypatch, **CASES[case]) for flag in (True, False)}
    made = _spy(monkeypatch)
    _step_in_turn_to_the_same_bits(runs, _grads, monkeypatch, switch="_MOMENTUM_IN_PLACE")
    opt_on = runs[True][1]
    bucket = next(b for b in opt_on._buckets if b.layout.m == 160)
    last = bucket.state.step
    # the updates of the 19 calls past the first (which observes only): each with no refresh due is made in place
    assert last == 19
    plain = sum(not opt_on.config.refresh.due(t, first_call=False) for t in range(1, last + 1))
    assert made["in_place"].count((160, 130)) == plain and plain >= 12
    assert made["new"] == [] and (12, 7) not in made["in_place"]  # fewer entries than _IN_PLACE_MIN: not offered


def test_a_step_in_place_moves_the_momentum_in_its_own_stack(monkeypatch):
    """On a plain update the new state holds the momentum stack itself, moved (one write: its version counter), in
    the memory of ``state[p]``'s view (the point of the path: one that made a new momentum and copied it back
    would pass the bits test above)."""
    params, opt = _build(True, monkeypatch)
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):  # past the refresh of update 4
        _step(params, opt, _grads(gen), True, monkeypatch)
    bucket = next(b for b in opt._buckets if b.layout.m == 160)
    stack = bucket.state.inner.momentum_eigen
    view = opt.state[params[0]][KEY["eigen"]]
    before, version = view.clone(), stack._version
    made = _spy(monkeypatch)
    _step(params, opt, _grads(gen), True, monkeypatch)  # update 6: no refresh
    assert made["in_place"] == [(160, 130)]
    assert bucket.state.inner.momentum_eigen is stack and stack._version == version + 1
    assert view.data_ptr() == stack.data_ptr() and not torch.equal(view, before)


def _momentum(opt, params):
    return opt.state[params[0]][KEY["eigen"]].clone()


@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_non_finite_gradient_leaves_the_skipped_block_its_old_momentum(scope, monkeypatch):
    """A NaN in the large block's gradient: its momentum and weight stay as they were under either scope (an update
    in place before the verdict would have moved the momentum)."""
    params, opt = _build(True, monkeypatch, nonfinite="skip", nonfinite_scope=scope)
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        _step(params, opt, _grads(gen), True, monkeypatch)
    before, weight = _momentum(opt, params), params[0].detach().clone()
    grads = _grads(gen)
    grads[0][3, 4] = math.nan
    _step(params, opt, grads, True, monkeypatch)
    assert torch.equal(_momentum(opt, params), before) and torch.equal(params[0], weight)


def test_a_momentum_whose_direction_would_overflow_is_refused_and_kept(monkeypatch):
    """After steps in place (bounds carried), ``state[p]``'s momentum set to 3e37 by hand: the carried bound no longer
    holds (the edit moved the version), the momentum is read, the proof fails (3e37 / ε overflows), the call makes a
    new momentum and the guard skips the block: momentum and weight as they were. A bound taken as still valid, or a
    proof that forgot the scale, would move the momentum of a skipped block."""
    params, opt = _build(True, monkeypatch, nonfinite="skip")
    gen = torch.Generator().manual_seed(9)
    for _ in range(7):  # updates 5 and 6 in place: a bound carried
        _step(params, opt, _grads(gen), True, monkeypatch)
    bucket = next(b for b in opt._buckets if b.layout.m == 160)
    assert isinstance(opt._carried_bounds().get(bucket), optimizer_module._MomentumBounds)
    opt.state[params[0]][KEY["eigen"]].fill_(3e37)
    made = _spy(monkeypatch)
    weight = params[0].detach().clone()
    _step(params, opt, _grads(gen), True, monkeypatch)
    assert made["new"] == [(160, 130)] and made["in_place"] == []
    assert torch.equal(params[0], weight)
    assert (opt.state[params[0]][KEY["eigen"]] == 3e37).all()


@pytest.mark.parametrize("key", ["factors.s_L", "factors.s_R"])
def test_an_eigenvalue_estimate_not_finite_keeps_the_momentum(key, monkeypatch):
    """An eigenvalue estimate set to NaN: the step's new estimates are NaN, the guard skips the block, and its momentum
    stays (a path that read only the momentum's bounds would move it before the verdict)."""
    params, opt = _build(True, monkeypatch, nonfinite="skip")
    gen = torch.Generator().manual_seed(11)
    for _ in range(6):
        _step(params, opt, _grads(gen), True, monkeypatch)
    opt.state[params[0]][key][5] = math.nan
    before, weight = _momentum(opt, params), params[0].detach().clone()
    made = _spy(monkeypatch)
    _step(params, opt, _grads(gen), True, monkeypatch)
    assert made["in_place"] == []
    assert torch.equal(_momentum(opt, params), before) and torch.equal(params[0], weight)


def test_a_factor_update_not_finite_keeps_the_momentum(monkeypatch):
    """A gradient of 1e25 on the large block: its factor update overflows float32 (the Gram of 1e25 entries), the
    proof is never asked or says no, the guard skips the block, and momentum and weight stay."""
    params, opt = _build(True, monkeypatch, nonfinite="skip")
    gen = torch.Generator().manual_seed(12)
    for _ in range(6):
        _step(params, opt, _grads(gen), True, monkeypatch)
    before, weight = _momentum(opt, params), params[0].detach().clone()
    grads = _grads(gen)
    grads[0] = grads[0] * 1e27
    made = _spy(monkeypatch)
    _step(params, opt, grads, True, monkeypatch)
    assert made["in_place"] == []
    assert torch.equal(_momentum(opt, params), before) and torch.equal(params[0], weight)
    assert all(torch.isfinite(t).all() for t in opt.state[params[0]].values() if isinstance(t, torch.Tensor))


@settings(max_examples=12, deadline=None)
@given(
    scales=st.lists(st.floats(min_value=-12, max_value=6), min_size=3, max_size=9),
    basis=st.sampled_from(["eigen", "original"]),
)
def test_the_carried_bounds_bound_the_momentum(scales, basis):
    """After every step in place, the carried bound (``_MomentumBounds``: ``max |m|`` of each block) is at least the
    momentum's own largest entry, read from the stack, over gradients whose size jumps by up to 18 orders of
    magnitude from step to step (a recurrence that dropped the rotation's factor, or the rounding term, would fall
    below)."""
    seen = 0
    overrides = {"refresh.every": 3, "inner.momentum_basis": basis}
    for _, opt in _steps_at_jumping_scales("kl_shampoo", scales, 3, **overrides):
        for bucket in opt._buckets:
            # a bound left by an earlier step that no longer holds (a refresh rotated the momentum since) is not the
            # next step's: valid() says which is
            bounds = optimizer_module._MomentumBounds.valid(opt._carried_bounds().get(bucket), bucket)
            if bounds is None:
                continue
            seen += 1
            momentum = optimizer_module._momentum_of(bucket.state.inner)
            actual = momentum.abs().flatten(1).amax(1).tolist()
            assert all(a <= b for a, b in zip(actual, bounds.m)), (actual, bounds.m)
    assert seen or all(s > 4 for s in scales)  # some step in place, unless every gradient was too large to prove


def test_eigen_momentum_is_safe_refuses_what_it_cannot_bound():
    """The arithmetic test itself: a non-finite bound, an ε that rounds to 0 in the dtype, a momentum whose ``lerp``
    could overflow, and a direction past a quarter of the largest float are refused; an ordinary block passes."""
    params = [torch.nn.Parameter(torch.randn(16, 12))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronopt.build(params, "kl_shampoo", **{"refresh.every": 2})
        for _ in range(4):
            params[0].grad = torch.randn(16, 12)
            opt.step()
    bucket = opt._buckets[0]
    cfg, layout, state = opt._bucket_config(bucket), bucket.layout, bucket.state
    ctx = compose.context(cfg, layout, state, state.step + 1)
    assert ctx.basis.ready
    big = torch.finfo(torch.float32).max
    safe = compose.eigen_momentum_is_safe
    assert safe(cfg, ctx, torch.float32, 1.0, 1.0, 1.0, math.sqrt(16 * 12))
    assert not safe(cfg, ctx, torch.float32, math.inf, 1.0)
    assert not safe(cfg, ctx, torch.float32, 1.0, math.nan)
    assert not safe(cfg, ctx, torch.float32, big / 3, 1.0)  # the lerp's difference could overflow
    # the direction: at most max(m, x) / ε times √(mn) (spread 1): 1e20 / 1e-8 · √192 ≈ 1.4e29 passes, 1e30 does not
    assert safe(cfg, ctx, torch.float32, 1e20, 1.0)
    assert not safe(cfg, ctx, torch.float32, 1e30, 1.0)
    tiny = kronopt.build([torch.nn.Parameter(torch.randn(16, 12))], "kl_shampoo", **{"inner.eps": 1e-50})
    assert not safe(tiny._group_cfgs[0], ctx, torch.float32, 1.0, 1.0)  # ε is 0 in float32
