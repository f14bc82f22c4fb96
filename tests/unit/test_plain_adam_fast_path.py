"""The plain AdamW fast path (``compose.adam_step`` on raw gradients, guarded by the new second moment)
against the general path (``compose.step`` on sanitized gradients, every changed tensor checked), bit for bit.

The general path is forced by making ``compose.is_plain_adam`` answer False while that optimizer is built
and stepped; both optimizers see the same gradients, including a NaN block, an infinite single block and
a finite block whose square overflows float32.
"""

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
