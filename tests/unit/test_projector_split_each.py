"""DyKAF's KSL steps of several buckets made together (``linalg.projector_split_ksl_each``,
``ProjectorSplittingFactors.update_each``) against each bucket's own step, bit for bit.

The calls made together share their per-block scalars (norms' scalings, weights, range tests) in one tensor and read
the host once for all; every call they cannot make as the plain dense step (a state whose norm needs its wide form
or is empty, a result out of the plain range, a tiled or split side, a tracked call, another dtype) is made alone.
Each test asks which calls were made together, so that a fallback taken for every call cannot pass for the shared
path, and the shared path's results are checked against the dense float64 reference of the spec (§3).
"""

import itertools

import pytest
import torch

from kronopt import compose, linalg
from kronopt.factors.projector_splitting import ProjectorSplittingFactors
from tests.reference.dykaf import ksl_dense
from tests.unit.test_rotated_adams import _same_deferred


def _state(b, m, n, gen, dtype=torch.float32, scale=1.0):
    """A started DyKAF state (symmetric PSD factors of equal norms) and a gradient."""
    A = torch.randn(b, m, m + 1, generator=gen, dtype=dtype)
    B = torch.randn(b, n, n + 2, generator=gen, dtype=dtype)
    L, R = A @ A.mT, B @ B.mT
    L, R = linalg.sym(L / linalg.block_norm(L)) * scale, linalg.sym(R / linalg.block_norm(R)) * scale
    return L, R, torch.randn(b, m, n, generator=gen, dtype=dtype) * 0.3


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(a), torch.signbit(b))


def _alone_counted(monkeypatch):
    """Which calls ``projector_split_ksl_each`` makes alone: the ids of the ``L`` each alone call is given."""
    alone, real = [], linalg.projector_split_ksl

    def counted(L, R, G, beta, **kw):
        alone.append(id(L))
        return real(L, R, G, beta, **kw)

    monkeypatch.setattr(linalg, "projector_split_ksl", counted)
    return alone, real


def _calls(gen):
    """Plain small calls (wide, tall, square, stacked), and calls each made alone for a reason of its own."""
    plain = [_state(b, m, n, gen) for b, m, n in [(1, 5, 9), (2, 12, 7), (1, 6, 6), (3, 3, 17), (1, 1, 8), (2, 9, 1)]]
    special = {
        "float64": _state(2, 7, 4, gen, torch.float64),
        "empty": tuple(torch.zeros_like(t) if k < 2 else t for k, t in enumerate(_state(1, 4, 6, gen))),
        "tiny": _state(2, 6, 5, gen, scale=2.0**-70),  # its norm read in the wide form
        "huge gradient": _state(1, 8, 3, gen)[:2] + (torch.full((1, 8, 3), 1e25),),  # out of the plain range: scaled
        "one block out of range": _huge_second_block(gen),
        "NaN": _nan_state(gen),
        "tracked": tuple(t.requires_grad_() if k == 2 else t for k, t in enumerate(_state(1, 5, 4, gen))),
    }
    return plain, special


def _huge_second_block(gen):
    L, R, G = _state(2, 6, 4, gen)
    G[1] *= 1e22
    return L, R, G


def _nan_state(gen):
    L, R, G = _state(1, 4, 7, gen)
    R[0, 1, 2] = R[0, 2, 1] = float("nan")
    return L, R, G


@pytest.mark.parametrize("deferred", [False, True])
def test_calls_made_together_equal_each_alone_bit_for_bit(monkeypatch, deferred):
    gen = torch.Generator().manual_seed(3)
    plain, special = _calls(gen)
    calls = [c for pair in itertools.zip_longest(plain, special.values()) for c in pair if c is not None]
    inputs = [tuple(t.detach().clone() for t in c) for c in calls]
    want, want_defer = [], []
    for L, R, G in calls:
        defer = [] if deferred else None  # nothing is written before the deferred writes run: the same stacks serve
        want.append(linalg.projector_split_ksl(L, R, G, 0.93, defer=defer))
        want_defer.append(defer)
    alone, _ = _alone_counted(monkeypatch)
    defers = [[] if deferred else None for _ in calls]
    got = linalg.projector_split_ksl_each(*(list(x) for x in zip(*calls)), 0.93, defers)
    # every special call alone (the tracked one: the caller's grad mode), every plain one together
    specials = {id(c[0]) for c in special.values()}
    assert set(alone) == specials and len(alone) == len(specials)
    for (L, R, G), (L_in, R_in, G_in), (gL, gR), (wL, wR), d, wd in zip(calls, inputs, got, want, defers, want_defer):
        for t, t_in in ((L, L_in), (R, R_in), (G, G_in)):
            _same(t.detach(), t_in)  # no input written
        if deferred and id(L) not in specials:
            assert gL is L and gR is R and len(d) == 2  # left to the state write, as alone
        if deferred and gL is L:
            with torch.no_grad():  # as the optimizer writes its state
                _same_deferred(d, wd)
        else:
            _same(gL.detach(), wL.detach())
            _same(gR.detach(), wR.detach())


def test_calls_made_together_follow_the_dense_reference_of_the_spec():
    """§3 on the explicit m² × n² matrices, in float64, against the calls made together in float32 and float64."""
    gen = torch.Generator().manual_seed(11)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        calls = [_state(b, m, n, gen, dtype) for b, m, n in [(2, 4, 6), (1, 7, 3), (1, 5, 5)]]
        got = linalg.projector_split_ksl_each([c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls], 0.9)
        for (L, R, G), (gL, gR) in zip(calls, got):
            for k in range(L.shape[0]):
                rL, rR = ksl_dense(L[k].double(), R[k].double(), G[k].double(), 0.9)
                assert torch.allclose(gL[k].double(), rL, rtol=0, atol=tol * rL.abs().max())
                assert torch.allclose(gR[k].double(), rR, rtol=0, atol=tol * rR.abs().max())
            assert torch.equal(gL, gL.mT) and torch.equal(gR, gR.mT)


def test_tiled_and_split_sides_are_made_alone(monkeypatch):
    """A side from ``_GRAM_TILED_MIN`` (tiled products) or ``_SPLIT_SANDWICH_MIN`` (a split sandwich) takes its own
    step: the calls together make dense products only."""
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 16)
    gen = torch.Generator().manual_seed(5)
    calls = [_state(1, 6, 9, gen), _state(1, 16, 5, gen), _state(1, 4, 20, gen), _state(2, 7, 3, gen)]
    alone, real = _alone_counted(monkeypatch)
    got = linalg.projector_split_ksl_each([c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls], 0.9)
    assert alone == [id(calls[1][0]), id(calls[2][0])]
    for (L, R, G), (gL, gR) in zip(calls, got):
        wL, wR = real(L, R, G, 0.9)
        _same(gL, wL)
        _same(gR, wR)


def test_update_each_equals_update_bit_for_bit(monkeypatch):
    """Buckets past their first call with every block started are made together; a bucket at its first call, one with
    a block not started (a zero first gradient) and a one-sided one are updated alone, as ``update`` makes them."""
    from kronopt.types import Layout

    stage = ProjectorSplittingFactors(beta=0.9)
    gen = torch.Generator().manual_seed(2)
    ctx_of = _contexts()
    states, grads, kinds = [], [], []
    for kind, (b, m, n, left, right) in {
        "plain": (2, 6, 9, "full", "full"), "plain tall": (1, 11, 4, "full", "full"),
        "first": (1, 5, 5, "full", "full"), "not started": (2, 4, 7, "full", "full"),
        "one-sided": (1, 6, 3, "full", "none"), "plain 2": (3, 3, 8, "full", "full"),
    }.items():
        layout = Layout(batch=b, m=m, n=n, left=left, right=right)
        state = stage.init(layout, dtype=torch.float32, device=torch.device("cpu"))
        if kind != "first":
            G0 = torch.randn(b, m, n, generator=gen)
            if kind == "not started":
                G0[1] = 0
            state = stage.update(state, G0, ctx_of(layout))
            if kind != "not started":  # its block 1 is still empty after a first call on a zero gradient
                state = stage.update(state, torch.randn(b, m, n, generator=gen), ctx_of(layout))
        states.append(state)
        grads.append(torch.randn(b, m, n, generator=gen))
        kinds.append(kind)
    layouts = [
        Layout(batch=g.shape[0], m=g.shape[1], n=g.shape[2], left="full", right="none" if k == "one-sided" else "full")
        for g, k in zip(grads, kinds)
    ]
    want = [stage.update(s, g, ctx_of(layout)) for s, g, layout in zip(states, grads, layouts)]
    together = []
    real = linalg.projector_split_ksl_each
    counted = lambda L, *a, **k: together.append(len(L)) or real(L, *a, **k)  # noqa: E731
    monkeypatch.setattr(linalg, "projector_split_ksl_each", counted)
    got = stage.update_each(states, grads, [ctx_of(layout) for layout in layouts])
    assert together == [3]  # the three plain buckets
    for s, w, g in zip(states, want, got):
        assert g.calls == w.calls == s.calls + 1
        for field in ("L", "R", "initialised"):
            a, b = getattr(g, field), getattr(w, field)
            assert (a is None) == (b is None)
            if a is not None:
                _same(a.float(), b.float())
    # the parallel variant is made by update alone
    parallel = ProjectorSplittingFactors(beta=0.9, variant="parallel")
    together.clear()
    parallel.update_each([states[0], states[5]], [grads[0], grads[5]], [ctx_of(layouts[0]), ctx_of(layouts[5])])
    assert together == []


def _contexts():
    """A step context for a layout (the projector-splitting update reads only ``defer`` and, on a restricted side,
    the basis)."""
    from kronopt.types import BasisState, StepContext

    def of(layout):
        failures = torch.zeros(layout.batch, dtype=torch.int64)
        basis = BasisState(Q_L=None, Q_R=None, lam_L=None, lam_R=None, failures=failures)
        return StepContext(step=1, layout=layout, basis=basis)

    return of


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_state_the_plain_norm_misreads_is_out_of_the_plain_range(dtype):
    """The calls together take ``‖R‖`` plainly and leave to the range test every state that
    ``block_norm_wide`` reads otherwise or that ``empty_state_norm`` calls empty: both thresholds lie under the
    plain range's lower end on every side the calls together take (below ``_GRAM_TILED_MIN``)."""
    lo, _ = linalg._plain_range(dtype)
    side = min(linalg._GRAM_TILED_MIN, linalg._SPLIT_SANDWICH_MIN) - 1
    assert linalg.norm_digits_floor(side * side, dtype) < lo
    assert linalg.empty_state_norm(dtype) < lo


def test_a_state_narrower_than_its_gradient_is_judged_in_its_own_range():
    """A review's find in the shared range test: a float32 state of norm 2^-70 with a float64 gradient as small makes
    norms that float64 holds and float32's plain step does not (‖K‖ about 2^-140): the state's range sends it down
    the scaled step, which follows the float64 step of the same values."""
    gen = torch.Generator().manual_seed(0)
    L, R, G = _state(1, 5, 4, gen, torch.float64)
    s = 2.0**-70
    L, R, G = (L * s).float(), R * s, G * s
    want = linalg.projector_split_ksl(L.double(), R, G, 0.9)
    got = linalg.projector_split_ksl(L, R, G, 0.9)
    for g, w in zip(got, want):
        assert ((g.double() - w).norm() / w.norm()).item() < 1e-5


def test_float16_calls_are_made_alone_once(monkeypatch):
    """float16's plain range is empty (every call of it takes the scaled step): such calls are not made together, where
    each would be made twice."""
    assert not linalg._plain_range(torch.float16)[0] < linalg._plain_range(torch.float16)[1]
    gen = torch.Generator().manual_seed(4)
    calls = [tuple(t.half() for t in _state(1, 6, 9, gen)) for _ in range(3)]
    k_steps, real = [], linalg._ksl_K
    monkeypatch.setattr(linalg, "_ksl_K", lambda *a, **k: k_steps.append(1) or real(*a, **k))
    got = linalg.projector_split_ksl_each([c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls], 0.9)
    alone = len(k_steps)
    want = [linalg.projector_split_ksl(*c, 0.9) for c in calls]
    assert alone == len(k_steps) - alone  # the K-steps of the calls alone, no more
    for (gL, gR), (wL, wR) in zip(got, want):
        _same(gL, wL)
        _same(gR, wR)


def test_a_defer_list_shared_by_calls_gets_their_writes_in_the_calls_order():
    """The same stacks stepped three times into one ``defer`` list, the first call out of the plain range (made alone,
    deferred): run in order, the writes leave what the calls in turn leave (the last call's factors)."""
    gen = torch.Generator().manual_seed(0)
    L, R, G = _state(1, 5, 4, gen)
    grads = [G * 1e12, G, G * 0.5]

    def final(step):
        Lw, Rw, defer = L.clone(), R.clone(), []
        step(Lw, Rw, defer)
        compose.run_deferred_(defer, torch.ones(1, dtype=torch.bool))
        return Lw, Rw

    def in_turn(Lw, Rw, defer):
        for g in grads:
            linalg.projector_split_ksl(Lw, Rw, g, 0.9, defer=defer)

    want = final(in_turn)
    got = final(lambda Lw, Rw, defer: linalg.projector_split_ksl_each([Lw] * 3, [Rw] * 3, grads, 0.9, [defer] * 3))
    for g, w in zip(got, want):
        _same(g, w)


def test_a_tracked_step_with_a_defer_list_returns_its_results_in_the_graph():
    """``projector_split_ksl`` under autograd (``G`` or the state tracked) with a ``defer`` list: the results come back
    as tensors in the graph, the list stays empty, and a gradient flows to ``G``, equal to the untracked step's
    values. Catches the deferral taken for a tracked step (the state write's ``out=`` refused tracked tensors)."""
    gen = torch.Generator().manual_seed(11)
    G0 = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64)
    L = linalg.gram_left(torch.randn(2, 6, 9, generator=gen, dtype=torch.float64))
    R = linalg.gram_right(torch.randn(2, 6, 9, generator=gen, dtype=torch.float64))
    want = linalg.projector_split_ksl(L.clone(), R.clone(), G0, 0.9)
    G = G0.clone().requires_grad_(True)
    defer = []
    got = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9, defer=defer)
    assert defer == []
    for a, b in zip(got, want):
        assert a.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)
    (got[0].sum() + got[1].square().sum()).backward()
    assert G.grad is not None and torch.isfinite(G.grad).all() and G.grad.abs().sum() > 0
