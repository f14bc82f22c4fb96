"""The small buckets' plain rotated-Adam calls made together (``compose.rotated_adams``, the CPU's
``KronOptimizer._step_small_buckets``) against the pipeline (``compose.step``), bit for bit.

``rotated_adams`` makes the directions of several buckets with one ``foreach`` call per elementwise operation
and setting; ``compose.step`` makes each bucket's with the stages' own methods. The two must agree on every
bit of the direction and the new state, for every setting the fast path accepts, and the fast path must turn
down every call it cannot make as the pipeline would (a refresh, a first call, a normalised or grafted step,
narrower storage, a restricted side, a stage from outside kronopt).
"""

import math

import attrs
import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module
from kronopt.types import Layout
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.soap import soap_reference


def _states(cfg, layout, steps, gen, dtype=torch.float32):
    """A bucket's state after ``steps`` calls of the pipeline on random gradients (its first call and, at 10,
    a refresh included), and the next gradient."""
    state = compose.init_state(cfg, layout, dtype=dtype, device=torch.device("cpu"))
    shape = (layout.batch, layout.m, layout.n)
    for _ in range(steps):
        _, state = compose.step(cfg, layout, state, torch.randn(shape, generator=gen, dtype=dtype))
    return state, torch.randn(shape, generator=gen, dtype=dtype)


def _equal(a, b):
    """Two records (or tensors) equal bit for bit, field by field."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
        return
    if a is None or isinstance(a, (int, float, bool, str)):
        assert a == b
        return
    assert type(a) is type(b)
    for field in attrs.fields(type(a)):
        _equal(getattr(a, field.name), getattr(b, field.name))


CONFIGS = {
    "soap": ("soap", {}),
    "soap, ε after the correction, other betas": (
        "soap", {"inner.eps_placement": "after_correction", "inner.betas": [0.9, 0.99], "inner.eps": 1e-6}
    ),
    "soap without bias correction": ("soap", {"inner.bias_correction": False}),
    "dykaf": ("dykaf", {}),
    "soap, power refresh unsorted": ("soap", {"basis.sort": False}),
}


def test_the_calls_of_several_buckets_and_settings_equal_the_pipeline_bit_for_bit():
    """Buckets of five configs (three Adam settings, two factor estimators), tall, wide, square, one-sided and
    stacked, float32 and float64, at different updates (so different bias corrections) in one call, against
    each bucket's ``compose.step``; the deferred factor updates too."""
    gen = torch.Generator().manual_seed(0)
    layouts = [
        Layout(batch=1, m=9, n=4, left="full", right="full"), Layout(batch=3, m=5, n=12, left="full", right="full"), Layout(batch=2, m=7, n=7, left="full", right="full"),
        Layout(batch=1, m=6, n=11, left="none", right="full"), Layout(batch=2, m=13, n=3, left="full", right="none"),
    ]
    calls, expected = [], []
    for k, (name, overrides) in enumerate(CONFIGS.values()):
        cfg = kronopt.resolve(name, **overrides).bound()
        for j, layout in enumerate(layouts):
            dtype = torch.float64 if (j + k) % 4 == 0 else torch.float32
            state, G = _states(cfg, layout, 12 + (j + k) % 5, gen, dtype)  # past the refresh at update 10
            assert compose.rotated_adam_due(cfg, layout, state, dtype)
            defer_ref = []
            expected.append((*compose.step(cfg, layout, state, G.clone(), defer=defer_ref), defer_ref))
            calls.append((cfg, layout, state, G, []))
    got = compose.rotated_adams(calls)
    for (D, new), (D_ref, new_ref, defer_ref), call in zip(got, expected, calls):
        _equal(D, D_ref)
        _equal(new, new_ref)
        _same_deferred(call[4], defer_ref)
    assert any(call[4] for call in calls)  # DyKAF's small updates are deferred too


def _same_deferred(defer, defer_ref):
    """The same deferred factor updates: into the same stacks, with the same values once run (each run on the
    stack as it was, which is then put back)."""
    assert len(defer) == len(defer_ref)
    assert all(a.target is b.target for a, b in zip(defer, defer_ref))
    for d, d_ref in zip(defer, defer_ref):
        ok = torch.ones(d.target.shape[0], dtype=torch.bool)
        kept = d.target.clone()
        compose.run_deferred_([d_ref], ok)
        made = d.target.clone()
        d.target.copy_(kept)
        compose.run_deferred_([d], ok)
        assert torch.equal(made, d.target)
        d.target.copy_(kept)


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


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("the first call", {"steps": 0}),
        ("a refresh is due at this update (the tenth)", {"steps": 10}),
        ("a normalised direction", {"inner.normalize": True}),
        ("grafting", {"post.grafting": "adam"}),
        ("a normalised post", {"post.normalize": True}),
        ("the factors updated before the direction", {"factor_update": "before"}),
        ("compiled", {"compile": True}),
        ("moments stored in bfloat16", {"storage.moments": "bfloat16"}),
        ("another inner rule", {"name": "shampoo"}),
        ("a factor estimator that reads its own rotation", {"name": "kl_soap"}),
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
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    taken = []
    with monkeypatch.context() as patch:
        patch.setattr(optimizer_module, "_ROTATED_ADAMS_TOGETHER", together)
        real = compose.rotated_adams

        def counted(calls):
            taken.append(len(calls))
            return real(calls)

        patch.setattr(compose, "rotated_adams", counted)
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        groups = [{"params": named[:5]}, {"params": named[5:], "lr": 0.003, "weight_decay": 0.1}]
        opt = kronopt.build(groups, preset, nonfinite="skip", nonfinite_scope="block", **(overrides or {}))
        for step in range(steps):
            grads = [torch.randn(s, generator=gen) for s in SHAPES]
            if poison and step == 13:
                grads[2][1, 1] = math.nan
                grads[5][0, 0] = 1e30  # finite; its square overflows the second moment
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), taken


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("soap", None),
        ("dykaf", None),
        ("soap", {"refresh.stagger": True}),  # some buckets refresh while the others are made together
        ("soap", {"inner.eps_placement": "after_correction", "lr": 0.02}),
    ],
)
def test_the_optimizer_takes_the_same_steps_with_the_calls_together(monkeypatch, preset, overrides):
    fast = _train(monkeypatch, preset, together=True, overrides=overrides)
    slow = _train(monkeypatch, preset, together=False, overrides=overrides)
    assert fast[3] and max(fast[3]) >= 5 and not slow[3]  # the path was taken, for several buckets at once
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b)
    for i in fast[1]:
        for key, value in fast[1][i].items():
            other = slow[1][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)
    counts = fast[2]
    assert counts == slow[2]
    # the NaN's block skipped, and the block whose moment overflows (DyKAF's first calls may skip it earlier)
    assert counts["p2"] == 1 and counts["p5"] >= 1 and counts["p0"] == 0


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
    monkeypatch.setattr(compose, "rotated_adams", lambda calls: taken.append(len(calls)) or real(calls))
    history = run_history(opt, ours, grads)
    # 25 calls: the first builds the basis, updates 10 and 20 refresh, the other 22 are made together, each of the
    # four buckets (the two 6 × 4 blocks stacked, 4 × 6, 5 × 5, and the bias, whose sides are not rotated)
    assert len(taken) == 22 and set(taken) == {4}
    assert_histories_close(history, ref)


def test_the_factor_updates_of_several_buckets_equal_each_alone():
    """``linalg.accumulate_grams_each`` against ``accumulate_gram_left`` on each pair: small dense sums made together,
    an inner side of 1 (entry by entry), a side the transpose is added to block by block, and one whose update is
    tiled and left to the state write (``defer``), float32 and float64, stacked and alone."""
    from kronopt import linalg

    gen = torch.Generator().manual_seed(7)
    sizes = [(1, 3, 5), (2, 17, 4), (1, 9, 1), (1, 400, 6), (1, linalg._GRAM_TILED_MIN, 3), (3, 6, 30)]
    X, A = [], []
    for k, (b, m, r) in enumerate(sizes):
        dtype = torch.float64 if k % 2 else torch.float32
        B = torch.randn(b, m, m + 2, generator=gen, dtype=dtype)
        X.append(B @ B.mT / m)
        A.append(torch.randn(b, m, r, generator=gen, dtype=dtype))
    defer, defer_ref = [[] for _ in X], [[] for _ in X]
    made = linalg.accumulate_grams_each(X, A, 0.9, 0.1, defer)
    for X_i, A_i, got, d, d_ref in zip(X, A, made, defer, defer_ref):
        want = linalg.accumulate_gram_left(X_i, A_i, 0.9, 0.1, defer=d_ref)
        assert torch.equal(got, want) and torch.equal(got, got.mT)
        assert (got is X_i) == (want is X_i)
        _same_deferred(d, d_ref)
    assert sum(map(len, defer)) == 1  # the tiled one, into its own stack
    assert torch.allclose(made[0], 0.9 * X[0] + 0.1 * A[0] @ A[0].mT, atol=1e-5)  # the EMA of the Gram, not only a copy
