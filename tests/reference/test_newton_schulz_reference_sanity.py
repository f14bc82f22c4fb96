"""Self-checks of the naive Newton–Schulz reference (never imports kronopt).

A misread spec would fail one of: the SVD closed form (NS acts on each normalized singular value by the
composed scalar quintic), torch.optim.Muon's own Newton–Schulz step (KellerJordan's coefficients, bfloat16),
or the composed-polynomial ranges of muon.md §4.
"""

from __future__ import annotations

import math

import pytest
import torch

from .newton_schulz import PUBLISHED, SHAPE_SCALES, coefficients, newton_schulz, scalar_iteration

F64 = torch.float64


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (1, 6)])
def test_reference_acts_on_normalized_singular_values(name, shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(name))
    X = torch.randn(*shape, generator=gen, dtype=F64) * 3.0
    P, S, Vh = torch.linalg.svd(X, full_matrices=False)
    coeffs = coefficients(name, 7)
    expected = P @ torch.diag(scalar_iteration(coeffs, S / torch.linalg.norm(X))) @ Vh
    torch.testing.assert_close(newton_schulz(X, coeffs), expected, rtol=1e-10, atol=1e-12)


def test_reference_extends_schedules_as_the_spec_says():
    assert coefficients("kj", 3) == [(3.4445, -4.7750, 2.0315)] * 3
    assert coefficients("quintic", 7)[5:] == [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377)]  # cycle
    assert coefficients("cans", 7)[5:] == [(2.2737, -1.6447, 0.4162)] * 2  # repeat last
    assert coefficients("deepseekv4", 11)[7:] == [(3.4445, -4.7750, 2.0315)] + [(2.0, -1.5, 0.5)] * 3
    assert [a for a, _, _ in coefficients("polar_express", 2)] == [pytest.approx(8.2872 / 1.01, abs=5e-5), 4.0664]


def test_reference_ranges_of_the_spec_table():
    # muon.md §4: kj, 5 steps maps [0.05, 1] into [0.682, 1.134]; deepseekv4, 10 steps: [0.01, 1] → [1, 1.0005]
    x = torch.linspace(0.05, 1.0, 20001, dtype=F64)
    y = scalar_iteration(coefficients("kj", 5), x)
    assert abs(y.min().item() - 0.682) < 5e-4 and abs(y.max().item() - 1.134) < 5e-4
    y = scalar_iteration(coefficients("deepseekv4", 10), torch.linspace(0.01, 1.0, 20001, dtype=F64))
    assert y.min().item() > 1.0 - 5e-5 and y.max().item() < 1.0005 + 5e-5


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_reference_matches_one_step_of_torch_muon(shape, adjust):
    # momentum 0, no Nesterov, no decay, lr 1: W ← W − s · NS_bf16(G), torch's quintic = KellerJordan's
    gen = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    G = torch.randn(*shape, generator=gen)
    before = W.detach().clone()
    opt = torch.optim.Muon([W], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn=adjust)
    W.grad = G.clone()
    opt.step()
    torch_update = (before - W.detach()).double()
    ours = SHAPE_SCALES[adjust](*shape) * newton_schulz(G.double(), coefficients("kj", 5))
    # bfloat16 has an 8-bit mantissa: 5 NS steps keep the result within a few 1e-2 relative
    rel = (torch_update - ours).norm() / ours.norm()
    assert rel < 3e-2, rel
    assert math.isclose(torch.linalg.norm(ours).item(), torch.linalg.norm(torch_update).item(), rel_tol=3e-2)
