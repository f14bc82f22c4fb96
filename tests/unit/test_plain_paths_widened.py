"""Plain AdamW's and plain Muon's CPU fast paths on gradients narrower than their state (bfloat16 or float16 parameters
with the default float32 state, float32 parameters under ``state_dtype = "float64"``): each block's gradient is cast
into the state's dtype in a block-sized scratch tensor before its arithmetic, and the step must be the general path's
(the gradients stacked and cast to the state's dtype, every changed tensor checked) bit for bit, skipped blocks and
counts included.

The general path is forced by making ``compose.is_plain_adam`` answer False (AdamW), or by turning
``optimizer._PLAIN_MUON_CPU`` off (Muon), while that optimizer is built and stepped.
"""

import warnings

import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module
from tests.torch_compat import needs_grad_dtype
from tests.unit.test_plain_muon_fast_path import count_plain_steps

SHAPES = [(6, 5), (6, 5), (6, 5), (7, 3), (9,)]  # a bucket of three blocks, a one-block bucket, a gain

#: (parameter dtype, state dtype, a finite gradient entry whose square overflows the state's dtype, or None)
CASES = {
    "bfloat16-params": (torch.bfloat16, None, 1e22),
    "float16-params": (torch.float16, None, None),  # float16 holds nothing whose square overflows float32
    "float32-params-float64-state": (torch.float32, "float64", None),
}


def _grads(step, gen, dtype, huge):
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    if step == 2:
        grads[1][2, 3] = float("nan")  # one block of the three-block bucket
    if step == 3:
        grads[3][0, 0] = float("inf")  # the one-block bucket
        grads[0][1, 1] = -float("inf")
    if step == 4 and huge is not None:
        grads[2][4, 4] = huge  # finite, but (1 - β₂)·g² overflows the state's dtype
        grads[4][0] = huge
    return grads


def _run(monkeypatch, case, *, fast, scope, calls, form="block_by_block"):
    dtype, state_dtype, huge = CASES[case]
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(compose, "is_plain_adam", lambda *a: False)
        # the CPU's block-by-block form, or the stacks' (the form of other devices) for every bucket
        patch.setattr(optimizer_module, "_BLOCKWISE_MIN", 1 if form == "block_by_block" else 10**12)
        real = compose.widened_block

        def counted(g, into):
            out = real(g, into)
            calls.append(out.dtype)  # the dtype the block's arithmetic read its gradient in
            return out

        patch.setattr(compose, "widened_block", counted)
        kw = {} if state_dtype is None else {"state_dtype": state_dtype}
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        opt = kronopt.build(named, "adamw", nonfinite_scope=scope, lr=0.05, **kw)
        gen = torch.Generator().manual_seed(2)
        for step in range(8):
            for p, g in zip(params, _grads(step, gen, dtype, huge)):
                p.grad = g
            opt.step()
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for i, p in enumerate(params)
    }
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), opt.skipped_steps()


def _same_bits(fast, slow, case):
    """The two runs' parameters (of the case's dtype) and state tensors, the same bits."""
    for a, b in zip(fast[0], slow[0]):
        assert a.dtype == b.dtype == CASES[case][0]
        assert torch.equal(a, b)
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys()
        for key in fast[1][i]:
            assert fast[1][i][key].dtype == slow[1][i][key].dtype
            assert torch.equal(fast[1][i][key], slow[1][i][key]), (case, i, key)


@pytest.mark.parametrize("form", ["block_by_block", "stacks"])
@pytest.mark.parametrize("scope", ["block", "step"])
@pytest.mark.parametrize("case", list(CASES))
def test_narrow_gradients_step_as_the_general_path_bit_for_bit(monkeypatch, case, scope, form):
    """Both forms of the fast path, the CPU's block by block and the stacks' (other devices'). Catches: a block whose
    gradient reaches the arithmetic uncast (a dtype error, or moments rounded to the gradient's dtype), a cast that
    writes the scratch tensor the direction is read from before the moments are made, such a block sent to torch's
    fused kernel, and a bucket that leaves the fast path for the general one (the casts are counted: the test would
    pass vacuously)."""
    fast_calls, slow_calls = [], []
    fast = _run(monkeypatch, case, fast=True, scope=scope, calls=fast_calls, form=form)
    slow = _run(monkeypatch, case, fast=False, scope=scope, calls=slow_calls, form=form)
    state_dtype = torch.float64 if CASES[case][1] == "float64" else torch.float32
    # every block of every call past the first went through the block form, in the state's dtype
    assert len(fast_calls) >= 7 * len(SHAPES) and set(fast_calls) == {state_dtype}
    assert not slow_calls
    _same_bits(fast, slow, case)
    assert fast[2] == slow[2]
    assert fast[3] == slow[3]
    assert any(fast[2].values())  # the non-finite gradients were met and counted


def test_a_skipped_bfloat16_block_keeps_its_weights_and_moments_exactly():
    """A block whose bfloat16 gradient holds a NaN is refused whole: its parameter and its float32 moments stay as
    they were (its counters advance, as on every path), while its bucket's other blocks step. Catches: a cast
    scratch tensor whose NaN reaches the moments before the verdict, or the refused block's parameter written
    anyway."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=gen).bfloat16()) for _ in range(3)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw", nonfinite_scope="block", lr=0.05)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(8, 6, generator=gen).bfloat16()
        opt.step()
    before = [p.detach().clone() for p in params]
    moments = [{k: opt.state[p][k].clone() for k in ("inner.exp_avg", "inner.exp_avg_sq")} for p in params]
    for p in params:
        p.grad = torch.randn(8, 6, generator=gen).bfloat16()
    params[1].grad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="p1"):
        opt.step()
        opt.flush_warnings()  # a CPU's report may wait for the next step
    assert torch.equal(params[1].detach(), before[1])
    for key, value in moments[1].items():
        assert torch.equal(opt.state[params[1]][key], value), key
    for i in (0, 2):
        assert not torch.equal(params[i].detach(), before[i])
        assert opt.state[params[i]]["inner.exp_avg"].dtype == torch.float32
    assert opt.nonfinite_counts() == {"p0": 0, "p1": 1, "p2": 0}


@pytest.mark.parametrize(
    ("narrow", "wide", "exact"),
    [
        (torch.bfloat16, torch.float32, True),
        (torch.float16, torch.float32, True),
        (torch.float32, torch.float64, True),
        (torch.bfloat16, torch.float64, True),
        (torch.float16, torch.bfloat16, False),  # a wider range, fewer digits: not every float16 is a bfloat16
        (torch.bfloat16, torch.float16, False),
        (torch.float32, torch.float32, False),  # not narrower: taken as it is, no cast
        (torch.float64, torch.float32, False),
    ],
)
def test_only_exact_widenings_are_taken(narrow, wide, exact):
    """Checked against the dtypes themselves: every finite value of the narrower dtype survives the round trip."""
    assert compose.widens_exactly(narrow, wide) is exact
    if exact:
        info = torch.finfo(narrow)
        values = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, 1 + info.eps], dtype=narrow)
        assert torch.equal(values.to(wide).to(narrow), values)


#: a Muon bucket of three blocks, a one-block bucket, a gain for the AdamW fallback (the blocks too large for the
#: small buckets' path, which the test turns off)
MUON_SHAPES = [(24, 16), (24, 16), (24, 16), (40, 12), (9,)]


def _muon_run(monkeypatch, case, *, fast):
    dtype, state_dtype, _ = CASES[case]
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in MUON_SHAPES]
    stepped, casts = [], []
    with monkeypatch.context() as patch:
        patch.setattr(optimizer_module, "_PLAIN_MUON_CPU", fast)
        patch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
        count_plain_steps(patch, stepped)
        real = compose.muon_look_ahead

        def spied(buf, g, weight, *, out):
            casts.append(g.dtype)  # the dtype the look-ahead read its gradient in
            return real(buf, g, weight, out=out)

        patch.setattr(compose, "muon_look_ahead", spied)
        kw = {} if state_dtype is None else {"state_dtype": state_dtype}
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "muon", lr=0.02, **kw)
        gen = torch.Generator().manual_seed(2)
        for step in range(6):
            grads = [torch.randn(s, generator=gen).to(dtype) for s in MUON_SHAPES]
            if step == 2:
                grads[1][2, 3] = float("nan")  # that bucket goes to the general path for the step
            for p, g in zip(params, grads):
                p.grad = g
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for i, p in enumerate(params)
    }
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), stepped, casts


@pytest.mark.parametrize("case", list(CASES))
def test_narrow_gradients_take_plain_muon_with_the_general_paths_bits(monkeypatch, case):
    """Catches: a gradient read uncast by the look-ahead or the momentum's advance (a dtype error, or a momentum
    advanced by the rounded values), the second cast skipped after the direction took its scratch tensor, and a
    bucket of narrow gradients sent to the general path (the plain path's calls are counted)."""
    fast = _muon_run(monkeypatch, case, fast=True)
    slow = _muon_run(monkeypatch, case, fast=False)
    state_dtype = torch.float64 if CASES[case][1] == "float64" else torch.float32
    assert fast[3].count(True) >= 2 * 5 and not any(slow[3])  # both matrix buckets, every call but the NaN one
    assert fast[4] and set(fast[4]) == {state_dtype}
    _same_bits(fast, slow, case)
    assert fast[2] == slow[2] and fast[2]["p1"] == 1


@needs_grad_dtype
@pytest.mark.parametrize("scope", ["block", "step"])
@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "pro_kl_shampoo", "dykaf"])
def test_narrow_gradients_stack_as_gradients_cast_by_hand(preset, scope):
    """The pipeline's stack of bfloat16 gradients under the float32 state (cast as each block is placed, where the
    step's check read every one finite; else cast and zeroed where not finite) against the same gradients cast to
    float32 by hand (``p.grad_dtype = None``), bit for bit, skipped blocks and counts included (under ``"block"``
    no check of the step's gradients is made, and the stack is cast and tested as before: the same comparison).
    Catches: a block placed uncast or from the wrong gradient, the check's flags taken for the wrong blocks, a
    non-finite entry left in the stack (a cast perturbed by an ulp fails every ``"step"`` case)."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(12, 8), (12, 8), (12, 8), (10, 6), (8,)]
    init = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    stream = []
    for step in range(7):
        row = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        if step == 3:
            row[1][2, 3] = float("nan")
        if step == 4:
            row[3][0, 0] = float("inf")
        stream.append(row)

    def run(cast):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        for p in ps:
            p.grad_dtype = None
        named = [(f"layers.{i}.weight", p) for i, p in enumerate(ps)]
        opt = kronopt.build(named, preset, lr=1e-2, nonfinite_scope=scope)
        for row in stream:
            for p, g in zip(ps, row):
                p.grad = g.float() if cast else g.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        # the float32 state too: a bfloat16 parameter's rounding hides a last bit of its update
        state = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in ps]
        return [p.detach().clone() for p in ps], state, opt.nonfinite_counts()

    (got, got_state, got_counts), (ref, ref_state, ref_counts) = run(cast=False), run(cast=True)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), preset
    for a, b in zip(got_state, ref_state):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (preset, key)
    assert got_counts == ref_counts and any(got_counts.values())
