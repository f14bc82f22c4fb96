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


def _run(monkeypatch, *, fast: bool, scope: str, calls: list[int]):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(compose, "is_plain_adam", lambda *a: False)
        real = compose.adam_step

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)

        patch.setattr(compose, "adam_step", counted)
        opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "adamw", nonfinite_scope=scope, lr=0.05)
        gen = torch.Generator().manual_seed(2)
        for step in range(7):
            for p, g in zip(params, _grads(step, gen)):
                p.grad = g
            opt.step()
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts()


@pytest.mark.parametrize("scope", ["block", "step"])
def test_fast_path_matches_the_general_path_bit_for_bit(monkeypatch, scope):
    fast_calls, slow_calls = [], []
    fast = _run(monkeypatch, fast=True, scope=scope, calls=fast_calls)
    slow = _run(monkeypatch, fast=False, scope=scope, calls=slow_calls)
    assert fast_calls and not slow_calls  # each optimizer took the path it was meant to
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b)
    assert fast[1].keys() == slow[1].keys()
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys()
        for key in fast[1][i]:
            assert torch.equal(fast[1][i][key], slow[1][i][key]), (i, key)
            if fast[1][i][key].is_floating_point():
                assert torch.isfinite(fast[1][i][key]).all()
    assert fast[2] == slow[2]
    if scope == "block":  # p0: -inf at step 3; p1: NaN at step 2; p2: overflow at step 4; p3: inf; p4: overflow
        assert fast[2] == {"p0": 1, "p1": 1, "p2": 1, "p3": 1, "p4": 1}


def test_a_skipped_block_keeps_its_state_and_weights_exactly(monkeypatch):
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
