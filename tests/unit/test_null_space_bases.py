"""``basis.null_space = "canonical"``: the directions a factor leaves to rounding get a basis the solver's rounding
does not pick.

A rank-deficient factor (a non-square block's first ``G Gᵀ``, DyKAF's rank-one start, a factor a repeated gradient
keeps of low rank) has eigenvalues of rounding, whose eigenvectors are any basis of their span; the specs let the
solver pick it (soap.md §8, dykaf.md §5), and Adam in the rotated coordinates is not invariant to a rotation inside
that span. So the solver's choice steers a non-square block's first steps by tens of per cent, and another
processor, stack or bucket picks another (the open degenerate-eigenspace bug of
``tests/unit/test_invariants_property.py``). The option takes one basis of the span in the first ``eigh``
(:func:`kronopt.linalg.canonical_null_basis`) and keeps a column's old direction where a power step's product is
rounding (:func:`kronopt.linalg.sorted_power_step`). The solver's choice is simulated here, on any processor, by
rotating its null eigenvectors and by adding noise of rounding's size to the power product.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt import linalg
from tests.unit.test_device_paths_differential import cpu_paths, gpu_paths

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:the route sends")]

F64 = torch.float64
CANONICAL = {"basis.null_space": "canonical"}


def _orthogonal(k, gen, dtype=F64):
    Q, R = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 12), c=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_a_null_span_comes_back_in_one_basis_whatever_basis_it_came_in(k, c, seed):
    """Any orthonormal basis of the flagged columns' span gives the same columns (to rounding); the other columns
    come back bit for bit; the result is orthonormal with the same span. Would catch: a rule that depends on the
    basis given (the old columns kept, a QR of them), a turn that touches the other columns, a lost span."""
    c = min(c, k)
    gen = torch.Generator().manual_seed(seed)
    V = _orthogonal(k, gen)
    null = (torch.arange(k) >= k - c).unsqueeze(0)
    turned = V.clone()
    turned[:, k - c :] = V[:, k - c :] @ _orthogonal(c, gen)
    a = linalg.canonical_null_basis(V.unsqueeze(0), null)[0]
    b = linalg.canonical_null_basis(turned.unsqueeze(0), null)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.equal(a[:, : k - c], V[:, : k - c])
    torch.testing.assert_close(a.T @ a, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    span = V[:, k - c :] @ V[:, k - c :].T
    torch.testing.assert_close(a[:, k - c :] @ a[:, k - c :].T, span, rtol=0, atol=1e-12)


def test_a_zero_factor_takes_the_identity():
    """Every column flagged (a block that has seen only zero gradients): the identity, a fresh block's basis."""
    gen = torch.Generator().manual_seed(0)
    V = _orthogonal(5, gen).unsqueeze(0)
    out = linalg.canonical_null_basis(V, torch.ones(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.eye(5, dtype=F64).unsqueeze(0))
    assert linalg.null_columns(torch.zeros(1, 5)).all()


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_a_coordinate_null_space_gets_a_well_conditioned_basis(dtype, tol):
    """A factor with one nonzero entry (DyKAF's start from a gradient with one nonzero entry) leaves the null
    space e₁^⊥, a coordinate subspace: the projections of fixed cosines are exponentially ill-conditioned there
    (the fifty-eighth session's try: float32 moved 9–16 %); the Gaussian seeds' are not. Rotating the null
    eigenvectors changes the basis by rounding only, in float32 too. Would catch: seeds in special position."""
    k = 40
    L = torch.zeros(1, k, k, dtype=dtype)
    L[0, 1, 1] = 2.0
    eig = linalg.eigh_descending(L, canonical_null=True)
    null = linalg.null_columns(eig.lam)
    assert null[0].tolist() == [False] + [True] * (k - 1)
    V = eig.Q[0].clone()
    V[:, 1:] = V[:, 1:] @ _orthogonal(k - 1, torch.Generator().manual_seed(0), dtype)
    again = linalg.canonical_null_basis(V.unsqueeze(0), null)
    torch.testing.assert_close(again, eig.Q, rtol=0, atol=tol)


def _rotating_solver(monkeypatch, seed=123):
    """``linalg._eigh`` whose eigenvectors of rounding eigenvalues come in another (random) basis of their span, as
    another processor's or stack's rounding would give them; each call draws its own rotations."""
    solve = linalg._eigh
    gen = torch.Generator().manual_seed(seed)

    def rotated(A):
        lam, Q = solve(A)
        Q = Q.clone()
        ascending_null = linalg.null_columns(lam.flip(-1)).flip(-1)
        for i in range(Q.shape[0]):
            c = int(ascending_null[i].sum())
            if c > 1:
                Q[i][:, :c] = Q[i][:, :c] @ _orthogonal(c, gen, Q.dtype)
        return lam, Q

    monkeypatch.setattr(linalg, "_eigh", rotated)


def _noisy_products(monkeypatch, size=1e-16, seed=7):
    """The refresh's power product with noise of its rounding's size added, as another stack's rounding would."""
    product = linalg._column_major_product
    gen = torch.Generator().manual_seed(seed)

    def noisy(A, Q):
        P = product(A, Q)
        noise = torch.randn(P.shape, generator=gen, dtype=P.dtype) * (size * torch.linalg.vector_norm(A))
        return (P + noise).mT.contiguous().mT

    monkeypatch.setattr(linalg, "_column_major_product", noisy)


def test_eigh_gives_a_rank_deficient_factor_one_basis_whatever_the_solver_picked(monkeypatch):
    """Two 9 × 9 factors of rank 3, their null eigenvectors returned in another basis: the same basis to rounding
    with ``canonical_null``, another without. Would catch: the solver's null basis passed on."""
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(2, 9, 3, generator=gen, dtype=F64)
    L = G @ G.mT
    plain, solver = linalg.eigh_descending(L, canonical_null=True), linalg.eigh_descending(L)
    _rotating_solver(monkeypatch)
    torch.testing.assert_close(linalg.eigh_descending(L, canonical_null=True).Q, plain.Q, rtol=0, atol=1e-12)
    assert (linalg.eigh_descending(L).Q - solver.Q).abs().max() > 0.1  # the simulation does move the solver's


def test_a_power_step_on_a_rank_one_factor_keeps_its_null_columns_whatever_the_rounding(monkeypatch):
    """SOAP's refresh of a 7-sided basis against a factor of rank one: the power product's other columns are
    rounding, which the QR turns into directions. With noise of that size added to the product the new basis is
    the same to rounding, each null column its old one (up to sign, in the sort's order). Would catch: the QR's
    own completion kept, flags read against the wrong scale."""
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(1, 7, 1, generator=gen, dtype=F64)
    A = u @ u.mT
    Q = linalg.eigh_descending(A, canonical_null=True).Q
    plain, _, perm = linalg.sorted_power_step(A, Q.clone(), sort=True, canonical_null=True)
    torch.testing.assert_close(plain[0, :, 1:].abs(), Q[0][:, perm[0, 1:]].abs(), rtol=0, atol=1e-12)
    _noisy_products(monkeypatch)
    noisy, _, perm = linalg.sorted_power_step(A, Q.clone(), sort=True, canonical_null=True)
    torch.testing.assert_close(noisy[0, :, 1:].abs(), Q[0][:, perm[0, 1:]].abs(), rtol=0, atol=1e-12)
    solver, _, _ = linalg.sorted_power_step(A, Q.clone(), sort=True)
    assert (solver[0, :, 1:].abs() - Q[0][:, perm[0, 1:]].abs()).abs().max() > 0.1  # the QR's own completion


def _displacement(preset, shape, *, steps=8, every=10, repeat=False, **overrides):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=gen, dtype=F64)
    grads = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]
    if repeat:
        grads = [grads[0]] * steps
    p = torch.nn.Parameter(W.clone())
    opt = kronopt.build([p], preset, **{"refresh.every": every}, **overrides)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach() - W


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo"])
def test_a_preset_steps_alike_whatever_null_basis_the_solver_returns(monkeypatch, preset, shape):
    """Eight calls on a non-square block (a first factor of rank 5 of 12; DyKAF's rank one on both sides), the
    solver's null eigenvectors in another basis: with ``"canonical"`` the same displacement to 1e-12; with the
    default ``"solver"`` it moves (by 8–50 % on these streams)."""
    plain, solver = _displacement(preset, shape, **CANONICAL), _displacement(preset, shape)
    _rotating_solver(monkeypatch)
    assert _relative(_displacement(preset, shape, **CANONICAL), plain) <= 1e-12
    assert _relative(_displacement(preset, shape), solver) > 1e-2


@pytest.mark.parametrize("shape", [(12, 5), (40, 3)])
@pytest.mark.parametrize("preset", ["dykaf", "pro_dykaf"])
def test_a_factor_kept_rank_one_refreshes_alike_whatever_the_rounding(monkeypatch, preset, shape):
    """DyKAF fed one gradient again and again keeps its factors rank one; refreshing every 2 calls, its power steps
    meet a null space each time. Noise of the product's rounding (1e-16 of its norm) moves eight calls'
    displacement by 5–50 % under ``"solver"``; under ``"canonical"`` by what Adam makes of rounding."""
    plain = _displacement(preset, shape, every=2, repeat=True, **CANONICAL)
    _noisy_products(monkeypatch)
    assert _relative(_displacement(preset, shape, every=2, repeat=True, **CANONICAL), plain) <= 1e-6


@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo"])
def test_a_bucket_equals_its_blocks_alone_whatever_null_bases_the_solver_picks(monkeypatch, preset):
    """DESIGN.md invariant 4 on a 2 × 5 parameter stepped in a bucket of two and alone, a refresh every 2, where
    each call of the solver returns its null eigenvectors in a basis of its own (as MKL's rounding by a block's
    alignment in the stack does on AMD processors: the open bug's cause): the same displacement to 1e-10 under
    ``"canonical"``. Would catch: the canonical basis depending on the stack (a seed drawn per call, per block)."""
    _rotating_solver(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    shape = (2, 5)
    W = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)]
    grads = [[torch.randn(shape, generator=gen, dtype=F64) for _ in range(2)] for _ in range(6)]
    moved, alone = _in_a_bucket_and_alone(preset, W, grads)
    assert _relative(moved - W[1], alone - W[1]) <= 1e-10


def _in_a_bucket_and_alone(preset, W, grads):
    """The second of two parameters stepped in one bucket, and the same parameter stepped alone, under the option
    (a refresh every 2 calls)."""
    both = [torch.nn.Parameter(w.clone()) for w in W]
    alone = [torch.nn.Parameter(W[1].clone())]
    pair = kronopt.build(both, preset, **{"refresh.every": 2}, **CANONICAL)
    single = kronopt.build(alone, preset, **{"refresh.every": 2}, **CANONICAL)
    for g in grads:
        both[0].grad, both[1].grad, alone[0].grad = g[0].clone(), g[1].clone(), g[1].clone()
        pair.step()
        single.step()
    return both[1].detach(), alone[0].detach()


@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo"])
def test_the_device_path_takes_the_canonical_basis_bit_for_bit(preset, monkeypatch):
    """A device cannot read the flags for free, so it takes the second QR at every refresh, from the kept copy of
    the product: the same bits as the CPU's path, which takes it only where a column is flagged (24 × 2 and 2 × 24
    blocks, refresh every 2, float32: the long side's factor stays rank-deficient over the first refreshes, so
    their power steps meet null spaces, counted here). Would catch: the device path recomputing the product, or
    skipping the second QR."""
    second = []
    real = linalg.q_factor

    def counting(P, **kw):
        second.append("r_diagonal" not in kw)
        return real(P, **kw)

    monkeypatch.setattr(linalg, "q_factor", counting)

    def run():
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 2), (24, 2), (2, 24)]]
        opt = kronopt.build(params, preset, **{"refresh.every": 2}, **CANONICAL)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    with cpu_paths():
        cpu = run()
    assert any(second), "no power step met a column of rounding on the CPU's path"
    with gpu_paths():
        gpu = run()
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


def test_aligned_blocks_keep_their_bits_in_a_bucket_under_the_canonical_choice():
    """Two 8 × 12 blocks (float64 and float32: sizes MKL rounds alike wherever they sit in a stack) whose first
    gradients have ranks 1 and 7, stepped in a bucket and the second alone: the same bits, as under the default
    (``test_a_bucket_steps_its_blocks_with_the_bits_they_take_alone``). Would catch: the canonical basis's work
    shaped by the other blocks of its stack (the review's find: products as wide as the stack's first flagged
    column, which MKL rounds by)."""
    for dtype in (F64, torch.float32):
        for preset in ("soap", "kl_shampoo", "dykaf"):
            gen = torch.Generator().manual_seed(0)
            W = [torch.randn(8, 12, generator=gen, dtype=dtype) for _ in range(2)]
            first = [torch.randn(8, r, generator=gen, dtype=dtype) @ torch.randn(r, 12, generator=gen, dtype=dtype) for r in (1, 7)]
            grads = [first] + [[torch.randn(8, 12, generator=gen, dtype=dtype) for _ in range(2)] for _ in range(5)]
            moved, alone = _in_a_bucket_and_alone(preset, W, grads)
            assert torch.equal(moved, alone), (preset, dtype)


@pytest.mark.parametrize("k, tail", [(256, 1e-8), (96, 1e-9)])
def test_keeping_old_columns_loses_nothing_on_an_ill_conditioned_float32_factor(k, tail):
    """A full-rank float32 factor whose spectrum falls to ``tail`` of its largest (a third or more of its columns
    under the rounding floor), five refreshes from a basis near its eigenvectors: the canonical path's basis
    diagonalises the factor as well as the solver's (off-diagonal energy within 1e-3 of it), stays orthonormal,
    and its flagged columns stay their old directions from refresh to refresh (the solver's turn through the
    tail). Would catch: flagged real directions turned into unrelated ones (the fifty-eighth session's thresholds
    against ‖P‖_F did, at every refresh), or flagged columns given random directions."""
    gen = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    A = (V * torch.logspace(0, math.log10(tail), k, dtype=F64)) @ V.T
    A32 = A.float().unsqueeze(0)
    start, _ = torch.linalg.qr(V + 1e-3 * torch.randn(k, k, generator=gen, dtype=F64))
    off, kept = {}, {}
    for canonical in (False, True):
        Q = start.float().unsqueeze(0)
        kept[canonical] = []
        for _ in range(5):
            diagonal = torch.empty(1, k)
            P = linalg._column_major_product(A32, Q)
            e = (Q * P).sum(-2)
            perm = torch.argsort(e, dim=-1, descending=True)
            linalg.q_factor(linalg.permute_columns(P, perm), r_diagonal=diagonal)
            flagged = (diagonal <= diagonal.amax() * linalg.power_rounding_floor(k, torch.float32))[0]
            old = linalg.permute_columns(Q, perm)[0]
            Q, _, _ = linalg.sorted_power_step(A32, Q.clone(), sort=True, canonical_null=canonical)
            if flagged.any():  # |cos| of each flagged column with its old one
                kept[canonical].append(float((Q[0] * old).sum(0).abs()[flagged].min()))
        Qd = Q[0].double()
        M = Qd.T @ A @ Qd
        off[canonical] = ((M - torch.diag(torch.diag(M))).norm() / A.norm()).item()
        torch.testing.assert_close(Qd.T @ Qd, torch.eye(k, dtype=F64), rtol=0, atol=1e-5)
    assert len(kept[True]) == 5 and min(kept[True]) >= 0.999
    assert min(kept[False]) < 0.9  # the solver's QR turns them
    assert abs(off[True] - off[False]) <= 1e-3 * off[False]


def test_the_option_round_trips_and_refuses_other_values():
    """``basis.null_space`` is a config option like any other: dumped and read back, and a wrong value named with
    its choices before anything is built."""
    cfg = kronopt.resolve("soap", **CANONICAL)
    assert cfg.basis.null_space == "canonical"
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    assert kronopt.resolve("soap").basis.null_space == "solver"
    with pytest.raises(kronopt.ConfigError, match="canonical"):
        kronopt.resolve("soap", **{"basis.null_space": "fixed"})
