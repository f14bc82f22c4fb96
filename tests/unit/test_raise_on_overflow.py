"""``nonfinite = "raise"`` where every gradient is finite but a block's update or new state overflows: the block is
skipped as under ``"warn"`` and ``step()`` raises at its end, naming it, instead of skipping it in silence."""

import warnings

import pytest
import torch

import kronopt

PRESETS = ["adamw", "soap", "kl_shampoo", "dykaf", "shampoo"]


def _params():
    gen = torch.Generator().manual_seed(0)
    return [
        ("big.weight", torch.nn.Parameter(torch.randn(6, 5, generator=gen))),
        ("small.weight", torch.nn.Parameter(torch.randn(6, 5, generator=gen))),
        ("other.weight", torch.nn.Parameter(torch.randn(4, 3, generator=gen))),
    ]


def _grads(named, gen, *, huge: bool):
    """Finite gradients; with ``huge`` the first one's entries are 1e30, whose squares (Adam's second moment,
    a Gram factor) overflow float32."""
    for i, (_, p) in enumerate(named):
        g = torch.randn(p.shape, generator=gen)
        p.grad = g * 1e30 if huge and i == 0 else g


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", PRESETS)
def test_an_overflowing_update_raises_at_the_end_of_its_step_and_the_others_step(preset, scope):
    named = _params()
    opt = kronopt.build(named, preset, nonfinite="raise", nonfinite_scope=scope, lr=1e-2)
    twin_named = _params()
    twin = kronopt.build(twin_named, preset, nonfinite="warn", nonfinite_scope=scope, lr=1e-2)
    gen, twin_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):  # past SOAP's first call, which only observes
        _grads(named, gen, huge=False)
        _grads(twin_named, twin_gen, huge=False)
        opt.step()
        twin.step()
    before = [p.detach().clone() for _, p in named]
    _grads(named, gen, huge=True)
    _grads(twin_named, twin_gen, huge=True)
    with pytest.raises(FloatingPointError, match=r"overflowed \(non-finite\) in: big\.weight;") as info:
        opt.step()
    assert "small.weight" not in str(info.value) and "other.weight" not in str(info.value)
    assert torch.equal(named[0][1].detach(), before[0])  # the overflowed block is untouched
    assert not torch.equal(named[1][1].detach(), before[1])  # the others took the step
    with warnings.catch_warnings(record=True) as caught:  # the same step under "warn": the same values
        warnings.simplefilter("always")
        twin.step()
        twin.flush_warnings()
    assert any("non-finite gradient or update" in str(w.message) and "big.weight" in str(w.message) for w in caught)
    for (_, a), (_, b) in zip(named, twin_named):
        assert torch.equal(a.detach(), b.detach())
    assert opt.nonfinite_counts() == twin.nonfinite_counts()
    _grads(named, gen, huge=False)  # training goes on after the error, with nothing pending
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert all(torch.isfinite(p).all() for _, p in named)


def test_a_non_finite_gradient_still_raises_before_anything_changes():
    named = _params()
    opt = kronopt.build(named, "soap", nonfinite="raise")
    gen = torch.Generator().manual_seed(2)
    _grads(named, gen, huge=False)
    opt.step()
    before = [p.detach().clone() for _, p in named]
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if isinstance(v, torch.Tensor)}
    _grads(named, gen, huge=False)
    named[2][1].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or Inf\) in: other\.weight; no parameter"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for (_, p), b in zip(named, before))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in state.items())
