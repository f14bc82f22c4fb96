"""Self-checks of the DyKAF float64 reference (tests/reference/dykaf.py); never imports kronopt.

Closed forms and limits a misreading of dykaf.md would break: G = 0 shrinks the Kronecker product by β;
the integrators are exact when the Fisher EMA is exactly a Kronecker product (streams G = a vᵀ, G = u bᵀ,
G = α u vᵀ); on a matrix-normal stream the tracked L ⊗ R is close to the dense nearest Kronecker product;
the first call leaves W unchanged.
"""

from __future__ import annotations

import pytest
import torch

from .dykaf import dykaf_reference, kron_init, ksl_dense, ksl_sandwich, parallel_dense, parallel_sandwich

F64 = torch.float64
STEPS = {"ksl": ksl_dense, "parallel": parallel_dense}


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def spd(gen, n):
    A = randn(gen, n, n)
    return A @ A.T + 0.1 * torch.eye(n, dtype=F64)


def rel(A, B):
    return ((A - B).norm() / B.norm()).item()


@pytest.mark.parametrize("variant", list(STEPS))
@pytest.mark.parametrize("beta", [0.5, 0.95])
def test_zero_gradient_scales_the_kronecker_product_by_beta(variant, beta):
    gen = torch.Generator().manual_seed(1)
    L, R = spd(gen, 4), spd(gen, 3)
    L1, R1 = STEPS[variant](L, R, torch.zeros(4, 3, dtype=F64), beta)
    assert rel(torch.kron(L1, R1), beta * torch.kron(L, R)) <= 1e-12
    # the factors come back balanced (‖L‖ = ‖R‖) and symmetric
    assert abs(L1.norm() - R1.norm()) <= 1e-12 * L1.norm()
    assert torch.equal(L1, L1.T) and torch.equal(R1, R1.T)


@pytest.mark.parametrize("variant", list(STEPS))
@pytest.mark.parametrize("stream", ["fixed_right", "fixed_left", "fixed_both"])
def test_exact_when_the_fisher_is_a_kronecker_product(variant, stream):
    # G_t = a_t vᵀ: R(vec G vec Gᵀ) = G ⊗ G = (a⊗a)(v⊗v)ᵀ, so every EMA of them is rank one in the
    # rearranged space (a Kronecker product), and a rank-one integrator started on it stays exact
    gen = torch.Generator().manual_seed(2)
    m, n, beta = 4, 3, 0.9
    u, v = randn(gen, m), randn(gen, n)
    F = L = R = None
    for _ in range(25):
        a = randn(gen, 1).item()
        if stream == "fixed_right":
            G = torch.outer(randn(gen, m), v)
        elif stream == "fixed_left":
            G = torch.outer(u, randn(gen, n))
        else:
            G = a * torch.outer(u, v)
        K = torch.kron(G, G)  # the rearranged vec G vec Gᵀ (row-major vec)
        if F is None:
            F = (1 - beta) * K
            L, R = kron_init(G, beta, "kron")  # σ₁√(1−β) u₁u₁ᵀ, σ₁√(1−β) v₁v₁ᵀ
        else:
            F = beta * F + (1 - beta) * K
            L, R = STEPS[variant](L, R, G, beta)
        assert rel(torch.outer(L.reshape(-1), R.reshape(-1)), F) <= 1e-10


@pytest.mark.parametrize("variant", list(STEPS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracks_the_dense_nearest_kronecker_product(variant, seed):
    # vec G ~ N(0, AAᵀ ⊗ BᵀB): the EMA is a Kronecker product plus sampling noise. By Eckart–Young the
    # dense NKP (top SVD term of the rearranged EMA) has the smallest error ‖F − vec L vec Rᵀ‖; the tracked
    # pair must come within 2 % of that optimum, and its distance to the NKP must stay a fraction of the
    # EMA's second-to-first singular value ratio (the part of each increment off the rank-one manifold,
    # which is what a projector-splitting step can miss; measured ≤ 0.2 σ₂/σ₁ here, asserted at 0.5)
    gen = torch.Generator().manual_seed(seed)
    m, n, beta = 4, 3, 0.95
    A, B = randn(gen, m, m), randn(gen, n, n)
    F = L = R = None
    for _ in range(200):
        G = A @ randn(gen, m, n) @ B
        K = torch.kron(G, G)
        if F is None:
            F, (L, R) = (1 - beta) * K, kron_init(G, beta, "kron")
        else:
            F, (L, R) = beta * F + (1 - beta) * K, STEPS[variant](L, R, G, beta)
    U, S, Vh = torch.linalg.svd(F)
    nkp = S[0] * torch.outer(U[:, 0], Vh[0])
    Y = torch.outer(L.reshape(-1), R.reshape(-1))
    assert (F - Y).norm() <= 1.02 * (F - nkp).norm()
    assert rel(Y, nkp) <= 0.5 * (S[1] / S[0]).item()


@pytest.mark.parametrize("variant", list(STEPS))
@pytest.mark.parametrize("init", ["kron", "eps", "sum"])
def test_first_call_leaves_w_unchanged(variant, init):
    gen = torch.Generator().manual_seed(3)
    params = [randn(gen, 5, 3), randn(gen, 4), randn(gen, 3, 3)]
    grads = [[randn(gen, *p.shape) for p in params] for _ in range(2)]
    history = dykaf_reference(params, grads, variant=variant, init=init, weight_decay=0.5)
    for before, after in zip(params, history[0]):
        assert torch.equal(before, after)
    assert any(not torch.equal(before, after) for before, after in zip(params, history[1]))


@pytest.mark.parametrize("shape", [(4, 3), (3, 7), (6, 6)])
@pytest.mark.parametrize("beta", [0.5, 0.95])
@pytest.mark.parametrize("variant", ["ksl", "parallel"])
def test_the_sandwich_form_is_the_dense_step(shape, beta, variant):
    """§3's and §4's pseudo-code (ksl_sandwich, parallel_sandwich: the forms the rounded reference rounds) against the
    steps on the dense rearranged matrices: one step, in float64."""
    gen = torch.Generator().manual_seed(3)
    m, n = shape
    L, R, G = spd(gen, m), spd(gen, n), randn(gen, m, n)
    sandwiches, dense = (ksl_sandwich, ksl_dense) if variant == "ksl" else (parallel_sandwich, parallel_dense)
    for a, b in zip(sandwiches(L, R, G, beta), dense(L, R, G, beta)):
        assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("step", [ksl_sandwich, parallel_sandwich])
def test_the_rounded_sandwich_form_lies_bfloat16s_rounding_off_the_exact_step(step):
    """rounded=True rounds to bfloat16 (2⁻⁸ relative) and nothing coarser: a step of a large increment lies about
    that far from the exact one, and its factors stay exactly symmetric."""
    gen = torch.Generator().manual_seed(4)
    L, R, G = spd(gen, 5), spd(gen, 4), 10 * randn(gen, 5, 4)
    exact = step(L, R, G, 0.5)
    narrow = step(L, R, G, 0.5, rounded=True)
    for a, b in zip(narrow, exact):
        assert 1e-5 < rel(a, b) < 1e-2
        assert torch.equal(a, a.T)
