"""The plain AdamW fast path (``compose.adam_step`` on raw gradients, guarded by the new second moment)
against the general path (``compose.step`` on sanitized gradients, every changed tensor checked), bit for bit.

The general path is forced by making ``compose.is_plain_adam`` answer False while that optimizer is built
and stepped; both optimizers see the same gradients, including a NaN block, an infinite single block and
a finite block whose square overflows float32.
"""

import math

import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module

SHAPES = [(6, 5), (6, 5), (6, 5), (7, 3), (9,)]  # a bucket of three blocks, a one-block bucket, a gain


def _grads(step, gen):
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    if step == 2:
        grads[1][2, 3] = float("nan")  # one block of the three-block bucket
    if step == 3:
        grads[3][0, 0] = float("inf")  # the one-block bucket
        grads[0][1, 1] = -float("inf")
    if step == 4:
        grads[2][4, 4] = 1e22  # finite, but (1 - β₂)·g² overflows float32
        grads[4][0] = 5e21
    return grads


#: the three forms of the fast path: on the stacks, block by block, and proven blocks through torch's fused kernel
FORMS = {"stacks": "adam_step", "block_by_block": "adam_block", "fused": "fused_adamw_"}


def _run(monkeypatch, *, fast: bool, scope: str, calls: list[int], form: str = "stacks"):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(compose, "is_plain_adam", lambda *a: False)
        # the CPU's block-by-block form for every block (else only for large ones), or never
        patch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12 if form == "stacks" else 1)
        patch.setattr(optimizer_module, "_FUSED_ADAMW", form == "fused")
        real = getattr(compose, FORMS[form])

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)

        patch.setattr(compose, FORMS[form], counted)
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw", nonfinite_scope=scope, lr=0.05)
        gen = torch.Generator().manual_seed(2)
        for step in range(7):
            for p, g in zip(params, _grads(step, gen)):
                p.grad = g
            opt.step()
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("scope", ["block", "step"])
def test_fast_path_matches_the_general_path_bit_for_bit(monkeypatch, scope, form):
    """Bit for bit on the stacks and block by block; torch's fused kernel orders the same arithmetic
    otherwise, so there the values agree up to rounding, and the skipped blocks and counts exactly."""
    fast_calls, slow_calls = [], []
    fast = _run(monkeypatch, fast=True, scope=scope, calls=fast_calls, form=form)
    slow = _run(monkeypatch, fast=False, scope=scope, calls=slow_calls)
    assert fast_calls and not slow_calls  # each optimizer took the path it was meant to

    def same(a, b):
        if form == "fused":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)

    for a, b in zip(fast[0], slow[0]):
        same(a, b)
    assert fast[1].keys() == slow[1].keys()
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys()
        for key in fast[1][i]:
            same(fast[1][i][key], slow[1][i][key])
            if fast[1][i][key].is_floating_point():
                assert torch.isfinite(fast[1][i][key]).all()
    assert fast[2] == slow[2]
    if scope == "block":  # p0: -inf at step 3; p1: NaN at step 2; p2: overflow at step 4; p3: inf; p4: overflow
        assert fast[2] == {"p0": 1, "p1": 1, "p2": 1, "p3": 1, "p4": 1}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_skipped_block_keeps_its_state_and_weights_exactly(monkeypatch, form):
    monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12 if form == "stacks" else 1)
    monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", form == "fused")
    params = [torch.nn.Parameter(torch.randn(4, 8)) for _ in range(2)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw")
    for p in params:
        p.grad = torch.randn(4, 8)
    opt.step()
    before = [(p.detach().clone(), opt.state[p]["inner.exp_avg"].clone(), opt.state[p]["inner.exp_avg_sq"].clone()) for p in params]
    params[0].grad = torch.full((4, 8), 1e25)  # finite gradient, overflowing second moment
    params[1].grad = torch.randn(4, 8)
    opt.step()
    w, m, v = before[0]
    assert torch.equal(params[0], w)
    assert torch.equal(opt.state[params[0]]["inner.exp_avg"], m) and torch.equal(opt.state[params[0]]["inner.exp_avg_sq"], v)
    assert not torch.equal(params[1], before[1][0])
    assert opt.nonfinite_counts() == {"p0": 1, "p1": 0}


@pytest.mark.parametrize("forced", [True, False])  # False: the defaults take this form for these small blocks
def test_fused_form_equals_torch_fused_adamw_bit_for_bit_and_leaves_gradients_alone(monkeypatch, forced):
    """The fused form is ``torch.optim.AdamW(fused=True)`` on the same blocks: the same parameters and
    moments after every step (step count, lr, betas, eps and decay wired through), gradients untouched."""
    if forced:
        monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 1)
        monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", True)
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(ours)], "adamw", lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fused=True)
    for _ in range(6):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b, g in zip(ours, theirs, grads):
            assert torch.equal(a, b)
            assert torch.equal(a.grad, g)
            assert torch.equal(opt.state[a]["inner.exp_avg"].view(a.shape), ref.state[b]["exp_avg"])
            assert torch.equal(opt.state[a]["inner.exp_avg_sq"].view(a.shape), ref.state[b]["exp_avg_sq"])


#: parameters whose memory is not their ``(m, n)`` block's: a block reshaped from them is a copy
STRIDED = {
    "channels_last": lambda w: w.contiguous(memory_format=torch.channels_last),  # a conv weight (8, 4, 3, 3)
    "permuted": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),  # a (4, 6, 5) tensor as (4, 5, 6)
    "transposed": lambda w: w.mT.contiguous().mT,  # a (7, 5) matrix stored column-major
}


@pytest.mark.parametrize("layout", list(STRIDED))
@pytest.mark.parametrize("form", ["fused", "block_by_block", "stacks"])
def test_a_parameter_stored_in_another_layout_is_updated_as_torch_adamw_updates_it(monkeypatch, form, layout):
    """Whatever its strides, a parameter moves as ``torch.optim.AdamW`` moves a contiguous copy of it: a
    form that updated its reshaped block (a copy, for these layouts) would leave it where it was."""
    monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12 if form == "stacks" else 1)
    monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", form == "fused")
    shape = {"channels_last": (8, 4, 3, 3), "permuted": (4, 5, 6), "transposed": (7, 5)}[layout]
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(shape, generator=gen)
    ours = torch.nn.Parameter(STRIDED[layout](start.clone()))
    theirs = torch.nn.Parameter(start.clone())
    assert not ours.is_contiguous() and torch.equal(ours, theirs)
    opt = kronopt.build([("w", ours)], "adamw", lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW([theirs], lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        ours.grad, theirs.grad = STRIDED[layout](g.clone()), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert (ours - start).abs().max() > 1e-2  # it moved (3 steps of lr 0.05)


def test_loading_a_state_dict_forgets_the_verdicts_kept_by_the_old_configs_ids():
    """The plain-AdamW verdict is kept per configuration object's ``id``; ``load_state_dict`` replaces those
    objects, and a new one may take a freed one's ``id``: a kept verdict would then answer for another config
    (say, a group whose ε placement now rules the fused arithmetic out)."""
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    opt = kronopt.build(params, "adamw", lr=0.05)
    for p in params:
        p.grad = torch.randn(4, 3)
    opt.step()
    assert opt.__dict__.get("_plain_adam")  # the verdict was kept
    opt.load_state_dict(opt.state_dict())
    assert not opt.__dict__.get("_plain_adam")
    opt.step()  # and found again for the new configs
    assert {key[0] for key in opt._plain_adam} <= {id(cfg) for cfg in opt._group_cfgs}


# -- every plain AdamW bucket of a CPU step together (KronOptimizer._step_plain_adams) ---------------

#: many shapes, one or a few blocks each; (128, 128) holds exactly _ADAM_BOUNDS_TOGETHER_MAX entries and
#: (130, 130) more (its bounds read alone, right before its work)
MANY = [(3, 4), (5, 2), (5, 2), (7,), (1, 9), (8, 8), (2, 3, 4), (130, 130), (11, 6), (11, 6), (11, 6), (13,),
        (128, 128), (6, 6), (6, 6)]


def _many_grads(step: int, gen: torch.Generator, *, nonfinite: bool) -> list[torch.Tensor | None]:
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=gen) for s in MANY]
    if step == 2 and nonfinite:
        grads[10][3, 1] = float("nan")  # the second block of a two-block bucket (p8, p10)
        grads[7][5, 5] = float("inf")  # the large block
    if step == 3:
        grads[4][0, 2] = 3e22  # finite, but its square overflows float32: no certificate, then checked
    if step % 2 == 1:
        grads[13] = None  # p13 skips every other step: its bucket splits from p14's, and their counts part
    return grads


def _groups(params):
    """Four groups: lr and decay of their own in two; the last two share the first's lr and decay and
    override only β (the third) or ε (the fourth), so only those keep their blocks out of its fused call."""
    settings = [
        {"lr": 0.05, "weight_decay": 0.1},
        {"lr": 0.02, "weight_decay": 0.0},
        {"lr": 0.05, "weight_decay": 0.1, "inner.betas": (0.8, 0.99)},
        {"lr": 0.05, "weight_decay": 0.1, "inner.eps": 1e-6},
    ]
    member = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1, 0, 0, 0]  # the blocks of a shape share a group where a bucket is meant
    groups = [dict(params=[], **kw) for kw in settings]
    for i, p in enumerate(params):
        groups[member[i]]["params"].append((f"p{i}", p))
    return groups


def _stepped(params, gen, *, scope: str, one_optimizer: bool):
    groups = _groups(params)
    if one_optimizer:
        opts = [kronopt.build(groups, "adamw", nonfinite_scope=scope)]
    else:  # each parameter alone in an optimizer of its own: no step ever sees two buckets
        opts = [
            kronopt.build([{**g, "params": [pair]}], "adamw", nonfinite_scope=scope)
            for g in groups for pair in g["params"]
        ]
    for step in range(6):
        # with scope "step" a NaN would skip the whole step of one optimizer, but only its own parameter's
        # step among the optimizers of one parameter each: there only the finite overflowing gradient comes
        for p, g in zip(params, _many_grads(step, gen, nonfinite=scope == "block")):
            p.grad = g
        for opt in opts:
            opt.step()
    counts: dict[str, int] = {}
    for opt in opts:
        counts.update(opt.nonfinite_counts())
    return counts, [{k: v for k, v in opt.state[p].items()} for p in params for opt in opts if p in opt.state]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scope", ["block", "step"])
def test_buckets_stepped_together_equal_each_parameter_stepped_alone(monkeypatch, scope, fused):
    """One optimizer over many shapes (every bucket's proven blocks in fused calls across buckets, the small
    blocks' extremes read together) against one optimizer per parameter: the same bits, the same skipped
    blocks, the same counters; with groups that differ in lr, decay, β or ε only, and buckets of one group
    at different step counts."""
    monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", fused)
    calls = []
    real = optimizer_module.KronOptimizer._step_plain_adams
    monkeypatch.setattr(optimizer_module.KronOptimizer, "_step_plain_adams", lambda self, work, ok: (calls.append(len(work)), real(self, work, ok))[1])
    start = [torch.randn(s, generator=torch.Generator().manual_seed(4)) for s in MANY]
    together = [torch.nn.Parameter(w.clone()) for w in start]
    alone = [torch.nn.Parameter(w.clone()) for w in start]
    counts_t, state_t = _stepped(together, torch.Generator().manual_seed(5), scope=scope, one_optimizer=True)
    n_together = calls[:6]
    counts_a, state_a = _stepped(alone, torch.Generator().manual_seed(5), scope=scope, one_optimizer=False)
    # every bucket of the step in one call: 15 parameters in 4 groups make 12 buckets (p8, p9 and p10, of one shape
    # in groups 0 and 1, which differ in lr and decay alone, share one; p1 and p2, whose groups differ in β, do
    # not); from the step p13 first sits out, its bucket with p14 is two, and on p13's steps both are stepped
    assert n_together == [12, 12, 13, 12, 13, 12]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    for sa, sb in zip(state_t, state_a):
        assert sa.keys() == sb.keys()
        for key in sa:
            va, vb = sa[key], sb[key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key
    assert counts_t == counts_a
    assert counts_t["p4"] == 1 and sum(counts_t.values()) == (3 if scope == "block" else 1)
    if scope == "block":
        assert counts_t["p10"] == 1 and counts_t["p7"] == 1
    steps = {f"p{i}": state["step"] for i, state in enumerate(state_t)}
    assert steps["p13"] == 3 and steps["p14"] == 6  # the split buckets' counters parted


def test_moment_extremes_read_off_a_buckets_stacks_are_each_blocks_own():
    """A bucket's moments' extremes from its stacks (three reductions) against ``foreach`` block by block: the same
    table, runs with and without stacks interleaved in order; blocks whose largest magnitude is negative, NaN in
    one block only, a block of zeros. Would catch a smallest entry read as a largest, a run's rows out of place."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(9)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw")
    stacks = [torch.randn(k, 3, 4, generator=gen) for k in (4, 2, 3, 2)]  # four buckets' first moments
    squares = [torch.rand(k, 3, 4, generator=gen) for k in (4, 2, 3, 2)]
    stacks[0][1] = -stacks[0][1].abs() - 5.0  # every entry negative: the extreme is the smallest entry
    stacks[2][2, 1, 1] = float("nan")
    stacks[1][0].zero_()
    blocks, runs = [], []
    for k, (m, v) in enumerate(zip(stacks, squares)):
        for i in range(m.shape[0]):
            g = torch.randn(3, 4, generator=gen)
            blocks.append((g, m[i], v[i]))
        apart = k in (1, 3)  # the second and the last bucket block by block
        runs.append((m.shape[0], None if apart else m, None if apart else v))
    together = opt._adam_extremes_small(blocks, runs)
    alone = opt._adam_extremes_small(blocks)
    assert together.shape == alone.shape == (11, 5)
    assert torch.equal(together.nan_to_num(7.0), alone.nan_to_num(7.0))
    assert together[8, 2:4].isnan().all() and not together[:8].isnan().any() and not together[9:].isnan().any()
    assert together[1, 2] == stacks[0][1].min() and together[1, 3] == stacks[0][1].max()


@pytest.mark.parametrize("stacks", [1, 10**9])  # every all-small bucket's moments read off its stacks; none
@pytest.mark.parametrize("scope", ["block", "step"])
def test_small_blocks_judged_together_step_as_blocks_judged_one_by_one(monkeypatch, scope, stacks):
    """From ``_ADAM_VERDICTS_TOGETHER_MIN`` small blocks a step judges them on tensors (``adam_blocks_are_safe``),
    below it one by one: on the many shapes, groups, NaN, infinity and an overflowing square of
    ``test_buckets_stepped_together_equal_each_parameter_stepped_alone``, the two give the same bits, the same
    skipped blocks and the same counters. Would catch a verdict that differs (a proven block with another
    arithmetic, a skipped one kept) or one handed to another block (the verdicts' order over the buckets)."""
    start = [torch.randn(s, generator=torch.Generator().manual_seed(4)) for s in MANY]
    runs = []
    monkeypatch.setattr(optimizer_module, "_ADAM_STACK_EXTREMES_MIN", stacks)
    for least in (0, 10**9):  # every step's small blocks on tensors; none
        monkeypatch.setattr(optimizer_module, "_ADAM_VERDICTS_TOGETHER_MIN", least)
        together = [torch.nn.Parameter(w.clone()) for w in start]
        runs.append((together, *_stepped(together, torch.Generator().manual_seed(5), scope=scope, one_optimizer=True)))
    (p_vec, counts_vec, state_vec), (p_one, counts_one, state_one) = runs
    assert all(torch.equal(a, b) for a, b in zip(p_vec, p_one))
    assert counts_vec == counts_one and sum(counts_vec.values()) == (3 if scope == "block" else 1)
    for sa, sb in zip(state_vec, state_one):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


def test_reports_come_in_the_buckets_order():
    """The plain AdamW buckets are stepped before the others, but their reports are queued in the buckets'
    order: a plain group, a group that takes the general path (it skips its first call), a plain group."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5, 2), (3, 3), (2, 6), (7,), (4, 4)]]
    groups = [
        {"params": [("a0", params[0]), ("a1", params[1])]},
        {"params": [("b0", params[2]), ("b1", params[3])], "skip_first_call": True},
        {"params": [("c0", params[4]), ("c1", params[5])]},
    ]
    opt = kronopt.build(groups, "adamw", nonfinite="warn", nonfinite_scope="block")
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:
                p.grad.view(-1)[0] = float("nan")
        opt.step()
    plain = [b for b in opt._buckets if opt._plain_adam_cpu(b) is not None]  # the groups' paths are as meant
    assert {id(p) for b in plain for p in b.params} == {id(p) for p in params[:2] + params[4:]}
    with pytest.warns(RuntimeWarning) as caught:
        opt.flush_warnings()
    named = [next(n for n in ("a0", "a1", "b0", "b1", "c0", "c1") if f" {n};" in str(w.message) or f" {n}," in str(w.message)) for w in caught]
    assert named == ["a0", "a1", "b0", "b1", "c0", "c1"]


def _blocks(gen: torch.Generator, edge: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for k, shape in enumerate([(1, 1), (3, 5), (7,), (16, 16), (2, 2, 3)]):
        g = torch.randn(shape, generator=gen) * 10.0 ** (k - 2)
        m = torch.randn(shape, generator=gen) * 10.0 ** (2 - k)
        v = torch.rand(shape, generator=gen) * 10.0 ** k
        if edge == "nan" and k == 1:
            g.view(-1)[2] = float("nan")
        if edge == "inf" and k == 3:
            g[0, 1] = -float("inf")
        if edge == "negative" and k == 2:  # every entry negative: the largest magnitude is the smallest entry
            g, m = -g.abs() - 1.0, -m.abs() - 1.0
        out.append((g, m, v))
    return out


@pytest.mark.parametrize("edge", ["plain", "nan", "inf", "negative"])
@pytest.mark.parametrize("checked", [True, False])
def test_small_blocks_bounds_are_each_blocks_own(edge, checked):
    """The extremes of many small blocks read together are those read block by block: the same floats,
    NaN where a gradient holds one, from the step's gradient check or from the blocks themselves."""
    blocks = _blocks(torch.Generator().manual_seed(6), edge)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g, _, _ in blocks]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw")
    for p, (g, _, _) in zip(params, blocks):
        p.grad = g
    if checked:
        opt._all_finite()  # the step's check of the gradients, whose extremes the bounds then reuse
        assert all(opt._checked(p.grad) is not None for p in params)
    together = opt._adam_bounds_small([(p.grad, m, v) for p, (_, m, v) in zip(params, blocks)])
    alone = [opt._adam_bounds(p.grad, m, v) for p, (_, m, v) in zip(params, blocks)]
    assert len(together) == len(alone) == len(blocks)
    for a, b in zip(together, alone):
        for x, y in zip(a, b):
            assert (math.isnan(x) and math.isnan(y)) or x == y
    g, m, v = blocks[2]
    assert together[2] == (g.abs().max().item() if edge != "nan" else together[2][0], m.abs().max().item(), v.max().item())
    if edge == "nan":
        assert math.isnan(together[1][0])


# -- the in-place certificate: compose.adam_block_is_safe --------------------------------------

from hypothesis import given, settings
from hypothesis import strategies as st

magnitude = st.one_of(st.just(0.0), st.floats(min_value=-30, max_value=38.5).map(lambda e: 10.0**e))


@settings(max_examples=300, deadline=None)
@given(
    g_abs=magnitude, m_abs=magnitude, v_max=magnitude,
    eps=st.sampled_from([1e-30, 1e-12, 1e-8, 1e-3]),
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
    beta2=st.sampled_from([0.0, 0.5, 0.95, 0.999]),
    t=st.integers(1, 5),
    placement=st.sampled_from(["before_correction", "after_correction"]),
    bias_correction=st.booleans(),
)
def test_a_certified_block_stays_finite_at_its_worst(g_abs, m_abs, v_max, eps, beta1, beta2, t, placement, bias_correction):
    """Blocks that reach the bounds in every sign pattern (the largest entries of each tensor, the smallest
    denominator): where the certificate holds, the moments and the direction come out finite."""
    cfg = kronopt.config.with_overrides(kronopt.PRESETS["adamw"], 
        {"inner.eps": eps, "inner.betas": [beta1, beta2], "inner.eps_placement": placement,
         "inner.bias_correction": bias_correction}
    ).bound()
    if not compose.adam_block_is_safe(cfg, t, torch.float32, g_abs, m_abs, v_max):
        return
    f32 = lambda x: min(torch.tensor(x, dtype=torch.float32).item(), x)  # a bound the float32 entries keep  # noqa: E731
    g = torch.tensor([f32(g_abs), -f32(g_abs), f32(g_abs), -f32(g_abs), 0.0, 0.0])
    m = torch.tensor([f32(m_abs), -f32(m_abs), -f32(m_abs), f32(m_abs), f32(m_abs), 0.0])
    v = torch.tensor([f32(v_max), f32(v_max), 0.0, 0.0, 0.0, 0.0])
    out = tuple(torch.empty(1, 6) for _ in range(3))
    D = compose.adam_block(cfg, t, m[None], v[None], g[None], out)
    for x in (*out[:2], D):
        assert torch.isfinite(x).all()


extreme = st.one_of(magnitude, magnitude.map(lambda x: -x), st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(extreme, extreme, extreme, extreme, magnitude), min_size=1, max_size=12),
    eps=st.sampled_from([0.0, 1e-30, 1e-8, 1e-3]),
    beta1=st.sampled_from([0.0, 0.9, 0.999]),
    t=st.integers(1, 4),
    bias_correction=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_blocks_judged_together_get_each_blocks_own_verdict(rows, eps, beta1, t, bias_correction, dtype):
    """``adam_blocks_are_safe`` against ``adam_block_is_safe`` block by block, on extremes of every size and sign,
    NaN and infinities (an infinite gradient's both ends among them), ``eps = 0`` and no bias correction: the same
    verdict for each. The bounds are the scalar form's ``max |g|`` (NaN where ``g`` holds one), ``max |m|``."""
    cfg = kronopt.config.with_overrides(
        kronopt.PRESETS["adamw"], {"inner.eps": eps, "inner.betas": [beta1, 0.99], "inner.bias_correction": bias_correction}
    ).bound()
    terms = compose.adam_safety_terms(cfg, t, dtype)
    together = compose.adam_blocks_are_safe(
        torch.tensor(rows, dtype=torch.float64), torch.tensor([terms] * len(rows), dtype=torch.float64)
    ).tolist()
    one_by_one = []
    for g_lo, g_hi, m_lo, m_hi, v_hi in rows:
        g_abs = math.nan if math.isnan(g_lo + g_hi) else max(-g_lo, g_hi)  # KronOptimizer's _bounds
        one_by_one.append(compose.adam_block_is_safe(cfg, t, dtype, g_abs, max(-m_lo, m_hi), v_hi))
    assert together == one_by_one


@pytest.mark.parametrize(
    "g_abs, m_abs, v_max",
    [(1e20, 0.0, 0.0), (0.0, 0.0, 3e38), (float("nan"), 1.0, 1.0), (float("inf"), 1.0, 1.0), (1.0, 1e35, 1.0)],
)
def test_no_certificate_near_overflow_or_for_a_non_finite_gradient(g_abs, m_abs, v_max):
    """g² overflows; v is at the edge; a NaN or infinite gradient; m / eps overflows (eps = 1e-8)."""
    cfg = kronopt.PRESETS["adamw"].bound()
    assert not compose.adam_block_is_safe(cfg, 1, torch.float32, g_abs, m_abs, v_max)


def test_no_certificate_without_eps():
    cfg = kronopt.config.with_overrides(kronopt.PRESETS["adamw"], {"inner.eps": 0.0}).bound()
    assert not compose.adam_block_is_safe(cfg, 1, torch.float32, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("fused", [True, False])
def test_scratch_made_under_inference_mode_serves_the_steps_outside_it(monkeypatch, fused):
    """The kept scratch of the block-by-block form (a block not proven finite, or no fused kernel) is made outside
    ``inference_mode`` even by a step inside it: a later step outside it writes into it (an inference tensor
    refuses an in-place write there). Gradients of 1e30 overflow the second moment, so no block is proven."""
    monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", fused)
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw", nonfinite="skip")
    for step in range(3):
        for p in params:
            p.grad = torch.full((64, 64), 1e30) if step < 2 else torch.randn(64, 64)
        if step == 0:
            with torch.inference_mode():
                opt.step()
        else:
            opt.step()
    assert opt.nonfinite_counts() == {"p0": 2, "p1": 2}
    assert all(torch.isfinite(p).all() for p in params)


def test_grad_check_rows_are_each_gradients_own_in_order():
    """``_GradChecks.rows``: the rows asked for, in order, whether they are one table's rows in turn (a slice), one
    table's in another order or with gaps, or two tables' (a stack). Would catch a slice taken where the rows are
    not in turn (a gap, another order, another table)."""
    from kronopt.optimizer import _GradChecks

    a = _GradChecks(torch.arange(12.0).view(6, 2), torch.tensor([True, False, True, True, False, True]), None)
    b = _GradChecks(torch.arange(100.0, 106.0).view(3, 2), torch.tensor([False, True, True]), None)
    for hits in ([(a, 1), (a, 2), (a, 3)], [(a, 4), (a, 0), (a, 5)], [(a, 0), (a, 2)], [(a, 5), (b, 0), (a, 1)], [(b, 2)]):
        expected_extremes = torch.stack([t.extremes[k] for t, k in hits])
        expected_each = torch.stack([t.each[k] for t, k in hits])
        assert torch.equal(_GradChecks.rows(hits, "extremes"), expected_extremes), hits
        assert torch.equal(_GradChecks.rows(hits, "each"), expected_each), hits


def test_plain_adamw_with_large_blocks_between_small_ones_equals_torch_adamw():
    """Small blocks checked with large ones between them (their rows of the gradient check with gaps: a stack, not
    a slice) and a bucket of several groups' blocks: torch's AdamW to float64 rounding. Would catch rows of another
    gradient's check taken for a block (a wrong bound lets a block skip the guard or take the slow path wrongly)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(4, 4), (200, 200), (4, 4), (7,), (200, 200), (7,), (4, 4)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[0::2], "lr": 3e-3, "weight_decay": 0.1}, {"params": ps[1::2], "lr": 1e-3, "weight_decay": 0.0}]  # noqa: E731
    opt = kronopt.build(groups(ours), "adamw")
    ref = torch.optim.AdamW(groups(theirs))
    for _ in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
