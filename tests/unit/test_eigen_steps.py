"""The small buckets' ``eigenvalue``-rule calls made together (``compose.eigen_steps``, the CPU's
``KronOptimizer._step_small_buckets``) against the pipeline (``compose.step``), bit for bit.

``eigen_steps`` makes KL-Shampoo's and Shampoo's calls of many buckets with one ``foreach`` call (or one pass over a
flat vector of every bucket's entries) per elementwise operation: the momenta, the scales of the eigenvalues, the
``kl`` estimator's eigenvalue estimates and Gram operands. ``compose.step`` makes each bucket's with the stages' own
methods. They must agree on every bit of the direction and the new state for every setting the path takes (a
refresh, a factor update before the direction, grafting included), and the path must turn down every call it
cannot make as the pipeline would. A flat vector gives each part its bits alone only where every kernel on it
rounds an entry alone, wherever it lies: tested here for each kernel used, and the scales of other exponents go
block by block.
"""

import itertools
import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt.types import Layout
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.kl_shampoo import kl_reference
from tests.unit._together import (
    assert_records_equal, assert_same_deferred, assert_same_training, drawn_calls_as_the_pipeline,
    made_together_as_the_pipeline, pipeline_state, slots_seen, train_two_groups,
)


_states, _equal, _same_deferred = pipeline_state, assert_records_equal, assert_same_deferred


CONFIGS = {
    "kl_shampoo": ("kl_shampoo", {}),
    "kl_shampoo, momentum in the original coordinates": ("kl_shampoo", {"inner.momentum_basis": "original"}),
    "kl_shampoo, bias-corrected, ε inside": ("kl_shampoo", {"inner.bias_correction": True, "inner.eps_placement": "inside"}),
    "kl_shampoo, ε outside, exponent -1/4": (
        "kl_shampoo", {"inner.eps_placement": "outside", "inner.exponent": -0.25, "inner.eps": 1e-3}
    ),
    "kl_shampoo, exponent -0.3 (scales block by block)": ("kl_shampoo", {"inner.exponent": -0.3}),
    "kl_shampoo, exponent -0.3, ε inside": ("kl_shampoo", {"inner.exponent": -0.3, "inner.eps_placement": "inside"}),
    "kl_shampoo, exponent -0.3, ε outside": ("kl_shampoo", {"inner.exponent": -0.3, "inner.eps_placement": "outside"}),
    "kl_shampoo, damped": ("kl_shampoo", {"factors.damping": 1e-3}),
    "kl_shampoo, unclamped, other retention": ("kl_shampoo", {"factors.clamping": False, "factors.beta": 0.9}),
    "kl_shampoo, factors before the direction": ("kl_shampoo", {"factor_update": "before"}),
    "kl_shampoo, grafted": ("kl_shampoo", {"post.grafting": "adam"}),
    "kl_shampoo, bfloat16 products and rotations": (
        "kl_shampoo", {"factors.product_dtype": "bfloat16", "rotation_dtype": "bfloat16"}
    ),
    "kl_shampoo, eigh refresh": ("kl_shampoo", {"basis.type": "eigh"}),
    "shampoo": ("shampoo", {}),
    "shampoo, momentum in the basis": ("shampoo", {"inner.momentum_basis": "eigen", "basis.type": "qr"}),
}

LAYOUTS = [
    Layout(batch=1, m=9, n=4, left="full", right="full"),  # tall: the right side's half rotation
    Layout(batch=3, m=5, n=12, left="full", right="full"),  # wide, more than twice: KL's sandwich
    Layout(batch=2, m=7, n=7, left="full", right="full"),
    Layout(batch=1, m=6, n=11, left="none", right="full"),
    Layout(batch=2, m=13, n=3, left="full", right="none"),
    Layout(batch=2, m=3, n=5, left="none", right="none"),  # neither side rotated: no estimate to track
]


def _made_together_as_the_pipeline(configs, layouts, update, seed, scale=1.0):
    """A bucket of each config on each layout, some in float64, stepped by the pipeline until its next call is
    update ``update(j, k)``; that call of them all made in one ``eigen_steps`` call against each bucket's
    ``compose.step``, bit for bit, deferred factor updates included. Returns ``[(call, new state)]``."""
    made = made_together_as_the_pipeline(
        compose.eigen_steps, compose.eigen_steps_due, configs, layouts,
        lambda cfg, j, k: update(j, k) - 1 + cfg.skip_first_call, lambda j, k: (j + k) % 3 == 0, seed, scale,
    )
    assert all(call[2].step + 1 == update(j, k) for (call, _), (j, k) in zip(made, _positions(configs, layouts)))
    return made


def _positions(configs, layouts):
    return [(j, k) for k in range(len(configs)) for j in range(len(layouts))]


def test_the_calls_of_several_buckets_and_settings_equal_the_pipeline_bit_for_bit():
    """Buckets of fifteen configs (KL-Shampoo's momentum in either coordinates, three ε placements, exponents whose
    scales go flat and one that goes block by block under each placement, damping, no clamping, the factors before
    the direction, grafting, bfloat16 products, eigh; Shampoo's ``ema`` factors and grafting) on tall, wide,
    square, one-sided, unrotated and stacked layouts, float32 and float64 in one call, past the first refresh, at
    updates with no refresh due."""
    made = _made_together_as_the_pipeline(CONFIGS, LAYOUTS, lambda j, k: 12 + (j + k) % 6, seed=0)
    assert not any(call[0].refresh.due(call[2].step + 1, first_call=False) for call, _ in made)
    assert len(made) == len(CONFIGS) * len(LAYOUTS)


def test_the_ceilings_of_the_inverse_roots_are_reached_and_each_side_s_own():
    """Small eigenvalue estimates (``init_factor`` 1e-4, gradients of 1e-3) put inverse roots at their ceilings
    ``max(10, min(d, c))``, each side's own, made together as alone."""
    configs = {"kl_shampoo": ("kl_shampoo", {"factors.init_factor": 1e-4}),
               "before": ("kl_shampoo", {"factors.init_factor": 1e-4, "factor_update": "before"})}
    made = _made_together_as_the_pipeline(configs, LAYOUTS, lambda j, k: 5 + 6 * ((j + k) % 2), seed=5, scale=1e-3)
    at = set()
    for (cfg, layout, _, _, _), new in made:
        for s, d in ((new.factors.s_L, layout.m), (new.factors.s_R, layout.n)):
            if s is not None:
                at |= {d for c in [cfg.factors._clamp(d)] if (s == c).any()}
    assert len(at) >= 3  # sides of several sizes, each at its own ceiling


def test_states_laid_out_column_major_step_as_the_pipeline_steps_them():
    """A momentum and inverse roots laid out column-major (a checkpoint's stacks keep their layout): the quotient
    of KL's scale laid out as the pipeline's (its products round by layout), the new roots in their layout, and the
    scales of an exponent whose power rounds by place made on the roots as laid out."""
    layout = Layout(batch=2, m=17, n=26, left="full", right="full")
    for overrides in ({}, {"inner.exponent": -0.3, "inner.eps_placement": "inside"}):
        cfg = kronopt.resolve("kl_shampoo", **overrides).bound()
        calls, expected = [], []
        for seed, dtype in itertools.product(range(3), (torch.float32, torch.float64)):
            state, G = _states(cfg, layout, 12 + seed, torch.Generator().manual_seed(seed), dtype)
            f, m = state.factors, state.inner.momentum_eigen
            state = attrs.evolve(
                state, factors=attrs.evolve(f, s_L=f.s_L.t().contiguous().t(), s_R=f.s_R.t().contiguous().t()),
                inner=attrs.evolve(state.inner, momentum_eigen=m.mT.contiguous().mT),
            )
            expected.append(compose.step(cfg, layout, state, G.clone()))
            calls.append((cfg, layout, state, G, None))
        for (D, new), (D_ref, new_ref) in zip(compose.eigen_steps(calls), expected):
            _equal(D, D_ref, "D")
            _equal(new, new_ref)
            assert new.factors.s_L.stride() == new_ref.factors.s_L.stride()


def test_refresh_calls_made_together_equal_the_pipeline_bit_for_bit():
    """Calls at the tenth and twentieth updates (a refresh due) among plain ones: the new basis, the eigenvalue
    estimates following its columns, the momentum carried into it, the factors the refresh read."""
    made = _made_together_as_the_pipeline(CONFIGS, LAYOUTS, lambda j, k: (10, 20, 15)[(j + k) % 3], seed=10)
    refreshed = [call for call, new in made if new.basis.refreshes != call[2].basis.refreshes]
    assert len(refreshed) >= len(made) // 2
    assert not any(call[4] for call in refreshed)  # a refresh reads the new factors: nothing left to the write


@pytest.mark.parametrize(
    ("update", "overrides", "deferred"),
    [(12, {}, 1), (20, {}, 0), (12, {"factor_update": "before"}, 0)],
    ids=["plain", "a refresh due", "factors before the direction"],
)
def test_deferred_factor_updates_are_left_as_the_pipeline_leaves_them(update, overrides, deferred):
    """A side from the dense deferral's size on leaves its KL factor update to the state write, together as alone;
    not where a refresh follows (it reads the new factor) nor before the direction (the pipeline defers none there)."""
    gen = torch.Generator().manual_seed(1)
    cfg = kronopt.resolve("kl_shampoo", **overrides).bound()
    layouts = [Layout(batch=1, m=4, n=linalg._DEFER_DENSE_MIN, left="full", right="full"),
               Layout(batch=2, m=linalg._DEFER_DENSE_MIN, n=3, left="full", right="full")]
    calls, expected = [], []
    for layout in layouts:
        state, G = _states(cfg, layout, update, gen)
        assert state.step + 1 == update
        defer_ref = []
        expected.append((*compose.step(cfg, layout, state, G.clone(), defer=defer_ref), defer_ref))
        calls.append((cfg, layout, state, G, []))
    for (D, new), (D_ref, new_ref, defer_ref), call in zip(compose.eigen_steps(calls), expected, calls):
        _equal(D, D_ref, "D")
        _equal(new, new_ref)
        assert len(call[4]) == deferred  # the long side's factor, where deferred
        _same_deferred(call[4], defer_ref)


def _due(name="kl_shampoo", steps=12, layout=Layout(batch=1, m=6, n=8, left="full", right="full"), **overrides):
    cfg = kronopt.resolve(name, **overrides).bound()
    state, _ = _states(cfg, layout, steps, torch.Generator().manual_seed(2))
    return compose.eigen_steps_due(cfg, layout, state, torch.float32)


def test_plain_calls_are_taken():
    assert _due()
    assert _due("shampoo")
    assert _due(steps=9)  # a refresh is due at this update
    assert _due(layout=Layout(batch=2, m=1, n=9, left="none", right="full"))
    assert _due(**{"post.grafting": "adam", "factor_update": "before"})


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("the first call", {"steps": 0}),
        ("a normalised direction", {"inner.normalize": True}),
        ("a normalised post", {"post.normalize": True}),
        ("compiled", {"compile": True}),
        ("momentum stored in bfloat16", {"storage.moments": "bfloat16"}),
        ("factors stored in bfloat16", {"storage.factors": "bfloat16"}),
        ("another inner rule", {"name": "soap"}),
        ("KL's factors with Adam's rule", {"name": "kl_soap"}),
        ("a split with the momentum whole", {"name": "pro_kl_shampoo", "inner.momentum_basis": "original"}),
    ],
)
def test_calls_the_pipeline_must_make_are_refused(why, kwargs):
    with pytest.warns(DeprecationWarning) if "inner.normalize" in kwargs else _nothing():
        assert not _due(**kwargs), why


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_restricted_side_is_refused():
    layout = Layout(batch=1, m=6, n=8, left="full", right="restricted", rank_right=2)
    cfg = kronopt.resolve("kl_shampoo", **{"inner.momentum_basis": "original"}).bound()
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    assert not compose.eigen_steps_due(cfg, layout, attrs.evolve(state, calls=5, step=4), torch.float32)


def test_a_stage_from_outside_kronopt_is_refused(monkeypatch):
    """A plugin's stage has its outputs checked (``compose._checked_slots``), which only the pipeline does."""
    assert _due()
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", True)
    assert not _due()


# -- the flat vectors ------------------------------------------------------------------------------


def _vectors(gen, dtype, lengths=(1, 3, 7, 16, 17, 33, 64, 65)):
    """Vectors of awkward lengths holding zeros, infinities, NaN, subnormals and values of every size."""
    out = []
    for k in lengths:
        v = torch.randn(k, generator=gen, dtype=dtype).abs() * 10.0 ** torch.randint(-30, 30, (k,), generator=gen).to(dtype)
        specials = torch.tensor([0.0, math.inf, math.nan, torch.finfo(dtype).tiny / 8, 1e-45, 3e38], dtype=dtype)
        v[: min(k, 6)] = specials[: min(k, 6)][torch.randperm(min(k, 6), generator=gen)]
        out.append(v.reshape(1, k) if k % 2 else v.reshape(k // 16 or 1, -1))
    return out


KERNELS = {
    "square": lambda x, y: x.square(),
    "reciprocal": lambda x, y: x.reciprocal(),
    "nan_to_num": lambda x, y: torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0),
    "lerp": lambda x, y: torch.lerp(x, y, 0.02),
    "lerp past a half": lambda x, y: torch.lerp(x, y, 0.9),
    "rsqrt": lambda x, y: x.rsqrt(),
    "sqrt": lambda x, y: x.sqrt(),
    "clamp": lambda x, y: x.clamp(min=0.0),
    "minimum": lambda x, y: torch.minimum(x, y),
    "divide": lambda x, y: x / y,
    "add": lambda x, y: x + y,
    **{f"power {e}": (lambda e: lambda x, y: linalg.power(x, e))(e) for e in sorted(linalg.POSITION_FREE_EXPONENTS)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_kernel_on_a_flat_vector_rounds_each_entry_as_alone(name, dtype):
    """What ``linalg.joined`` relies on: each elementwise kernel the flat paths use gives an entry the same bits
    wherever it lies in a vector (a vectorised body or a scalar tail), so a part of one flat vector comes out as
    the part alone."""
    gen = torch.Generator().manual_seed(3)
    x, y = _vectors(gen, dtype), _vectors(gen, dtype)
    fn = KERNELS[name]
    whole = linalg.parted(fn(linalg.joined(x), linalg.joined(y)), x)
    for part, a, b in zip(whole, x, y):
        alone = fn(a, b)
        assert torch.equal(part.nan_to_num(7.0), alone.nan_to_num(7.0)) and torch.equal(part.isnan(), alone.isnan())
        for e in range(a.numel()):  # and each entry in a tensor of its own
            one = fn(a.reshape(-1)[e : e + 1], b.reshape(-1)[e : e + 1])
            assert torch.equal(one.nan_to_num(7.0), part.reshape(-1)[e : e + 1].nan_to_num(7.0))


def test_joined_and_parted_give_every_tensor_back():
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 3, generator=gen), torch.randn(5, generator=gen), torch.randn(1, 1, generator=gen)]
    back = linalg.parted(linalg.joined(xs), xs)
    assert [b.shape for b in back] == [x.shape for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(back, xs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tracked_inverse_roots_of_many_equal_each_alone(dtype):
    """Zero roots (an infinite previous eigenvalue), NaN and infinite statistics, clamped and unclamped parts, each
    statistic divided by its own number."""
    gen = torch.Generator().manual_seed(5)
    s = [v.abs().clamp(max=1e4).nan_to_num(0.5) for v in _vectors(gen, dtype)]
    d = _vectors(gen, dtype)
    clamp = [None if k % 3 == 0 else float(10 + k) for k in range(len(s))]
    divisors = [float(3 + 2 * k) for k in range(len(s))]
    made = linalg.tracked_inverse_root_ema_each(s, d, 0.98, clamp, divisors=divisors)
    for m, s_i, d_i, c, n in zip(made, s, d, clamp, divisors):
        alone = linalg.tracked_inverse_root_ema(s_i, d_i / n, 0.98, c)
        assert m.shape == s_i.shape and torch.equal(m, alone)
    undivided = linalg.tracked_inverse_root_ema_each(s, d, 0.5, clamp)
    assert all(torch.equal(u, linalg.tracked_inverse_root_ema(a, b, 0.5, c)) for u, a, b, c in zip(undivided, s, d, clamp))
    with pytest.raises(ValueError, match="same shape"):
        linalg.tracked_inverse_root_ema_each([s[0]], [d[1]], 0.9, [None])


@pytest.mark.parametrize("exponent", [-0.5, -0.25, -1.0, -0.3])
def test_the_product_denominators_of_many_equal_each_alone(exponent):
    """Zero and infinite eigenvalues (the NaN mend of ``0 · ∞``), negative ones, in some pairs only; the exponent
    -0.3, whose power may round by place, block by block."""
    gen = torch.Generator().manual_seed(6)
    lam_L = [torch.rand(b, m, generator=gen) * 10 for b, m in ((1, 4), (2, 7), (1, 17), (3, 2))]
    lam_R = [torch.rand(b, n, generator=gen) * 10 for b, n in ((1, 9), (2, 3), (1, 33), (3, 5))]
    lam_L[1][0, 2], lam_R[1][0, 1] = 0.0, math.inf  # a zero root against an infinite one in a block: 0 · ∞
    lam_L[2][0, 5], lam_R[3][2, 4] = -1.0, math.nan
    made = linalg.product_inverse_root_denominators_each(lam_L, lam_R, exponent, 1e-8)
    for m, a, b in zip(made, lam_L, lam_R):
        alone = linalg.product_inverse_root_denominator(a, b, exponent, 1e-8)
        assert torch.equal(m, alone)
    assert torch.isinf(made[1][0, 2, 1])  # the mended 0 · ∞: no step
    # float64 pairs beside them, none with a zero root: the float32 pair's 0 · ∞ still mended
    wide = [torch.rand(1, 3, dtype=torch.float64) + 1, torch.rand(1, 4, dtype=torch.float64) + 1]
    mixed = linalg.product_inverse_root_denominators_each([lam_L[1], wide[0]], [lam_R[1], wide[1]], exponent, 1e-8)
    for m, a, b in zip(mixed, (lam_L[1], wide[0]), (lam_R[1], wide[1])):
        assert torch.equal(m, linalg.product_inverse_root_denominator(a, b, exponent, 1e-8))
    # where no root is zero nothing is mended, and each part is still as alone
    clean = linalg.product_inverse_root_denominators_each(lam_L[:1], lam_R[:1], exponent, 0.0)
    assert torch.equal(clean[0], linalg.product_inverse_root_denominator(lam_L[0], lam_R[0], exponent, 0.0))


def test_the_estimators_eigenvalues_of_many_equal_each_alone():
    cfg = kronopt.resolve("kl_shampoo").bound()
    gen = torch.Generator().manual_seed(7)
    states = []
    for layout in LAYOUTS:
        state, _ = _states(cfg, layout, 12, gen)
        states.append(state.factors)
    states[0] = attrs.evolve(states[0], s_L=torch.zeros_like(states[0].s_L))  # s = 0: an infinite eigenvalue
    for made, state in zip(cfg.factors.eigvals_each(states), states):
        for a, b in zip(made, cfg.factors.eigvals(state)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)


# -- through the optimizer ------------------------------------------------------------------------

SHAPES = [(6, 5), (6, 5), (7, 3), (3, 9), (9,), (5, 4), (4, 7), (12, 40), (2, 2), (17, 26)]


def _train(monkeypatch, preset, *, together, overrides=None, steps=24, poison=True, failing=None):
    return train_two_groups(
        monkeypatch, preset, SHAPES, switch="_EIGEN_STEPS_TOGETHER", function="eigen_steps", together=together,
        overrides=overrides, steps=steps, poison=poison, patches=failing,
    )


_same_runs = assert_same_training


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("kl_shampoo", None),
        ("shampoo", None),
        ("kl_shampoo", {"refresh.stagger": True}),  # some buckets refresh at an update where the others do not
        ("kl_shampoo", {"inner.momentum_basis": "original", "inner.bias_correction": True}),
    ],
)
def test_the_optimizer_takes_the_same_steps_with_the_calls_together(monkeypatch, preset, overrides):
    """Two param groups of other rates, a NaN gradient and an overflowing one (skipped blocks), refreshes: the same
    parameters, state and skip counts as each bucket through its pipeline."""
    fast = _train(monkeypatch, preset, together=True, overrides=overrides)
    slow = _train(monkeypatch, preset, together=False, overrides=overrides)
    assert fast[3] and max(fast[3]) >= 5 and not slow[3]  # the path was taken, for several buckets at once
    _same_runs(fast, slow)
    assert fast[2]["p2"] >= 1 and fast[2]["p0"] == 0


def _failing_qr(at):
    """Patches ``linalg.q_factor`` so that every 7 × 7 side's QR returns a NaN column on its first block at the
    twentieth update's refresh (the 7 × 3 block's left side, the 4 × 7 block's right one)."""

    def install(patch):
        real = linalg.q_factor
        real_step = kronopt.KronOptimizer.step

        def failing(P, **kwargs):
            Q = real(P, **kwargs)
            if at["step"] == 21 and P.shape[-2:] == (7, 7):
                Q[0, :, 3] = math.nan
                at["made"] += 1
            return Q

        def counted_step(self, closure=None):
            at["step"] += 1
            return real_step(self, closure)

        patch.setattr(linalg, "q_factor", failing)
        patch.setattr(kronopt.KronOptimizer, "step", counted_step)

    return install


def test_a_failed_refresh_made_together_keeps_the_old_basis_as_the_pipeline_does(monkeypatch):
    """A refresh made together does not test its new basis; the optimizer's test of the new state finds the NaN and
    makes the call again through the pipeline, whose refresh keeps that block's old basis: parameters, state and
    counts as with the path off, nothing skipped."""
    runs = {}
    for together in (True, False):
        at = {"step": 0, "made": 0}
        runs[together] = (_train(monkeypatch, "kl_shampoo", together=together, poison=False, failing=_failing_qr(at)), at)
    (fast, at_fast), (slow, at_slow) = runs[True], runs[False]
    assert at_slow["made"] == 2 and at_fast["made"] == 4  # each failing side once with the path off, twice with it on
    _same_runs(fast, slow)
    assert all(torch.isfinite(p).all() for p in fast[0]) and not any(fast[2].values())


def test_the_calls_made_together_follow_the_float64_reference_of_the_spec(monkeypatch):
    """The path against the clean-room float64 KL-Shampoo written from the spec (tests/reference/kl_shampoo.py), not
    only against the pipeline: every call past the first is made by ``eigen_steps``."""
    shapes = [(6, 4), (4, 6), (5, 5), (6, 4), (3, 7)]
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = reference_grads(gen, shapes, 25)
    ref = kl_reference(params, grads, lr=1e-3)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(ours)], "kl_shampoo", lr=1e-3)
    taken = []
    real = compose.eigen_steps
    monkeypatch.setattr(compose, "eigen_steps", lambda calls: taken.append(len(calls)) or real(calls))
    history = run_history(opt, ours, grads)
    assert len(taken) == 24 and set(taken) == {4}  # the two 6 × 4 blocks stacked, 4 × 6, 5 × 5, 3 × 7
    assert_histories_close(history, ref)


def test_the_stage_clock_times_each_operator_of_the_calls_together_in_its_slot(monkeypatch):
    """On the updates made together, the momenta, scales and rotations are the inner rule's, the Gram products and
    eigenvalue estimates the factors' (``kronopt bench --stages``): the slot open at each such operator."""
    shapes = [(6, 5), (6, 5), (7, 3), (3, 9)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    opt = kronopt.build(params, "kl_shampoo")
    seen, taken = slots_seen(monkeypatch, opt, params, "eigen_steps", 12)
    assert taken == [3] * 12  # the stacked 6 × 5 pair, 7 × 3, 3 × 9
    for name in ("_foreach_lerp", "_foreach_div"):  # the momenta and the scaled direction
        assert seen.get(name) == {"inner"}, (name, seen.get(name))
    for name in ("baddbmm", "_foreach_add", "rsqrt"):  # the Gram products, their sums, the eigenvalue estimates
        assert seen.get(name) == {"factors"}, (name, seen.get(name))
    assert "basis" in seen.get("linalg_householder_product", set()) | seen.get("geqrf", set())


# -- drawn settings ---------------------------------------------------------------------------------

_SIDES = st.sampled_from([("full", "full"), ("full", "full"), ("none", "full"), ("full", "none"), ("none", "none")])


@st.composite
def _drawn_calls(draw):
    """A few buckets of drawn layouts (sides up to 14, stacks of up to 3, one-sided and unrotated ones among them) under
    drawn settings of the ``eigenvalue`` rule and the ``kl`` or ``ema`` estimator, each at a drawn update (a refresh
    due or not), some in float64: ``(configs, layouts, updates, float64 flags)``."""
    k = draw(st.integers(1, 4))
    configs, layouts, updates, wide = {}, [], [], []
    for i in range(k):
        preset = draw(st.sampled_from(["kl_shampoo", "shampoo"]))
        overrides = {
            "inner.momentum_basis": draw(st.sampled_from(["original", "eigen"])),
            "inner.eps_placement": draw(st.sampled_from(["inside", "outside", "product"])),
            "inner.exponent": draw(st.sampled_from([-0.5, -0.25, -1.0, -0.3])),
            "inner.bias_correction": draw(st.booleans()),
            "inner.eps": draw(st.sampled_from([0.0, 1e-12, 1e-3])),
            "factor_update": draw(st.sampled_from(["after", "before"])),
            "post.grafting": draw(st.sampled_from(["none", "adam"])),
            "refresh.every": draw(st.integers(2, 6)),
        }
        if preset == "kl_shampoo":
            overrides["factors.damping"] = draw(st.sampled_from([0.0, 0.0, 1e-4]))
            overrides["factors.clamping"] = draw(st.booleans())
            overrides["factors.init_factor"] = draw(st.sampled_from([0.1, 1e-4]))
        if overrides["inner.momentum_basis"] == "eigen" or preset == "kl_shampoo":
            overrides["basis.type"] = "qr"
        configs[f"{preset} {i}"] = (preset, overrides)
        left, right = draw(_SIDES)
        layouts.append(Layout(batch=draw(st.integers(1, 3)), m=draw(st.integers(1, 14)), n=draw(st.integers(1, 14)),
                              left=left, right=right))
        updates.append(draw(st.integers(2, 13)))  # past the first call of either preset
        wide.append(draw(st.booleans()))
    return configs, layouts, updates, wide


@settings(max_examples=30, deadline=None)
@given(_drawn_calls(), st.integers(0, 2**16))
def test_drawn_settings_made_together_equal_the_pipeline_bit_for_bit(drawn, seed):
    """Each drawn config on its own layout, all in one ``eigen_steps`` call, against each bucket's ``compose.step``:
    the settings the path takes in every combination the tables above do not spell out."""
    configs, layouts, updates, wide = drawn
    for k, (name, (preset, overrides)) in enumerate(configs.items()):
        made = made_together_as_the_pipeline(
            compose.eigen_steps, compose.eigen_steps_due, {name: (preset, overrides)}, [layouts[k]],
            lambda cfg, j, i: updates[k] - 1 + cfg.skip_first_call, lambda j, i: wide[k], seed,
        )
        assert made[0][0][2].step + 1 == updates[k]
    # and all of them in one call
    drawn_calls_as_the_pipeline(
        compose.eigen_steps, compose.eigen_steps_due,
        [(preset, overrides, layouts[k], updates[k], wide[k])
         for k, (preset, overrides) in enumerate(configs.values())],
        seed,
    )
