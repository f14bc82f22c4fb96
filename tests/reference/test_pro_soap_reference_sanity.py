"""Sanity checks of the Pro-SOAP reference itself (``tests/reference/pro_soap.py``), against hand formulas."""

import math

import torch

from tests.reference.pro_kl_shampoo import newton_schulz, ns_schedule
from tests.reference.pro_soap import ProSoapState, pro_soap_reference

F64 = torch.float64


def test_rank_zero_is_the_orthogonalized_momentum_at_unit_rms():
    """r = 0: no subspace block; the step is √(mn)·NS(M)/‖NS(M)‖ (complement only, RMS 1)."""
    gen = torch.Generator().manual_seed(1)
    m, n = 5, 7
    W0 = torch.randn(m, n, generator=gen, dtype=F64)
    G1, G2 = (torch.randn(m, n, generator=gen, dtype=F64) for _ in range(2))
    hist = pro_soap_reference([W0], [[G1], [G2]], lr=0.1, weight_decay=0.0, rank=0, side="right")
    assert torch.equal(hist[0][0], W0)  # the first call only builds the factors
    M = 0.05 * G2
    O = newton_schulz(M, ns_schedule("kj", 5))
    step = (W0 - hist[1][0]) / 0.1
    torch.testing.assert_close(step, math.sqrt(m * n) * O / O.norm(), rtol=1e-12, atol=1e-14)
    assert abs(step.square().mean().sqrt().item() - 1.0) < 1e-12


def test_spike_and_flat_ema_target_gives_s_and_mu_exactly():
    """Gradients whose Gram matrix is diag(9, 4, 1, 1, 1, 1): the EMA target is exactly U S Uᵀ + μ P⊥ with U the
    first two coordinates, so S = Uᵀ R U = diag(9, 4)·w and μ = 1·w (w the EMA's total weight) after any number of
    steps, and the dense reconstruction equals the EMA."""
    n, r, steps, rho = 6, 2, 7, 0.9
    H = torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=F64))
    W0 = torch.zeros(n, n, dtype=F64)
    scales = [1.0 + 0.1 * k for k in range(steps)]
    states = [ProSoapState()]
    pro_soap_reference([W0], [[c * H] for c in scales], rank=r, side="right", betas=(0.9, rho),
                       precondition_frequency=1000, states=states)
    st = states[0]
    R_ema = torch.zeros(n, n, dtype=F64)
    for c in scales:
        R_ema = rho * R_ema + (1 - rho) * c * c * (H.T @ H)
    U = st.U
    torch.testing.assert_close(U.abs(), torch.eye(n, dtype=F64)[:, :r], rtol=0, atol=1e-12)
    torch.testing.assert_close(st.S, U.T @ R_ema @ U, rtol=1e-12, atol=1e-14)
    w = R_ema[2, 2].item()
    assert abs(st.mu - w) < 1e-12 * w
    dense = U @ st.S @ U.T + st.mu * (torch.eye(n, dtype=F64) - U @ U.T)
    torch.testing.assert_close(dense, R_ema, rtol=1e-12, atol=1e-14)


def test_complement_has_the_subspace_blocks_rms_and_the_blocks_are_orthogonal():
    """Each step is a subspace block Q_L X Uᵀ plus a complement block ⟂ U with the same per-entry RMS."""
    gen = torch.Generator().manual_seed(3)
    m, n, r = 6, 9, 3
    W0 = torch.zeros(m, n, dtype=F64)
    grads = [[torch.randn(m, n, generator=gen, dtype=F64)] for _ in range(6)]
    states = [ProSoapState()]
    hist = pro_soap_reference([W0], grads[:-1], rank=r, side="right", weight_decay=0.0, lr=1.0,
                              precondition_frequency=2, states=states)
    U = states[0].U.clone()
    W_before = hist[-1][0]
    W_after = pro_soap_reference([W0], grads, rank=r, side="right", weight_decay=0.0, lr=1.0,
                                 precondition_frequency=2)[-1][0]
    step = W_before - W_after
    sub, comp = step @ U @ U.T, step - step @ U @ U.T
    rms_sub = sub.norm() / math.sqrt(m * r)
    rms_comp = comp.norm() / math.sqrt(m * (n - r))
    assert rms_sub > 0
    torch.testing.assert_close(rms_comp, rms_sub, rtol=1e-10, atol=0)
