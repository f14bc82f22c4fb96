"""kronopt.linalg: products, bases, eigh, power/QR, Newton–Schulz, Muon scales."""

import itertools
import math

import pytest
import torch
import torch.utils._python_dispatch
from hypothesis import given
from hypothesis import strategies as st

import kronopt
from kronopt import linalg
from tests.assertions import (
    assert_close_to_identity,
    assert_descending,
    assert_orthonormal,
    assert_psd,
    assert_symmetric,
)
from tests.reference import newton_schulz as ns_ref
from tests.strategies import SEEDS, dims, generator, orthonormal, randn, spd, spd_matrix

F64 = torch.float64


def close(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- elementary products ------------------------------------------------------------------


@given(seed=SEEDS, n=dims(), b=st.integers(1, 3), dtype=st.sampled_from([torch.float32, F64]))
def test_sym_is_exactly_symmetric_and_fixes_symmetric_input(seed, n, b, dtype):
    A = randn(generator(seed), b, n, n, dtype=dtype)
    S = linalg.sym(A)
    assert_symmetric(S)
    assert torch.equal(linalg.sym(S), S)
    close(S, (A + A.mT) / 2, rtol=0, atol=0)


@pytest.mark.parametrize("n", [5, linalg._SYM_BLOCKED_MIN])
def test_sym_into_a_place_in_a_larger_matrix(n):
    """``sym(A, out=...)`` writes the same bits into a strided place (a diagonal tile of a larger matrix)
    or into a contiguous result as ``sym(A)`` makes apart, on either CPU path, and leaves the rest alone."""
    A = randn(generator(3), 2, n, n).float()
    big = torch.zeros(2, n + 3, n + 3)
    place = big[:, 3:, 3:]
    assert linalg.sym(A, out=place).data_ptr() == place.data_ptr()
    assert torch.equal(place, linalg.sym(A))
    place.zero_()
    assert torch.equal(big, torch.zeros(2, n + 3, n + 3))  # nothing written outside the place
    dense = torch.empty(2, n, n)
    assert linalg.sym(A, out=dense) is dense and torch.equal(dense, linalg.sym(A))


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3))
def test_gram_left_right_symmetric_psd_and_correct(seed, m, n, b):
    G = randn(generator(seed), b, m, n)
    L, R = linalg.gram_left(G), linalg.gram_right(G)
    assert L.shape == (b, m, m) and R.shape == (b, n, n)
    assert_symmetric(L)
    assert_symmetric(R)
    assert_psd(L)
    assert_psd(R)
    close(L, G @ G.mT)
    close(R, G.mT @ G)


@given(
    seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 6), b=st.integers(1, 3), tile=st.integers(1, 5),
    beta=st.sampled_from([0.0, 0.5, 0.95, 1.0]), right=st.booleans(),
)
def test_tiled_gram_update_is_exactly_symmetric_and_equals_the_dense_one(seed, m, k, b, tile, beta, right):
    """The CPU's tile-by-tile Gram update (lower tiles multiplied, mirrored above; uneven last tile) against the
    float64 product, in float32 (rounding only) and in float64; ``beta = 0`` ignores ``X`` (NaN in it included)."""
    gen = generator(seed)
    A = randn(gen, b, k, m) if right else randn(gen, b, m, k)
    X = linalg.gram_left(randn(gen, b, m, m))
    if beta == 0.0:
        X[:, 0, 0] = float("nan")
    fn = linalg.accumulate_gram_right if right else linalg.accumulate_gram_left
    A2 = A.mT if right else A
    expected = (beta * X if beta else 0.0) + 0.3 * A2 @ A2.mT
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, True)
        out64 = fn(X, A, beta, 0.3)
        out32 = fn(X.float(), A.float(), beta, 0.3)
    for out in (out64, out32):
        assert_symmetric(out)
        assert torch.equal(out, out.mT)
    close(out64, expected)
    close(out32.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [linalg.gram_left, linalg.gram_right, linalg.block_norm])
def test_unbatched_input_raises(fn):
    with pytest.raises(ValueError, match="batch of matrices"):
        fn(torch.ones(3, 4))


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), left=st.booleans(), right=st.booleans())
def test_rotate_unrotate_round_trip(seed, m, n, b, left, right):
    gen = generator(seed)
    X = randn(gen, b, m, n)
    Q_L = orthonormal(gen, b, m) if left else None
    Q_R = orthonormal(gen, b, n) if right else None
    Y = linalg.rotate(X, Q_L, Q_R)
    expected = X
    if Q_L is not None:
        expected = Q_L.mT @ expected
    if Q_R is not None:
        expected = expected @ Q_R
    close(Y, expected)
    close(linalg.unrotate(Y, Q_L, Q_R), X)
    close(linalg.rotate(linalg.unrotate(X, Q_L, Q_R), Q_L, Q_R), X)


class _MultiplyAdds(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the multiply-adds of every (batched) matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "bmm", "addmm", "baddbmm"):
            a, b = args[-2], args[-1]
            self.total += math.prod(a.shape) * b.shape[-1]
        return func(*args, **(kwargs or {}))


@given(seed=SEEDS, m=dims(), n=dims(), p=dims(), q=dims(), b=st.integers(1, 2))
def test_rotate_and_unrotate_with_rectangular_bases_take_the_cheaper_order(seed, m, n, p, q, b):
    """A restricted side's basis is ``d × r``: ``Q_Lᵀ X Q_R`` and ``Q_L Y Q_Rᵀ`` equal the float64 product
    and cost the smaller of the two orders' multiply-adds (either order would be the same product)."""
    p, q = min(p, m), min(q, n)
    gen = generator(seed)
    X, Y = randn(gen, b, m, n), randn(gen, b, p, q)
    Q_L, Q_R = orthonormal(gen, b, m)[..., :p], orthonormal(gen, b, n)[..., :q]
    with _MultiplyAdds() as rot:
        out = linalg.rotate(X, Q_L, Q_R)
    close(out, torch.einsum("bmp,bmn,bnq->bpq", Q_L, X, Q_R))
    assert rot.total == b * min(p * n * (m + q), m * q * (n + p))
    with _MultiplyAdds() as unrot:
        back = linalg.unrotate(Y, Q_L, Q_R)
    close(back, torch.einsum("bmp,bpq,bnq->bmn", Q_L, Y, Q_R))
    assert unrot.total == b * min(m * q * (p + n), p * n * (q + m))


def test_rotate_of_a_restricted_right_side_applies_the_subspace_first():
    """``(64 × 256)`` against a ``256 × 32`` subspace: ``X U`` first costs 0.42 of rotating by ``Q_L`` first."""
    gen = generator(0)
    X = torch.randn(1, 64, 256, generator=gen, dtype=F64)
    Q_L, U = orthonormal(gen, 1, 64), orthonormal(gen, 1, 256)[..., :32]
    with _MultiplyAdds() as rot:
        linalg.rotate(X, Q_L, U)
    assert rot.total == 64 * 256 * 32 + 64 * 64 * 32  # not 64·64·256 + 64·256·32


def test_rotate_with_identity_is_exact_noop():
    X = randn(generator(0), 2, 3, 4)
    assert linalg.rotate(X, None, None) is X
    assert linalg.unrotate(X, None, None) is X


@given(
    seed=SEEDS,
    m=dims(),
    n=dims(),
    sides=st.tuples(*[st.booleans()] * 4),
)
def test_change_basis_equals_rotate_new_of_unrotate_old(seed, m, n, sides):
    gen = generator(seed)
    b = 2
    X = randn(gen, b, m, n)
    oL, oR, nL, nR = (
        orthonormal(gen, b, d) if on else None for on, d in zip(sides, (m, n, m, n))
    )
    got = linalg.change_basis(X, (oL, oR), (nL, nR))
    expected = linalg.rotate(linalg.unrotate(X, oL, oR), nL, nR)
    close(got, expected)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3))
def test_permute_along_rows_and_columns(seed, m, n, b):
    gen = generator(seed)
    X = randn(gen, b, m, n)
    pr = torch.stack([torch.randperm(m, generator=gen) for _ in range(b)])
    pc = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
    rows = linalg.permute_along(X, pr, 1)
    cols = linalg.permute_along(X, pc, 2)
    for i in range(b):
        assert torch.equal(rows[i], X[i][pr[i], :])
        assert torch.equal(cols[i], X[i][:, pc[i]])


@given(seed=SEEDS, n=dims(), k=dims(), b=st.integers(1, 3), column_major=st.booleans())
def test_permute_columns_moves_each_blocks_columns_and_keeps_the_layout(seed, n, k, b, column_major):
    """A refresh's power product and a basis are column-major (moved as rows of their transposes), others row-major."""
    gen = generator(seed)
    Q = randn(gen, b, n, k)
    if column_major:
        Q = Q.mT.contiguous().mT
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(b)])
    got = linalg.permute_columns(Q, perm)
    for i in range(b):
        assert torch.equal(got[i], Q[i][:, perm[i]])
    assert got.mT.is_contiguous() if column_major and k > 1 else got.is_contiguous()


@pytest.mark.parametrize("b", [0, 1, 3])
@pytest.mark.parametrize(("m", "n"), [(64, 64), (100, 41), (41, 100)])
def test_permutations_of_blocks_past_the_row_move_size(b, m, n):
    """Blocks of ``_ROWS_BY_SELECT_MIN`` entries on move whole rows (``_rows_in_order``): the same entries as an
    index per block, in the layouts the smaller ones keep, a permutation stored transposed included."""
    assert m * n >= linalg._ROWS_BY_SELECT_MIN
    gen = torch.Generator().manual_seed(b + m)
    X = torch.randn(b, m, n, generator=gen)
    pr = torch.stack([torch.randperm(m, generator=gen) for _ in range(b)]) if b else torch.zeros(0, m, dtype=torch.long)
    pc = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]) if b else torch.zeros(0, n, dtype=torch.long)
    Q = X.mT.contiguous().mT  # column-major, as a refresh's power product and bases
    for perm_rows, perm_cols in ((pr, pc), (pr.mT.contiguous().mT, pc.mT.contiguous().mT)):
        rows, cols = linalg.permute_along(X, perm_rows, 1), linalg.permute_columns(Q, perm_cols)
        assert rows.shape == X.shape and cols.shape == Q.shape and rows.is_contiguous() and cols.mT.is_contiguous()
        for i in range(b):
            assert torch.equal(rows[i], X[i][pr[i], :]) and torch.equal(cols[i], X[i][:, pc[i]])


def test_permute_along_bad_dim_raises():
    X = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="dim must be 1 or 2"):
        linalg.permute_along(X, torch.tensor([[1, 0]]), 0)


@given(seed=SEEDS, n=dims(), k=dims(), b=st.integers(1, 3), column_major=st.booleans())
def test_permute_columns(seed, n, k, b, column_major):
    gen = generator(seed)
    Q = randn(gen, b, n, k)
    if column_major:  # LAPACK's layout: the columns are moved as whole rows of Qᵀ
        Q = Q.mT.contiguous().mT
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(b)])
    out = linalg.permute_columns(Q, perm)
    for i in range(b):
        assert torch.equal(out[i], Q[i][:, perm[i]])


@given(seed=SEEDS, m=dims(), n=dims())
def test_match_norm(seed, m, n):
    gen = generator(seed)
    D, A = randn(gen, 2, m, n), randn(gen, 2, m, n)
    out = linalg.match_norm(D, A)
    close(linalg.block_norm(out), linalg.block_norm(A))
    close(out / linalg.block_norm(out), D / linalg.block_norm(D))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("a_norm", [0.0, 0.1, 1.0, 10.0, 1e3])
def test_match_norm_zero_direction_stays_zero(dtype, a_norm):
    # documented: "0 stays 0", whatever the norm of A
    D = torch.zeros(2, 3, 4, dtype=dtype)
    A = torch.full((2, 3, 4), a_norm / math.sqrt(12), dtype=dtype)
    out = linalg.match_norm(D, A)
    assert torch.isfinite(out).all(), f"match_norm(0, A) with ‖A‖_F = {a_norm} gave {out[0, 0, 0].item()}"
    assert torch.equal(out, D)


def test_finite_blocks_and_select_blocks():
    a = torch.ones(3, 2, 2)
    a[1, 0, 1] = float("nan")
    c = torch.ones(3, 2)
    c[2, 0] = float("inf")
    ok = linalg.finite_blocks(a, None, c)
    assert ok.tolist() == [True, False, False]
    new, old = torch.full((3, 2, 2), 5.0), torch.full((3, 2, 2), -1.0)
    out = linalg.select_blocks(ok, new, old)
    assert out[0].eq(5).all() and out[1].eq(-1).all() and out[2].eq(-1).all()
    with pytest.raises(ValueError):
        linalg.finite_blocks(None)


@pytest.mark.parametrize("flags", [[True, True, True], [False, False, False], [True, False, True]])
def test_select_blocks_lays_its_result_out_as_new_on_the_host_and_device_paths(monkeypatch, flags):
    """``new`` row-major and ``old`` column-major (a stack loaded from a checkpoint in another layout): every
    verdict gives the same values and the same strides whether read on the host or not, ``new``'s. Products that
    read the result round by its layout on AMD processors (pro_kl_shampoo's momentum, re-split at a refresh where
    no block kept its subspace, parted the CPU's path from a device's by an ulp on a Zen 4). Would catch: the
    host's path handing back ``old`` itself where no block is ok."""
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(3, 6, 4, generator=gen)
    old = torch.randn(3, 6, 4, generator=gen).mT.contiguous().mT
    ok = torch.tensor(flags)
    host = linalg.select_blocks(ok, new, old)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", False)
    device = linalg.select_blocks(ok, new, old)
    want = torch.where(ok.view(-1, 1, 1), new, old)
    assert torch.equal(host, want) and torch.equal(device, want)
    assert host.stride() == device.stride() == new.stride()
    # where the layouts agree, no block ok hands back ``old`` itself (no pass over it)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", True)
    if not any(flags):
        same = old.contiguous()
        assert linalg.select_blocks(ok, new, same) is same


# -- eigh ----------------------------------------------------------------------------------


def _check_eigh(A, eig, *, tol):
    n = A.shape[-1]
    assert eig.lam.shape == A.shape[:-1] and eig.Q.shape == A.shape
    assert eig.lam.dtype == A.dtype and eig.Q.dtype == A.dtype
    assert eig.ok.dtype == torch.bool and eig.ok.all()
    assert_descending(eig.lam)
    assert_orthonormal(eig.Q, atol=tol * n)
    scale = A.abs().amax(dim=(-2, -1), keepdim=True)
    recon = (eig.Q * eig.lam.unsqueeze(-2)) @ eig.Q.mT
    torch.testing.assert_close(recon / scale, A / scale, rtol=0, atol=tol * n)
    # sign convention: each column's largest-magnitude entry is positive
    pivot = eig.Q.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(eig.Q, -2, pivot) > 0).all()


@given(A=spd(batch=2))
def test_eigh_descending_float64(A):
    _check_eigh(A, linalg.eigh_descending(A), tol=1e-12)


@given(seed=SEEDS, n=dims(2), b=st.integers(1, 3))
def test_eigh_descending_indefinite_float64(seed, n, b):
    A = linalg.sym(randn(generator(seed), b, n, n))
    _check_eigh(A, linalg.eigh_descending(A), tol=1e-12)


@given(seed=SEEDS, n=dims())
def test_eigh_descending_float32_tolerance(seed, n):
    A = spd_matrix(generator(seed), 2, n, log10_range=(-2.0, 2.0), dtype=torch.float32)
    _check_eigh(A, linalg.eigh_descending(A), tol=2e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 3), (1, 2, 3, 3)])
def test_eigh_non_square_or_unbatched_raises(shape):
    with pytest.raises(ValueError, match="square"):
        linalg.eigh_descending(torch.zeros(shape))


def test_eigh_retries_in_float64(monkeypatch):
    seen = []

    def flaky(A):
        seen.append(A.dtype)
        if A.dtype == torch.float32:
            raise RuntimeError("simulated float32 failure")
        return torch.linalg.eigh(A)

    monkeypatch.setattr(linalg, "_eigh", flaky)
    A = spd_matrix(generator(3), 2, 5, log10_range=(-1.0, 1.0), dtype=torch.float32)
    eig = linalg.eigh_descending(A)
    assert seen == [torch.float32, torch.float64]
    _check_eigh(A, eig, tol=2e-6)


def test_eigh_raises_arithmetic_error_when_retry_fails(monkeypatch):
    def broken(A):
        raise RuntimeError(f"simulated failure in {A.dtype}")

    monkeypatch.setattr(linalg, "_eigh", broken)
    with pytest.raises(ArithmeticError, match="float64"):
        linalg.eigh_descending(torch.eye(3).expand(2, 3, 3).clone())


# -- power / QR and Rayleigh quotients --------------------------------------------------------


@given(A=spd(batch=2), seed=SEEDS)
def test_power_qr_orthonormal_and_spans_AQ(A, seed):
    n = A.shape[-1]
    Q = orthonormal(generator(seed), 2, n)
    Q_new = linalg.power_qr(A, Q)
    assert Q_new.shape == Q.shape
    assert_orthonormal(Q_new, atol=1e-12 * n)
    AQ = A @ Q
    # A Q lies in the span of Q_new (A is invertible, so the spans are equal)
    close(Q_new @ (Q_new.mT @ AQ), AQ, rtol=1e-9, atol=1e-9 * AQ.abs().max().item())
    # and column by column: the first j columns of Q_new span those of A Q (R = Q_newᵀ A Q is upper
    # triangular), which is what makes repeated steps converge to the ordered eigenvectors
    assert_upper_triangular(Q_new.mT @ AQ)


@given(A=spd(batch=2), seed=SEEDS, sort=st.booleans())
def test_sorted_power_step_is_a_qr_of_the_permuted_power_product(A, seed, sort):
    n = A.shape[-1]
    Q = orthonormal(generator(seed), 2, n)
    Q_new, e, perm = linalg.sorted_power_step(A, Q, sort=sort)
    rayleigh = torch.diagonal(Q.mT @ A @ Q, dim1=-2, dim2=-1)
    order = torch.arange(n).expand(2, n) if perm is None else perm
    assert (perm is None) == (not sort)
    if sort:
        assert torch.all(e[:, :-1] >= e[:, 1:])
    close(e, rayleigh.gather(-1, order))
    assert_orthonormal(Q_new, atol=1e-12 * n)
    P = (A @ Q).gather(-1, order.unsqueeze(-2).expand(2, n, n))  # A Q with its columns in that order
    assert_upper_triangular(Q_new.mT @ P)


def assert_upper_triangular(R):
    below = torch.tril(R, diagonal=-1).abs().max().item()
    assert below <= 1e-9 * R.abs().max().item(), below


@given(seed=SEEDS, n=dims(), k=dims(), b=st.integers(1, 3))
def test_rayleigh_quotients_equal_diag_of_QtAQ(seed, n, k, b):
    gen = generator(seed)
    A = linalg.sym(randn(gen, b, n, n))
    Q = randn(gen, b, n, k)
    got = linalg.rayleigh_quotients(A, Q)
    close(got, torch.diagonal(Q.mT @ A @ Q, dim1=-2, dim2=-1))


# -- Newton–Schulz ---------------------------------------------------------------------------------

SCHEDULES = ["kj", "polar_express", "quintic", "cans", "deepseekv4"]


# The coefficients come from tests/reference/newton_schulz.py, typed from muon.md §4, never from
# linalg.NS_SCHEDULES: a wrong number in kronopt's table must disagree with them.
composed = ns_ref.scalar_iteration
schedule = ns_ref.coefficients

#: KellerJordan/Muon's quintic, typed here once more (muon.md §4; torch.optim.Muon's defaults)
KJ = (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 5, 8, 11, 17])
def test_ns_schedules_match_the_published_tables(name, steps):
    tuples, beyond = linalg.NS_SCHEDULES[name]
    assert [tuple(t) for t in linalg.ns_coefficients(tuples, steps, beyond)] == schedule(name, steps)


@given(seed=SEEDS, m=dims(), n=dims(), sigma=st.floats(1e-3, 1e3), steps=st.integers(1, 8))
def test_newton_schulz_of_a_rank_one_matrix_is_the_scalar_iteration_at_one(seed, m, n, sigma, steps):
    # σ u vᵀ normalised by its Frobenius norm σ has the single singular value 1, so NS gives p∘…∘p(1) u vᵀ
    gen = generator(seed)
    u, v = randn(gen, m), randn(gen, n)
    u, v = u / u.norm(), v / v.norm()
    x = 1.0
    for _ in range(steps):
        x = KJ[0] * x + KJ[1] * x**3 + KJ[2] * x**5
    out = linalg.newton_schulz((sigma * torch.outer(u, v))[None], [KJ] * steps, dtype=F64)[0]
    close(out, x * torch.outer(u, v), rtol=1e-10, atol=1e-12)


@given(seed=SEEDS, n=dims(1, 8))
def test_newton_schulz_keeps_an_orthogonal_matrix_in_the_schedules_band(seed, n):
    # Q/‖Q‖_F has every singular value 1/√n, so NS(Q) = p(1/√n) Q; polar_express (≥ 8 steps) maps
    # [1e-3, 1] to 1 ± 1e-4 (muon.md §4), so an orthogonal matrix is a fixed point up to that band
    Q = orthonormal(generator(seed), 1, n)
    coeffs = [
        (8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750),
    ]  # fmt: skip
    x = 1 / math.sqrt(n)
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    out = linalg.newton_schulz(Q, coeffs, dtype=F64)
    close(out, x * Q, rtol=1e-10, atol=1e-12)
    assert abs(x - 1) <= 1e-4
    close(out, Q, rtol=0, atol=1e-4)


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), name=st.sampled_from(SCHEDULES), steps=st.integers(1, 10))
def test_newton_schulz_equals_the_naive_reference(seed, m, n, b, name, steps):
    X = randn(generator(seed), b, m, n) * 10.0 ** (seed % 7 - 3)
    coeffs = schedule(name, steps)
    for norm in ("clamp", "add"):
        close(linalg.newton_schulz(X, coeffs, dtype=F64, norm=norm), ns_ref.newton_schulz(X, coeffs, norm=norm), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 32, 64), (2, 64, 64), (8, 24, 40), (3, 70, 20), (1, 48, 96)])
def test_newton_schulz_in_bfloat16_on_small_cpu_blocks_is_bfloat16_arithmetic(gen, shape):
    """Small CPU blocks run the bfloat16 iteration in float32 kernels, each result rounded to bfloat16.
    Over two iterations (before rounding flips compound) nearly every entry equals the float64
    reference that rounds each operation to bfloat16 (100 % in most draws); the float32 iteration
    rounded only at the end matches about 40 %, and unrounded none."""
    U = torch.randn(*shape, generator=gen)
    assert linalg._bfloat16_in_float32(U, torch.bfloat16)
    coeffs = schedule("kj", 2)
    for norm in ("clamp", "add"):
        out = linalg.newton_schulz(U, coeffs, norm=norm)
        assert out.dtype == torch.bfloat16 and out.shape == U.shape
        ref = ns_ref.newton_schulz(U, coeffs, norm=norm, round_to=torch.bfloat16)
        assert (out.double() == ref).double().mean() >= 0.95
    # five iterations: the flips compound, and it stays a bfloat16 polar factor
    out = linalg.newton_schulz(U, schedule("kj", 5)).double()
    ref = ns_ref.newton_schulz(U, schedule("kj", 5), round_to=torch.bfloat16)
    assert (out - ref).norm() <= 1e-2 * ref.norm()


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 70, 20), (1, 48, 48)])
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_newton_schulz_in_float32_kernels_rounds_in_its_buffers_as_into_new_tensors(gen, shape, source):
    """The untracked path rounds each result in place in buffers of its own; a ``U`` that autograd
    tracks takes the functional form, each result rounded into a new tensor. The two give the same
    bits, for float32 and bfloat16 input, either norm, wide, tall and square blocks, any number of
    iterations (none included), and ``U`` is left as it was."""
    U = torch.randn(*shape, generator=gen).to(source) * 1e-3  # so that an ε of 1e-4 to 1 counts in the norm
    before = U.clone()
    assert linalg._bfloat16_in_float32(U, torch.bfloat16)
    for norm, eps in itertools.product(("clamp", "add"), (1e-7, 1e-4, 0.3)):
        for steps in (0, 1, 5):
            coeffs = schedule("kj", steps) if steps else []
            fast = linalg.newton_schulz(U, coeffs, norm=norm, eps=eps)
            with torch.enable_grad():
                tracked = linalg.newton_schulz(U.clone().requires_grad_(), coeffs, norm=norm, eps=eps)
            assert fast.dtype == tracked.dtype == torch.bfloat16 and not fast.requires_grad
            assert torch.equal(fast, tracked.detach()), (norm, eps, steps)
    assert torch.equal(U, before)
    # a transposed view is read into contiguous memory first: as the functional form on a contiguous copy
    V = U.mT.contiguous().mT  # U's values, the other strides
    with torch.enable_grad():
        tracked = linalg.newton_schulz(U.clone().requires_grad_(), schedule("kj", 5))
    assert torch.equal(linalg.newton_schulz(V, schedule("kj", 5)), tracked.detach())


class _Products(torch.utils._python_dispatch.TorchDispatchMode):
    """The overloads of the products a call dispatches (``bmm.out``, ``baddbmm.default``, …)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.seen.append(func._overloadname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 70, 20), (1, 48, 48)])
@pytest.mark.parametrize(
    "dtype, rounded",
    [(torch.bfloat16, False), (torch.float32, False), (torch.float64, False), (torch.bfloat16, True)],
    ids=["bfloat16", "float32", "float64", "bfloat16 in float32 kernels"],
)
def test_newton_schulz_in_kept_buffers_gives_the_functional_forms_bits(gen, shape, dtype, rounded, monkeypatch):
    """With ``buffers`` (a dict the caller keeps) an untracked ``U`` runs in them, every product written with
    ``out=`` and no buffer made again at a second call of the same shape; a ``U`` that autograd tracks takes the
    functional form. The same bits for any input dtype, either norm, any number of iterations (none included),
    in ``dtype``'s own kernels or (bfloat16) in float32 kernels, a first and a second call alike, and ``U`` is left
    as it was. Fails on a buffer read after it is overwritten, a norm taken after a cast it should precede, a ``U``
    normalised in place, a product that allocates, or buffers of another call's shape taken again."""
    monkeypatch.setattr(linalg, "_bfloat16_in_float32", lambda U, dtype: rounded)
    for source in (torch.float32, torch.bfloat16, torch.float64):
        U = torch.randn(*shape, generator=gen).to(source) * 1e-3  # so that an ε of 1e-4 to 1 counts in the norm
        before = U.clone()
        for norm, eps in itertools.product(("clamp", "add"), (1e-7, 1e-4, 0.3)):
            for steps in (0, 1, 5):
                coeffs = schedule("kj", steps) if steps else []
                kept: dict[str, torch.Tensor] = {}
                first = linalg.newton_schulz(U, coeffs, norm=norm, eps=eps, dtype=dtype, buffers=kept).clone()
                made = dict(kept)
                with _Products() as products:
                    second = linalg.newton_schulz(U, coeffs, norm=norm, eps=eps, dtype=dtype, buffers=kept)
                assert kept.keys() == made.keys() and all(kept[k] is made[k] for k in made)
                with torch.enable_grad():
                    tracked = linalg.newton_schulz(U.clone().requires_grad_(), coeffs, norm=norm, eps=eps, dtype=dtype)
                assert first.dtype == second.dtype == tracked.dtype == dtype and not second.requires_grad
                assert torch.equal(first, tracked.detach()) and torch.equal(second, tracked.detach()), (source, norm, eps, steps)
                assert products.seen == ["out"] * 3 * steps, products.seen
        assert torch.equal(U, before)
    other: dict[str, torch.Tensor] = {}
    linalg.newton_schulz(torch.randn(2, 8, 6, generator=gen), schedule("kj", 2), dtype=dtype, buffers=other)
    small = dict(other)
    linalg.newton_schulz(torch.randn(2, 10, 6, generator=gen), schedule("kj", 2), dtype=dtype, buffers=other)
    assert other["X"] is not small["X"] and other["X"].shape == (2, 10, 6)  # another shape: made anew


def test_newton_schulz_in_float32_kernels_under_function_transforms(gen):
    """Forward-mode AD and ``vmap`` wrap their tensors, so they take the functional form (no ``out=``, nothing
    in place): the primal matches the plain iteration bit for bit, the mapped slices up to a few entries
    (vmap runs its reductions and products over the whole stack, in another order)."""
    U = torch.randn(2, 3, 24, 40, generator=gen)
    coeffs = schedule("kj", 3)
    plain = torch.stack([linalg.newton_schulz(u, coeffs) for u in U])
    mapped = torch.func.vmap(lambda u: linalg.newton_schulz(u, coeffs))(U)
    assert mapped.dtype == torch.bfloat16 and (mapped == plain).double().mean() >= 0.99
    torch.testing.assert_close(mapped.float(), plain.float(), rtol=0, atol=1e-2)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(U[0], torch.ones_like(U[0]))
        out = torch.autograd.forward_ad.unpack_dual(linalg.newton_schulz(dual, coeffs))
    assert torch.equal(out.primal, plain[0]) and out.tangent is not None


def test_newton_schulz_takes_float32_kernels_only_for_small_bfloat16_work_on_a_cpu(monkeypatch):
    """Where the processor's bfloat16 products are the faster ones."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)
    small = torch.zeros(4, 32, 64)
    assert linalg._bfloat16_in_float32(small, torch.bfloat16)
    assert linalg._bfloat16_in_float32(small.mT, torch.bfloat16)  # the Gram side is the shorter one either way
    assert not linalg._bfloat16_in_float32(small, torch.float32)  # not bfloat16 arithmetic
    assert not linalg._bfloat16_in_float32(small.double(), torch.bfloat16)
    assert not linalg._bfloat16_in_float32(torch.zeros(1, 16, 16), torch.bfloat16)  # 16³: torch's own small kernel
    assert not linalg._bfloat16_in_float32(torch.zeros(4, 128, 256), torch.bfloat16)  # 2²⁴: bfloat16 kernels win
    assert linalg._bfloat16_in_float32(torch.zeros(1, 64, 256), torch.bfloat16)  # 2²⁰, the last size in float32
    assert not linalg._bfloat16_in_float32(torch.zeros(1, 65, 256), torch.bfloat16)


def test_newton_schulz_takes_float32_kernels_at_every_size_where_bfloat16_products_are_slower(gen, monkeypatch):
    """On a processor whose bfloat16 products are no faster than float32 ones, every CPU batch above
    16³ runs its bfloat16 iteration in float32 kernels, and it is still bfloat16 arithmetic: over
    two iterations nearly every entry equals the float64 reference that rounds each operation to
    bfloat16."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: False)
    U = torch.randn(2, 128, 320, generator=gen)  # 2²³ multiply-adds in its Gram product
    assert linalg._bfloat16_in_float32(U, torch.bfloat16)
    assert linalg._bfloat16_in_float32(U.mT, torch.bfloat16)
    assert not linalg._bfloat16_in_float32(torch.zeros(1, 16, 16), torch.bfloat16)  # torch's own small kernel
    assert not linalg._bfloat16_in_float32(U, torch.float32)
    assert not linalg._bfloat16_in_float32(U.double(), torch.bfloat16)
    products: list[torch.dtype] = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("bmm", "baddbmm"):
                products.append(args[1].dtype)
            return func(*args, **(kwargs or {}))

    coeffs = schedule("kj", 2)
    for V in (U, U.mT):
        products.clear()
        with Spy():
            out = linalg.newton_schulz(V, coeffs)
        assert products and set(products) == {torch.float32}
        assert out.dtype == torch.bfloat16 and out.shape == V.shape
        ref = ns_ref.newton_schulz(V, coeffs, round_to=torch.bfloat16)
        assert (out.double() == ref).double().mean() >= 0.95
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)  # the bfloat16 kernels otherwise
    products.clear()
    with Spy():
        linalg.newton_schulz(U, coeffs)
    assert products and set(products) == {torch.bfloat16}


_INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: fpu sse2 avx512f {}\n\n"
_AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu sse2 avx512f {}\n\n"


@pytest.mark.parametrize(
    ("text", "fast"),
    [
        (_INTEL.format("avx512_bf16 amx_bf16 amx_tile"), True),  # AMX
        (_INTEL.format("avx512_bf16 avx512_fp16"), False),  # bfloat16 dot products without AMX
        (_INTEL.format("avx2"), False),
        (_AMD.format("avx512_bf16"), True),  # Zen 4 on
        (_AMD.format("avx2"), False),
        # the first processor's flags only
        (_INTEL.format("avx512_bf16") + "processor\t: 1\nflags\t\t: amx_bf16\n", False),
        ("\n\n  \n" + _INTEL.format("avx2"), False),  # blank lines before the first block
        ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n", True),  # no x86 flags: the default
        ("vendor_id       : IBM/S390\nfeatures\t: esan3 zarch vx\n", True),
        (None, True),  # no file: the default
    ],
)
def test_bfloat16_products_fast_read_from_the_processor_flags(text, fast, tmp_path, monkeypatch):
    assert _on_processor(text, tmp_path, monkeypatch, linalg._bfloat16_products_fast) is fast


def _on_processor(text, tmp_path, monkeypatch, read):
    """``read()`` with ``/proc/cpuinfo`` replaced by ``text`` (no file where it is ``None``); the cached
    reading of the processor cleared before and after, the real file back first (a later reading of the test's
    processor left cached would send later tests down another processor's paths)."""
    info = tmp_path / "cpuinfo"
    if text is not None:
        info.write_text(text)
    with monkeypatch.context() as patch:
        patch.setattr(linalg, "_CPUINFO", str(info))
        linalg._processor.cache_clear()
        try:
            return read()
        finally:
            patch.undo()
            linalg._processor.cache_clear()


def test_compiled_newton_schulz_stays_a_bfloat16_iteration(gen):
    """Inductor fuses a float32 → bfloat16 → float32 round trip away, so inside torch.compile the
    small-block path would run a float32 iteration; the compiled twin keeps the bfloat16 kernels
    instead, and its distance from the float64 iteration is eager bfloat16's (about 1.5e-2 here),
    not float32's (about 1e-6; 1.6e-3 with the round trips fused away)."""
    U = torch.randn(4, 32, 64, generator=gen)
    coeffs = schedule("kj", 5)
    exact = ns_ref.newton_schulz(U, coeffs)
    torch._dynamo.reset()
    out = torch.compile(linalg.newton_schulz, dynamic=False)(U, coeffs)
    assert out.dtype == torch.bfloat16
    err = lambda X: ((X.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    eager = err(linalg.newton_schulz(U, coeffs))
    assert 0.5 * eager <= err(out) <= 2.0 * eager


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(1, 3), name=st.sampled_from(SCHEDULES), steps=st.integers(1, 10))
def test_newton_schulz_is_composed_polynomial_of_normalized_singular_values(seed, m, n, b, name, steps):
    X = randn(generator(seed), b, m, n)
    coeffs = schedule(name, steps)
    out = linalg.newton_schulz(X, coeffs, dtype=F64)
    assert out.shape == X.shape and out.dtype == F64
    P, S, Vh = torch.linalg.svd(X, full_matrices=False)
    s = S / torch.linalg.vector_norm(X, dim=(-2, -1)).unsqueeze(-1)
    expected = (P * composed(coeffs, s).unsqueeze(-2)) @ Vh
    close(out, expected, rtol=1e-9, atol=1e-9)
    # singular values of the output are p(σ / ‖X‖_F)
    close(torch.linalg.svdvals(out), composed(coeffs, s).abs().sort(dim=-1, descending=True).values, rtol=1e-9, atol=1e-9)


# muon.md §4: (schedule, steps, input range, output range, decimals of the table)
NS_TABLE = [
    ("kj", 5, (0.05, 1.0), (0.682, 1.134), 3),
    ("polar_express", 5, (1e-3, 1.0), (0.846, 1.124), 3),
    ("polar_express", 6, (1e-3, 1.0), (0.994, 1.001), 3),
    ("polar_express", 8, (1e-3, 1.0), (1.0, 1.0), 4),
    ("cans", 5, (1e-3, 1.0), (0.884, 1.120), 3),
    ("deepseekv4", 10, (0.01, 1.0), (1.0000, 1.0005), 4),
]


def test_a_schedule_without_margin_diverges_just_above_one_and_is_refused_below_float64():
    """``cans`` (muon.md §4, no safety factor): its composed polynomial, in float64, leaves its band from 1 + 1e-4
    (``polar_express``, with its margin, does not). A rank-one block's normalised input has its one singular value at
    1 exactly before the rounding: bfloat16's rounding (2⁻⁸) sends the iteration to 1e38 or inf on a 7 × 5 block,
    float32's to 60 and more on a 1024 × 1024 block (1e8 on 2048²), while float64 keeps it a partial isometry. So
    ``cans`` is refused with any iteration dtype but float64, by the orthogonalize rule and the lowrank_flat split
    alike, each problem of the Newton–Schulz options named in one error."""
    above = torch.tensor([1 + 1e-4, 1.004], dtype=F64)
    assert (composed(schedule("cans", 5), above) > 100).all()
    assert (composed(schedule("polar_express", 5), above) < 1.2).all()
    gen = generator(0)
    cans = linalg.ns_schedule("cans", 5)
    small = randn(gen, 1, 7, 1) @ randn(gen, 1, 1, 5)
    narrow = linalg.newton_schulz(small.float(), cans, dtype=torch.bfloat16)
    assert narrow.double().abs().max() > 10  # a partial isometry's entries are ≤ 1
    wide = randn(gen, 1, 1024, 1) @ randn(gen, 1, 1, 1024)
    top = torch.linalg.matrix_norm(linalg.newton_schulz(wide.float(), cans, dtype=torch.float32).double(), ord=2)
    assert not (top < 2).all(), top
    top64 = torch.linalg.matrix_norm(linalg.newton_schulz(wide, cans, dtype=F64), ord=2)
    assert abs(top64.item() - 1.0) <= 0.15, top64
    with pytest.raises(ValueError, match=r"needs ns_dtype = 'float64'.*; ns_restarts \(ns_form = 'gram'\)"):
        linalg.check_ns_options("gram", (9,), 5, "cans", "float32")
    for dtype in ("bfloat16", "float16", "float32"):
        with pytest.raises(kronopt.config.ConfigError, match=r"coefficients = 'cans' needs ns_dtype"):
            kronopt.resolve("muon", **{"inner.coefficients": "cans", "inner.ns_dtype": dtype})
        with pytest.raises(kronopt.config.ConfigError, match=r"ns_coefficients = 'cans' needs ns_dtype"):
            kronopt.resolve("pro_kl_shampoo", **{"split.ns_coefficients": "cans", "split.ns_dtype": dtype})
    kronopt.resolve("muon", **{"inner.coefficients": "cans", "inner.ns_dtype": "float64"})
    kronopt.resolve("pro_kl_shampoo", **{"split.ns_coefficients": "cans", "split.ns_dtype": "float64"})
    kronopt.resolve("muon", **{"inner.coefficients": "polar_express"})  # bfloat16, its margin folded in


@pytest.mark.parametrize("name,steps,inputs,outputs,decimals", NS_TABLE)
def test_composed_polynomial_range_matches_spec_table(name, steps, inputs, outputs, decimals):
    lo, hi = inputs
    x = torch.cat(
        [
            torch.linspace(lo, hi, 50_001, dtype=F64),
            torch.logspace(math.log10(lo), math.log10(hi), 50_001, dtype=F64),
        ]
    )
    y = composed(schedule(name, steps), x)
    half_ulp = 0.5 * 10.0**-decimals + 1e-12
    assert abs(y.min().item() - outputs[0]) <= half_ulp, (name, steps, y.min().item())
    assert abs(y.max().item() - outputs[1]) <= half_ulp, (name, steps, y.max().item())


@pytest.mark.parametrize("name,steps,inputs,outputs,decimals", NS_TABLE)
@given(seed=SEEDS, k=st.integers(1, 6), data=st.data())
def test_newton_schulz_singular_values_land_in_spec_band(name, steps, inputs, outputs, decimals, seed, k, data):
    lo = inputs[0]
    # normalized singular values u with Σu² = 1 and every u in [lo, 1]
    small = data.draw(st.lists(st.floats(lo, 3 * lo), min_size=k - 1, max_size=k - 1))
    u = torch.tensor([*small, math.sqrt(1 - sum(v * v for v in small))], dtype=F64)
    gen = generator(seed)
    m, n = k + data.draw(st.integers(0, 3)), k + data.draw(st.integers(0, 3))
    P = orthonormal(gen, 1, m)[..., :k]
    V = orthonormal(gen, 1, n)[..., :k]
    X = (P * (7.5 * u)) @ V.mT
    sv = torch.linalg.svdvals(linalg.newton_schulz(X, schedule(name, steps), dtype=F64))[..., :k]
    slack = 0.5 * 10.0**-decimals + 1e-9
    assert sv.min().item() >= outputs[0] - slack
    assert sv.max().item() <= outputs[1] + slack


@given(seed=SEEDS, m=dims(), n=dims(), norm=st.sampled_from(["clamp", "add"]))
def test_newton_schulz_transpose_equivariant(seed, m, n, norm):
    X = randn(generator(seed), 2, m, n)
    coeffs = schedule("kj", 5)
    out = linalg.newton_schulz(X.contiguous(), coeffs, dtype=F64, norm=norm)
    close(linalg.newton_schulz(X.mT.contiguous(), coeffs, dtype=F64, norm=norm), out.mT)
    # either orientation comes back in the block's own layout: no transposed view for a caller to copy
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("norm", ["clamp", "add"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 5, 3), (1, 4, 4)])
def test_newton_schulz_of_zero_is_zero(dtype, norm, shape):
    out = linalg.newton_schulz(torch.zeros(shape), schedule("kj", 5), dtype=dtype, norm=norm)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros(shape, dtype=dtype))


@given(seed=SEEDS, m=dims(), n=dims(), b=st.integers(2, 4), name=st.sampled_from(SCHEDULES))
def test_newton_schulz_batch_equals_separate_calls(seed, m, n, b, name):
    X = randn(generator(seed), b, m, n)
    coeffs = schedule(name, 5)
    batched = linalg.newton_schulz(X, coeffs, dtype=F64)
    for i in range(b):
        close(batched[i : i + 1], linalg.newton_schulz(X[i : i + 1], coeffs, dtype=F64), rtol=1e-10, atol=1e-11)


def test_newton_schulz_bad_norm_or_shape_raises():
    with pytest.raises(ValueError, match="norm"):
        linalg.newton_schulz(torch.ones(1, 2, 2), schedule("kj", 1), norm="max")
    with pytest.raises(ValueError, match="batch"):
        linalg.newton_schulz(torch.ones(2, 2), schedule("kj", 1))


def test_ns_coefficients_extension():
    sched = ((1.0, 0.0, 0.0), (2.0, 0.0, 0.0), (3.0, 0.0, 0.0))
    assert [a for a, _, _ in linalg.ns_coefficients(sched, 7, "cycle")] == [1, 2, 3, 1, 2, 3, 1]
    assert [a for a, _, _ in linalg.ns_coefficients(sched, 5, "repeat_last")] == [1, 2, 3, 3, 3]
    assert [a for a, _, _ in linalg.ns_coefficients(sched, 2, "cycle")] == [1, 2]
    with pytest.raises(ValueError):
        linalg.ns_coefficients((), 3, "cycle")
    with pytest.raises(ValueError):
        linalg.ns_coefficients(sched, 3, "wrap")


# -- Muon scales ------------------------------------------------------------------------------------


def _expected_rms(rule, m, n):
    """muon.md §5: the update RMS of s·O for an exactly semi-orthogonal O."""
    return {
        "original": 1 / math.sqrt(n),
        "match_rms_adamw": 0.2,
        "spectral": 1.0,
        "unit_rms_norm": math.sqrt(m / n) / math.sqrt(max(m, n)),
        "none": 1 / math.sqrt(max(m, n)),
    }[rule]


@pytest.mark.parametrize("rule", linalg.MUON_SCALES)
@pytest.mark.parametrize("m,n", [(12, 4), (6, 6), (4, 12), (1, 9), (9, 1)])
def test_muon_scale_update_rms_table(rule, m, n):
    O = linalg.newton_schulz(randn(generator(m * 31 + n), 1, m, n), schedule("polar_express", 12), dtype=F64)
    k = min(m, n)
    small = O.mT @ O if m >= n else O @ O.mT
    assert_close_to_identity(small[0], diag_atol=1e-6, offdiag_atol=1e-6)
    assert k == small.shape[-1]
    rms = (linalg.muon_scale(m, n, rule) * O).square().mean().sqrt().item()
    assert rms == pytest.approx(_expected_rms(rule, m, n), rel=1e-6)


def test_muon_scale_unknown_rule_raises():
    with pytest.raises(ValueError, match="unknown scale rule"):
        linalg.muon_scale(3, 4, "bogus")


# -- restricted (low-rank + flat) sides: dense checks ---------------------------------------------


def _flat_factor(gen, d, r):
    U = orthonormal(gen, 1, d)[:, :, :r]
    S = spd_matrix(gen, 1, r)
    mu = torch.tensor([0.37], dtype=torch.float64)
    dense = U @ S @ U.mT + mu.view(-1, 1, 1) * (torch.eye(d, dtype=torch.float64) - U @ U.mT)
    return U, S, mu, dense


def test_subspace_split_and_row_energy_match_dense_projections():
    gen = generator(11)
    X = randn(gen, 2, 5, 7)
    U = orthonormal(gen, 2, 7)[:, :, :3]
    XU, Xc = linalg.subspace_split(X, U)
    P_perp = torch.eye(7, dtype=torch.float64) - U @ U.mT
    torch.testing.assert_close(XU, torch.einsum("bmn,bnr->bmr", X, U), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(Xc, X @ P_perp, rtol=1e-12, atol=1e-13)
    # a transposed view (a left-restricted side's frame): the same split, the complement in the view's layout
    T = randn(gen, 2, 7, 5).mT
    TU, Tc = linalg.subspace_split(T, U)
    torch.testing.assert_close(TU, T @ U, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(Tc, T @ P_perp, rtol=1e-12, atol=1e-13)
    assert Tc.mT.is_contiguous()
    # the subspace on the left: (Uᵀ X, X − U Uᵀ X); given coordinates are used as they are
    Z = randn(gen, 2, 7, 4)
    ZU, Zc = linalg.subspace_split(Z, U, left=True)
    torch.testing.assert_close(ZU, U.mT @ Z, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(Zc, P_perp @ Z, rtol=1e-12, atol=1e-13)
    given = torch.zeros_like(XU)
    kept, whole = linalg.subspace_split(X, U, coords=given)
    assert kept is given
    torch.testing.assert_close(whole, X, rtol=0, atol=0)
    w = torch.rand(2, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(linalg.weighted_row_energy(X, w), torch.einsum("bmn,bn->bm", X * X, w), rtol=1e-13, atol=0)
    torch.testing.assert_close(linalg.weighted_row_energy(X, None), (X * X).sum(-1), rtol=1e-13, atol=0)


def test_restricted_power_product_is_the_updated_factor_acting_on_its_subspace():
    gen = generator(12)
    d, r, rho = 9, 3, 0.8
    U, S, mu, dense = _flat_factor(gen, d, r)
    A = spd_matrix(gen, 1, d)  # the new statistic
    expected = (rho * dense + (1 - rho) * A) @ U
    torch.testing.assert_close(linalg.restricted_power_product(U, S, (1 - rho) * A @ U, rho), expected, rtol=1e-12, atol=1e-12)


def test_reproject_flat_is_the_m_projection_of_the_dense_factor():
    gen = generator(13)
    d, r = 10, 4
    U, S, mu, dense = _flat_factor(gen, d, r)
    U_new = orthonormal(gen, 1, d)[:, :, :r]
    lam = torch.rand(1, r, generator=gen, dtype=torch.float64) + 0.5
    S_new, mu_new, lam_new = linalg.reproject_flat(U_new, U, S, mu, lam)
    torch.testing.assert_close(S_new, U_new.mT @ dense @ U_new, rtol=1e-12, atol=1e-12)
    trace = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    torch.testing.assert_close(mu_new, (trace(dense) - trace(S_new)) / (d - r), rtol=1e-12, atol=1e-14)
    # tracked values: the diagonal of the same projection applied to U diag(λ) Uᵀ + μ P⊥
    tracked = U @ torch.diag_embed(lam) @ U.mT + mu.view(-1, 1, 1) * (torch.eye(d, dtype=torch.float64) - U @ U.mT)
    torch.testing.assert_close(lam_new, torch.diagonal(U_new.mT @ tracked @ U_new, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)


def _sandwich(gen, b, m, k):
    """A symmetric ``X``, ``G`` and ``S`` with a per-block ``β``, and ``β X + 0.7 (G S) Gᵀ`` in float64."""
    G = randn(gen, b, m, k)
    S = linalg.gram_left(randn(gen, b, k, k))
    X = linalg.gram_left(randn(gen, b, m, m))
    beta = torch.rand(b, 1, 1, generator=gen, dtype=F64)
    return G, S, X, beta, beta * X + 0.7 * G @ S @ G.mT


def _tiling(patch, tile, tiled):
    """Make :func:`kronopt.linalg.sym_product` take tiles of ``tile`` from side 1 (``tiled``) or never."""
    patch.setattr(linalg, "_GRAM_TILED_MIN", 1 if tiled else 10**9)
    patch.setattr(linalg, "_GRAM_TILE", tile)


@given(seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 6), b=st.integers(1, 3), tile=st.integers(1, 5), tiled=st.booleans())
def test_sym_product_of_a_sandwich_with_per_block_beta(seed, m, k, b, tile, tiled):
    """``β X + α (G S) Gᵀ`` with a per-block ``β`` tensor, tile by tile or dense: exactly symmetric, equal to float64."""
    G, S, X, beta, expected = _sandwich(generator(seed), b, m, k)
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, tiled)
        out = linalg.sym_product(X, G @ S, G, beta=beta, alpha=0.7)
    assert torch.equal(out, out.mT)
    close(out, expected)


@given(
    seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 6), b=st.integers(1, 3), tile=st.integers(1, 5),
    per_block=st.booleans(), dtype=st.sampled_from([torch.float32, F64]), in_place=st.booleans(),
)
def test_sym_product_at_half_weight_gives_the_bits_of_sym_of_the_full_one(seed, m, k, b, tile, per_block, dtype, in_place):
    """The products that are symmetrised are made at half weight and summed with their transposes
    (``sym_sum``): dense, the whole result, and tiled, each diagonal tile, equal ``sym`` of the same product
    made at full weight bit for bit (halving is exact); below the diagonal, each part (a row's panel in place,
    a tile apart: ``_tiles_in_place``) is the full-weight product's own, and so is its mirror. ``sym_sum(A)``
    is ``A + Aᵀ``, twice ``sym(A)`` exactly."""
    gen = generator(seed)
    A, B = randn(gen, b, m, k, dtype=dtype), randn(gen, b, m, k, dtype=dtype)
    X = linalg.sym(randn(gen, b, m, m, dtype=dtype))
    beta = (torch.rand(b, 1, 1, generator=gen, dtype=F64) + 0.25).to(dtype) if per_block else 0.9

    def full(I, J):  # the product at full weight of the rows I and the columns J, as the dense form made it before
        if per_block:
            return torch.baddbmm(X[:, I, J] * beta, A[:, I], B[:, J].mT, alpha=0.3)
        return torch.baddbmm(X[:, I, J], A[:, I], B[:, J].mT, beta=beta, alpha=0.3)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, "_tiles_in_place", lambda: in_place)
        _tiling(patch, tile, False)
        dense = linalg.sym_product(X, A, B, beta=beta, alpha=0.3)
        _tiling(patch, tile, True)
        tiled = linalg.sym_product(X, A, B, beta=beta, alpha=0.3)
        slices = linalg._tile_slices(m)
    assert torch.equal(dense, linalg.sym(full(slice(0, m), slice(0, m))))
    for i, I in enumerate(slices):
        assert torch.equal(tiled[:, I, I], linalg.sym(full(I, I)))
        for J in [slice(0, I.start)] if in_place and i else slices[:i]:
            assert torch.equal(tiled[:, I, J], full(I, J)) and torch.equal(tiled[:, J, I], full(I, J).mT)
    S = randn(gen, b, m, m, dtype=dtype)
    assert torch.equal(linalg.sym_sum(S), S + S.mT) and torch.equal(linalg.sym_sum(S), 2 * linalg.sym(S))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("tiled", [False, True])
def test_sym_product_with_beta_zero_never_reads_x(tiled, in_place):
    """With a number β of 0 the start ``X`` is never read, dense or tiled, by panels in place or tile by
    tile apart: ``accumulate_sandwich`` starts from ``torch.empty_like``, whose memory may hold NaN or inf."""
    gen = generator(21)
    A = randn(gen, 2, 10, 3).float()  # a Gram product, as accumulate_sandwich's
    X = torch.full((2, 10, 10), float("nan"))
    X[:, ::3, 1::2] = float("inf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, "_tiles_in_place", lambda: in_place)
        _tiling(patch, 4, tiled)
        out = linalg.sym_product(X, A, A, beta=0.0, alpha=0.3)
    assert torch.isfinite(out).all() and torch.equal(out, out.mT)
    close(out.double(), 0.3 * A.double() @ A.double().mT, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiled", [False, True])
def test_sym_product_keeps_entries_between_half_the_largest_float_and_it(tiled):
    """The one place the half-weight form differs from averaging the full-weight product: entries above half
    the largest finite number, where ``P + Pᵀ`` (or the full product itself) overflowed, stay finite and exact."""
    big = 0.6 * torch.finfo(torch.float32).max
    X = torch.eye(5).mul(big).unsqueeze(0)
    A = torch.zeros(1, 5, 2)
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, 2, tiled)
        out = linalg.sym_product(X, A, A, beta=1.0, alpha=0.3)
    assert torch.equal(out, X)
    assert not torch.isfinite(linalg.sym(X)).all()  # what averaging the full-weight product gave


@given(
    seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 4), l=st.integers(1, 14), b=st.integers(1, 3),
    tile=st.integers(1, 5), tiled=st.booleans(),
)
def test_two_gram_updates_with_a_per_block_weight(seed, m, k, l, b, tile, tiled):
    """``β X + α (A Aᵀ + w B Bᵀ)`` with a weight per block (one of them 0), tile by tile or dense: exactly
    symmetric, equal to the float64 sum in float64 and to rounding in float32. A weight on the wrong Gram,
    or a missing square root in the tiled form, fails."""
    gen = generator(seed)
    A, B = randn(gen, b, m, k), randn(gen, b, m, l)
    X = linalg.gram_left(randn(gen, b, m, m))
    w = torch.rand(b, 1, 1, generator=gen, dtype=F64) * 4
    w[0] = 0.0
    expected = 0.9 * X + 0.3 * (A @ A.mT + w * B @ B.mT)
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, tiled)
        out64 = linalg.accumulate_two_grams_left(X, A, B, w, 0.9, 0.3)
        out32 = linalg.accumulate_two_grams_left(X.float(), A.float(), B.float(), w.float(), 0.9, 0.3)
    for out in (out64, out32):
        assert torch.equal(out, out.mT)
    close(out64, expected)
    close(out32.double(), expected, rtol=1e-5, atol=1e-5)
    if not tiled:  # made at half weight, summed with its transpose: the bits of sym of the full-weight sum
        X, A, B, w = X.float(), A.float(), B.float(), w.float()
        assert torch.equal(out32, linalg.sym(torch.baddbmm(X, A, A.mT, beta=0.9, alpha=0.3).addcmul_(B @ B.mT, w, value=0.3)))


@given(seed=SEEDS, d=st.integers(1, 10), k=st.integers(1, 24), b=st.integers(1, 3), tile=st.integers(1, 5), tiled=st.booleans())
def test_sandwich_update_is_the_gram_update_of_the_rotated_operand(seed, d, k, b, tile, tiled):
    """``accumulate_sandwich``: ``β X + α Q (Y Yᵀ) Qᵀ``, for an orthonormal ``Q`` the Gram update of ``Q Y``; exactly
    symmetric and PSD, tile by tile or dense, equal to float64 and to rounding in float32 (a NaN in the empty start
    of ``Y Yᵀ`` would show)."""
    gen = generator(seed)
    Y, Q = randn(gen, b, d, k), orthonormal(gen, b, d)
    X = linalg.gram_left(randn(gen, b, d, d))
    expected = 0.9 * X + 0.3 * (Q @ Y) @ (Q @ Y).mT
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, tiled)
        out = linalg.accumulate_sandwich(X, Q, Y, 0.9, 0.3)
        out32 = linalg.accumulate_sandwich(X.float(), Q.float(), Y.float(), 0.9, 0.3)
    for o in (out, out32):
        assert torch.equal(o, o.mT)
    assert_psd(out)
    close(out, expected)
    close(out32.double(), expected, rtol=1e-4, atol=1e-4)


@given(
    seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 4), l=st.integers(1, 14), b=st.integers(1, 3),
    tile=st.integers(1, 5), tiled=st.booleans(), rotated=st.booleans(), product=st.booleans(),
)
def test_two_gram_updates_with_the_rotated_rows_energies(seed, m, k, l, b, tile, tiled, rotated, product):
    """``accumulate_two_grams_left_with_energy``: the same update as ``accumulate_two_grams_left`` and the squared
    row norms of ``Qᵀ B`` (``B`` itself without ``Q``) against float64, whether they come off ``B``'s Gram
    (wider than tall, dense) or off the product, which it returns where it made it (``None`` otherwise). A
    diagonal read across the wrong axis of ``Qᵀ C``, or the energies of ``B`` instead of ``Qᵀ B``, fails. ``product``:
    the caller reads ``Qᵀ B`` itself, so it is made and returned whatever the shapes."""
    gen = generator(seed)
    A, B = randn(gen, b, m, k), randn(gen, b, m, l)
    X = linalg.gram_left(randn(gen, b, m, m))
    w = torch.rand(b, 1, 1, generator=gen, dtype=F64) * 4
    Q = orthonormal(gen, b, m) if rotated else None
    expected = 0.9 * X + 0.3 * (A @ A.mT + w * B @ B.mT)
    QtB = B if Q is None else Q.mT @ B
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, tiled)
        out, energy, made = linalg.accumulate_two_grams_left_with_energy(X, A, B, w, 0.9, 0.3, Q, product=product)
        out32, energy32, _ = linalg.accumulate_two_grams_left_with_energy(
            X.float(), A.float(), B.float(), w.float(), 0.9, 0.3, None if Q is None else Q.float()
        )
    assert torch.equal(out, out.mT)
    close(out, expected)
    close(energy, QtB.square().sum(-1))
    close(energy32.double(), QtB.square().sum(-1), rtol=1e-5, atol=1e-4)
    from_gram = Q is not None and not tiled and l > m and not product
    assert (made is None) == from_gram
    if made is not None:
        close(made, QtB)


def test_rows_energies_of_a_narrow_dtype_come_from_the_product(gen):
    """In bfloat16 a row's energy read off the Gram keeps no digits well above float32's limit, so a dtype
    narrower than float32 takes the product's route whatever the shapes."""
    X = linalg.gram_left(randn(gen, 1, 3, 3)).bfloat16()
    A, B, Q = randn(gen, 1, 3, 2).bfloat16(), randn(gen, 1, 3, 9).bfloat16(), orthonormal(gen, 1, 3).bfloat16()
    _, energy, made = linalg.accumulate_two_grams_left_with_energy(X, A, B, torch.ones(1, 1, 1, dtype=torch.bfloat16), 0.9, 0.3, Q)
    assert made is not None
    assert torch.equal(energy, linalg.weighted_row_energy(made, None))


def test_rotated_diagonal_is_the_diagonal_of_the_congruence_floored_at_zero(gen):
    """``diag(Qᵀ C Q)`` for a PSD ``C`` and a square ``Q`` (not orthonormal: the identity holds for any ``Q``);
    a rounding below zero (a direction ``C`` does not reach) reads 0."""
    C = linalg.gram_left(randn(gen, 2, 6, 3))  # rank 3
    Q = randn(gen, 2, 6, 6)
    close(linalg.rotated_diagonal(C, Q), torch.diagonal(Q.mT @ C @ Q, dim1=-2, dim2=-1))
    null = torch.linalg.svd(C[:, :, :]).U[:, :, 3:]  # C's null space: diag(Qᵀ C Q) = 0 up to rounding there
    out = linalg.rotated_diagonal(C.float(), null.float())
    assert (out >= 0).all() and out.max() < 1e-4


@given(seed=SEEDS, m=st.integers(1, 12), k=st.integers(1, 6), b=st.integers(1, 3), tile=st.integers(1, 5), tiled=st.booleans())
def test_sym_product_stats_reduce_the_product_it_returns(seed, m, k, b, tile, tiled):
    """``sym_product_stats``: the same product as :func:`sym_product`, with ``⟨P, Y⟩_F`` and ``‖P‖_F`` per block
    equal to the float64 sums over the whole matrix (tiles below the diagonal count for their mirrors too)."""
    gen = generator(seed)
    G, S, X, beta, expected = _sandwich(gen, b, m, k)
    Y = linalg.sym(randn(gen, b, m, m))
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, tiled)
        P, dot, norm = linalg.sym_product_stats(X, G @ S, G, beta=beta, alpha=0.7, other=Y)
        assert torch.equal(P, linalg.sym_product(X, G @ S, G, beta=beta, alpha=0.7))
        P_alone, no_dot, norm_alone = linalg.sym_product_stats(X, G @ S, G, beta=beta, alpha=0.7)
    close(P, expected)
    close(dot.view(-1), (expected * Y).sum((-2, -1)))
    close(norm.view(-1), expected.flatten(1).norm(dim=-1))
    assert no_dot is None and torch.equal(P_alone, P) and torch.equal(norm_alone, norm)


@given(
    seed=SEEDS, k=st.integers(0, 6), d=st.integers(0, 13), b=st.integers(1, 3), tile=st.integers(1, 5),
    per_block=st.booleans(),
)
def test_split_sandwich_equals_the_product_and_reads_only_the_lower_triangle(seed, k, d, b, tile, per_block):
    """``α A S Aᵀ`` from ``S``'s lower tiles (uneven last tile, a per-block ``α``): exactly symmetric, equal to
    the float64 product, in float32 to rounding; NaN in ``S``'s tiles above the diagonal changes nothing, so a
    tile read from the wrong triangle, a diagonal tile not halved or a missing ``Hᵀ`` fails."""
    gen = generator(seed)
    A = randn(gen, b, k, d)
    S = linalg.sym(randn(gen, b, d, d))
    alpha = torch.rand(b, 1, 1, generator=gen, dtype=F64) + 0.5 if per_block else 0.7
    expected = alpha * (A @ S @ A.mT)
    index = torch.arange(d) // tile
    S_lower = S.masked_fill(index.view(-1, 1) < index.view(1, -1), float("nan"))  # the tiles above the diagonal
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, True)
        out64 = linalg.split_sandwich(A, S_lower, alpha=alpha)
        out32 = linalg.split_sandwich(A.float(), S_lower.float(), alpha=alpha if not per_block else alpha.float())
    assert out64.shape == (b, k, k)
    for out in (out64, out32):
        assert torch.equal(out, out.mT)
    close(out64, expected)
    scale = max([1.0, *expected.abs().flatten().tolist()])
    close(out32.double(), expected, rtol=1e-5, atol=1e-5 * scale)


@given(
    seed=SEEDS, k=st.integers(0, 6), d=st.integers(0, 13), b=st.integers(1, 3), tile=st.integers(1, 5),
    middle=st.sampled_from(["dense", "tiles", "panels"]), f32=st.booleans(), number=st.booleans(),
)
def test_split_sandwich_plus_adds_the_symmetric_part_of_its_summand_once(seed, k, d, b, tile, middle, f32, number):
    """``plus = (X, w)``: ``α A S Aᵀ + w (X + Xᵀ)/2`` with a per-block ``α`` and a per-block or plain ``w``, exactly
    symmetric however far ``X`` is from symmetric, equal to the float64 sum (a summand added to one triangle only,
    at twice its weight, scaled by ``α`` too, or left unsymmetrised fails), from a dense middle and from its held
    tiles, tile by tile or by row panels; the buffer the products fill is never read uninitialised (it is NaN
    here); ``X`` is only read."""
    gen = generator(seed)
    A, X = randn(gen, b, k, d), randn(gen, b, k, k)
    S = linalg.sym(randn(gen, b, d, d))
    alpha = torch.rand(b, 1, 1, generator=gen, dtype=F64) + 0.5
    w = 0.75 if number else torch.rand(b, 1, 1, generator=gen, dtype=F64) * 3 - 1
    expected = alpha * (A @ S @ A.mT) + w * (X + X.mT) / 2
    dtype = torch.float32 if f32 else F64
    A, X, S, alpha = A.to(dtype), X.to(dtype), S.to(dtype), alpha.to(dtype)
    w = w if number else w.to(dtype)
    before = X.clone()
    real_empty = torch.empty
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, True)
        patch.setattr(linalg, "_held_panels", lambda: middle == "panels")
        held = S
        if middle != "dense":
            held, _, _ = linalg.sym_product_stats(
                torch.zeros(b, d, d, dtype=dtype), S, torch.eye(d, dtype=dtype).expand(b, d, d), beta=0.0, alpha=1.0, tiles=True
            )
            assert d == 0 or isinstance(held, linalg.LowerTiles)
            assert bool(getattr(held, "panels", None)) is (middle == "panels" and d > tile)
        patch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
        out = linalg.split_sandwich(A, held, alpha=alpha, plus=(X, w))
        plain = linalg.split_sandwich(A, held, alpha=alpha)
    assert torch.equal(X, before) and out.shape == (b, k, k) and out.dtype == dtype
    assert torch.equal(out, out.mT)
    if f32:
        scale = max([1.0, *expected.abs().flatten().tolist()])
        close(out.double(), expected, rtol=1e-5, atol=1e-5 * scale)
    else:
        close(out, expected)
        close(out - plain, w * (X + X.mT) / 2)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("into_x", [False, True])
def test_tiled_update_shows_each_tile_as_it_is_stored(into_x, in_place, monkeypatch):
    """``each`` sees the lower triangle row of tiles by row of tiles, the row's part left of the diagonal (one
    panel in place, tile by tile apart: every entry below the diagonal exactly once) then its diagonal tile,
    with the values the result holds there: a diagonal tile exactly symmetric and contiguous (the reductions of
    :func:`sym_product_stats` round as on a tile made apart), whether the result is fresh or ``X`` itself; the
    result is exactly symmetric."""
    monkeypatch.setattr(linalg, "_tiles_in_place", lambda: in_place)
    gen = generator(4)
    X = linalg.sym(randn(gen, 2, 7, 7)).float()
    A = randn(gen, 2, 7, 3).float()
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, 3, True)
        target = X.clone()
        out = linalg._tiled_sym_product(
            target, A, A, 0.9, 0.1, lambda tile, I, J: seen.append((I, J, tile.clone(), tile.is_contiguous())),
            out=target if into_x else None,
        )
    assert (out is target) == into_x and torch.equal(out, out.mT)
    panels = [(0, 3, 0, 3), (3, 6, 0, 3), (3, 6, 3, 6), (6, 7, 0, 6), (6, 7, 6, 7)]
    tiles = [(0, 3, 0, 3), (3, 6, 0, 3), (3, 6, 3, 6), (6, 7, 0, 3), (6, 7, 3, 6), (6, 7, 6, 7)]
    assert [(I.start, I.stop, J.start, J.stop) for I, J, _, _ in seen] == (panels if in_place else tiles)
    for I, J, tile, contiguous in seen:
        assert torch.equal(tile, out[:, I, J])
        if I == J:
            assert contiguous and torch.equal(tile, tile.mT)
    torch.testing.assert_close(out, 0.9 * X + 0.1 * A @ A.mT, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
def test_tiled_update_takes_the_form_the_processor_runs_faster(in_place, monkeypatch):
    """``_tiles_in_place`` decides where the tiles below the diagonal are accumulated: a row of them as one
    panel in a strided view of the result (an in-place product on a non-contiguous tensor), or each tile in
    memory of its own; either way the result is exactly symmetric and the float64 update's, for a scalar and
    a per-block β alike."""
    monkeypatch.setattr(linalg, "_tiles_in_place", lambda: in_place)
    gen = generator(5)
    X = linalg.sym(randn(gen, 2, 7, 7)).float()
    A = randn(gen, 2, 7, 3).float()
    strided = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "baddbmm_" and not args[0].is_contiguous():
                strided.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    for beta in (0.9, torch.tensor([0.5, 2.0]).view(2, 1, 1)):
        strided.clear()
        with pytest.MonkeyPatch.context() as patch, Spy():
            _tiling(patch, 3, True)
            out = linalg._tiled_sym_product(X.clone(), A, A, beta, 0.1)
        assert strided == ([(2, 3, 3), (2, 1, 6)] if in_place else [])  # the panels of rows 3:6 and 6:7
        assert torch.equal(out, out.mT)
        expected = (beta if isinstance(beta, float) else beta.double()) * X.double() + 0.1 * A.double() @ A.double().mT
        close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("text", "in_place"),
    [
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", False),
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", True),
        ("processor\t: 0\n", True),
        (None, True),
    ],
)
def test_tiles_in_place_except_on_amd_processors(text, in_place, tmp_path, monkeypatch):
    """The form is read from the processor's vendor: apart on AMD, in place elsewhere and where it cannot be read."""
    assert _on_processor(text, tmp_path, monkeypatch, linalg._tiles_in_place) is in_place


@pytest.mark.parametrize(
    ("text", "onednn", "tile"),
    [
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", None, 192),
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", None, 256),  # AMD, products in MKL
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nflags\t\t: avx512f\n", None, 256),
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", True, 256),  # oneDNN forced: its tile
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", False, 256),
        ("processor\t: 0\n", None, 192),
        (None, None, 192),
    ],
)
def test_gram_tile_read_from_the_processor_and_the_side(text, onednn, tile, tmp_path, monkeypatch):
    """192 where MKL takes the products on a processor not AMD's (the one measured faster so) up to a side of
    ``_SMALL_TILES_MAX``, 256 past it, on AMD's and wherever oneDNN takes them; a side of 768 then makes 4 tiles
    or 3, one of 3072 twelve."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    assert _on_processor(text, tmp_path, monkeypatch, lambda: linalg._gram_tile(2048)) == tile
    assert _on_processor(text, tmp_path, monkeypatch, lambda: linalg._gram_tile(2049)) == 256
    slices = _on_processor(text, tmp_path, monkeypatch, lambda: linalg._tile_slices(768))
    assert [(t.start, t.stop) for t in slices] == [(lo, min(lo + tile, 768)) for lo in range(0, 768, tile)]
    long = _on_processor(text, tmp_path, monkeypatch, lambda: linalg._tile_slices(3072))
    assert [t.start for t in long] == [*range(0, 3072, 256)]
    monkeypatch.setattr(linalg, "_GRAM_TILE", 100)  # set: it, whatever the processor and the side
    assert _on_processor(text, tmp_path, monkeypatch, lambda: linalg._gram_tile(4096)) == 100


def test_tiled_update_with_only_beta_tracked_and_into_another_dtype():
    """The tiles go in place only where they may: a per-block β that autograd tracks alone gets its
    gradient (∂/∂β_b of Σ P ⊙ W is Σ X_b ⊙ W_b), and a result of a wider dtype than the operands
    holds the float32 product cast, as a tile made apart and copied in does."""
    gen = generator(11)
    X = linalg.sym(randn(gen, 2, 7, 7))
    A = randn(gen, 2, 7, 3)
    W = randn(gen, 2, 7, 7)
    beta = torch.tensor([0.5, 2.0], dtype=F64).view(2, 1, 1).requires_grad_()
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, 2, True)
        P = linalg.sym_product(X, A, A, beta=beta, alpha=0.3)
        (P * W).sum().backward()
        close(P.detach(), beta.detach() * X + 0.3 * A @ A.mT)
        close(beta.grad, (X * W).sum(dim=(-2, -1), keepdim=True))
        X32, A32 = X.float(), A.float()
        out = torch.full((2, 7, 7), float("nan"), dtype=F64)
        assert linalg._tiled_sym_product(X32, A32, A32, 0.9, 0.1, out=out) is out
        same = linalg._tiled_sym_product(X32, A32, A32, 0.9, 0.1)
    assert torch.equal(out, same.double())


@pytest.mark.parametrize("left", [False, True])
def test_subspace_join_inverts_the_split(left):
    """Joining the split's parts gives the matrix back (float64), on either side, with a float32 basis
    read in the parts' dtype."""
    gen = generator(21)
    X = randn(gen, 2, 9, 7)
    U = torch.linalg.qr(randn(gen, 2, 9 if left else 7, 3)).Q
    Y, C = linalg.subspace_split(X, U, left=left)
    close(linalg.subspace_join(Y, C, U, left=left), X)
    joined32 = linalg.subspace_join(Y, C, U.float(), left=left)
    assert joined32.dtype == F64
    torch.testing.assert_close(joined32, X, rtol=0, atol=1e-6)


def test_weighted_row_energy_reads_a_transposed_view_alike():
    """Unit weights give the squared row norms whether the rows are contiguous or strided (the two take
    different reductions): against a float64 sum of squares of a contiguous copy."""
    X = randn(generator(5), 2, 37, 53).float()
    for view in (X, X.mT, X[:, ::2]):
        expected = view.contiguous().double().square().sum(-1)
        torch.testing.assert_close(linalg.weighted_row_energy(view, None).double(), expected, rtol=1e-6, atol=0)


@given(seed=SEEDS, m=st.integers(1, 11), k=st.integers(1, 5), b=st.integers(1, 3), tile=st.integers(1, 4))
def test_lower_tiles_hold_the_tiled_product_and_write_it_scaled(seed, m, k, b, tile):
    """``sym_product_stats(..., tiles=True)`` keeps the tiled product's tiles on and below the diagonal: written
    with a per-block scale (mirrors included) they are the dense product scaled, with the same reductions, to
    rounding (the dense form accumulates each tile in its place and reduces its norm row by row, which may
    round otherwise); the write is the tiles' own values scaled, bit for bit; ``split_sandwich`` from them
    equals the one from the dense matrix to rounding."""
    G, S, X, beta, _ = _sandwich(generator(seed), b, m, k)
    scale = torch.rand(b, 1, 1, generator=generator(seed + 1), dtype=F64) + 0.5
    with pytest.MonkeyPatch.context() as patch:
        _tiling(patch, tile, True)
        dense, dot, norm = linalg.sym_product_stats(X, G @ S, G, beta=beta, alpha=0.7, other=X)
        held, dot_t, norm_t = linalg.sym_product_stats(X, G @ S, G, beta=beta, alpha=0.7, other=X, tiles=True)
        assert isinstance(held, linalg.LowerTiles)
        A = randn(generator(seed + 2), b, 3, m)
        close(linalg.split_sandwich(A, held), linalg.split_sandwich(A, dense))
        written = held.write(scale=scale)
    # the tiles keep their own grid: read with another tile size in force, they give the same
    close(linalg.split_sandwich(A, held), linalg.split_sandwich(A, dense))
    close(written, dense * scale)
    close(dot_t, dot)
    close(norm_t, norm)
    unscaled = held.write(scale=torch.ones_like(scale))  # the tiles and their mirrors, times one: exact
    assert torch.equal(unscaled, unscaled.mT)
    expected = unscaled * scale
    assert torch.equal(written, expected)
    into = torch.full_like(dense, float("nan"))
    assert held.write(into, scale=scale) is into and torch.equal(into, expected)


@pytest.mark.parametrize("onednn", [False, True])
def test_split_sandwich_pays_only_for_a_large_middle_on_cpu(monkeypatch, onednn):
    """The split form is taken on CPU where the symmetric middle is the larger side and at least
    ``_SPLIT_SANDWICH_MIN`` (docs/performance_log.md times the crossover), never for a square or smaller middle.
    Where oneDNN takes the products, a dense middle (its panels copied for each product) is split only from an
    outer side of ``_SPLIT_DENSE_MIN_OUTER``; held tiles (``held=True``) as before."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)

    def pays(k, d, device="cpu", held=False):
        return linalg.split_pays(torch.empty(1, k, d, device=device), torch.empty(1, d, d, device=device), held=held)

    for held in (False, True):
        assert pays(767, 768, held=held) and pays(384, 1024, held=held) and pays(512, 2048, held=held)
        assert not pays(768, 768, held=held) and not pays(1024, 768, held=held) and not pays(256, 512, held=held)
        assert not pays(256, 1024, device="meta", held=held)
        assert pays(256, 1024, held=True) and pays(256, 768, held=True)
    # a dense middle against a short outer side: split on MKL's path, not on oneDNN's
    assert pays(256, 1024) is not onednn and pays(256, 768) is not onednn and pays(383, 1024) is not onednn
    # an outer side too thin for oneDNN takes MKL's products, and the split
    assert pays(8, 768)


def test_sandwiches_split_at_the_threshold_and_keep_autograd():
    """``sandwich``/``sandwich_t`` take the split form for a large middle (a spy counts it) and give the plain
    product to rounding; where autograd tracks an input they take the plain form, and gradients flow."""
    gen = generator(5)
    G = randn(gen, 1, 8, 768).float()
    X = linalg.gram_left(randn(gen, 1, 768, 800)).float() / 800
    calls = []
    real = linalg.split_sandwich
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, "split_sandwich", lambda A, S, **kw: calls.append(S.shape[-1]) or real(A, S, **kw))
        out, out_t = linalg.sandwich(G, X), linalg.sandwich_t(G.mT.contiguous(), X)
        assert calls == [768, 768]
        expected = (G.double() @ X.double() @ G.double().mT)
        for o in (out, out_t):
            torch.testing.assert_close(o.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        tracked = G.clone().requires_grad_(True)
        linalg.sandwich(tracked, X).sum().backward()
        assert calls == [768, 768] and tracked.grad is not None and torch.isfinite(tracked.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_power_of_two_scale_brings_the_largest_norm_into_a_half_to_one(dtype):
    """Per block, the largest of the norms times the scale lies in [1/2, 1) and the scale is an exact power of two,
    within the clamp (a quarter of the exponent range, so the scale's square and its inverse are normal numbers); a
    zero block takes 1, one with an infinite or NaN norm NaN."""
    a = torch.tensor([3.0, 0.0, 1e-30, 1e30, 0.75, 0.0, float("nan"), float("inf")], dtype=dtype)
    b = torch.tensor([5.0, 0.0, 4e-30, 1.0, 0.0, 1e-3, 0.0, 0.0], dtype=dtype)
    scale = linalg.power_of_two_scale(a.view(-1, 1, 1), b.view(-1, 1, 1)).view(-1)
    assert scale.dtype == dtype
    assert scale[6:].isnan().all()
    scale = scale[:6]
    mantissa, exponent = torch.frexp(scale.double())
    assert torch.equal(mantissa, torch.full_like(mantissa, 0.5))  # a power of two
    limit = math.frexp(torch.finfo(dtype).max)[1] // 2 - 4
    expected = [2.0**-3, 1.0, 2.0**97, 2.0**-100, 2.0**0, 2.0**9]
    if dtype != torch.float64:  # the clamp, ±60
        expected[2:4] = [2.0**limit, 2.0**-limit]
    assert scale.double().tolist() == expected
    top = torch.maximum(a, b)[:6].double() * scale.double()
    inside = [0, 2, 3, 4, 5] if dtype == torch.float64 else [0, 4, 5]  # the blocks the clamp leaves alone
    assert ((top >= 0.5) & (top < 1.0))[inside].all()


@pytest.mark.parametrize("first", [True, False])
def test_restricted_refresh_keeps_float32_range(first):
    """A restricted side's refresh from a power product of entries near 2^70 (a SOAP factor of gradient entries
    near 1e10) or 2^-70 finds the subspace and eigenvalues of the unscaled product, scaled: its regulariser's ‖P‖
    is taken without the squares that overflow float32 (an infinite regulariser left every block unrefreshed)."""
    gen = generator(3)
    d, r = 24, 4
    A = spd_matrix(gen, 2, d, log10_range=(-1, 1))
    U = orthonormal(gen, 2, d)[:, :, :r]
    P, U32 = (A @ U).float(), U.float()
    lam = torch.ones(2, r)
    U_ref, lam_ref, ok_ref = linalg.restricted_refresh(P, U32, lam, first=first)
    assert ok_ref.all()
    for scale in (2.0**70, 2.0**-70):
        U_new, lam_new, ok = linalg.restricted_refresh(P * scale, U32, lam, first=first)
        assert ok.all(), scale
        torch.testing.assert_close(U_new, U_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(lam_new / scale, lam_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_restricted_refresh_of_a_rank_deficient_factor_picks_its_vanishing_directions_whatever_the_solver(
    monkeypatch, dtype
):
    """A later refresh of a restricted side whose factor has rank 3 on a subspace of rank r = 6 (pro_dykaf's 40-wide
    side after two gradients): three Ritz values are rounding, and their Ritz vectors any basis of their span, which
    the solver's rounding picks (another in a stack than alone: a bucket's steps parted from its blocks' alone by
    4–29 %). The new subspace is span(P V_real) ⊕ span(U V_c), the vanishing directions kept as they are (checked
    against an independent projection), and the basis the same, to rounding, when the solver returns the vanishing
    vectors rotated by any orthogonal S or with flipped signs."""
    gen = generator(5)
    d, r, rank = 40, 6, 3
    B = orthonormal(gen, 1, d)[:, :, :rank]
    A = B @ torch.diag_embed(torch.tensor([[3.0, 1.0, 0.25]], dtype=F64)) @ B.mT  # rank 3
    U = orthonormal(gen, 1, d)[:, :, :r]
    P = A @ U
    Pd, Ud, lam = P.to(dtype), U.to(dtype), torch.ones(1, r, dtype=dtype)
    U_new, lam_new, ok = linalg.restricted_refresh(Pd, Ud, lam, first=False)
    assert ok.all()
    tol = 1e-10 if dtype == F64 else 2e-4
    # the span: the three real power directions and the three vanishing directions of U, in float64
    rayleigh = U.mT @ P
    w, V = torch.linalg.eigh((rayleigh + rayleigh.mT) / 2)
    real, null = V[..., -rank:], V[..., :-rank]
    expected = torch.cat([P @ real, U @ null], dim=-1)
    projector = U_new.double() @ U_new.double().mT
    assert ((expected - projector @ expected).norm() / expected.norm()).item() <= tol
    assert (lam_new[0, rank:].abs() <= 1e-5 * lam_new[0, 0]).all()
    eigh = linalg.eigh_descending
    for seed in range(3):
        S = orthonormal(generator(100 + seed), 1, r - rank).to(dtype) * (-1) ** seed

        def rotated(X, S=S):
            e = eigh(X)
            Q = e.Q.clone()
            Q[..., rank:] = Q[..., rank:] @ S  # another basis of the vanishing Ritz vectors' span
            return linalg.Eigh(Q=Q, lam=e.lam, ok=e.ok)

        monkeypatch.setattr(linalg, "eigh_descending", rotated)
        again = linalg.restricted_refresh(Pd, Ud, lam, first=False)[0]
        monkeypatch.setattr(linalg, "eigh_descending", eigh)
        torch.testing.assert_close(again, U_new, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype,overlap", [(torch.float64, 3e-8), (torch.float32, 1e-3)])
def test_restricted_refresh_finds_a_real_direction_behind_a_ritz_value_of_the_size_of_rounding(dtype, overlap):
    """A factor with eigenvalues 10, 5, 8 along e0, e1, e20 and a subspace U = [e0, e1, e2, e3 + ε e20] (normalised)
    that barely reaches e20: the fourth Ritz value, 8ε², is below the solver's floor, but the power product's column,
    8ε e20, is not rounding, and one refresh turns the subspace to e20 (‖U'ᵀ e20‖ ≈ 1), as the plain power step does.
    Catches a rule that keeps the current direction for every Ritz value below the floor (e20 never found)."""
    d = 24
    F = torch.zeros(1, d, d, dtype=F64)
    F[0, 0, 0], F[0, 1, 1], F[0, 20, 20] = 10.0, 5.0, 8.0
    U = torch.zeros(1, d, 4, dtype=F64)
    U[0, 0, 0] = U[0, 1, 1] = U[0, 2, 2] = 1.0
    U[0, 3, 3], U[0, 20, 3] = 1.0, overlap
    U = U / U.norm(dim=-2, keepdim=True)
    P = F @ U
    U_new, lam_new, ok = linalg.restricted_refresh(P.to(dtype), U.to(dtype), torch.ones(1, 4, dtype=dtype), first=False)
    assert ok.all()
    reach = U_new[0, 20].double().norm().item()
    assert reach >= 0.99, f"the subspace reaches e20 by {reach:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [-0.25, 0.25, -0.5, 0.5, -1 / 3])
def test_power_of_a_row_does_not_depend_on_how_many_rows_share_the_call(exponent, dtype):
    """``linalg.power`` gives each entry the bits it gets alone, for the roots the presets take (±1/4, ±1/2),
    within about an ulp of ``x ** e``. Catches torch's CPU ``pow`` at ``±1/4`` (vectorised body and scalar
    tail round a few entries apart), which made shampoo's step depend on its stack's size."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 8, generator=gen, dtype=dtype) * 10 + 1e-8
    full = linalg.power(x, exponent)
    torch.testing.assert_close(full, x.double() ** exponent, rtol=4 * torch.finfo(dtype).eps, atol=0, check_dtype=False)
    if exponent != -1 / 3:  # any other exponent is torch's pow, which makes no such promise
        assert all(torch.equal(linalg.power(x[:k], exponent), full[:k]) for k in range(1, 40))
        assert all(torch.equal(linalg.power(x[i : i + 1], exponent), full[i : i + 1]) for i in range(40))


def test_block_min_max_is_each_blocks_smallest_and_largest_entry_nan_where_it_holds_one():
    """``block_min_max`` against ``aminmax`` of each block alone: over stacks of 1, 3 and 4 blocks, a strided one, with
    an infinity, a NaN (in both results) and a block of one entry (two reductions must not drop a NaN nor mix blocks)."""
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn(1, 64, 48, generator=gen), torch.randn(3, 7, 5, generator=gen), torch.randn(4, 1, 1, generator=gen)]
    stacks.append(torch.randn(4, 30, 20, generator=gen).mT)  # not contiguous
    stacks[1][1, 2, 3] = math.inf
    stacks[1][2, 0, 0] = math.nan
    stacks[3][0, 5, 7] = -math.inf
    for t in stacks:
        lo, hi = linalg.block_min_max(t)
        for k in range(t.shape[0]):
            want_lo, want_hi = torch.aminmax(t[k])
            assert torch.equal(lo[k], want_lo) or (lo[k].isnan() and want_lo.isnan())
            assert torch.equal(hi[k], want_hi) or (hi[k].isnan() and want_hi.isnan())
    lo, hi = linalg.block_min_max(stacks[1])
    assert lo[2].isnan() and hi[2].isnan() and hi[1] == math.inf and not lo[0].isnan()


def test_nonzero_blocks_counts_any_nonzero_entry_nan_and_subnormals_included_and_no_negative_zero():
    """``nonzero_blocks`` against each block's entries read one by one: a lone negative entry, a subnormal one (whose
    square, and so the norm, underflows), NaN, an infinity, and blocks of zeros, negative zeros included, or of no
    entries, which hold none."""
    X = torch.zeros(7, 3, 4)
    X[1, 0, 0] = -1e-30
    X[2, 1, 1] = math.nan
    X[3, 2, 3] = math.inf
    X[4] = -0.0
    X[5, 2, 0] = 1e-44  # subnormal in float32
    X[6, 1, 2] = -math.inf
    want = [bool(((X[k] != 0) | X[k].isnan()).any()) for k in range(7)]
    assert linalg.nonzero_blocks(X).tolist() == want == [False, True, True, True, False, True, True]
    assert linalg.nonzero_blocks(X.mT).tolist() == want  # a strided stack
    assert linalg.nonzero_blocks(torch.zeros(2, 0, 3)).tolist() == [False, False]
    assert linalg.nonzero_blocks(torch.zeros(0, 3, 4)).tolist() == []  # a stack of no blocks


@pytest.mark.parametrize("host", [True, False], ids=["cpu", "device"])
def test_block_norm_wide_keeps_digits_out_of_range_and_the_plain_bits_inside(host, monkeypatch):
    """``block_norm_wide`` against the float64 norm of each block: blocks of float32 entries near 2^-76 (whose plain
    norm reads 37 % low), 2^-90 (plain 0), 2^-130 (subnormal entries, a normal norm) and a lone subnormal entry are
    within an ulp or two; blocks in range keep the plain norm's bits, and so does one whose squares overflow (2^70:
    infinity, which the callers refuse); NaN, infinity and zero blocks read as the plain norm does. The same bits
    whether the CPU reads its verdict on the host or not (another device's path), in one stack with blocks in range;
    blocks of no entries have norm 0."""
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 24, 40, generator=gen)
    scales = [2.0**-76, 2.0**-90, 2.0**-130, 2.0**70, 1.0, 2.0**-40, 1.0, 1.0, 0.0]
    X = base * torch.tensor(scales).view(-1, 1, 1)
    X[6] = 0.0
    X[6, 3, 5] = 2.0**-149  # a lone subnormal: plain reads 0
    X[7, 1, 1] = math.nan
    X[8, 0, 0] = math.inf
    plain = linalg.block_norm(X).view(-1)
    got = linalg.block_norm_wide(X).view(-1)
    want = linalg.block_norm(X.double()).view(-1)
    for k in (0, 1, 2, 4, 5):
        assert abs(got[k].item() / want[k].item() - 1) <= 2 * torch.finfo(torch.float32).eps, k
    assert plain[0] < 0.7 * want[0] and plain[1] == 0  # what the plain norm reads
    assert got[3] == plain[3] == math.inf
    assert got[6].item() == 2.0**-149 and plain[6] == 0
    assert torch.equal(got[4], plain[4]) and torch.equal(got[5], plain[5])  # in range: the plain bits
    assert got[7].isnan() and got[8] == math.inf
    assert not linalg.block_norm_wide(torch.zeros(2, 0, 3)).any() and not linalg.block_norm_wide(torch.zeros(2, 3, 0)).any()
    inside = X[[4, 5]]
    assert torch.equal(linalg.block_norm_wide(inside), linalg.block_norm(inside))
    # float64: the plain norm
    torch.testing.assert_close(linalg.block_norm_wide(X.double()), linalg.block_norm(X.double()), rtol=0, atol=0, equal_nan=True)


def test_block_norm_wide_stays_in_its_dtype(monkeypatch):
    """The digits are kept in the block's own dtype, on the path other devices take too (some have no float64):
    no float64 tensor is made."""
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", False)
    made = []

    class Dtypes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(t.dtype for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    X = torch.randn(3, 16, 24) * torch.tensor([2.0**-90, 1.0, 2.0**-70]).view(-1, 1, 1)
    with Dtypes():
        got = linalg.block_norm_wide(X)
    assert made and torch.float64 not in made
    want = linalg.block_norm(X.double())
    assert ((got.double() / want - 1).abs() <= 2 * torch.finfo(torch.float32).eps).all()
