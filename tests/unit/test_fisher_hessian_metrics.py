"""``kronopt fisher``'s Hessian experiment reads its metrics without subtracting squares (the fifty-eighth session
mended the gradient lab's; these are the Hessian lab's): ``‖H − L⊗R‖²``, the scale-free error and the NKP floor of
a Hessian that is (nearly) a Kronecker product read rounding, or the small value itself, not the square root of a
difference of two nearly equal numbers (1e-8 at best in float64)."""

import math

import torch

from kronopt.app import fisher as F

F64 = torch.float64


def _kron_case(eps: float, seed: int = 0):
    """``R(H) = vec L vec Rᵀ + eps · E`` with ``E`` of unit norm orthogonal to that rank-one term: the distance
    ``eps``, the scale-free error ``eps / ‖R(H)‖`` to first order, the floor ``eps / ‖R(H)‖``."""
    gen = torch.Generator().manual_seed(seed)
    vecL, vecR = torch.randn(16, generator=gen, dtype=F64), torch.randn(36, generator=gen, dtype=F64)
    E = torch.randn(16, 36, generator=gen, dtype=F64)
    u, v = vecL / vecL.norm(), vecR / vecR.norm()
    E = E - torch.outer(u, u @ E)
    E = E - torch.outer(E @ v, v)  # (I − u uᵀ) E (I − v vᵀ): orthogonal to the rank-one term on both sides
    E = E / E.norm()
    return torch.outer(vecL, vecR) + eps * E, vecL, vecR


def test_an_exact_kronecker_hessian_reads_rounding():
    """Would catch the old forms: ``H2 − 2HK + K2`` and ``√(1 − cos²)`` read about 1e-8 (the square root of
    rounding) on an exact fit, the floor ``√(‖R‖² − σ₁²)`` likewise."""
    RH, vecL, vecR = _kron_case(0.0)
    metrics = F._kron_metrics(RH, vecL, vecR, 0.0)
    scale = float(RH.norm()) ** 2
    assert metrics["diff2"] <= 1e-28 * scale
    assert metrics["e_s"] <= 1e-14
    assert F.nkp_floor(RH) <= 1e-14


def test_a_near_kronecker_hessian_reads_its_small_distance():
    """``eps = 1e-9`` of a unit-scale term: the distance squared 1e-18 (the old form read 0 or ~1e-14 of
    rounding), the scale-free error and the floor ``1e-9 / ‖R(H)‖`` to 1e-6 relative."""
    eps = 1e-9
    RH, vecL, vecR = _kron_case(eps)
    norm = float(RH.norm())
    metrics = F._kron_metrics(RH, vecL, vecR, 0.0)
    assert math.isclose(metrics["diff2"], eps**2, rel_tol=1e-6)
    assert math.isclose(metrics["e_s"], eps / norm, rel_tol=1e-6)
    assert math.isclose(F.nkp_floor(RH), eps / norm, rel_tol=1e-6)


def test_ordinary_values_agree_with_the_definitions():
    """Far from a fit the new forms give the textbook values (cos from the inner product, floor from σ₁):
    the mend changed digits only where the old forms lost them. Zero ``K`` reads the documented 1."""
    gen = torch.Generator().manual_seed(3)
    RH = torch.randn(16, 36, generator=gen, dtype=F64)
    vecL, vecR = torch.randn(16, generator=gen, dtype=F64), torch.randn(36, generator=gen, dtype=F64)
    K = torch.outer(vecL, vecR)
    cos = float((RH * K).sum() / (RH.norm() * K.norm()))
    metrics = F._kron_metrics(RH, vecL, vecR, 0.5)
    assert math.isclose(metrics["diff2"], float((RH - K).square().sum()), rel_tol=1e-12)
    assert math.isclose(metrics["e_s"], math.sqrt(1 - cos**2), rel_tol=1e-12)
    assert metrics["floor"] == 0.5
    sigma = torch.linalg.svdvals(RH)
    assert math.isclose(F.nkp_floor(RH), math.sqrt(1 - float(sigma[0] ** 2 / sigma.square().sum())), rel_tol=1e-12)
    assert F._kron_metrics(RH, torch.zeros(16, dtype=F64), vecR, 0.0)["e_s"] == 1.0
