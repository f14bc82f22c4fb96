"""The soap preset under ``rotation_dtype = "bfloat16"`` against the float64 reference rounding its rotations.

The reference (tests/reference/soap.py, ``rotations="bfloat16"``) rounds every operand and result of the
gradient's rotation and the direction's return to bfloat16 by hand, its sums exact. kronopt on float64 parameters
rounds the same values (a float64 block's narrow products run in its own kernels: ``linalg._narrow_emulated``), so
the two agree as closely as the float64 runs without the option do; the exact reference lies far off both.
"""

import pytest
import torch

import kronopt
from kronopt import optimizer as kopt
from tests.equivalence._helpers import assert_histories_close, reference_grads, run_history
from tests.reference.soap import soap_reference

SHAPES = [(6, 4), (4, 6), (5, 5), (7,), (9, 3)]


@pytest.mark.parametrize("together", [True, False], ids=["small-buckets-together", "bucket-by-bucket"])
@pytest.mark.parametrize("options", [{}, {"precondition_frequency": 3, "max_precond_dim": 5}])
def test_soap_with_bfloat16_rotations_matches_the_reference_rounding_them(gen, options, together, monkeypatch):
    if not together:  # the CPU's small buckets stepped one at a time, through the stages' own rotations
        monkeypatch.setattr(kopt, "_SMALL_TOGETHER_MAX", 0)
    steps = 30
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps)
    ref = soap_reference(params, grads, lr=3e-3, rotations="bfloat16", **options)
    exact = soap_reference(params, grads, lr=3e-3, **options)
    overrides = {"lr": 3e-3, "rotation_dtype": "bfloat16"}
    if "precondition_frequency" in options:
        overrides |= {"refresh.every": options["precondition_frequency"], "shapes.max_dim": options["max_precond_dim"]}
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build(ours_params, "soap", **overrides)
    ours = run_history(opt, ours_params, grads)
    assert_histories_close(ours, ref)
    # the rounding shows: the exact reference is off by far more than the comparison's tolerance
    apart = max((a - b).abs().max().item() for a_k, b_k in zip(ours, exact) for a, b in zip(a_k, b_k))
    assert apart > 1e-6


@pytest.mark.parametrize("together", [True, False], ids=["small-buckets-together", "bucket-by-bucket"])
@pytest.mark.parametrize("rotations", ["exact", "bfloat16"])
def test_soap_with_bfloat16_gram_products_matches_the_reference_rounding_them(gen, rotations, together, monkeypatch):
    """``factors.product_dtype = "bfloat16"`` (the EMA's Gram products: the gradient and each product rounded), alone
    and with the rotations narrowed too, against the reference rounding the same values by hand."""
    if not together:
        monkeypatch.setattr(kopt, "_SMALL_TOGETHER_MAX", 0)
    steps = 30
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, steps)
    ref = soap_reference(params, grads, lr=3e-3, rotations=rotations, grams="bfloat16")
    exact_grams = soap_reference(params, grads, lr=3e-3, rotations=rotations)
    overrides = {"lr": 3e-3, "rotation_dtype": "compute" if rotations == "exact" else "bfloat16",
                 "factors.product_dtype": "bfloat16"}
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    ours = run_history(kronopt.build(ours_params, "soap", **overrides), ours_params, grads)
    assert_histories_close(ours, ref)
    apart = max((a - b).abs().max().item() for a_k, b_k in zip(ours, exact_grams) for a, b in zip(a_k, b_k))
    assert apart > 1e-6
