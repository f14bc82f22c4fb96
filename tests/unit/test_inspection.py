"""kronopt.inspection: KronOptimizer.inspect() reads factors, bases, eigenvalues and records through the stage contracts."""

import pytest
import torch

import kronopt
from tests.strategies import generator, randn


def _feed(params, gen, dtype=torch.float64):
    for p in params:
        p.grad = randn(gen, *p.shape, dtype=dtype)


def test_adamw_second_moment_and_records_match_closed_forms():
    gen = generator(0)
    W = torch.nn.Parameter(randn(gen, 5, 3))
    opt = kronopt.build([("w", W)], "adamw", **{"inner.betas": [0.9, 0.99]})
    assert opt.inspect() == {}  # no state before the first step
    _feed([W], gen)
    g = W.grad.clone()
    opt.step()
    view = opt.inspect()["w"]
    assert view.shape == (5, 3) and view.step == 1 and view.pipeline == "main"
    torch.testing.assert_close(view.second_moment, 0.01 * g.square(), rtol=1e-14, atol=0)
    torch.testing.assert_close(view.records["inner"]["exp_avg"], 0.1 * g, rtol=1e-14, atol=0)
    assert view.left.basis is None and view.right.basis is None  # the identity basis keeps none
    assert view.spectrum("left") is None


def test_soap_eigenvalues_are_those_of_the_first_factor():
    gen = generator(1)
    W = torch.nn.Parameter(randn(gen, 6, 4))
    opt = kronopt.build([("w", W)], "soap")
    _feed([W], gen)
    G = W.grad.clone()
    opt.step()  # the first call builds L = (1-β) G Gᵀ and its eigenbasis
    view = opt.inspect()["w"]
    L = 0.05 * G @ G.mT
    torch.testing.assert_close(view.left.factor, L, rtol=1e-12, atol=1e-14)
    expected = torch.linalg.eigvalsh(L).flip(0)
    torch.testing.assert_close(view.left.eigvals, expected, rtol=1e-10, atol=1e-14)
    Q = view.left.basis
    torch.testing.assert_close(Q.mT @ L @ Q, torch.diag(expected), rtol=1e-10, atol=1e-12)
    assert view.second_moment is not None and view.second_moment.shape == (6, 4)


def test_restricted_side_shows_its_subspace_flat_value_and_whole_spectrum():
    gen = generator(2)
    W = torch.nn.Parameter(randn(gen, 6, 12))
    opt = kronopt.build([("blocks.0.weight", W)], "pro_kl_shampoo", **{"split.rank": 3})
    for _ in range(4):
        _feed([W], gen)
        opt.step()
    view = opt.inspect()["blocks.0.weight"]
    right = view.right
    assert right.kind == "restricted" and right.rank == 3
    assert right.basis.shape == (12, 3) and right.eigvals.shape == (3,) and right.flat.ndim == 0
    torch.testing.assert_close(right.basis.mT @ right.basis, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    spectrum = view.spectrum("right")
    assert spectrum.shape == (12,)  # r tracked values + (d - r) copies of μ
    assert (spectrum == right.flat).sum() >= 9
    # the tracked values come from the kl estimator (λ = 1/s²), not from the basis
    s_R = view.records["factors"]["s_R"]
    torch.testing.assert_close(right.eigvals, 1.0 / s_R.square())


def test_a_plugin_inner_rule_shows_up():
    pytest.importorskip("kronopt_example_plugin")
    gen = generator(3)
    W = torch.nn.Parameter(randn(gen, 4, 4))
    opt = kronopt.build([("w", W)], "soap", **{"inner.type": "sign_momentum", "inner.momentum": 0.5})
    for _ in range(2):
        _feed([W], gen)
        opt.step()
    view = opt.inspect()["w"]
    assert set(view.records["inner"]) == {"momentum_buffer"}  # the plugin's own record
    assert view.second_moment is None  # it declares none
    assert view.left.eigvals is not None  # the basis still reports its estimates


def test_views_are_copies_and_one_per_block_of_a_bucket():
    gen = generator(4)
    params = [torch.nn.Parameter(randn(gen, 3, 3)) for _ in range(3)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "soap")
    _feed(params, gen)
    opt.step()
    views = opt.inspect()
    assert sorted(views) == ["p0", "p1", "p2"]
    views["p1"].left.factor.zero_()
    assert opt.inspect()["p1"].left.factor.abs().sum() > 0
    for i, p in enumerate(params):  # each view is its own block
        torch.testing.assert_close(views[f"p{i}"].right.factor, 0.05 * p.grad.mT @ p.grad, rtol=1e-12, atol=1e-14)


def test_eigh_failures_counts_sides_not_refreshes(monkeypatch):
    """``eigh_failures()`` adds one per rotated side whose ``eigh`` failed at a refresh, as its docstring says.

    Catches a docstring that promises refreshes (a two-sided block would read double what it says) and a count
    that drifts from per-side: two failed refreshes give 4 on a block with both sides rotated and 2 on a block
    whose long right side is not rotated (``shapes.max_dim``)."""
    from kronopt import linalg

    gen = generator(5)
    two = torch.nn.Parameter(randn(gen, 6, 4))
    one = torch.nn.Parameter(randn(gen, 6, 40))
    opt = kronopt.build([("two", two), ("one", one)], "shampoo", **{"refresh.every": 1, "shapes.max_dim": 32})
    views = None
    real_eigh = linalg._eigh

    def fails(A):
        raise RuntimeError("forced eigh failure")

    for call in range(4):
        _feed([two, one], gen)
        monkeypatch.setattr(linalg, "_eigh", fails if call in (1, 2) else real_eigh)
        opt.step()
        if call == 0:
            views = opt.inspect()
    monkeypatch.setattr(linalg, "_eigh", real_eigh)
    assert (views["two"].right.kind, views["one"].right.kind) == ("full", "none")
    assert opt.eigh_failures() == {"two": 4, "one": 2}
    doc = " ".join(kronopt.KronOptimizer.eigh_failures.__doc__.split())
    assert "per side, not per refresh" in doc and "reads 4 after two failed refreshes" in doc
