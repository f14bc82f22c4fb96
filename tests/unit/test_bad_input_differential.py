"""Differential bug hunt of the three bad-input promises (DESIGN.md, docs/architecture.md "Numerics policy").

* NaN/Inf gradients never reach the parameters, and a skipped block or step changes nothing:
  each run with a bad gradient is compared with a run that got a finite gradient instead (the
  other blocks must step bit for bit as there), and with the documented skip (the bad block's
  parameter and tensor state unchanged, its ``nonfinite_counts()`` entry counted).
* A failed eigendecomposition (or QR, or SVD) falls back without crashing training, counted in
  ``eigh_failures()``; the solvers are made to fail by monkeypatching ``kronopt.linalg``.
* Invalid configs fail before anything is built, every problem listed; odd parameters and
  gradients either work or give a clear error naming the parameter, before anything changes.

The bugs this hunt found, each pinned by a test here: a skipped first call spent (its counters
advanced with nothing written), DyKAF's first SVD with no float64 retry and no fallback, ``lr = inf``
accepted, a bad value hiding an incompatible stage combination, ``max_skipped_steps`` silently
ignored under ``nonfinite_scope = "block"``, integer and complex parameters and sparse or misshapen
gradients failing deep in the step without naming their parameter.
Shapes are small (8 × 12) and runs a few steps long, in float32 (the default paths: CPU small
buckets, deferred factor updates, the plain AdamW path) unless a test says otherwise.
"""

import warnings

import pytest
import torch

import kronopt
from kronopt import linalg

# 8 × 12 blocks gain nothing from threads; on a shared 2-core machine one thread keeps the run time steady
pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
PRESETS = list(kronopt.PRESETS)
#: three blocks of one (8, 12) bucket, a vector (the AdamW fallback in routed presets) and the
#: transposed shape (a left restricted side under pro_*'s low-rank + flat split)
SHAPES = [(8, 12), (8, 12), (8, 12), (12,), (12, 8)]
NAMES = [f"layer{i}.w" for i in range(len(SHAPES))]
BF16 = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}


def _refresh_every(preset: str) -> dict:
    """A refresh every 2 updates, so that a 5-call run holds the first call and refreshes."""
    return {"refresh.every": 2} if kronopt.PRESETS[preset].refresh.every > 1 else {}


def _params(shapes=SHAPES, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _grad_stream(steps, shapes=SHAPES, dtype=torch.float32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _tensor_state(opt, p):
    """Every tensor of ``state[p]`` but the non-finite counter, cloned."""
    return {k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "nonfinite"}


def _all_state(opt, params):
    return {(i, k): v for i, p in enumerate(params) for k, v in _tensor_state(opt, p).items()}


def _poison(g, how):
    g = g.clone()
    if how == "nan_entry":
        g.view(-1)[3] = NAN
    elif how == "inf_all":
        g.fill_(INF)
    elif how == "neginf_entry":
        g.view(-1)[-1] = -INF
    elif how == "huge":
        g.view(-1)[5] = 1e30  # finite; its square overflows float32
    else:
        raise AssertionError(how)
    return g


def _run(preset, overrides, steps, *, bad=None, tensor_lr=False, shapes=SHAPES, dtype=torch.float32, names=NAMES):
    """Step a fresh optimizer over the fixed gradient stream. ``bad = (call, block, how)`` poisons that
    gradient. Returns the parameters, the optimizer, the parameters after every call, and the
    bad block's (parameter, tensor state) right before and after the poisoned call."""
    params = _params(shapes, dtype)
    opt = kronopt.build(list(zip(names, params)), preset, nonfinite="skip", **overrides)
    if tensor_lr:
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"])
            group["weight_decay"] = torch.tensor(group["weight_decay"])
    history, around = [], None
    for call, grads in enumerate(_grad_stream(steps, shapes, dtype)):
        if bad is not None and call == bad[0]:
            grads[bad[1]] = _poison(grads[bad[1]], bad[2])
            before = (params[bad[1]].detach().clone(), _tensor_state(opt, params[bad[1]]))
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if bad is not None and call == bad[0]:
            around = (before, (params[bad[1]].detach().clone(), _tensor_state(opt, params[bad[1]])))
        history.append([p.detach().clone() for p in params])
    return params, opt, history, around


def _counts(opt):
    return {k: v for k, v in opt.nonfinite_counts().items() if v}


# -- non-finite gradients, nonfinite_scope = "block" ------------------------------------------------

#: (call, block, how): the first call; a refresh call (2 for the presets that skip their first call,
#: 1 for the others); a 1-D parameter; the block with a left restricted side under pro_*
BLOCK_SCENARIOS = [(0, 1, "nan_entry"), (1, 3, "inf_all"), (2, 4, "neginf_entry"), (2, 0, "inf_all")]
OPTIONS = {
    "plain": ({}, False),
    "bf16_storage_tensor_lr": (BF16, True),
    "stagger": ({"refresh.stagger": True}, False),
}


#: every preset plainly; the options on a spread of presets (the file's run time is bounded)
BLOCK_CASES = (
    [(p, "plain") for p in PRESETS]
    + [(p, "bf16_storage_tensor_lr") for p in ("adamw", "soap", "shampoo", "muon", "kl_shampoo", "pro_soap", "dykaf")]
    + [(p, "stagger") for p in ("soap", "kl_shampoo", "pro_kl_shampoo", "dykaf_rank1")]
)


@pytest.mark.parametrize(("preset", "option"), BLOCK_CASES)
def test_a_bad_block_is_skipped_alone_and_the_others_step_as_without_it(preset, option):
    """nonfinite_scope = "block": against a run where the bad gradient was finite, every other block
    steps bit for bit the same at every call; the bad block keeps its parameter and every state
    tensor through the bad call; it is counted once in ``nonfinite_counts()`` and nothing else is.

    Catches: a mask applied to the wrong block or left out of one state tensor (deferred factor
    writes, bf16 rounding, a staggered phase's bucket, the fused AdamW path); NaN entries not zeroed
    before a batched solver (leaking into the neighbours); weight decay applied to a skipped block;
    a tensor learning rate bypassing the mask; a skip counted on the wrong parameter or twice."""
    extra, tensor_lr = OPTIONS[option]
    overrides = {"nonfinite_scope": "block", **_refresh_every(preset), **extra}
    _, _, reference, _ = _run(preset, overrides, 4, tensor_lr=tensor_lr)
    for call, block, how in BLOCK_SCENARIOS:
        params, opt, history, ((p0, s0), (p1, s1)) = _run(preset, overrides, 4, bad=(call, block, how), tensor_lr=tensor_lr)
        where = f"{preset} {option}: {how} in block {block} at call {call}"
        for t, (ref, got) in enumerate(zip(reference, history)):
            for i, (a, b) in enumerate(zip(ref, got)):
                if i != block:
                    assert torch.equal(a, b), f"{where}: block {i} differs from the finite run at call {t}"
        assert torch.equal(p0, p1), f"{where}: the bad block's parameter changed"
        for k in s0:
            assert torch.equal(s0[k], s1[k]), f"{where}: the bad block's state {k} changed"
        assert all(torch.isfinite(p).all() for p in params), where
        assert _counts(opt) == {NAMES[block]: 1}, where


@pytest.mark.parametrize("preset", ["soap", "shampoo", "kl_shampoo", "pro_soap", "dykaf", "muon"])
@pytest.mark.parametrize("scope", ["block", "step"])
def test_a_skipped_block_in_a_bucket_continues_like_the_same_block_skipped_alone(preset, scope):
    """The bad block's own future (float64): in a bucket of three, skipped at call 2 (scope "block":
    its own NaN; scope "step": a neighbour's NaN skips the step), then stepped on, it must follow the
    run of that block alone, skipped at the same call by its own NaN (batching changes nothing, the
    documented skip included: tensors kept, counters advanced).

    Catches: a skipped block whose state is half written (e.g. moments kept but factors or basis
    advanced, or the reverse), a per-block counter or mask that diverges from the bucket's, a
    refresh on the skipped call applied to some of the block's stacks only."""
    shapes = [(8, 12)] * 3
    overrides = {"nonfinite_scope": scope, "state_dtype": "float64", **_refresh_every(preset)}
    if preset == "muon":
        overrides["inner.ns_dtype"] = "float64"
    names = ["a.w", "b.w", "c.w"]
    poisoned = 1 if scope == "block" else 0
    bucket, _, hist_bucket, _ = _run(preset, overrides, 6, bad=(2, poisoned, "nan_entry"), shapes=shapes,
                                     dtype=torch.float64, names=names)
    # block 1 alone, with the same gradients and its own NaN at call 2
    params = _params(shapes, torch.float64)[1:2]
    opt = kronopt.build([("b.w", params[0])], preset, nonfinite="skip", **overrides)
    for call, grads in enumerate(_grad_stream(6, shapes, torch.float64)):
        g = grads[1]
        params[0].grad = _poison(g, "nan_entry") if call == 2 else g
        opt.step()
        torch.testing.assert_close(params[0].detach(), hist_bucket[call][1], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{preset} scope {scope}, call {call}: {m}")


@pytest.mark.parametrize(
    ("preset", "option"),
    [(p, "plain") for p in PRESETS]
    + [(p, "bf16_storage_tensor_lr") for p in ("adamw", "soap", "kl_shampoo", "pro_kl_shampoo", "dykaf_rank1")],
)
def test_a_nonfinite_gradient_changes_no_tensor_anywhere_under_step_scope(preset, option):
    """nonfinite_scope = "step" (default), float32: a NaN/Inf in one parameter on the first call, a
    refresh call or a later one leaves every parameter and every state tensor of every parameter bit
    for bit as it was; ``skipped_steps()`` is 1 after it and 0 after the next finite step; only the
    bad parameter is counted.

    Catches: a state write (a deferred factor update, a bf16-rounded stack, the fused AdamW kernel,
    a refresh's replaced basis stack) that ignores the step flag; decay applied on a skipped step."""
    extra, tensor_lr = OPTIONS[option]
    overrides = {**_refresh_every(preset), **extra}
    for call, block, how in [(0, 0, "nan_entry"), (1, 3, "inf_all"), (2, 4, "neginf_entry")]:
        params = _params()
        opt = kronopt.build(list(zip(NAMES, params)), preset, nonfinite="skip", **overrides)
        if tensor_lr:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"])
        where = f"{preset} {option}: {how} in block {block} at call {call}"
        for t, grads in enumerate(_grad_stream(call + 2)):
            if t == call:
                grads[block] = _poison(grads[block], how)
                before = ([p.detach().clone() for p in params], _all_state(opt, params))
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            if t == call:
                for i, (a, p) in enumerate(zip(before[0], params)):
                    assert torch.equal(a, p), f"{where}: parameter {i} changed"
                after = _all_state(opt, params)
                for k, v in before[1].items():
                    assert torch.equal(v, after[k]), f"{where}: state {k} changed"
                assert opt.skipped_steps() == 1, where
        assert opt.skipped_steps() == 0, where
        assert _counts(opt) == {NAMES[block]: 1}, where


@pytest.mark.parametrize("preset", PRESETS)
def test_a_finite_gradient_that_overflows_skips_its_block_alone_under_step_scope(preset):
    """A 1e30 entry (finite; its square overflows float32) in one block of a bucket, on a refresh
    call: the other blocks step bit for bit as in the run without it, nothing non-finite reaches a
    parameter or the state, and ``skipped_steps()`` stays 0 (the step is not skipped whole). Where
    the block is skipped it is counted once and keeps its parameter.

    Catches: an overflow taken for a non-finite gradient (the whole step skipped), an overflowed
    factor or moment written into the stacks, one overflowing block spoiling its neighbours."""
    overrides = _refresh_every(preset)
    _, _, reference, _ = _run(preset, overrides, 4)
    params, opt, history, ((p0, _), (p1, _)) = _run(preset, overrides, 4, bad=(2, 0, "huge"))
    for t, (ref, got) in enumerate(zip(reference, history)):
        for i in range(1, len(SHAPES)):
            assert torch.equal(ref[i], got[i]), f"block {i} differs at call {t}"
    assert all(torch.isfinite(p).all() for p in params)
    for p in params:
        assert all(torch.isfinite(v).all() for v in _tensor_state(opt, p).values())
    assert opt.skipped_steps() == 0
    counts = _counts(opt)
    assert set(counts) <= {NAMES[0]} and counts.get(NAMES[0], 0) <= 1, counts
    if counts:
        assert torch.equal(p0, p1)


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_gradients_move_the_parameters_by_weight_decay_alone(preset):
    """All-zero gradients from the first call on, through refreshes of rank-deficient (zero)
    factors: no block is skipped or counted, and every matrix is exactly decayed, its value after
    k updates ``W₀ (1 − lr·wd)^k`` (computed here in float64; the first call of a preset with
    ``skip_first_call`` does not update; DyKAF's blocks wait for a nonzero gradient and do not move). Subnormal
    gradients likewise skip nothing.

    Catches: 0/0 in an eigenvalue rule, a grafting or RMS normalisation, a whitened complement with
    a zero flat eigenvalue (a NaN direction would skip the block and its decay, and count it); a
    refresh of a zero factor that fails or writes NaN."""
    shapes = [(8, 12), (12, 8)]
    cfg = kronopt.resolve(preset, **_refresh_every(preset))
    params = _params(shapes)
    start = [p.detach().double() for p in params]
    opt = kronopt.build(list(zip(["a.w", "b.w"], params)), preset, nonfinite="skip", **_refresh_every(preset))
    calls = 6
    for _ in range(calls):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    updates = calls - (1 if cfg.skip_first_call else 0)
    if preset in ("dykaf", "dykaf_rank1", "pro_dykaf"):  # dykaf.md §5: no first call before a nonzero gradient
        updates = 0
    factor = (1.0 - cfg.lr * cfg.weight_decay) ** updates
    for p, w0 in zip(params, start):
        torch.testing.assert_close(p.detach().double(), w0 * factor, rtol=2e-6, atol=0)
    assert _counts(opt) == {} and sum(opt.eigh_failures().values()) == 0
    for p in params:
        p.grad = torch.full_like(p, 1e-42)  # subnormal in float32
    opt.step()
    assert _counts(opt) == {} and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", ["soap", "shampoo", "kl_shampoo", "dykaf", "pro_kl_shampoo", "muon", "adamw"])
def test_a_skipped_first_call_leaves_the_next_call_a_first_call(preset, scope):
    """A first call whose every gradient is non-finite (the step skipped: "no parameter and no state tensor
    changes") is not counted: the run then goes on bit for bit as the run that never saw it, counters
    included. Guards the first call's Python fields (``calls``, ``step``, ``basis.ready``) taken from the
    masked call: ``basis.ready`` turned True with the identity basis kept, and the next finite call
    stepped the parameter with unbuilt factors (kl_shampoo moved 0.25 at once; soap ran as Adam until
    its first refresh; Adam's first bias correction was spent)."""
    shapes = [(8, 12), (12,)]
    grads = _grad_stream(4, shapes)
    skipped, clean = _params(shapes), _params(shapes)
    opt_skipped = kronopt.build(skipped, preset, nonfinite="skip", nonfinite_scope=scope)
    opt_clean = kronopt.build(clean, preset, nonfinite="skip", nonfinite_scope=scope)
    for p in skipped:
        p.grad = torch.full(p.shape, NAN)
    opt_skipped.step()
    if preset not in ("adamw", "muon"):  # the identity basis is ready from the start
        assert opt_skipped.state[skipped[0]]["basis.ready"] is False, "ready without a basis ever being built"
    assert opt_skipped.state[skipped[0]]["calls"] == 0
    _go_on_alike(opt_skipped, skipped, opt_clean, clean, grads)


def _go_on_alike(opt_a, a, opt_b, b, grads):
    """Both runs stepped on ``grads``; after each step their parameters and counters must be equal."""
    for step in grads:
        for p, q, g in zip(a, b, step):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            assert {k: v for k, v in opt_a.state[p].items() if not isinstance(v, torch.Tensor)} == {
                k: v for k, v in opt_b.state[q].items() if not isinstance(v, torch.Tensor)
            }


def test_a_first_call_skipped_whole_for_another_bucket_is_not_counted_either():
    """Under ``nonfinite_scope = "step"`` a NaN in one bucket skips the step whole: the other bucket's first
    call, though its gradient was finite, wrote nothing and is not counted either (guards the decision
    taken from the block's own gradient flag alone, not the step's)."""
    shapes = [(8, 12), (6, 6)]
    grads = _grad_stream(3, shapes)
    skipped, clean = _params(shapes), _params(shapes)
    opt_skipped = kronopt.build(skipped, "soap", nonfinite="skip")
    opt_clean = kronopt.build(clean, "soap", nonfinite="skip")
    skipped[0].grad, skipped[1].grad = torch.full((8, 12), NAN), torch.ones(6, 6)
    opt_skipped.step()
    assert opt_skipped.skipped_steps() == 1 and opt_skipped.state[skipped[1]]["calls"] == 0
    _go_on_alike(opt_skipped, skipped, opt_clean, clean, grads)


# -- failing solvers ----------------------------------------------------------------------------------


def _nan_on_block_0(real):
    def solver(A):
        out = [t.clone() for t in real(A)]
        out[0][0] = NAN
        return tuple(out)

    return solver


@pytest.mark.parametrize("preset", ["soap", "shampoo", "kl_shampoo", "dykaf"])
def test_an_eigh_that_returns_nan_for_one_block_leaves_the_others_alone_and_is_counted(preset, monkeypatch):
    """``linalg._eigh`` returns NaN eigenvalues for block 0 of every batch (float32 and float64):
    block 0 keeps its identity basis and counts the failure in ``eigh_failures()`` (two sides per eigh
    refresh), nothing is counted as a non-finite gradient, every parameter stays finite, and block 1
    (same bucket) follows the run with a working solver bit for bit.

    Catches: the batched solver's bad block leaking into its neighbours, a NaN basis kept, the failure
    not counted or counted on the wrong block, NaN reaching a parameter through the eigenvalues."""
    shapes = [(8, 12), (8, 12)]
    overrides = {"refresh.every": 2}
    ref, _, ref_hist, _ = _run(preset, overrides, 5, shapes=shapes, names=["a.w", "b.w"])
    monkeypatch.setattr(linalg, "_eigh", _nan_on_block_0(linalg._eigh))
    params, opt, hist, _ = _run(preset, overrides, 5, shapes=shapes, names=["a.w", "b.w"])
    for t, (a, b) in enumerate(zip(ref_hist, hist)):
        assert torch.equal(a[1], b[1]), f"block 1 differs at call {t}"
    failures = opt.eigh_failures()
    assert failures["a.w"] >= 2 and failures["a.w"] % 2 == 0 and failures["b.w"] == 0, failures
    assert _counts(opt) == {}
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("preset", ["soap", "kl_soap", "dykaf_rank1"])
def test_an_eigh_that_raises_on_the_first_call_is_retried_at_the_next_refresh(preset, monkeypatch):
    """``_eigh`` raises (both dtypes) on the first call of a ``qr`` basis, whose first refresh is an eigh:
    the step completes, the parameters are untouched (first call), both sides are counted per block,
    ``basis.ready`` stays False, and once the solver works again the next refresh is a full eigh again
    (not a power step from the identity) and the run goes on finite.

    Catches: a raising solver crashing step(); ``ready`` set although no basis was built (the next
    refreshes would then be power steps warm-started from the identity); failures not counted."""
    shapes = [(8, 12), (8, 12)]
    params = _params(shapes)
    opt = kronopt.build(list(zip(["a.w", "b.w"], params)), preset, nonfinite="skip", **{"refresh.every": 2})
    real = linalg._eigh
    calls = []

    def broken(A):
        raise RuntimeError("simulated convergence failure")

    def counting(A):
        calls.append(A.shape)
        return real(A)

    start = [p.detach().clone() for p in params]
    monkeypatch.setattr(linalg, "_eigh", broken)
    grads = _grad_stream(4, shapes)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert opt.eigh_failures() == {"a.w": 2, "b.w": 2}
    assert opt.state[params[0]]["basis.ready"] is False
    monkeypatch.setattr(linalg, "_eigh", counting)
    for g_list in grads[1:3]:  # updates 1 and 2: the refresh at update 2
        for p, g in zip(params, g_list):
            p.grad = g
        opt.step()
    assert len(calls) == 2, "the next refresh must decompose both sides again"
    assert opt.state[params[0]]["basis.ready"] is True
    assert all(torch.isfinite(p).all() for p in params) and _counts(opt) == {}


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "dykaf"])
def test_a_qr_refresh_that_returns_nan_keeps_the_blocks_basis_and_is_counted(preset, monkeypatch):
    """``linalg.q_factor`` (the QR of the warm-started power step) returns NaN for block 0 at one later
    refresh: block 0 keeps its basis exactly, one failure per side is counted, and block 1 follows the
    run with a working QR bit for bit, before and after.

    Catches: a NaN basis written, the moments rotated or permuted by a refresh that was dropped, the
    neighbour's basis or moments disturbed by the selection, the failure not counted."""
    shapes = [(8, 12), (8, 12)]
    overrides = {"refresh.every": 2}
    _, _, ref_hist, _ = _run(preset, overrides, 6, shapes=shapes, names=["a.w", "b.w"])
    params = _params(shapes)
    opt = kronopt.build(list(zip(["a.w", "b.w"], params)), preset, nonfinite="skip", **overrides)
    real = linalg.q_factor

    def nan_on_block_0(P, **kw):
        Q = real(P, **kw).clone()
        Q[0] = NAN
        return Q

    for call, grads in enumerate(_grad_stream(6, shapes)):
        for p, g in zip(params, grads):
            p.grad = g
        if call == 4:  # update 4: a refresh by the power step + QR (the basis is ready)
            Q_before = opt.state[params[0]]["basis.Q_L"].clone()
            monkeypatch.setattr(linalg, "q_factor", nan_on_block_0)
            opt.step()
            monkeypatch.setattr(linalg, "q_factor", real)
            assert torch.equal(opt.state[params[0]]["basis.Q_L"], Q_before)
        else:
            opt.step()
        assert torch.equal(params[1], ref_hist[call][1]), f"block 1 differs at call {call}"
    assert opt.eigh_failures() == {"a.w": 2, "b.w": 0}
    assert all(torch.isfinite(p).all() for p in params) and _counts(opt) == {}


def test_dykaf_first_call_survives_an_svd_that_fails_in_float32(monkeypatch):
    """Catches: a decomposition on the first call that is not retried in float64 (as eigh is)."""
    real = linalg._svd

    def float32_fails(A):
        if A.dtype == torch.float32:
            raise RuntimeError("simulated convergence failure")
        return real(A)

    params, clean = _params([(8, 12)]), _params([(8, 12)])
    opt, ref = kronopt.build(params, "dykaf"), kronopt.build(clean, "dykaf")
    for k, grads in enumerate(_grad_stream(3, [(8, 12)])):
        params[0].grad, clean[0].grad = grads[0].clone(), grads[0].clone()
        with monkeypatch.context() as m:
            m.setattr(linalg, "_svd", float32_fails)
            opt.step()
        ref.step()
        if k == 0:  # the start from the float64 triplet, cast back, against the float32 one: rounding apart
            for key in ("factors.L", "factors.R"):  # (rank one: their eigenbases are not unique, the factors are)
                torch.testing.assert_close(opt.state[params[0]][key], ref.state[clean[0]][key], rtol=1e-5, atol=1e-6)
                assert opt.state[params[0]][key].abs().max() > 0
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0], _params([(8, 12)])[0])


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "pro_soap", "dykaf"])
def test_an_svd_that_always_fails_on_the_first_call_does_not_crash_training(preset, monkeypatch):
    """Catches: a solver failure on a first call escaping the fallback policy (crash), and a crash in
    the middle of step() after other buckets were already written (nothing may be lost or half done)."""

    def broken(A):
        raise RuntimeError("simulated convergence failure")

    shapes = [(8, 12), (12,)]
    params = _params(shapes)
    opt = kronopt.build(list(zip(["layer.w", "layer.b"], params)), preset)
    monkeypatch.setattr(linalg, "_svd", broken)
    before = [p.detach().clone() for p in params]
    grads = _grad_stream(3, shapes)
    for p, g in zip(params, grads[0]):
        p.grad = g
    try:
        opt.step()
    except RuntimeError:
        for p, b in zip(params, before):  # at the very least, nothing half done
            assert torch.equal(p, b), "a failed step() left some parameters updated"
        raise
    for g_list in grads[1:]:
        for p, g in zip(params, g_list):
            p.grad = g
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0]), "the matrix never stepped"


def test_dykaf_start_falls_back_to_the_power_iteration_where_the_svd_fails_in_both_dtypes(monkeypatch):
    """Where the SVD fails in float32 and float64, DyKAF's first triplet comes from the power iteration
    (``linalg.FALLBACK_POWER_ITERS`` of them), with a warning: bit for bit the run with ``init_solver = "power"``
    at that many iterations (guards a fallback that starts from nothing, or from another start)."""

    def broken(A):
        raise RuntimeError("simulated convergence failure")

    params, power = _params([(8, 12)]), _params([(8, 12)])
    opt = kronopt.build(params, "dykaf")
    ref = kronopt.build(power, "dykaf", **{"factors.init_solver": "power", "factors.power_iters": linalg.FALLBACK_POWER_ITERS})
    for k, grads in enumerate(_grad_stream(3, [(8, 12)])):
        params[0].grad, power[0].grad = grads[0].clone(), grads[0].clone()
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.setattr(linalg, "_svd", broken)
            opt.step()
        assert (k == 0) == any("SVD" in str(w.message) for w in caught)
        ref.step()
        assert torch.equal(params[0], power[0])


# -- invalid configs ------------------------------------------------------------------------------------


def test_every_problem_of_several_param_groups_is_listed_before_any_state_is_made(monkeypatch):
    """Group overrides with a wrong type, an out-of-range beta, an unknown stage, a typo'd key and a
    bad fallback value, in two groups: one ConfigError lists each with its path (and the available
    stage names), raised before any optimizer state is allocated and with no parameter touched.

    Catches: stopping at the first error (of a group or of a table), an error path without its group,
    state allocated (``compose.init_state``) before validation finishes."""

    def no_state(*a, **k):
        raise AssertionError("optimizer state allocated before the config was validated")

    monkeypatch.setattr(kronopt.compose, "init_state", no_state)
    W, b = _params([(8, 12), (12,)])
    W0 = W.detach().clone()
    with pytest.raises(kronopt.ConfigError) as info:
        kronopt.build(
            [
                {"params": [("a.w", W)], "lr": "fast", "inner.betas": [0.9, 1.5], "basis.type": "eigen"},
                {"params": [("a.b", b)], "fallback.lr": -1.0, "refresh.evry": 2},
            ],
            "kl_shampoo",
        )
    paths = {p for p, _ in info.value.errors}
    assert paths == {
        "param_groups[0].lr", "param_groups[0].inner.betas", "param_groups[0].basis.type",
        "param_groups[1].fallback.lr", "param_groups[1].refresh.evry",
    }, info.value.errors
    text = str(info.value)
    assert "eigh, identity, qr" in text and "5 errors" in text
    assert torch.equal(W, W0) and W.grad is None


@pytest.mark.parametrize("via", ["overrides", "dict"])
def test_a_bad_value_does_not_hide_an_incompatible_stage_combination(via):
    """``lr = -1`` together with ``basis = eigh`` over ``factors = none``: both problems in one error.

    Catches: validation that stops after one category of error."""
    with pytest.raises(kronopt.ConfigError) as info:
        if via == "overrides":
            kronopt.resolve("soap", lr=-1.0, **{"basis.type": "eigh", "factors.type": "none"})
        else:
            raw = kronopt.to_dict(kronopt.PRESETS["soap"])
            raw.update(lr=-1.0, basis={"type": "eigh"}, factors={"type": "none"})
            kronopt.from_dict(raw)
    assert {p for p, _ in info.value.errors} == {"lr", "basis.type"}, info.value.errors


@pytest.mark.parametrize("how", ["override_lr", "override_weight_decay", "toml_lr", "group_lr", "fallback_lr"])
def test_an_infinite_learning_rate_or_decay_is_rejected_before_anything_is_built(how):
    """Catches: an out-of-range (infinite) hyperparameter accepted, which then puts Inf/NaN into the
    parameters without any non-finite gradient."""
    W = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(kronopt.ConfigError):
        if how == "override_lr":
            kronopt.build([W], "soap", lr=INF)
        elif how == "override_weight_decay":
            kronopt.build([W], "adamw", weight_decay=INF)
        elif how == "toml_lr":
            text = kronopt.dumps(kronopt.PRESETS["adamw"]).replace("lr = 0.001", "lr = inf", 1)
            assert "lr = inf" in text
            kronopt.loads(text)
        elif how == "group_lr":
            kronopt.build([{"params": [W], "lr": INF}], "soap")
        else:
            kronopt.build([("head.w", W)], "muon", **{"fallback.lr": INF})


def test_max_skipped_steps_is_not_silently_ignored_under_block_scope():
    """Catches: a conflicting pair of options accepted with one of them dead."""
    W = torch.nn.Parameter(torch.randn(8, 12))
    try:
        opt = kronopt.build([W], "soap", nonfinite="skip", nonfinite_scope="block", max_skipped_steps=2)
    except kronopt.ConfigError:
        return  # refused at build: fine
    with pytest.raises(FloatingPointError):
        for _ in range(4):  # every gradient of every parameter non-finite
            W.grad = torch.full((8, 12), NAN)
            opt.step()


# -- odd parameters and gradients ------------------------------------------------------------------


def _build_and_step(preset, odd_name, odd, odd_grad):
    """Build with an odd parameter next to a normal one and step twice (a first call may only observe):
    returns the error raised (or None) and whether each parameter is unchanged."""
    normal = torch.nn.Parameter(torch.randn(6, 4))
    n0, o0 = normal.detach().clone(), odd.detach().clone()
    err = None
    try:
        opt = kronopt.build([("normal.w", normal), (odd_name, odd)], preset)
        for _ in range(2):
            normal.grad = torch.randn(6, 4)
            odd.grad = odd_grad.clone()
            opt.step()
    except Exception as exc:  # noqa: BLE001 - any error is judged by its message below
        err = exc
    return err, torch.equal(normal.detach(), n0), torch.equal(odd.detach(), o0)


@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_an_integer_parameter_gets_a_clear_error_naming_it_and_nothing_changes(preset):
    """Catches: an unsupported dtype found mid-step (a half-applied step, an anonymous torch error)."""
    odd = torch.arange(12).reshape(3, 4).clone()
    err, normal_same, odd_same = _build_and_step(preset, "counts.w", odd, torch.ones(3, 4, dtype=torch.long))
    assert err is not None and "counts.w" in str(err), err
    assert normal_same and odd_same


@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_a_complex_parameter_gets_a_clear_error_naming_it(preset):
    """Either a clear error naming the parameter, with nothing changed, or a finite step.

    Catches: complex tensors reaching code that cannot take them, with an error that does not say
    which parameter."""
    odd = torch.nn.Parameter(torch.randn(8, 12, dtype=torch.complex64))
    err, normal_same, odd_same = _build_and_step(preset, "rotor.w", odd, torch.randn(8, 12, dtype=torch.complex64))
    if err is None:  # supported: then it must step to finite values
        assert not odd_same and torch.isfinite(torch.view_as_real(odd.detach())).all()
        return
    assert "rotor.w" in str(err), err
    assert normal_same and odd_same


@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_a_sparse_gradient_gets_a_clear_error_naming_its_parameter(preset):
    """Either a clear error naming the parameter, with nothing changed, or the step of the same
    gradient given dense.

    Catches: a sparse gradient reaching dense-only reductions with an anonymous error."""
    dense = torch.randn(8, 12)
    dense[2:5] = 0.0  # rows an embedding did not look up
    odd = torch.nn.Parameter(torch.randn(8, 12))
    twin = torch.nn.Parameter(odd.detach().clone())
    err, normal_same, odd_same = _build_and_step(preset, "embed.weight", odd, dense.to_sparse())
    if err is None:  # supported: then it must step as the same gradient given dense
        _build_and_step(preset, "embed.weight", twin, dense)
        assert torch.equal(odd.detach(), twin.detach())
        return
    assert "embed.weight" in str(err), err
    assert normal_same and odd_same


@pytest.mark.parametrize("preset", ["adamw", "soap"])
def test_a_gradient_of_another_shape_is_refused_naming_its_parameter(preset):
    """Catches: a mis-shaped gradient silently reinterpreted (a transposed gradient stepped as if it
    were the right one)."""
    odd = torch.nn.Parameter(torch.randn(8, 12))
    normal = torch.nn.Parameter(torch.randn(6, 4))
    opt = kronopt.build([("normal.w", normal), ("odd.w", odd)], preset)
    odd.grad = torch.randn(8, 12)
    odd.grad.data = torch.randn(12, 8)  # torch's .grad setter would refuse this shape
    normal.grad = torch.randn(6, 4)
    o0 = odd.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match="odd.w"):
        opt.step()
    assert torch.equal(odd.detach(), o0)


def test_a_frozen_parameter_and_one_without_gradient_stay_untouched_and_stateless():
    """A parameter with ``requires_grad = False`` (no gradient) and a trainable one without a gradient,
    in the bucket of a stepped one: both stay bit for bit with their state tensors, and the stepped
    one moves as when optimised alone.

    Catches: a missing gradient taken as zero (moments decayed, weight decay applied, counters of the
    absent blocks' state advanced into their tensors), the stepped block disturbed by its absent
    neighbours."""
    frozen = torch.nn.Parameter(torch.randn(8, 12), requires_grad=False)
    idle, moving = _params([(8, 12), (8, 12)])
    alone = torch.nn.Parameter(moving.detach().clone())
    opt = kronopt.build([("f.w", frozen), ("i.w", idle), ("m.w", moving)], "soap", **{"refresh.every": 2})
    ref = kronopt.build([("m.w", alone)], "soap", **{"refresh.every": 2})
    f0, i0 = frozen.detach().clone(), idle.detach().clone()
    s_frozen, s_idle = _tensor_state(opt, frozen), _tensor_state(opt, idle)
    for (g,) in _grad_stream(4, [(8, 12)]):
        moving.grad, alone.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(frozen, f0) and torch.equal(idle, i0)
    for before, p in ((s_frozen, frozen), (s_idle, idle)):
        after = _tensor_state(opt, p)
        assert all(torch.equal(v, after[k]) for k, v in before.items())
    torch.testing.assert_close(moving.detach(), alone.detach(), rtol=1e-6, atol=1e-7)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
