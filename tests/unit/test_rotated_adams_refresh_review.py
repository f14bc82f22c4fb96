"""A review of the small buckets' refresh calls made together (``compose.rotated_adams`` with a refresh due, the
untested power step of ``QrBasis._side`` under ``StepContext.finite_fallback = False``, and the optimizer's redo of a
bucket whose together call left a non-finite new basis, ``KronOptimizer._step_small_buckets``).

The existing tests (tests/unit/test_rotated_adams.py) make a QR fail at a refresh with nothing else wrong, and poison
gradients on a plain update (but for the staggered run, where the NaN falls on its block's refresh, whose QR does not
fail). Here: the failing refresh meets a NaN gradient in the same stacked bucket, an
overflowing gradient on the refresh update itself (the redo's own new state is still not finite: its blocks must
still be tested), a factor that overflows into the refresh, a state saved and loaded just before the refresh, under
``nonfinite`` = ``warn`` / ``skip`` / ``raise`` and both scopes; how often the redo runs; the contract of
``rotated_adams`` itself (the refresh it makes is left untested, the pipeline's is not); and ``permute_along`` /
``permute_columns`` with a permutation in a transposed memory layout (the review's one defect, mended).
"""

import copy
import math
import warnings

import pytest
import torch

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as optimizer_module
from kronopt.types import Layout, StepContext

# a stacked 6 × 5 pair (its 6 × 6 left side the only one of that size), one-block buckets, a 7 × 7 block, a bias
SHAPES = [(6, 5), (6, 5), (7, 3), (3, 9), (9,), (5, 4), (4, 7), (7, 7), (2, 2)]
REFRESHES = (10, 20)  # soap skips its first call: the loop's step k is update k, a refresh every 10


def _failing_qr(monkeypatch, at, when):
    """``linalg.q_factor`` whose result has a NaN column on block 1 of the stacked pair's 6 × 6 side at the steps
    ``when(step)`` says (``at["step"]``, set by the loop); counts the failures it made."""
    real = linalg.q_factor

    def failing(P, **kwargs):
        Q = real(P, **kwargs)
        if when(at["step"]) and tuple(P.shape) == (2, 6, 6):
            Q[1, :, 2] = math.nan
            at["made"] += 1
        return Q

    monkeypatch.setattr(linalg, "q_factor", failing)


def _train(monkeypatch, *, together, grads, nonfinite="warn", scope="block", qr_fails=lambda step: False,
           overrides=None, reload_at=None, steps=22):
    """A run of two param groups on ``grads(step, gen)``; returns what must agree bit for bit with the path on and
    off, and what the run took: the ``KronOptimizer._run`` calls of each step and the QR failures made."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    groups = [{"params": named[:5]}, {"params": named[5:], "lr": 0.003, "weight_decay": 0.1}]
    at = {"step": -1, "made": 0}
    runs: dict[int, int] = {}
    errors = []
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(optimizer_module, "_ROTATED_ADAMS_TOGETHER", together)
        _failing_qr(patch, at, qr_fails)
        real_run = optimizer_module.KronOptimizer._run

        def counted_run(self, bucket, cfg):
            runs[at["step"]] = runs.get(at["step"], 0) + 1
            return real_run(self, bucket, cfg)

        patch.setattr(optimizer_module.KronOptimizer, "_run", counted_run)
        kw = {"nonfinite": nonfinite, "nonfinite_scope": scope, **(overrides or {})}
        opt = kronopt.build(groups, "soap", **kw)
        for step in range(steps):
            at["step"] = step
            for p, g in zip(params, grads(step, gen)):
                p.grad = g
            if step == reload_at:  # the state saved and loaded into a new optimizer just before this step
                saved = copy.deepcopy(opt.state_dict())
                opt = kronopt.build(groups, "soap", **kw)
                opt.load_state_dict(saved)
            try:
                opt.step()
            except FloatingPointError as e:
                errors.append((step, str(e)))
        opt.flush_warnings()
    copied = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {
        "params": [p.detach().clone() for p in params],
        "state": {i: {k: copied(v) for k, v in opt.state[p].items()} for i, p in enumerate(params)},
        "counts": opt.nonfinite_counts(),
        "eigh": opt.eigh_failures(),
        "warnings": [str(w.message) for w in caught],
        "errors": errors,
        "runs": runs,
        "qr_made": at["made"],
    }


def _same_bits(a, b):
    """Equal bit for bit, NaNs (where they are) and the signs of zeros included."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0))
    assert torch.equal(a.signbit(), b.signbit())


def _same_runs(fast, slow):
    for a, b in zip(fast["params"], slow["params"]):
        _same_bits(a, b)
    for i in fast["state"]:
        assert fast["state"][i].keys() == slow["state"][i].keys()
        for key, value in fast["state"][i].items():
            other = slow["state"][i][key]
            if isinstance(value, torch.Tensor):
                _same_bits(value, other)
            else:
                assert value == other, (i, key)
    for key in ("counts", "eigh", "warnings", "errors"):
        assert fast[key] == slow[key], key


def _poisoned(step, gen):
    """At the first refresh a gradient whose square overflows the moments (p5); at the second a NaN in the stacked
    pair's block 0 (p0: its partner's QR fails in the same bucket) and a gradient whose square overflows the 7 × 7
    block's factors, so that its refresh reads an infinite factor (p7)."""
    g = [torch.randn(s, generator=gen) for s in SHAPES]
    if step == REFRESHES[0]:
        g[5][0, 0] = 1e30
    if step == REFRESHES[1]:
        g[0][1, 1] = math.nan
        g[7][2, 2] = 1e20
    return g


@pytest.mark.parametrize(
    ("nonfinite", "scope", "reload_at"),
    [("warn", "block", None), ("skip", "step", None), ("raise", "block", None), ("warn", "block", REFRESHES[0])],
)
def test_a_failing_refresh_beside_overflows_and_nans_steps_alike(monkeypatch, nonfinite, scope, reload_at):
    """The QR of block 1 of the stacked pair fails at both refreshes; the first refresh meets an overflowing gradient
    in another bucket, the second a NaN in that very bucket and a factor overflowing into a third bucket's refresh.
    Parameters, state, skip counts, basis failures, warnings and errors as with the path off, in each ``nonfinite``
    mode (and a state saved and loaded just before a refresh). Catches a redo whose blocks are not tested again
    (an overflow at a refresh step written into the state) and a redo that reads the first attempt's tensors."""
    kw = {"grads": _poisoned, "nonfinite": nonfinite, "scope": scope, "reload_at": reload_at,
          "qr_fails": lambda step: step in REFRESHES}
    fast = _train(monkeypatch, together=True, **kw)
    slow = _train(monkeypatch, together=False, **kw)
    _same_runs(fast, slow)
    assert fast["qr_made"] > slow["qr_made"] > 0  # the failing refreshes were made again by the pipeline
    for a in fast["params"]:
        assert torch.isfinite(a).all()
    if nonfinite == "raise":  # the NaN raises before the step; the overflow once the step is made
        assert [step for step, _ in fast["errors"]] == [REFRESHES[0], REFRESHES[1]]
        assert "p5" in fast["errors"][0][1] and "p0" in fast["errors"][1][1]
        assert fast["eigh"]["p1"] == 1  # the second refresh was never made
        return
    if scope == "step":  # the NaN skips the whole second step: its refresh is not kept
        assert fast["counts"]["p1"] == 0 and fast["eigh"]["p1"] == 1
        return
    assert fast["counts"]["p5"] == 1 and fast["counts"]["p0"] == 1 and fast["counts"]["p7"] == 1
    assert fast["counts"]["p1"] == 0 and fast["eigh"]["p1"] == 2 and fast["eigh"]["p0"] == 0  # the kept basis counted
    assert fast["warnings"] if nonfinite == "warn" else not fast["warnings"]


def _plain(step, gen):
    g = [torch.randn(s, generator=gen) for s in SHAPES]
    if step == 13:  # not a refresh: an overflow that no redo can mend
        g[5][0, 0] = 1e30
    return g


def test_the_pipeline_makes_a_call_again_only_for_a_failed_refresh(monkeypatch):
    """The redo is a second pipeline call: it must run for a bucket whose refresh made together left a non-finite
    basis, and for nothing else (not for every refresh, not for an overflow on a plain update). Catches a redo
    condition that drops the test of the new state (every refresh made twice) or the test of a replaced basis."""
    kw = {"grads": _plain, "nonfinite": "warn", "qr_fails": lambda step: step == REFRESHES[1]}
    fast = _train(monkeypatch, together=True, **kw)
    slow = _train(monkeypatch, together=False, **kw)
    _same_runs(fast, slow)
    buckets = slow["runs"][0]
    assert buckets == 8 and all(n == buckets for n in slow["runs"].values())
    # the first call of each bucket is the pipeline's; then one redo, of the one bucket whose QR failed
    assert fast["runs"] == {0: buckets, REFRESHES[1]: 1}
    assert fast["counts"]["p5"] == 1 and fast["eigh"]["p1"] == 1


def _zero_for_p3(step, gen):
    g = [torch.randn(s, generator=gen) for s in SHAPES]
    g[3].zero_()  # with ε = 0 its direction is 0/0 at every update, its basis (of a zero factor) finite
    return g


def test_a_non_finite_direction_beside_a_finite_new_basis_is_not_made_again(monkeypatch):
    """A refresh at every update (``refresh.every = 1``) of a bucket whose direction is NaN on every step (ε = 0 on a
    zero gradient): its new state is not finite, but its new basis is, so the pipeline would make the same call
    again for nothing. Catches a redo condition that reads any non-finite tensor of the run, not the basis's."""
    kw = {"grads": _zero_for_p3, "nonfinite": "warn", "overrides": {"inner.eps": 0.0, "refresh.every": 1}}
    fast = _train(monkeypatch, together=True, **kw)
    slow = _train(monkeypatch, together=False, **kw)
    _same_runs(fast, slow)
    assert fast["counts"]["p3"] >= 20  # skipped at every update
    assert fast["runs"] == {0: slow["runs"][0]}  # the first calls alone: no redo


def _state_after(cfg, layout, calls, gen):
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    shape = (layout.batch, layout.m, layout.n)
    for _ in range(calls):
        _, state = compose.step(cfg, layout, state, torch.randn(shape, generator=gen))
    return state, torch.randn(shape, generator=gen)


def test_a_refresh_made_together_is_left_untested_and_the_pipelines_is_tested(monkeypatch):
    """``rotated_adams``'s contract (its caller tests the new state): a QR that fails on block 1 leaves that block's
    new basis NaN there, where ``compose.step`` keeps its old basis and counts the failure; block 0 alike in both.
    The basis stage called directly with a context built as a plugin or a test builds one (``StepContext``'s defaults)
    tests too. Catches a together call that tests its refresh after all (``finite_fallback`` left on: the saving
    lost), a pipeline whose refresh no longer tests (``_side`` reading ``tested`` the wrong way round, ``context``'s
    default), and ``StepContext.finite_fallback`` defaulting to off."""
    cfg = kronopt.resolve("soap").bound()
    layout = Layout(batch=2, m=7, n=6, left="full", right="full")
    state, G = _state_after(cfg, layout, 10, torch.Generator().manual_seed(5))  # the next call is update 10
    assert cfg.refresh.due(state.step + 1, first_call=False) and compose.rotated_adam_due(cfg, layout, state, torch.float32)
    real = linalg.q_factor

    def failing(P, **kwargs):
        Q = real(P, **kwargs)
        if P.shape[-1] == 7:
            Q[1, :, 4] = math.nan
        return Q

    monkeypatch.setattr(linalg, "q_factor", failing)
    D_ref, ref = compose.step(cfg, layout, state, G.clone())
    ((D, new),) = compose.rotated_adams([(cfg, layout, state, G, [])])
    alone, _ = cfg.basis.refresh(state.basis, cfg.factors.factors(ref.factors), StepContext(step=10, layout=layout, basis=state.basis))
    monkeypatch.undo()
    assert torch.equal(alone.Q_L[1], state.basis.Q_L[1]) and torch.equal(alone.failures, ref.basis.failures)
    _same_bits(D, D_ref)  # the direction is the old basis's
    assert torch.equal(ref.basis.Q_L[1], state.basis.Q_L[1]) and torch.equal(ref.basis.lam_L[1], state.basis.lam_L[1])
    assert ref.basis.failures.tolist() == [state.basis.failures[0].item(), state.basis.failures[1].item() + 1]
    assert torch.isfinite(ref.basis.Q_L).all() and torch.isfinite(ref.inner.exp_avg).all()
    assert torch.isnan(new.basis.Q_L[1]).any() and torch.equal(new.basis.failures, state.basis.failures)
    for a, b in [
        (new.basis.Q_L[0], ref.basis.Q_L[0]), (new.basis.Q_R, ref.basis.Q_R), (new.basis.lam_L[0], ref.basis.lam_L[0]),
        (new.inner.exp_avg[0], ref.inner.exp_avg[0]), (new.inner.exp_avg_sq[0], ref.inner.exp_avg_sq[0]),
        (new.factors.L, ref.factors.L), (new.factors.R, ref.factors.R),
    ]:
        _same_bits(a, b)
    assert any(not torch.isfinite(t).all() for t in compose.changed_tensors(new, state, D))  # the optimizer's test sees it


def test_a_permutation_in_a_transposed_layout_is_taken():
    """A ``(b, k)`` permutation stored transposed (an argsort of a transposed tensor; ``BasisChange`` asks no layout)
    moves the rows and columns it says: ``linalg._rows_in_order`` once viewed ``perm + arange`` flat and raised."""
    gen = torch.Generator().manual_seed(6)
    b, k, n = 3, 4, 5
    perm = torch.argsort(torch.randn(k, b, generator=gen).mT, dim=-1)  # (b, k), strides (1, b)
    assert perm.stride() == (1, b)
    X = torch.randn(b, k, n, generator=gen)
    want = torch.gather(X, 1, perm.contiguous().unsqueeze(-1).expand_as(X))
    Q = torch.randn(b, n, k, generator=gen).mT.contiguous().mT  # column-major, as a refresh's bases
    want_cols = torch.gather(Q, -1, perm.contiguous().unsqueeze(-2).expand_as(Q))
    assert torch.equal(linalg.permute_columns(Q, perm), want_cols)
    assert torch.equal(linalg.permute_along(X, perm, 1), want)
