"""Factor updates made at the state write (``linalg.DeferredWrite``, ``compose.run_deferred_``): the same
bits as in the step.

On a CPU, a tiled Gram update of a factor that nothing later in the call reads is left to the
optimizer's state write, which computes it into the factor's stack in place once it knows the
written blocks. Each test runs the same steps both ways (``optimizer._DEFER_FACTOR_UPDATES``) and
finds the same parameters and state bit for bit: every block written, a block skipped for a NaN
gradient (the masked path), a block whose factor would overflow (predicted from a bound on its entries, ``linalg.gram_update_bound``).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as kopt

# two blocks of one shape (a bucket of two) with a left side that takes tiles, and a right side that does
SHAPES = [(520, 24), (520, 24), (24, 530), (40, 40)]


def _run(preset, defer, monkeypatch, *, bad=(), steps=9):
    """``steps`` steps of ``preset`` on SHAPES; ``bad``: ``(step, param, value)`` written into a gradient entry.
    Returns the parameters, the optimizer and what each state write ran: ``(deferred count, every block written)``."""
    monkeypatch.setattr(kopt, "_DEFER_FACTOR_UPDATES", defer)
    seen = []
    real = compose.run_deferred_

    def spy(deferred, write, **kw):
        seen.append((len(deferred), bool(write.all())))
        return real(deferred, write, **kw)

    monkeypatch.setattr(compose, "run_deferred_", spy)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    opt = kronopt.build(
        [(f"blocks.{i}.weight", p) for i, p in enumerate(params)], preset,
        nonfinite_scope="block", nonfinite="skip", **{"refresh.every": 3},
    )
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            for step, which, value in bad:
                if (step, which) == (k, i):
                    p.grad[1, 2] = value
        opt.step()
    return params, opt, seen


def _state(opt, params):
    return [(k, v) for p in params for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "kl_soap", "dykaf"])
def test_deferred_factor_updates_give_the_same_bits(preset, monkeypatch):
    bad = [(4, 0, math.nan), (6, 1, 1e20)]  # block 0 of the pair skipped at 4, block 1 overflows its factor at 6
    new_params, new_opt, seen = _run(preset, True, monkeypatch, bad=bad)
    old_params, old_opt, none = _run(preset, False, monkeypatch, bad=bad)
    assert not none  # the switch really turns it off
    assert any(n and every for n, every in seen), "no update was made in place"
    assert any(n and not every for n, every in seen), "the masked path never ran"
    for a, b in zip(new_params, old_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    new_state, old_state = _state(new_opt, new_params), _state(old_opt, old_params)
    assert [k for k, _ in new_state] == [k for k, _ in old_state]
    for (key, a), (_, b) in zip(new_state, old_state):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
        assert torch.isfinite(a).all(), key
    # the skipped blocks kept their factors: a block's nonfinite count says it was skipped
    assert [int(new_opt.state[p]["nonfinite"]) for p in new_params[:2]] == [1, 1]


def test_a_factor_update_the_direction_reads_is_never_deferred(monkeypatch):
    """shampoo updates its factors before the direction (``factor_update = "before"``): nothing is deferred."""
    _, _, seen = _run("shampoo", True, monkeypatch, steps=5)
    assert seen == []  # (soap on the same blocks defers: the test above)


def test_the_factor_view_is_updated_in_place(monkeypatch):
    """``optimizer.state[p]``'s factor is the same tensor across steps, and a deferred update reaches it."""
    params, opt, _ = _run("soap", True, monkeypatch, steps=4)
    L = opt.state[params[0]]["factors.L"]
    before = L.clone()
    params[0].grad = torch.randn(params[0].shape)
    for p in params[1:]:
        p.grad = torch.randn(p.shape)
    opt.step()  # update 4 of refresh.every 3: no refresh follows, so the update is deferred
    assert opt.state[params[0]]["factors.L"] is L
    beta = opt.config.factors.beta
    expected = beta * before.double() + (1 - beta) * params[0].grad.double() @ params[0].grad.double().T
    torch.testing.assert_close(L.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_in_place_tiled_product_is_the_fresh_ones_bits(in_place, monkeypatch):
    """Deferred into the state itself or made fresh, the tiled update has the same bits: both accumulate each
    tile below the diagonal the same way, in its place in the result or apart (``linalg._tiles_in_place``;
    the two ways may round apart on a short last row of tiles, a side of 777 on two threads)."""
    monkeypatch.setattr(linalg, "_tiles_in_place", lambda: in_place)
    g = torch.Generator().manual_seed(3)
    for m, k in ((520, 30), (777, 300), (520, 1100)):
        A = torch.randn(2, m, k, generator=g)
        X = linalg.gram_left(torch.randn(2, m, 2 * m, generator=g))
        for beta in (0.9, torch.tensor([0.5, 2.0]).view(2, 1, 1)):
            fresh = linalg._tiled_sym_product(X, A, A, beta, 0.1)
            target = X.clone()
            assert linalg._tiled_sym_product(target, A, A, beta, 0.1, out=target) is target
            torch.testing.assert_close(target, fresh, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(min_value=-30.0, max_value=25.0), x_scale=st.floats(min_value=-30.0, max_value=38.0), seed=st.integers(0, 2**16))
def test_gram_update_finite_proves_the_new_value_finite(scale, x_scale, seed):
    """Proven finite ⇒ the new value is finite everywhere (and its diagonal below the share)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 12, 5, generator=g) * 10.0**scale
    B = torch.randn(2, 12, 12, generator=g)
    X = (linalg.gram_left(B) * 10.0**x_scale).float()
    if not torch.isfinite(X).all():
        return
    predicted = linalg.gram_update_finite(X, A, 0.9, 0.1)
    new = linalg.sym_product(X, A, A, beta=0.9, alpha=0.1)
    finite = torch.isfinite(new).flatten(1).all(1)
    assert not (predicted & ~finite).any()
    diagonal = torch.diagonal(new, dim1=-2, dim2=-1)
    assert not (predicted & (diagonal.abs().amax(-1) > torch.finfo(torch.float32).max / 8)).any()


def test_gram_update_finite_reads_a_transposed_operand_as_its_copy():
    """The proof reads ``A`` in its memory order: a transposed view gives the verdicts of its contiguous copy,
    and a block whose energy sits past the share in a single row is not proven."""
    g = torch.Generator().manual_seed(3)
    B = torch.randn(3, 5, 7, generator=g)
    B[2, :, 4] = 2.0**62  # one row of A = Bᵀ: ‖a_4‖² = 5 · 2^124, finite and past an eighth of float32's largest
    A = B.mT
    X = linalg.gram_left(torch.randn(3, 7, 7, generator=g))
    assert not A.is_contiguous()
    assert linalg.gram_update_finite(X, A, 0.9, 1.0).tolist() == linalg.gram_update_finite(X, A.contiguous(), 0.9, 1.0).tolist() == [True, True, False]


def test_gram_update_finite_counts_the_old_factor():
    """A factor whose own diagonal sits past the share is not proven finite, however small the increment."""
    X = torch.eye(4).expand(2, 4, 4).clone()
    X[1] *= 1e38  # past an eighth of float32's largest; β X itself still finite
    A = torch.full((2, 4, 3), 1e-3)
    assert linalg.gram_update_finite(X, A, 0.9, 0.1).tolist() == [True, False]


def test_gram_update_finite_sees_nan_and_inf_in_the_operand():
    A = torch.randn(3, 6, 4)
    A[1, 2, 3] = math.nan
    A[2, 0, 0] = math.inf
    X = linalg.gram_left(torch.randn(3, 6, 6))
    assert linalg.gram_update_finite(X, A, 0.9, 0.1).tolist() == [True, False, False]


def test_a_block_not_proven_finite_keeps_the_update_in_the_step(monkeypatch):
    """Deferred only where the prediction proves every block finite: otherwise the update is made in the step
    and judged by the guard as before (the same bits), and nothing of that bucket is deferred."""
    real = linalg.gram_update_finite

    def second_block_unproven(X, A, beta, alpha, **kw):
        flags = real(X, A, beta, alpha, **kw)
        return flags & torch.tensor([True, False]) if X.shape[0] == 2 else flags

    monkeypatch.setattr(linalg, "gram_update_finite", second_block_unproven)
    new_params, new_opt, seen = _run("soap", True, monkeypatch)
    old_params, old_opt, _ = _run("soap", False, monkeypatch)
    assert seen and all(n == 1 for n, _ in seen)  # the lone (24, 530) block's right side only, never the pair
    for a, b in zip(new_params, old_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (key, a), (_, b) in zip(_state(new_opt, new_params), _state(old_opt, old_params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def _single(preset, defer, monkeypatch, grads, shape, *, set_L=None):
    """One parameter of ``shape`` stepped on ``grads``; ``set_L``: ``(step, value)`` written into its factor L first."""
    monkeypatch.setattr(kopt, "_DEFER_FACTOR_UPDATES", defer)
    p = torch.nn.Parameter(torch.ones(shape))
    opt = kronopt.build([("w", p)], preset, nonfinite_scope="block", nonfinite="skip", **{"refresh.every": 10})
    for k, g in enumerate(grads):
        if set_L is not None and set_L[0] == k:
            opt.state[p]["factors.L"].copy_(set_L[1])
        p.grad = g.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    "case",
    ["tiny_then_large", "huge", "diagonal_near_overflow"],
)
def test_edge_cases_give_the_same_bits(case, monkeypatch):
    """Blocks near the edges of float32, where a prediction from norms or from the diagonal could differ from
    the values themselves: each runs as without deferral, and its state stays finite."""
    g = torch.Generator().manual_seed(0)
    if case == "tiny_then_large":  # ‖K‖ below float32's tiny, √S large: L's scale overflows
        preset, shape = "dykaf", (6, 6)
        g1, g2 = torch.zeros(shape), torch.zeros(shape)
        g1[0, 0], g2[0, 1] = 4.5e-20, 1e3
        grads, set_L = [g1, g2, g2, g2], None
    elif case == "huge":  # ‖K‖² overflows in float32 while K itself is finite
        preset, shape = "dykaf", (6, 6)
        grads, set_L = [torch.randn(shape, generator=g) * (1e11 if k == 2 else 1.0) for k in range(4)], None
    else:  # a finite PSD factor between an eighth of float32's largest number and overflow
        preset, shape = "soap", (520, 24)
        grads = [torch.randn(shape, generator=g) for _ in range(6)]
        set_L = (2, torch.eye(520) * (0.2 * torch.finfo(torch.float32).max))
    a, opt_a = _single(preset, True, monkeypatch, grads, shape, set_L=set_L)
    b, opt_b = _single(preset, False, monkeypatch, grads, shape, set_L=set_L)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (key, x), (_, y) in zip(_state(opt_a, [a]), _state(opt_b, [b])):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)
        assert torch.isfinite(x).all(), key
