"""The pro_soap preset against the float64 clean-room reference ``tests/reference/pro_soap.py``.

Step for step (every parameter after every call), float64 state and Newton–Schulz, 50 calls with a refresh every
3–5 updates, over a wide (6×8), a tall (8×6) and a square (7×7) block, both restricted sides (and "larger"), ranks
0–3.  ``rtol = 1e-10, atol = 1e-12``.
"""

import pytest
import torch

import kronopt
from tests.equivalence._helpers import assert_histories_close, pro_adam_overrides, reference_grads, run_history
from tests.reference.pro_soap import pro_soap_reference

SHAPES = [(6, 8), (8, 6), (7, 7)]
STEPS = 50


pytestmark = pytest.mark.usefixtures("one_thread")


_overrides = pro_adam_overrides


CASES = [
    pytest.param({"rank": 2, "side": "right", "precondition_frequency": 3}, id="right-r2"),
    pytest.param({"rank": 3, "side": "left", "precondition_frequency": 4}, id="left-r3"),
    pytest.param({"side": "larger", "precondition_frequency": 5}, id="larger-default-rank"),
    pytest.param({"rank": 0, "side": "right", "precondition_frequency": 3}, id="rank0"),
    pytest.param(
        {"rank": 2, "side": "larger", "precondition_frequency": 4, "betas": (0.9, 0.99), "shampoo_beta": 0.8,
         "complement_mult": 0.5, "weight_decay": 0.1, "ns_steps": 7},
        id="larger-betas-mult",
    ),
]


@pytest.mark.parametrize("options", CASES)
def test_pro_soap_matches_reference(options):
    gen = torch.Generator().manual_seed(20261130)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = reference_grads(gen, SHAPES, STEPS)
    ref = pro_soap_reference(params, grads, lr=1e-2, **options)
    ours_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(ours_params)], "pro_soap", **_overrides(options))
    sides = [b["sides"] for b in opt.bucket_summary()]
    assert all("restricted" in s for s in sides), sides  # the restricted path is what runs
    ours = run_history(opt, ours_params, grads)
    for p, q in zip(ours[-1], params):
        assert (p - q).abs().max() > 1e-2  # the parameters really moved
    assert_histories_close(ours, ref, rtol=1e-10, atol=1e-12)
