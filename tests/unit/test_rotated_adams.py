"""The small buckets' plain rotated-Adam calls made together (``compose.rotated_adams``, the CPU's
``KronOptimizer._step_small_buckets``) against the pipeline (``compose.step``), bit for bit.

``rotated_adams`` makes the directions of several buckets with one ``foreach`` call per elementwise operation
and setting; ``compose.step`` makes each bucket's with the stages' own methods. The two must agree on every
bit of the direction and the new state, for every setting the fast path accepts, a refresh included, and the fast
path must turn down every call it cannot make as the pipeline would (a first call, a normalised or grafted step,
narrower storage, a restricted side, a stage from outside kronopt). A refresh made together leaves the test of its
new basis to the optimizer, which makes a call whose new basis is not finite again through the pipeline.
"""

import copy
import math
import warnings

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as optimizer_module
from kronopt.types import Layout
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.soap import soap_reference
from tests.unit._together import (
    assert_records_equal, assert_same_deferred, assert_same_training, drawn_calls_as_the_pipeline,
    made_together_as_the_pipeline, pipeline_state, slots_seen, train_two_groups,
)


_states, _equal, _same_deferred = pipeline_state, assert_records_equal, assert_same_deferred


CONFIGS = {
    "soap": ("soap", {}),
    "soap, ε after the correction, other betas": (
        "soap", {"inner.eps_placement": "after_correction", "inner.betas": [0.9, 0.99], "inner.eps": 1e-6}
    ),
    "soap without bias correction": ("soap", {"inner.bias_correction": False}),
    "dykaf": ("dykaf", {}),
    "soap, power refresh unsorted": ("soap", {"basis.sort": False}),
    "kl_soap (its factor update reads the call's rotation)": ("kl_soap", {}),
}


def _made_together_as_the_pipeline(configs, layouts, steps, float64_every, seed):
    """A bucket of each config on each layout after ``steps(j, k)`` calls of the pipeline (``j`` the layout's
    index, ``k`` the config's), some in float64; the next call of them all made in one ``rotated_adams`` call
    against each bucket's ``compose.step``, bit for bit, deferred factor updates included. Returns
    ``[(call, new state)]``."""
    return made_together_as_the_pipeline(
        compose.rotated_adams, compose.rotated_adam_due, configs, layouts, lambda cfg, j, k: steps(j, k),
        lambda j, k: (j + k) % float64_every == 0, seed,
    )


def test_the_calls_of_several_buckets_and_settings_equal_the_pipeline_bit_for_bit():
    """Buckets of six configs (three Adam settings, three factor estimators: KL-SOAP's reads the call's rotation),
    tall, wide, square, one-sided and stacked, float32 and float64, at different updates (so different bias
    corrections) in one call, against each bucket's ``compose.step``; the deferred factor updates too."""
    layouts = [
        Layout(batch=1, m=9, n=4, left="full", right="full"), Layout(batch=3, m=5, n=12, left="full", right="full"), Layout(batch=2, m=7, n=7, left="full", right="full"),
        Layout(batch=1, m=6, n=11, left="none", right="full"), Layout(batch=2, m=13, n=3, left="full", right="none"),
    ]
    made = _made_together_as_the_pipeline(CONFIGS, layouts, lambda j, k: 12 + (j + k) % 5, 4, seed=0)  # past update 10's refresh
    assert any(call[4] for call, _ in made)  # DyKAF's small updates are deferred too


REFRESHING = {
    **CONFIGS,
    "soap, two power steps a refresh": ("soap", {"basis.power_steps": 2}),
    "soap, canonical null space": ("soap", {"basis.null_space": "canonical"}),
    "soap, eigh refresh": ("soap", {"basis.type": "eigh"}),
}


def test_refresh_calls_made_together_equal_the_pipeline_bit_for_bit():
    """Calls at the tenth and twentieth updates (a refresh due) among plain ones, of eight configs (the power step
    sorted and not, two power steps, the canonical null space, an ``eigh`` refresh, DyKAF, three Adam settings) on
    tall, wide, one-sided and stacked layouts, float32 and float64, in one call, against each bucket's
    ``compose.step``: the new basis, its eigenvalue estimates, the moments carried into it, the factors (not
    deferred: the refresh reads them), the counters."""
    layouts = [
        Layout(batch=1, m=9, n=4, left="full", right="full"), Layout(batch=3, m=5, n=12, left="full", right="full"),
        Layout(batch=2, m=1, n=9, left="none", right="full"), Layout(batch=2, m=13, n=3, left="full", right="none"),
    ]
    # updates 10 and 20 refresh, 15 does not
    made = _made_together_as_the_pipeline(REFRESHING, layouts, lambda j, k: (10, 20, 15)[(j + k) % 3], 3, seed=10)
    refreshed = [call for call, new in made if new.basis.refreshes != call[2].basis.refreshes]
    assert len(refreshed) >= len(made) // 2
    assert not any(call[4] for call in refreshed)  # a refresh reads the new factors: nothing left to the state write


def test_a_deferred_factor_update_is_left_as_the_pipeline_leaves_it():
    """A long side from the tiled size on leaves its factor update to the state write: the same records, the
    new state holding the old stack, and the same stack once they run."""
    gen = torch.Generator().manual_seed(1)
    cfg = kronopt.resolve("soap").bound()
    layout = Layout(batch=1, m=4, n=512, left="full", right="full")
    state, G = _states(cfg, layout, 11, gen)
    defer_ref, defer = [], []
    D_ref, new_ref = compose.step(cfg, layout, state, G.clone(), defer=defer_ref)
    ((D, new),) = compose.rotated_adams([(cfg, layout, state, G, defer)])
    assert len(defer) == len(defer_ref) == 1  # the right factor (512 × 512)
    _equal(D, D_ref)
    _equal(new, new_ref)
    assert new.factors.R is state.factors.R
    _same_deferred(defer, defer_ref)


def _due(name="soap", steps=12, layout=Layout(batch=1, m=6, n=8, left="full", right="full"), dtype=torch.float32, **overrides):
    cfg = kronopt.resolve(name, **overrides).bound()
    state, _ = _states(cfg, layout, steps, torch.Generator().manual_seed(2), dtype)
    return compose.rotated_adam_due(cfg, layout, state, dtype)


def test_plain_calls_are_taken():
    assert _due()
    assert _due("dykaf")
    assert _due(layout=Layout(batch=2, m=1, n=9, left="none", right="full"))
    assert _due(steps=10)  # a refresh is due at this update (the tenth)
    assert _due("dykaf", steps=10)
    assert _due("kl_soap")  # KL's factors read the call's rotation: shared with the direction (StepContext.rotated)


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("the first call", {"steps": 0}),
        ("a normalised direction", {"inner.normalize": True}),
        ("grafting", {"post.grafting": "adam"}),
        ("a normalised post", {"post.normalize": True}),
        ("the factors updated before the direction", {"factor_update": "before"}),
        ("compiled", {"compile": True}),
        ("moments stored in bfloat16", {"storage.moments": "bfloat16"}),
        ("another inner rule", {"name": "shampoo"}),
        ("another split", {"name": "pro_soap"}),
    ],
)
def test_calls_the_pipeline_must_make_are_refused(why, kwargs):
    assert not _due(**kwargs), why


def test_a_restricted_side_is_refused():
    layout = Layout(batch=1, m=6, n=8, left="full", right="restricted", rank_right=2)
    cfg = kronopt.resolve("soap").bound()
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    state = attrs.evolve(state, calls=5, step=4)
    assert not compose.rotated_adam_due(cfg, layout, state, torch.float32)


def test_a_stage_from_outside_kronopt_is_refused(monkeypatch):
    """A plugin's stage has its outputs checked (``compose._checked_slots``), which only the pipeline does."""
    cfg = kronopt.resolve("soap").bound()
    layout = Layout(batch=1, m=6, n=8, left="full", right="full")
    state, _ = _states(cfg, layout, 12, torch.Generator().manual_seed(3))
    assert compose.rotated_adam_due(cfg, layout, state, torch.float32)
    monkeypatch.setattr(compose, "CHECK_OWN_STAGES", True)
    assert not compose.rotated_adam_due(cfg, layout, state, torch.float32)


# -- through the optimizer ------------------------------------------------------------------------

SHAPES = [(6, 5), (6, 5), (7, 3), (3, 9), (9,), (5, 4), (4, 7), (12, 40), (2, 2)]


def _train(monkeypatch, preset, *, together, overrides=None, steps=24, poison=True):
    return train_two_groups(
        monkeypatch, preset, SHAPES, switch="_ROTATED_ADAMS_TOGETHER", function="rotated_adams", together=together,
        overrides=overrides, steps=steps, poison=poison, seed=4,
    )


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("soap", None),
        ("dykaf", None),
        ("kl_soap", None),
        ("soap", {"refresh.stagger": True}),  # some buckets refresh at an update where the others do not
        ("soap", {"inner.eps_placement": "after_correction", "lr": 0.02}),
    ],
)
def test_the_optimizer_takes_the_same_steps_with_the_calls_together(monkeypatch, preset, overrides):
    fast = _train(monkeypatch, preset, together=True, overrides=overrides)
    slow = _train(monkeypatch, preset, together=False, overrides=overrides)
    assert fast[3] and max(fast[3]) >= 5 and not slow[3]  # the path was taken, for several buckets at once
    assert_same_training(fast, slow)
    counts = fast[2]
    # the NaN's block skipped, and the block whose moment overflows (DyKAF's first calls may skip it earlier)
    assert counts["p2"] == 1 and counts["p5"] >= 1 and counts["p0"] == 0


def _train_failing_refresh(monkeypatch, *, together):
    """``_train``'s soap run (no poisoned gradient) in which the QR of every 7 × 7 side returns a NaN column on one
    block at the twentieth update's refresh (the 7 × 3 block's left side, the 4 × 7 block's right one)."""
    real = linalg.q_factor
    at = {"step": 0, "made": 0}

    def failing(P, **kwargs):
        Q = real(P, **kwargs)
        if at["step"] == 21 and P.shape[-2:] == (7, 7):  # the 21st call: the first only builds the basis
            Q[0, :, 3] = math.nan
            at["made"] += 1
        return Q

    monkeypatch.setattr(linalg, "q_factor", failing)
    real_step = kronopt.KronOptimizer.step

    def counted_step(self, closure=None):
        at["step"] += 1
        return real_step(self, closure)

    monkeypatch.setattr(kronopt.KronOptimizer, "step", counted_step)
    out = _train(monkeypatch, "soap", together=together, poison=False)
    monkeypatch.undo()
    return out, at["made"]


def test_a_failed_refresh_made_together_keeps_the_old_basis_as_the_pipeline_does(monkeypatch):
    """A refresh made together does not test its new basis (``StepContext.finite_fallback``); the optimizer's test of
    the new state finds the NaN and makes the call again through the pipeline, whose refresh keeps that block's
    old basis and counts the failure: parameters, state and counts as with the path off, nothing skipped."""
    (fast, made_fast), (slow, made_slow) = (_train_failing_refresh(monkeypatch, together=t) for t in (True, False))
    assert made_slow == 2 and made_fast == 4  # each failing side once with the path off, twice with it on
    assert fast[3] and not slow[3]
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    for i in fast[1]:
        for key, value in fast[1][i].items():
            other = slow[1][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)
    assert fast[2] == slow[2] and not any(fast[2].values())
    failed = [v for i in fast[1] for k, v in fast[1][i].items() if "fail" in k and isinstance(v, torch.Tensor) and v.any()]
    assert failed  # the kept basis was counted as a failure


@pytest.mark.parametrize("options", [{}, {"correct_bias": False, "betas": (0.9, 0.99), "shampoo_beta": 0.8}])
def test_the_calls_made_together_follow_the_float64_reference_of_the_spec(monkeypatch, options):
    """The path against a clean-room float64 SOAP written from the spec (tests/reference/soap.py), not only against
    the pipeline: every plain call of the run is made by ``rotated_adams``."""
    shapes = [(6, 4), (4, 6), (5, 5), (7,), (6, 4)]
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = reference_grads(gen, shapes, 25)
    ref = soap_reference(params, grads, lr=3e-3, **options)
    overrides = {}
    if options:
        overrides = {"inner.bias_correction": False, "inner.betas": [0.9, 0.99], "factors.beta": 0.8}
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours, "soap", lr=3e-3, **overrides)
    taken = []
    real = compose.rotated_adams
    monkeypatch.setattr(compose, "rotated_adams", lambda calls, **kw: taken.append(len(calls)) or real(calls, **kw))
    history = run_history(opt, ours, grads)
    # 25 calls: the first builds the basis, the other 24 are made together (updates 10 and 20 with a refresh), each
    # of the four buckets (the two 6 × 4 blocks stacked, 4 × 6, 5 × 5, and the bias, whose sides are not rotated)
    assert len(taken) == 24 and set(taken) == {4}
    assert_histories_close(history, ref)


def test_the_factor_updates_of_several_buckets_equal_each_alone():
    """``linalg.accumulate_grams_each`` against ``accumulate_gram_left`` on each pair: small dense sums made together,
    an inner side of 1 (entry by entry), a side the transpose is added to block by block (its dense update left to
    the state write, ``defer``), and one whose update is tiled and left to it, float32 and float64, stacked and
    alone."""
    from kronopt import linalg

    gen = torch.Generator().manual_seed(7)
    sizes = [(1, 3, 5), (2, 17, 4), (1, 9, 1), (1, 400, 6), (1, linalg._GRAM_TILED_MIN, 3), (3, 6, 30)]
    X, A = [], []
    for k, (b, m, r) in enumerate(sizes):
        dtype = torch.float64 if k % 2 else torch.float32
        B = torch.randn(b, m, m + 2, generator=gen, dtype=dtype)
        X.append(linalg.sym(B @ B.mT / m))  # a factor is symmetric to the bit (a product's transpose may round otherwise)
        A.append(torch.randn(b, m, r, generator=gen, dtype=dtype))
    defer, defer_ref = [[] for _ in X], [[] for _ in X]
    made = linalg.accumulate_grams_each(X, A, 0.9, 0.1, defer)
    for X_i, A_i, got, d, d_ref in zip(X, A, made, defer, defer_ref):
        want = linalg.accumulate_gram_left(X_i, A_i, 0.9, 0.1, defer=d_ref)
        assert torch.equal(got, want) and torch.equal(got, got.mT)
        assert (got is X_i) == (want is X_i)
        _same_deferred(d, d_ref)
    # the tiled one and the dense one of a side from _DEFER_DENSE_MIN (400: its transpose added block by block), each
    # into its own stack; the smaller dense ones are made at once
    assert sum(map(len, defer)) == 2 and [bool(d) for d in defer] == [False, False, False, True, True, False]
    assert torch.allclose(made[0], 0.9 * X[0] + 0.1 * A[0] @ A[0].mT, atol=1e-5)  # the EMA of the Gram, not only a copy


# -- more settings and scenarios (a review's) -----------------------------------------------------------

# one setting apart from SOAP's each: a key that leaves any one out makes two of them with one setting
ONE_APART = {
    "beta1": {"inner.betas": [0.5, 0.95]},
    "beta2": {"inner.betas": [0.95, 0.5]},
    "eps": {"inner.eps": 0.3},
    "placement": {"inner.eps_placement": "after_correction"},
    "bias correction": {"inner.bias_correction": False},
}


def test_buckets_one_adam_setting_apart_are_each_made_with_their_own():
    """SOAP and five configs each one Adam setting apart from it, at the same update on one layout, in one call:
    each as its pipeline makes it (tests/unit/test_rotated_adams.py's configs differ in several at once)."""
    layout = Layout(batch=2, m=5, n=4, left="full", right="full")
    configs = [kronopt.resolve("soap").bound()] + [kronopt.resolve("soap", **o).bound() for o in ONE_APART.values()]
    calls, expected = [], []
    for cfg in configs:  # the same gradients for each (one seed): only the setting differs
        state, G = _states(cfg, layout, 12, torch.Generator().manual_seed(1))
        assert compose.rotated_adam_due(cfg, layout, state, torch.float32)
        expected.append(compose.step(cfg, layout, state, G.clone()))
        calls.append((cfg, layout, state, G, None))
    for (D, new), (D_ref, new_ref) in zip(compose.rotated_adams(calls), expected):
        _equal(D, D_ref)
        _equal(new, new_ref)
    # every setting changes the direction: a bucket made with another's setting would show
    for k, (D, _) in enumerate(expected[1:]):
        assert not torch.equal(D, expected[0][0]), list(ONE_APART)[k]


def test_ema_factors_of_different_retentions_are_each_updated_with_their_own():
    """Three SOAP configs whose factors differ in their retention alone (three stages of one class), in one call:
    each factor updated with its own beta (``update_each`` is asked per stage, not per class)."""
    layout = Layout(batch=1, m=6, n=5, left="full", right="full")
    configs = [kronopt.resolve("soap", **{"factors.beta": beta}).bound() for beta in (0.95, 0.5, 0.0)]
    gen = torch.Generator().manual_seed(2)
    calls, expected = [], []
    for cfg in configs:
        state, G = _states(cfg, layout, 12, gen)
        expected.append(compose.step(cfg, layout, state, G.clone()))
        calls.append((cfg, layout, state, G, None))
    for (D, new), (D_ref, new_ref) in zip(compose.rotated_adams(calls), expected):
        _equal(D, D_ref)
        _equal(new, new_ref)


def test_accumulate_grams_each_with_zero_retention_never_reads_the_old_factor():
    """``beta = 0``: the product's ``β X`` is never read (as BLAS, and ``_weighted_product``'s outer products), so a
    non-finite old factor leaves no trace, made together as alone; float32 and float64 stacks in one call."""
    gen = torch.Generator().manual_seed(3)
    X = [torch.full((1, 4, 4), math.inf), torch.full((2, 3, 3), math.nan, dtype=torch.float64), torch.full((1, 5, 5), math.inf)]
    A = [
        torch.randn(1, 4, 6, generator=gen), torch.randn(2, 3, 7, generator=gen, dtype=torch.float64),
        torch.randn(1, 5, 1, generator=gen),
    ]
    made = linalg.accumulate_grams_each(X, A, 0.0, 1.0)
    for X_i, A_i, got in zip(X, A, made):
        want = linalg.accumulate_gram_left(X_i, A_i, 0.0, 1.0)
        assert torch.equal(got, want) and bool(got.isfinite().all())


# -- through the optimizer ------------------------------------------------------------------------

GROUPED_SHAPES = [(6, 5), (6, 5), (7, 3), (3, 9), (9,), (5, 4), (4, 7), (5, 4), (2, 2)]


def _train_groups(monkeypatch, preset, *, together, groups, grads, overrides=None, state_hook=None, steps=24):
    """A run of ``steps`` steps on the gradients ``grads(step, gen)`` (``None``: none), with the calls made together or
    not; returns the parameters, their state, the skip counts, the warnings and the sizes of the calls made together."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in GROUPED_SHAPES]
    taken = []
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(optimizer_module, "_ROTATED_ADAMS_TOGETHER", together)
        real = compose.rotated_adams
        patch.setattr(compose, "rotated_adams", lambda calls, **kw: taken.append(len(calls)) or real(calls, **kw))
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        opt = kronopt.build(groups(named), preset, **(overrides or {}))
        for step in range(steps):
            for p, g in zip(params, grads(step, gen)):
                p.grad = g
            if state_hook is not None and step == 14:
                opt = state_hook(opt, named, preset, overrides)
            opt.step()
    copy_of = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    state = {i: {k: copy_of(v) for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), [str(w.message) for w in caught], taken


def _same_runs(fast, slow):
    assert fast[4] and not slow[4]  # the calls were made together in one run and not in the other
    assert_same_training(fast, slow)
    assert fast[3] == slow[3]


def _random(step, gen):
    return [torch.randn(s, generator=gen) for s in GROUPED_SHAPES]


def _three_groups(named):
    """SOAP's Adam settings, other betas with the factors' retention tied to β₂, and a third group ε after the
    correction, no bias correction, its own retention, rate and decay."""
    return [
        {"params": named[:3]},
        {"params": named[3:6], "overrides": {"inner.betas": [0.9, 0.99], "factors.beta": "beta2"}},
        {
            "params": named[6:], "lr": 0.003, "weight_decay": 0.1,
            "overrides": {
                "inner.eps_placement": "after_correction", "inner.bias_correction": False, "factors.beta": 0.5,
                "inner.eps": 1e-3,
            },
        },
    ]


@pytest.mark.parametrize("preset", ["soap", "dykaf"])
def test_groups_of_other_adam_settings_and_retentions_step_alike(monkeypatch, preset):
    """Three param groups of different Adam settings and factor retentions (the same shapes in several, so one call
    holds buckets of each), some parameters skipping steps (their buckets split), a NaN and an overflow, warnings on."""

    def grads(step, gen):
        g = _random(step, gen)
        if step % 3 == 1:
            g[1] = None
        if step % 5 == 2:
            g[7] = None
            g[4] = None
        if step == 13:
            g[2][1, 1] = math.nan
            g[5][0, 0] = 1e30  # finite; its square overflows the second moment
        return g

    kw = {"groups": _three_groups, "grads": grads, "overrides": {"nonfinite": "warn", "nonfinite_scope": "block"}}
    fast = _train_groups(monkeypatch, preset, together=True, **kw)
    slow = _train_groups(monkeypatch, preset, together=False, **kw)
    assert max(fast[4]) >= 6
    _same_runs(fast, slow)
    assert fast[2]["p2"] == 1 and fast[2]["p5"] >= 1 and fast[3]


def test_eps_zero_on_exactly_zero_moments_skips_the_same_blocks(monkeypatch):
    """``inner.eps = 0`` where a second moment is exactly zero (a 2-D parameter whose gradient is always zero, a
    vector with one entry always zero: in the basis ``0 / 0``): its blocks skipped, their counts and warnings as the
    pipeline's (a division guarded against zero, in one path and not the other, would step them)."""

    def grads(step, gen):
        g = _random(step, gen)
        g[3].zero_()
        g[4][0] = 0.0
        return g

    kw = {"groups": lambda named: named, "grads": grads, "overrides": {"inner.eps": 0.0, "nonfinite": "warn"}}
    fast = _train_groups(monkeypatch, "soap", together=True, **kw)
    slow = _train_groups(monkeypatch, "soap", together=False, **kw)
    _same_runs(fast, slow)
    assert fast[2]["p3"] == fast[2]["p4"] == 23 and fast[2]["p0"] == 0  # every update but the skipped first call


def _reloaded_in_other_layouts(opt, named, preset, overrides):
    """The optimizer's state saved and loaded into a new one, its moments column-major or strided on the way."""
    saved = copy.deepcopy(opt.state_dict())
    for k, entry in enumerate(saved["state"].values()):
        for key in ("inner.exp_avg", "inner.exp_avg_sq", "factors.L", "factors.R"):
            v = entry.get(key)
            if isinstance(v, torch.Tensor) and v.ndim == 2:
                if (k + len(key)) % 2:
                    entry[key] = v.mT.contiguous().mT
                else:
                    wide = torch.zeros(v.shape[0], 2 * v.shape[1], dtype=v.dtype)
                    wide[:, ::2] = v
                    entry[key] = wide[:, ::2]
    new = kronopt.build(named, preset, **(overrides or {}))
    new.load_state_dict(saved)
    return new


@pytest.mark.parametrize("preset", ["soap", "dykaf"])
def test_a_state_loaded_in_other_memory_layouts_steps_alike(monkeypatch, preset):
    kw = {"groups": lambda named: named, "grads": _random, "state_hook": _reloaded_in_other_layouts}
    fast = _train_groups(monkeypatch, preset, together=True, **kw)
    slow = _train_groups(monkeypatch, preset, together=False, **kw)
    _same_runs(fast, slow)


def test_the_stage_clock_times_each_operator_of_the_calls_together_in_its_slot(monkeypatch):
    """On the updates made together, the rotations and the elementwise Adam work are the inner rule's and the EMA's
    Gram products the factors' (``kronopt bench --stages``): the slot open at each such operator."""
    shapes = [(6, 5), (6, 5), (7, 3), (3, 9), (9,)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    opt = kronopt.build(params, "soap")
    seen, taken = slots_seen(monkeypatch, opt, params, "rotated_adams", 3)
    assert taken == [4, 4, 4]  # the stacked 6 × 5 pair, 7 × 3, 3 × 9 and the bias
    # the elementwise Adam work is one foreach call per operation (the dispatcher sees those, not the kernels in them)
    for name in ("bmm", "_foreach_lerp", "_foreach_mul", "_foreach_sqrt", "_foreach_div"):
        assert seen.get(name) == {"inner"}, (name, seen.get(name))
    for name in ("baddbmm", "_foreach_add"):  # the Gram products and their sums with their transposes
        assert seen.get(name) == {"factors"}, (name, seen.get(name))


def test_a_large_kl_soap_bucket_takes_the_call_alone_as_the_pipeline(monkeypatch):
    """A CPU bucket outside the small ones takes the call alone (``KronOptimizer._in_place_due``); KL-SOAP's, whose
    factor update makes new eigenvalue estimates, is never proven for its moments in place, and its call (the factor
    update first, reading the call's rotation, then the direction) steps as the pipeline does, float32 and float64,
    refreshes included."""
    shapes = [(520, 24), (520, 24), (200, 150), (40, 40), (64,)]

    def run(in_place, dtype):
        monkeypatch.setattr(optimizer_module, "_ROTATED_MOMENTS_IN_PLACE", in_place)
        taken = []
        real = compose.rotated_adams
        monkeypatch.setattr(compose, "rotated_adams", lambda calls, **kw: taken.append(len(calls)) or real(calls, **kw))
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in shapes]
        opt = kronopt.build([(f"b.{i}.w", p) for i, p in enumerate(params)], "kl_soap", **{"refresh.every": 3})
        for _ in range(9):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in params], taken

    for dtype in (torch.float32, torch.float64):
        (fast, alone), (slow, small) = run(True, dtype), run(False, dtype)
        assert len(alone) > len(small)  # the large buckets' calls too, each alone (the 40 × 40 one's in both)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))


@st.composite
def _drawn_adam_calls(draw):
    """A few buckets of drawn layouts (sides up to 14, stacks of up to 3, one-sided and unrotated ones) under drawn Adam
    settings of soap, dykaf and kl_soap (whose factor update reads the call's rotation), each at a drawn update."""
    out = []
    for i in range(draw(st.integers(1, 4))):
        preset = draw(st.sampled_from(["soap", "dykaf", "kl_soap"]))
        overrides = {
            "inner.eps_placement": draw(st.sampled_from(["before_correction", "after_correction"])),
            "inner.bias_correction": draw(st.booleans()),
            "inner.betas": draw(st.sampled_from([[0.9, 0.98], [0.95, 0.95], [0.0, 0.5]])),
            "refresh.every": draw(st.integers(2, 6)),
        }
        if preset == "kl_soap":
            overrides["factors.init_factor"] = draw(st.sampled_from([0.1, 1e-4]))
            overrides["factors.clamping"] = draw(st.booleans())
        left, right = draw(st.sampled_from([("full", "full"), ("full", "full"), ("none", "full"), ("full", "none"),
                                            ("none", "none")]))
        layout = Layout(batch=draw(st.integers(1, 3)), m=draw(st.integers(1, 14)), n=draw(st.integers(1, 14)),
                        left=left, right=right)
        out.append((preset, overrides, layout, draw(st.integers(2, 13)), draw(st.booleans())))
    return out


@settings(max_examples=30, deadline=None)
@given(_drawn_adam_calls(), st.integers(0, 2**16))
def test_drawn_settings_made_together_equal_the_pipeline_bit_for_bit(drawn, seed):
    """Drawn buckets in one ``rotated_adams`` call against each bucket's ``compose.step``, bit for bit (NaN where the
    pipeline's has NaN)."""
    drawn_calls_as_the_pipeline(compose.rotated_adams, compose.rotated_adam_due, drawn, seed)
