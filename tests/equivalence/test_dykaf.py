"""The dykaf presets against the clean-room float64 reference of tests/reference/dykaf.py."""

import pytest
import torch

import kronopt
from kronopt import optimizer as kopt
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.dykaf import dykaf_reference

SHAPES = [(6, 4), (4, 6), (5, 5), (7,), (6, 4)]






KEYMAP = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "precondition_frequency": "refresh.every",
    "betas": "inner.betas",
    "shampoo_beta": "factors.beta",
    "max_precond_dim": "shapes.max_dim",
    "variant": "factors.variant",
    "init": "factors.init",
    "one_sided": "factors.one_sided",
}


@pytest.mark.parametrize(
    "options,first",
    [
        ({}, "single"),
        ({"precondition_frequency": 3, "weight_decay": 0.1, "lr": 1e-2}, "single"),
        ({"variant": "parallel", "precondition_frequency": 4}, "single"),
        ({"init": "kron_reference", "precondition_frequency": 5}, "single"),
        ({"init": "eps", "betas": (0.9, 0.99), "shampoo_beta": 0.9, "precondition_frequency": 4}, "surplus"),
        ({"init": "eps", "variant": "parallel"}, "surplus"),
        ({"init": "sum", "precondition_frequency": 5}, "surplus"),
        ({"max_precond_dim": 5, "precondition_frequency": 3}, "single"),
        ({"max_precond_dim": 5, "one_sided": "sum", "precondition_frequency": 3}, "single"),
    ],
)
def test_dykaf_preset_matches_reference(gen, options, first):
    options = {"lr": 3e-3, **options}  # the reference's (SOAP's) lr; the preset's default is tuned
    steps = 55
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps, first=first)
    ref = dykaf_reference(params, grads, **options)
    overrides = {KEYMAP[k]: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours_params, "dykaf", **overrides)
    ours = run_history(opt, ours_params, grads)
    assert not torch.equal(ours[-1][0], params[0])
    for k, (a_k, b_k) in enumerate(zip(ours, ref)):
        for i, (a, b) in enumerate(zip(a_k, b_k)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, k=k, i=i: f"call {k}, param {i}: {m}")


@pytest.mark.parametrize(
    "options,first",
    [
        ({}, "single"),
        ({"init": "eps", "precondition_frequency": 4}, "surplus"),
        ({"init": "sum", "shampoo_beta": 0.9, "precondition_frequency": 5}, "surplus"),
        ({"max_precond_dim": 5, "precondition_frequency": 3}, "single"),
        ({"max_precond_dim": 5, "one_sided": "sum", "precondition_frequency": 3}, "single"),
        ({"variant": "parallel", "precondition_frequency": 4}, "single"),
        ({"init": "eps", "variant": "parallel"}, "surplus"),
    ],
)
@pytest.mark.parametrize("together", [True, False], ids=["small-buckets-together", "bucket-by-bucket"])
def test_dykaf_with_bfloat16_products_matches_the_reference_rounding_them(gen, options, first, together, monkeypatch):
    """``factors.product_dtype = "bfloat16"``: the KSL step's four sandwich products (the parallel step's six; a
    one-sided block's Gram product) with bfloat16 operands and results, against the reference's §3 and §4
    pseudo-code rounding the same values by hand (tests/reference/dykaf.py, ``ksl_sandwich``, ``parallel_sandwich``);
    and measurably off the exact products' run."""
    if not together:
        monkeypatch.setattr(kopt, "_SMALL_TOGETHER_MAX", 0)
    options = {"lr": 3e-3, **options}
    steps = 30
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps, first=first)
    ref = dykaf_reference(params, grads, grams="bfloat16", **options)
    exact = dykaf_reference(params, grads, **options)
    overrides = {KEYMAP[k]: v for k, v in options.items()} | {"factors.product_dtype": "bfloat16"}
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    ours = run_history(kronopt.build(ours_params, "dykaf", **overrides), ours_params, grads)
    assert_histories_close(ours, ref)
    apart = max((a - b).abs().max().item() for a_k, b_k in zip(ours, exact) for a, b in zip(a_k, b_k))
    assert apart > 1e-6


@pytest.mark.parametrize("options", [{}, {"precondition_frequency": 3, "variant": "parallel"}])
def test_dykaf_rank1_preset_matches_reference(gen, options):
    options = {"lr": 3e-3, **options}  # the reference's lr; the preset's default is tuned
    steps = 50
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps, first="single")
    ref = dykaf_reference(params, grads, rank1=True, **options)
    overrides = {KEYMAP[k]: v for k, v in options.items()}
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    ours = run_history(kronopt.build(ours_params, "dykaf_rank1", **overrides), ours_params, grads)
    for k, (a_k, b_k) in enumerate(zip(ours, ref)):
        for i, (a, b) in enumerate(zip(a_k, b_k)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, k=k, i=i: f"call {k}, param {i}: {m}")


def test_first_call_leaves_parameters_bit_identical(gen):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    before = [p.detach().clone() for p in params]
    opt = kronopt.build(params, "dykaf", weight_decay=0.5)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_one_dimensional_parameters_follow_the_soap_path(gen):
    shapes = [(7,), (3,), (1,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(25)]
    runs = []
    for preset in ("soap", "dykaf"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        runs.append(run_history(kronopt.build(ps, preset, **{"refresh.every": 3}), ps, grads))
    for a_k, b_k in zip(*runs):
        for a, b in zip(a_k, b_k):
            assert torch.equal(a, b)


def test_forcing_the_ema_estimator_gives_the_soap_preset():
    cfg = kronopt.resolve("dykaf", **{"factors.type": "ema", "factors.beta": 0.95})
    assert cfg == kronopt.PRESETS["soap"]


def test_zero_first_gradient_leaves_the_block_uninitialised(gen):
    W = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    opt = kronopt.build([W], "dykaf", weight_decay=0.0)
    before = W.detach().clone()
    W.grad = torch.zeros(6, 4, dtype=torch.float64)
    opt.step()
    assert torch.equal(W, before)
    (bucket,) = opt._buckets
    assert not bucket.state.factors.initialised.any()
    assert torch.equal(bucket.state.factors.L, torch.zeros(1, 6, 6, dtype=torch.float64))
    G = torch.outer(torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64))
    W.grad = G
    opt.step()
    assert bucket.state.factors.initialised.all()
    # started from this (rank-one) gradient: exactly the kron start, (1 − β) G ⊗ G's NKP
    L, R = bucket.state.factors.L[0], bucket.state.factors.R[0]
    U, S, Vh = torch.linalg.svd(G)
    expected = 0.05 * S[0] ** 2 * torch.kron(torch.outer(U[:, 0], U[:, 0]), torch.outer(Vh[0], Vh[0]))
    torch.testing.assert_close(torch.kron(L, R), expected, rtol=1e-10, atol=1e-12)
