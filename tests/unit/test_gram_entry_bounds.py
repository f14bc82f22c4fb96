"""The proof behind a deferred Gram update (``linalg.gram_update_bound``): a bound on the new factor's entries from the
old factor's largest entry, carried from the write that made it or read, never from its diagonal alone.

A factor loaded from a checkpoint or edited need not be PSD: a NaN or an infinity off its diagonal passed the
diagonal's proof, the update was left to the state write and wrote the NaN into the state unseen, where the same
step made in the step was refused by the guard (the block skipped, its state kept). These tests pin the same steps
either way, the carried bound against the entries it bounds, and when it is read again."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as kopt

# a pair whose long side takes tiles (520: the tiled deferral), a block whose two sides are dense and deferred (200,
# 150: from linalg._DEFER_DENSE_MIN), and a small one (not deferred)
SHAPES = [(520, 24), (520, 24), (200, 150), (40, 40)]


def _steps(opt, params, g, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _corrupted_run(preset, defer, value, monkeypatch):
    """4 steps, the state saved with ``value`` written off the diagonal of two factors (the tiled left side of the
    pair's first block, the dense right side of the 200 × 150 block), loaded into a new optimizer, 5 steps more.
    Returns the parameters, the optimizer and how many updates each state write deferred."""
    monkeypatch.setattr(kopt, "_DEFER_FACTOR_UPDATES", defer)
    seen = []
    real = compose.run_deferred_

    def spy(deferred, write, **kw):
        seen.append(len(deferred))
        return real(deferred, write, **kw)

    monkeypatch.setattr(compose, "run_deferred_", spy)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    named = [(f"blocks.{i}.weight", p) for i, p in enumerate(params)]
    settings_ = {"refresh.every": 3, "nonfinite_scope": "block", "nonfinite": "skip"}
    first = kronopt.build(named, preset, **settings_)
    _steps(first, params, g, 4)
    saved = first.state_dict()
    saved["state"][0]["factors.L"][3, 7] = value
    saved["state"][2]["factors.R"][9, 2] = value
    opt = kronopt.build(named, preset, **settings_)
    opt.load_state_dict(saved)
    seen.clear()
    _steps(opt, params, g, 5)
    return params, opt, seen


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_loaded_factor_with_nan_or_inf_off_its_diagonal_steps_as_without_deferral(preset, value, monkeypatch):
    """Deferral on and off give the same parameters and state bit for bit (NaN where NaN), the corrupted blocks are
    skipped at every step (their parameters unmoved, their factors as loaded), and the clean blocks' updates are
    still deferred. Against the diagonal's proof the first two fail: the corrupted blocks step and write the NaN."""
    new_params, new_opt, seen = _corrupted_run(preset, True, value, monkeypatch)
    old_params, old_opt, none = _corrupted_run(preset, False, value, monkeypatch)
    assert not any(none) and any(seen)
    for a, b in zip(new_params, old_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(new_params, old_params):
        for key, a in new_opt.state[p].items():
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, old_opt.state[q][key], rtol=0, atol=0, equal_nan=True, msg=key)
    counts = [int(new_opt.state[p]["nonfinite"]) for p in new_params]
    assert counts[0] == counts[2] == 5 and counts[1] == counts[3] == 0
    kept = new_opt.state[new_params[0]]["factors.L"][3, 7].item()
    assert math.isnan(kept) if math.isnan(value) else kept == value


def _psd(b, m, g, scale=1.0):
    B = torch.randn(b, m, m + 3, generator=g)
    return linalg.sym(B @ B.mT) * scale


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16), m=st.sampled_from([130, 160, 520]), steps=st.integers(1, 6),
    scales=st.lists(st.floats(min_value=-20.0, max_value=15.0), min_size=6, max_size=6), beta=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    one_row=st.booleans(),
)
def test_the_carried_bound_holds_every_entry_of_the_factor_it_was_left_with(seed, m, steps, scales, beta, one_row):
    """Deferred updates in a row, each into the stack itself: after each, the bound kept for the stack is at least
    every entry's magnitude (``one_row``: the increment's energy on one entry, where the bound is tight but for its
    rounding), and the next proof takes it without reading the stack."""
    g = torch.Generator().manual_seed(seed)
    X = _psd(2, m, g)
    for k in range(steps):
        A = torch.randn(2, m, 7, generator=g) * 10.0 ** scales[k]
        if one_row:
            A[:, 1:] = 0.0
        defer = []
        assert linalg.accumulate_gram_left(X, A, beta, 1.0 - beta if beta < 1 else 1.0, defer=defer) is X
        if not defer:  # not proven finite: made in the step (the guard's case)
            return
        defer[0].into(X)
        kept = linalg._ENTRY_BOUNDS.get(X)
        assert kept is not None
        assert (X.abs().flatten(1).amax(1) <= kept).all(), (X.abs().flatten(1).amax(1), kept)


def test_the_bound_is_read_again_after_an_edit_a_copy_or_a_write_elsewhere():
    """A bound is kept only for the stack the deferred write went into, at the version counter it left: an in-place
    edit, a clone, and a write into another tensor (the masked path) leave none; an edit's NaN then fails the proof."""
    g = torch.Generator().manual_seed(1)
    X, A = _psd(2, 200, g), torch.randn(2, 200, 9, generator=g)
    defer = []
    linalg.accumulate_gram_left(X, A, 0.9, 0.1, defer=defer)
    other = torch.empty_like(X)
    defer[0].into(other)
    assert linalg._ENTRY_BOUNDS.get(other) is None and linalg._ENTRY_BOUNDS.get(X) is None
    defer[0].into(X)
    assert linalg._ENTRY_BOUNDS.get(X) is not None
    assert linalg._ENTRY_BOUNDS.get(X.clone()) is None
    X[1, 4, 5] = math.nan  # off the diagonal: the diagonal's proof passed it
    assert linalg._ENTRY_BOUNDS.get(X) is None
    assert linalg.gram_update_finite(X, A, 0.9, 0.1).tolist() == [True, False]
    defer = []
    assert linalg.accumulate_gram_left(X, A, 0.9, 0.1, defer=defer) is not X and not defer


def test_a_freed_stack_leaves_no_bound_behind():
    """The kept bounds hold their stacks weakly and go with them."""
    g = torch.Generator().manual_seed(2)
    X, A = _psd(1, 160, g), torch.randn(1, 160, 5, generator=g)
    defer = []
    linalg.accumulate_gram_left(X, A, 0.9, 0.1, defer=defer)
    defer[0].into(X)
    key = id(X)
    assert key in linalg._ENTRY_BOUNDS._held
    del X, defer
    assert key not in linalg._ENTRY_BOUNDS._held


def test_an_inference_stack_is_read_every_time():
    """A stack made under ``torch.inference_mode`` keeps no version counter: no bound is kept for it."""
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        X, A = _psd(1, 160, g), torch.randn(1, 160, 5, generator=g)
        defer = []
        linalg.accumulate_gram_left(X, A, 0.9, 0.1, defer=defer)
        defer[0].into(X)
        assert linalg._ENTRY_BOUNDS.get(X) is None
