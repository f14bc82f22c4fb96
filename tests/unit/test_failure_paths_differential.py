"""Differential hunt of the failure paths: "bad input gets a clear error and loses nothing: NaN/Inf gradients never
reach the parameters; a failed eigendecomposition falls back without crashing training" (DESIGN.md invariant 5,
docs/architecture.md "Numerics policy", the ``kronopt.linalg`` and ``kronopt.bases`` docstrings).

Beyond ``test_bad_input_differential.py`` (a solver that fails for the whole batch, or returns NaN for one block):

* a solver that fails on **one block** of a bucket of three, by raising as torch's batched ``eigh``/``svd`` do (the
  whole call raises, ``(Batch element i): ... failed to converge``): the other blocks must go on as in the run where
  nothing failed, bit for bit, and only the failing block keeps its basis and is counted (the batching invariant);
* a refresh that failed, kept through ``state_dict()``/``load_state_dict()`` (``basis.ready`` and the counts);
* a checkpoint whose state tensors were corrupted (NaN or Inf) and loaded: nothing non-finite reaches a parameter and
  the other blocks step as from the clean checkpoint;
* degenerate but finite gradients over many steps (zero for 50 steps, rank one, subnormal, alternating sign, one
  block zero forever, a 1e30 spike among 1e-3 entries), against ``torch.optim.AdamW(fused=True)`` for adamw;
* ``nonfinite = "raise"`` under both scopes (a run that raised goes on as the run that never saw the step) and
  ``"warn"`` (the same values as ``"skip"``, one warning at the next ``step()`` naming the parameter and the scope).

Small shapes (8 × 6, 6 × 4), a refresh every 2 or 3 calls, float32, one thread.
"""

import copy
import warnings

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.splits import LowRankFlatSplit

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
PRESETS = list(kronopt.PRESETS)
#: the presets that keep a basis (the others have none to fail)
ROTATED = [p for p in PRESETS if p not in ("adamw", "muon")]
NAMES = ["a", "b", "c"]


def _every(preset, every=2):
    return {"refresh.every": every} if kronopt.PRESETS[preset].refresh.every > 1 else {}


def _params(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _stream(shapes, calls, seed=2, scale_first=1.0):
    """Gradients per call; block 0's scaled by ``scale_first`` (the block the picky solvers below fail on)."""
    gen = torch.Generator().manual_seed(seed)
    out = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(calls)]
    for grads in out:
        grads[0].mul_(scale_first)
    return out


def _build(names, params, preset, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the route's warning on unnamed parameters, and the like
        return kronopt.build(list(zip(names, params)), preset, **overrides)


def _floating_state(opt, p):
    return {k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _counters(opt, p):
    return {k: v for k, v in opt.state[p].items() if not isinstance(v, torch.Tensor)}


# -- a solver that fails on one block of a bucket ---------------------------------------------------------------

#: block 0's gradients are 1e3 times the others': its factors' traces are about 1e6 times theirs (measured: ≥ 1e5
#: against ≤ 10 on these shapes), so a trace above ``_PICKY`` tells block 0 apart, in float32 and float64 alike
_PICKY = 1e3


def _picky(real, key):
    """``real`` (``linalg._eigh`` or ``linalg._svd``), failing as torch's batched solvers do, for the whole call, when
    any block of the batch is block 0 (``key(A) > _PICKY`` per block), in every dtype."""

    def solver(A):
        bad = (key(A) > _PICKY).nonzero().flatten().tolist()
        if bad:
            raise torch.linalg.LinAlgError(f"(Batch element {bad[0]}): The algorithm failed to converge (simulated)")
        return real(A)

    return solver


def _trace(A):
    return torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)


def _largest(A):
    return A.abs().amax(dim=(-2, -1))


def _run_with(preset, solver_name, solver, at, calls, shapes=((8, 6),) * 3, record=None):
    """``calls`` calls of ``preset`` on three blocks of one bucket, block 0's gradients 1e3 times larger, with
    ``linalg.<solver_name>`` replaced by ``solver`` during call ``at`` only. Returns the parameters after each call,
    the optimizer, and (``record``) block 0's basis tensors right before and after call ``at``."""
    params = _params(shapes)
    opt = _build(NAMES, params, preset, nonfinite="skip", **_every(preset))
    real = getattr(linalg, solver_name)
    history, around = [], None
    for t, grads in enumerate(_stream(shapes, calls, scale_first=1e3)):
        for p, g in zip(params, grads):
            p.grad = g
        if t == at:
            before = {k: v for k, v in _floating_state(opt, params[0]).items() if k.startswith("basis.")}
            setattr(linalg, solver_name, solver)
        try:
            opt.step()
        finally:
            setattr(linalg, solver_name, real)
        if t == at:
            around = (before, {k: v for k, v in _floating_state(opt, params[0]).items() if k.startswith("basis.")})
        history.append([p.detach().clone() for p in params])
    return history, opt, around


#: (preset, the call whose eigh fails on block 0, block 0's expected eigh_failures): shampoo's eigh basis at a later
#: refresh (both sides), a qr basis's first refresh (an eigh of both sides, at the first call), a restricted side's
#: Rayleigh–Ritz eigh (r × r) at a later refresh
EIGH_CASES = [("shampoo", 3, 2), ("soap", 0, 2), ("kl_shampoo", 0, 2), ("pro_kl_shampoo", 4, 1)]


@pytest.mark.parametrize(("preset", "at", "failures"), EIGH_CASES)
def test_an_eigh_that_fails_on_one_block_leaves_the_other_blocks_of_its_bucket_as_without_it(preset, at, failures):
    """``linalg._eigh`` raises ``LinAlgError`` (in float32 and float64) whenever block 0 is in its batch, during one
    call. Expected (DESIGN.md 4 and 5: "a bucket of b blocks gives the same result as b separate runs"; "keep the last
    good basis, count the failure"; docs/architecture.md: "keep their last good value for the affected blocks"):
    training goes on; blocks 1 and 2 follow the run whose solver never failed bit for bit at every call (a batch of
    them alone would not have failed); block 0 keeps its basis through that call (its identity at the first call) and
    alone is counted; every parameter stays finite.

    Today the whole bucket falls back: blocks 1 and 2 lose the refresh (they keep their old or identity basis, and
    diverge from the reference from the next call on) and are counted as failures too."""
    reference, _, _ = _run_with(preset, "_eigh", linalg._eigh, at, 6)
    history, opt, (before, after) = _run_with(preset, "_eigh", _picky(linalg._eigh, _trace), at, 6)
    assert all(torch.isfinite(p).all() for p in history[-1])
    for key in ("basis.Q_L", "basis.lam_L"):  # the side whose eigh failed (the restricted side under pro_*)
        assert torch.equal(before[key], after[key]), f"block 0's {key} changed at the failed refresh"
    for t, (ref, got) in enumerate(zip(reference, history)):
        for i in (1, 2):
            assert torch.equal(ref[i], got[i]), f"block {i} differs from the run without the failure at call {t}"
    assert opt.eigh_failures() == {"a": failures, "b": 0, "c": 0}
    assert all(v == 0 for v in opt.nonfinite_counts().values())


@pytest.mark.parametrize("preset", ["dykaf", "pro_soap"])
def test_an_svd_that_fails_on_one_block_at_the_first_call_leaves_the_others_as_without_it(preset):
    """``linalg._svd`` raises whenever block 0 (gradient entries above 1e3 in magnitude) is in its batch, at the first
    call (DyKAF's start from the dominant triplet; a restricted side's first subspace). Expected, as for ``eigh``:
    blocks 1 and 2 start from their own SVD and follow the run whose solver never failed bit for bit; block 0 takes
    the documented fallback with a warning naming it, and its parameter stays finite."""
    reference, _, _ = _run_with(preset, "_svd", linalg._svd, 0, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, _, _ = _run_with(preset, "_svd", _picky(linalg._svd, _largest), 0, 4)
    assert any("SVD" in str(w.message) for w in caught), "the fallback must be reported"
    assert all(torch.isfinite(p).all() for p in history[-1])
    for t, (ref, got) in enumerate(zip(reference, history)):
        for i in (1, 2):
            assert torch.equal(ref[i], got[i]), f"block {i} differs from the run without the failure at call {t}"


# -- a failed refresh, saved and resumed --------------------------------------------------------------------


def _broken(A):
    raise torch.linalg.LinAlgError("The algorithm failed to converge (simulated)")


def _nan_q_on_block_0(P, **kw):
    Q = _REAL_Q_FACTOR(P, **kw).clone()
    Q[0] = NAN
    return Q


_REAL_Q_FACTOR = linalg.q_factor


def _failing(preset, when):
    """The call and the failure of :func:`test_a_refresh_that_failed_is_kept_through_a_state_dict_and_the_run_resumes_bit_for_bit`:
    the first refresh (call 1 for shampoo, 0 for the others: an ``eigh`` raising for every block), or a later one
    (call 3 for shampoo, 4 for the others: shampoo's ``eigh`` and a restricted side's Rayleigh–Ritz ``eigh`` raising,
    or the QR of a qr basis's power step returning NaN for block 0)."""
    shampoo = preset == "shampoo"
    if when == "first":
        return (1 if shampoo else 0), "_eigh", _broken
    at = 3 if shampoo else 4
    if shampoo or isinstance(kronopt.PRESETS[preset].split, LowRankFlatSplit):
        return at, "_eigh", _broken
    return at, "q_factor", _nan_q_on_block_0


@pytest.mark.parametrize("when", ["first", "later"])
@pytest.mark.parametrize("preset", ROTATED)
def test_a_refresh_that_failed_is_kept_through_a_state_dict_and_the_run_resumes_bit_for_bit(preset, when):
    """A refresh fails during call ``at`` (:func:`_failing`; after a failed first refresh of a qr basis without a
    restricted side ``basis.ready`` stays False). The state dict saved right after loads into a fresh optimizer whose run goes on bit for bit as the
    uninterrupted one: parameters, every state tensor, the counters, ``basis.ready`` (a lost False would turn the next
    refresh into a power step from the identity) and ``eigh_failures()`` (not zero)."""
    at, solver_name, solver = _failing(preset, when)
    shapes = [(8, 6), (8, 6), (6, 4)]
    grads = _stream(shapes, 6)
    overrides = {"nonfinite": "skip", **_every(preset)}
    params = _params(shapes)
    opt = _build(NAMES, params, preset, **overrides)
    resumed = None
    for t, step in enumerate(grads):
        for p, g in zip(params, step):
            p.grad = g.clone()
        with pytest.MonkeyPatch.context() as patch:
            if t == at:
                patch.setattr(linalg, solver_name, solver)
            opt.step()
            if resumed is not None:
                for p, g in zip(resumed[0], step):
                    p.grad = g.clone()
                resumed[1].step()
        if t == at:
            saved = copy.deepcopy(opt.state_dict())
            twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
            twin_opt = _build(NAMES, twins, preset, **overrides)
            twin_opt.load_state_dict(saved)
            resumed = (twins, twin_opt)
            assert twin_opt.eigh_failures() == opt.eigh_failures()
    twins, twin_opt = resumed
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert _counters(opt, p) == _counters(twin_opt, q)
        mine, theirs = _floating_state(opt, p), _floating_state(twin_opt, q)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert twin_opt.eigh_failures() == opt.eigh_failures() and sum(opt.eigh_failures().values()) > 0


# -- a corrupted checkpoint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_a_checkpoint_with_a_corrupted_state_tensor_never_writes_nan_into_a_parameter(preset):
    """Each floating state tensor of block ``a`` in turn, filled with NaN (or one entry set to +Inf) in a saved state
    dict, loaded into a fresh optimizer (``nonfinite = "warn"``) that steps 4 more calls. Expected (the numerics
    policy: "no NaN or Inf ever reaches a parameter"): every parameter stays finite at every call; the other blocks
    (``b`` in the same bucket, ``c`` elsewhere) step bit for bit as from the clean checkpoint; block ``a`` either
    steps (the corrupted tensor was one a refresh replaces or nothing reads) or keeps its parameter, in which case each
    skipped call is counted in ``nonfinite_counts()`` and warned of, naming it."""
    shapes = [(8, 6), (8, 6), (6,)]
    grads = _stream(shapes, 7)
    overrides = {"nonfinite": "warn", **_every(preset)}
    params = _params(shapes)
    opt = _build(NAMES, params, preset, **overrides)
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()

    def resume(state_dict):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin_opt = _build(NAMES, twins, preset, **overrides)
        twin_opt.load_state_dict(state_dict)
        history = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in grads[3:]:
                for p, g in zip(twins, step):
                    p.grad = g.clone()
                twin_opt.step()
                history.append([p.detach().clone() for p in twins])
            twin_opt.flush_warnings()
        reports = [w for w in caught if "non-finite" in str(w.message)]
        return history, twin_opt, reports

    clean, _, _ = resume(copy.deepcopy(saved))
    keys = [k for k, v in saved["state"][0].items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    assert keys
    for key in keys:
        for how in ("nan", "inf"):
            corrupted = copy.deepcopy(saved)
            t = corrupted["state"][0][key]
            if how == "nan":
                t.fill_(NAN)
            else:
                t[(0,) * t.ndim] = INF
            history, twin_opt, reports = resume(corrupted)
            where = f"{preset}: {key} {how}"
            for t_, (ref, got) in enumerate(zip(clean, history)):
                assert all(torch.isfinite(p).all() for p in got), f"{where}: a non-finite parameter at call {t_}"
                assert torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2]), f"{where}: b or c disturbed"
            kept = [torch.equal(h[0], params[0]) for h in history]
            count = twin_opt.nonfinite_counts()["a"]
            assert count == sum(kept), f"{where}: {sum(kept)} calls kept the parameter, {count} counted"
            assert len(reports) == count and all(str(w.message).split(" in: ")[1].split(";")[0] == "a" for w in reports), where


# -- degenerate but finite gradients --------------------------------------------------------------------------


def _degenerate(kind, shapes, calls):
    gen = torch.Generator().manual_seed(3)
    out = []
    fixed = [torch.randn(s, generator=gen) for s in shapes]
    for t in range(calls):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if kind == "zero_then_normal" and t < 50:
            grads = [torch.zeros(s) for s in shapes]
        elif kind == "rank_one":
            grads = [torch.randn(s[0], 1, generator=gen) @ torch.randn(1, s[1], generator=gen) for s in shapes]
        elif kind == "subnormal":
            grads = [g * 1e-40 for g in grads]  # float32 subnormals (the smallest normal is 1.2e-38)
        elif kind == "alternating_sign":
            grads = [f * (-1) ** t for f in fixed]
        elif kind == "one_block_zero_forever":
            grads[1] = torch.zeros(shapes[1])
        out.append(grads)
    return out


DEGENERATE = {"zero_then_normal": 55, "rank_one": 12, "subnormal": 12, "alternating_sign": 12, "one_block_zero_forever": 12}


@pytest.mark.parametrize("kind", list(DEGENERATE))
@pytest.mark.parametrize("preset", PRESETS)
def test_degenerate_finite_gradients_keep_every_parameter_and_state_finite_and_skip_nothing(preset, kind):
    """All-zero gradients for 50 calls then normal ones; rank-one gradients; subnormal ones (1e-40 in float32);
    gradients that change sign at every call; one block whose gradient is exactly zero forever beside two that are not.
    Over refreshes (every 3 calls) of rank-deficient, zero or tiny factors, with ``nonfinite = "warn"``: no warning, no
    block skipped (``nonfinite_counts()``), no eigh failure counted, every parameter and every floating state tensor
    finite; adamw equals ``torch.optim.AdamW(fused=True)`` bit for bit (docs/architecture.md: the fused kernel agrees
    with it bit for bit), whatever the pattern."""
    shapes = [(6, 4), (6, 4), (8, 8)]
    grads = _degenerate(kind, shapes, DEGENERATE[kind])
    params = _params(shapes)
    opt = _build(NAMES, params, preset, nonfinite="warn", **_every(preset, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        opt.flush_warnings()
    assert all(torch.isfinite(p).all() for p in params)
    for p in params:
        assert all(torch.isfinite(v).all() for v in _floating_state(opt, p).values())
    assert not any(opt.nonfinite_counts().values()) and not any(opt.eigh_failures().values())
    if preset == "adamw":
        refs = _params(shapes)
        ref = torch.optim.AdamW(refs, fused=True)  # the preset's defaults are torch's
        for step in grads:
            for p, g in zip(refs, step):
                p.grad = g.clone()
            ref.step()
        for p, q in zip(params, refs):
            assert torch.equal(p, q)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_1e30_entry_among_1e_minus_3_entries_every_call_never_puts_inf_in_the_state(preset):
    """Float32 gradients of 1e-3 with one entry 1e30 (finite; its square overflows), at every call for 8 calls, on
    every block. Documented (docs/architecture.md: a block whose direction or new state would be non-finite from a
    finite gradient is skipped and counted): each block either steps or, where it is skipped, keeps its parameter and
    is counted, once per skipped call; every parameter and every floating state tensor stays finite (where
    ``torch.optim.AdamW`` would store ``inf`` in ``exp_avg_sq``)."""
    shapes = [(6, 4), (6, 4), (8, 8)]
    params = _params(shapes)
    opt = _build(NAMES, params, preset, nonfinite="skip", **_every(preset))
    observes = kronopt.PRESETS[preset].skip_first_call  # its first call updates no parameter, skipped or not
    counts = [0, 0, 0]
    for t in range(8):
        before = [p.detach().clone() for p in params]
        for p in params:
            g = torch.full(p.shape, 1e-3)
            g[1, 2] = 1e30
            p.grad = g
        opt.step()
        now = [opt.nonfinite_counts()[n] for n in NAMES]
        for i, (b, p) in enumerate(zip(before, params)):
            assert torch.isfinite(p).all()
            if t > 0 or not observes:
                assert now[i] - counts[i] == int(torch.equal(b, p)), f"block {i} at call {t}: kept ⇔ counted"
        counts = now
    for p in params:
        assert all(torch.isfinite(v).all() for v in _floating_state(opt, p).values())


# -- nonfinite = "raise" and "warn" ------------------------------------------------------------------------------


def _matrix_run(preset, mode, scope, *, bad_call=3, omit=False, calls=6):
    """Four parameters (two of one bucket, another shape, a vector), a NaN in ``b``'s gradient at ``bad_call`` (or,
    with ``omit``, that call left out). Returns the parameters after each call, the optimizer, what call ``bad_call``
    raised (or None), the warnings caught per call, and the state (tensors and counters) right before and after it."""
    shapes = [(6, 4), (6, 4), (8, 8), (4,)]
    names = ["a", "b", "c", "d"]
    params = _params(shapes)
    opt = _build(names, params, preset, nonfinite=mode, nonfinite_scope=scope, **_every(preset))
    history, raised, caught, around = [], None, [], None
    for t, step in enumerate(_stream(shapes, calls)):
        if t == bad_call and omit:
            continue
        step = [g.clone() for g in step]
        if t == bad_call:
            step[1][2, 1] = NAN
            before = [(p.detach().clone(), _floating_state(opt, p), _counters(opt, p)) for p in params]
        for p, g in zip(params, step):
            p.grad = g
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                opt.step()
            except FloatingPointError as exc:
                assert t == bad_call
                raised = str(exc)
        caught.append([str(x.message) for x in w if issubclass(x.category, RuntimeWarning)])
        if t == bad_call:
            around = (before, [(p.detach().clone(), _floating_state(opt, p), _counters(opt, p)) for p in params])
        history.append([p.detach().clone() for p in params])
    return history, opt, raised, caught, around


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", PRESETS)
def test_nonfinite_raise_changes_nothing_under_either_scope_and_the_run_goes_on_as_without_that_call(preset, scope):
    """``nonfinite = "raise"`` (KronConfig: "raise FloatingPointError before anything changes"), under ``"step"`` and
    ``"block"`` scope alike: the call raises naming ``b`` alone; every parameter, state tensor and counter of every
    block is as before it; nothing is counted; and as the error was raised before anything changed, the run goes on
    bit for bit as the run that never had that call."""
    history, opt, raised, _, (before, after) = _matrix_run(preset, "raise", scope)
    assert raised is not None and raised.startswith("non-finite gradient (NaN or Inf) in: b; no parameter"), raised
    for i, ((p0, s0, c0), (p1, s1, c1)) in enumerate(zip(before, after)):
        assert torch.equal(p0, p1) and _same(s0, s1) and c0 == c1, f"block {i} changed"
    omitted, ref_opt, _, _, _ = _matrix_run(preset, "raise", scope, omit=True)
    for a, b in zip(history[-1], omitted[-1]):
        assert torch.equal(a, b)
    assert not any(opt.nonfinite_counts().values()) and opt.skipped_steps() == 0


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", PRESETS)
def test_nonfinite_warn_steps_as_skip_and_warns_once_at_the_next_step_naming_the_parameter(preset, scope):
    """``nonfinite = "warn"`` is ``"skip"`` with a report (KronConfig: "skip it, warn on the next step"): the same
    parameters at every call, the same counts; one RuntimeWarning, raised by the ``step()`` after the bad call (none
    by the bad call itself, none later), naming ``b`` alone and saying what was skipped (the whole step, or these
    parameters, by scope). Under ``"step"`` scope the bad call leaves every parameter and state tensor as it was."""
    warned, opt_w, _, caught, (before, after) = _matrix_run(preset, "warn", scope)
    skipped, opt_s, _, caught_skip, _ = _matrix_run(preset, "skip", scope)
    for t, (a, b) in enumerate(zip(warned, skipped)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"warn and skip differ at call {t}"
    assert opt_w.nonfinite_counts() == opt_s.nonfinite_counts() == {"a": 0, "b": 1, "c": 0, "d": 0}
    assert not any(caught_skip)
    assert [len(c) for c in caught] == [0, 0, 0, 0, 1, 0], caught
    message = caught[4][0]
    assert " in: b; " in message, message
    assert ("whole step was skipped" in message) == (scope == "step"), message
    assert ("nonfinite_scope = 'block'" in message) == (scope == "block"), message
    if scope == "step":
        for i, ((p0, s0, _), (p1, s1, _)) in enumerate(zip(before, after)):
            assert torch.equal(p0, p1) and _same(s0, s1), f"block {i} changed on a skipped step"
