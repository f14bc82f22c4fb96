"""The fast paths of the step (issue 14): the masked state write, the finiteness tests, ``q_factor``, ``sym``.

Each is checked against the plain formula it replaces, bit for bit where the docstring promises it.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import compose, linalg
from tests.torch_compat import assert_block_as_alone

NONFINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 80, 64)])  # the torch.where path and the copies a block (≥ 4096 per block)
@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("host", [True, False])  # the CPU's path, and the device path (torch.where)
def test_masked_write_keeps_masked_blocks_bit_for_bit_and_writes_the_others(shape, bad, host, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    old = torch.randn(shape, generator=gen) * 1e30
    new = torch.randn(shape, generator=gen) * 1e-30
    new[1, 0, 0] = bad  # a block the caller masks off because its new value is not finite
    old[0, 1, 2] = bad  # a written block's old value, as a loaded or edited stack may hold: replaced whole
    old[3, 2, 1] = bad  # a kept block's: kept as it is
    new[0, 2, 0] = -0.0  # a written block takes its new value's bits, the sign of a zero included
    ok = torch.tensor([True, False, True, False])
    before, expected_new = old.clone(), new.clone()
    view = old[2]  # a per-parameter view must see the write
    compose.masked_write_(old, new, ok)
    assert torch.equal(old[0], expected_new[0]) and torch.equal(old[2], expected_new[2])
    assert torch.equal(old[1], before[1])
    torch.testing.assert_close(old[3], before[3], rtol=0, atol=0, equal_nan=True)  # its NaN, inf or -inf kept
    assert old[0, 2, 0].item() == 0.0 and math.copysign(1.0, old[0, 2, 0].item()) == -1.0
    assert torch.equal(view, expected_new[2])


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 80, 64)])  # the torch.where path and the CPU's plain copy
@pytest.mark.parametrize("layout", ["rows", "columns"])  # bases are stored column-major
def test_masked_write_with_every_block_ok_is_the_new_state_bit_for_bit_in_the_old_storage(shape, layout):
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(shape, generator=gen)
    new = torch.randn(shape, generator=gen) * 1e30
    if layout == "columns":
        old, new = old.mT.contiguous().mT, new.mT.contiguous().mT
    expected, storage, view = new.clone(), old.data_ptr(), old[3]
    compose.masked_write_(old, new, torch.ones(4, dtype=torch.bool))
    assert torch.equal(old, expected) and torch.equal(view, expected[3])
    assert old.data_ptr() == storage and old.stride() == new.stride()


class _Writes(TorchDispatchMode):
    """The operators that write into a tensor (in place or ``out=``) with more than 1000 entries."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable and isinstance(out, torch.Tensor) and out.numel() > 1000:
            self.names.append(func.__name__)
        return out


class _Calls(TorchDispatchMode):
    """Every operator called."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ok", [[True] * 4, [True, False, True, True]])
def test_masked_write_on_cpu_is_one_copy_when_every_block_is_ok_and_a_copy_a_written_block_otherwise(ok):
    old, new = torch.zeros(4, 80, 64), torch.ones(4, 80, 64)
    with _Writes() as writes:
        compose.masked_write_(old, new, torch.tensor(ok))
    assert writes.names == ["copy_.default"] * (1 if all(ok) else sum(ok))
    assert old.tolist() == [new[i].tolist() if w else torch.zeros(80, 64).tolist() for i, w in enumerate(ok)]


def test_masked_write_of_integer_state_selects_blocks():
    old = torch.arange(8).view(4, 2)
    compose.masked_write_(old, torch.full((4, 2), -1), torch.tensor([False, True, True, False]))
    assert old.tolist() == [[0, 1], [-1, -1], [-1, -1], [6, 7]]


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_blocks_flags_each_kind_of_non_finite_value_anywhere(bad, dtype):
    for position in [(0, 0), (3, 7), (5, 2), (7, 7)]:  # first, last and inner entries (vectorised and tail loops)
        t = torch.randn(3, 8, 8).to(dtype) * 1e3
        t[1][position] = bad
        assert linalg.finite_blocks(t).tolist() == [True, False, True]
    huge = torch.full((2, 4, 4), torch.finfo(dtype).max, dtype=dtype)  # finite, and sums would overflow
    huge[0, 0, 0] = -huge[0, 0, 0]
    assert linalg.finite_blocks(huge).tolist() == [True, True]


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("host", [True, False])  # a CPU's verdict read on the host, or the device-agnostic path
def test_finite_blocks_of_large_stacks_read_them_once(monkeypatch, bad, dtype, layout, host):
    """Large blocks (the reductions' vectorised kernels, not their tails), in both stack layouts: a bad
    entry anywhere flags its block; finite entries at ±max do not (their sums overflow: the exact
    reading decides); a finite stack is read once, by one sum a block on a CPU's host path, by one
    product elsewhere."""
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 96, 333, generator=gen).to(dtype)
    if layout == "column":
        base = base.mT.contiguous().mT
    for position in [(0, 0), (95, 332), (47, 165), (13, 64), (80, 320)]:
        t = base.clone()
        t[2][position] = bad
        assert linalg.finite_blocks(t).tolist() == [True, True, False], position
    t = base.clone()
    t[0] = torch.finfo(dtype).max
    t[1] = -torch.finfo(dtype).max
    assert linalg.finite_blocks(t).tolist() == [True, True, True]
    with _Calls() as calls:
        linalg.finite_blocks(base)
    read = [name for name in calls.names if name in {"sum.dim_IntList", "mm.default", "amax.default", "amin.default"}]
    assert read == (["sum.dim_IntList"] if host else ["mm.default"])
    assert not {"clone.default", "copy_.default", "_to_copy.default"} & set(calls.names)  # read in place


def test_finite_blocks_of_a_float16_stack_whose_sums_pass_its_range_read_it_once():
    """float16 blocks of ordinary entries sum past float16's 65504: on a CPU's host path they are
    summed in float32, so a finite stack is still read by one sum, and a bad entry still flags its block."""
    t = torch.full((3, 64, 64), 100.0, dtype=torch.float16)  # each block sums to 409600
    with _Calls() as calls:
        assert linalg.finite_blocks(t).tolist() == [True, True, True]
    assert [n for n in calls.names if n in {"sum.dim_IntList", "mm.default", "amax.default", "amin.default"}] == ["sum.dim_IntList"]
    for bad in NONFINITE:
        u = t.clone()
        u[1, 63, 0] = bad
        assert linalg.finite_blocks(u).tolist() == [True, False, True]


def test_finite_blocks_of_a_tensor_autograd_tracks_read_it_without_a_host_read():
    """A tensor autograd tracks (or a torch.func transform wraps: not :func:`linalg._plain`) takes the
    device-agnostic product, whose verdict stays a tensor, not the host's sums; the verdicts are the same."""
    t = torch.randn(3, 40, 50, requires_grad=True)
    with _Calls() as calls:
        assert linalg.finite_blocks(t).tolist() == [True, True, True]
    assert "mm.default" in calls.names and "sum.dim_IntList" not in calls.names
    u = t.detach().clone()
    u[2, 39, 49] = float("inf")
    assert linalg.finite_blocks(u.requires_grad_()).tolist() == [True, True, False]


def test_finite_blocks_of_a_column_major_matrix_of_vector_blocks():
    """A 2-D tensor whose blocks are columns in memory (``(300, 100).mT``): the bad entry's block, not another."""
    t = torch.randn(300, 100).mT
    t[7, 5] = float("nan")
    assert (~linalg.finite_blocks(t)).nonzero().flatten().tolist() == [7]


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_blocks_of_one_block_held_in_several_small_tensors(bad, dtype):
    """A bucket of one block held in several small tensors: a bad entry in any tensor, first or last,
    flags it; an empty tensor among them and entries at ±max do not."""
    shapes = [(1, 3, 4), (1, 5), (1, 0, 3), (1, 6, 2)]
    assert linalg.finite_blocks(*[torch.randn(s).to(dtype) for s in shapes]).tolist() == [True]
    for which in (0, 1, 3):
        for entry in (0, -1):
            ts = [torch.randn(s).to(dtype) for s in shapes]
            ts[which].view(-1)[entry] = bad
            assert linalg.finite_blocks(*ts).tolist() == [False], (which, entry)
    top = torch.finfo(dtype).max
    assert linalg.finite_blocks(torch.full((1, 4, 4), top, dtype=dtype), torch.full((1, 3), -top, dtype=dtype)).tolist() == [True]


def test_finite_blocks_of_small_tensors_reduce_once_and_read_a_column_major_block_in_place():
    """Small tensors side by side (a refresh's column-major basis, as LAPACK returns it, and its estimates):
    one reduction for all, and the basis read through its transpose, not copied into rows first."""
    Q, e = torch.randn(2, 9, 9).mT.contiguous().mT, torch.randn(2, 9)
    with _Calls() as calls:
        ok = linalg.finite_blocks(Q, e)
    assert ok.tolist() == [True, True]
    assert calls.names.count("amax.default") == 1 and "amin.default" not in calls.names
    assert not {"clone.default", "copy_.default", "_to_copy.default"} & set(calls.names)
    Q[1, 8, 0] = float("nan")
    assert linalg.finite_blocks(Q, e).tolist() == [True, False]


def test_finite_blocks_of_small_integer_and_bool_tensors_are_all_finite():
    """Tensors without infinities or NaN (integers at their extremes, bools) side by side: every block finite."""
    ints = torch.tensor([[torch.iinfo(torch.int64).min, 0], [torch.iinfo(torch.int64).max, -1]])
    flags = torch.tensor([[True, False, True], [False, False, False]])
    assert linalg.finite_blocks(ints, ints.clone()).tolist() == [True, True]
    assert linalg.finite_blocks(flags, flags.clone()).tolist() == [True, True]


def test_finite_blocks_of_vectors_and_empty_blocks_and_mixed_dtypes():
    v = torch.tensor([1.0, float("nan"), 3.0])
    empty = torch.zeros(3, 0, 4)
    other = torch.ones(3, 2, dtype=torch.float64)
    other[2, 1] = float("inf")
    assert linalg.finite_blocks(v, empty, other).tolist() == [True, False, False]
    assert linalg.finite_blocks(empty).tolist() == [True, True, True]
    for dtype in (torch.float32, torch.int64):  # a stack of no blocks (read by a product, or by its extremes)
        assert linalg.finite_blocks(torch.zeros(0, 3, 4, dtype=dtype)).shape == (0,)
        assert linalg.finite_blocks(torch.zeros(0, 3, 4, dtype=dtype), torch.zeros(0, 5, dtype=dtype)).shape == (0,)


@pytest.mark.parametrize("at_once", [True, False])  # small tensors side by side, or reduced one by one
@pytest.mark.parametrize("bad", NONFINITE)
def test_finite_blocks_of_several_tensors_flags_the_block_of_any_bad_entry(monkeypatch, at_once, bad):
    if not at_once:
        monkeypatch.setattr(linalg, "_FINITE_AT_ONCE_MAX", 0)
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=gen) for s in [(4, 5, 3), (4,), (4, 2, 7), (4, 6)]]
    tensors.append(torch.randn(4, 3, 5, generator=gen).mT)  # column-major, as the bases are
    assert linalg.finite_blocks(*tensors).tolist() == [True] * 4
    for which, t in enumerate(tensors):
        inner = t.shape[1:]
        for block in range(4):
            for entry in [tuple(0 for _ in inner), tuple(d - 1 for d in inner)]:  # first and last of the block
                ts = [u.clone() for u in tensors]
                ts[which][(block, *entry)] = bad
                assert linalg.finite_blocks(*ts).tolist() == [i != block for i in range(4)], (which, block, entry)


def test_finite_each_and_all_finite_one_flag_per_tensor():
    ts = [torch.ones(3, 4), torch.tensor(float("-inf")), torch.zeros(0), torch.full((5,), 2.0)]
    assert linalg.finite_each(ts).tolist() == [True, False, True, True]
    assert not bool(linalg.all_finite(ts))
    assert bool(linalg.all_finite([ts[0], ts[3]]))
    with pytest.raises(ValueError):
        linalg.finite_each([])


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 9, 4)])
def test_q_factor_is_the_q_of_torch_qr(shape):
    P = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    Q = linalg.q_factor(P)
    assert torch.equal(Q, torch.linalg.qr(P)[0])
    with pytest.raises(ValueError):
        linalg.q_factor(torch.zeros(1, 2, 3))  # more columns than rows


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 9, 4), (0, 4, 4), (3, 4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_factor_overwrite_is_the_same_q_in_the_inputs_memory(shape, dtype):
    """A column-major ``P`` (what the power step makes) holds its own Q afterwards."""
    P = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    expected = torch.linalg.qr(P)[0]
    P = P.mT.contiguous().mT
    Q = linalg.q_factor(P, overwrite=True)
    assert torch.equal(Q, expected)
    assert Q.data_ptr() == P.data_ptr() and torch.equal(P, expected)


def test_q_factor_overwrite_leaves_other_layouts_and_tracked_inputs_alone():
    """A row-major ``P`` and one autograd tracks take the copying path: the same Q, ``P`` unchanged."""
    P = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.qr(P)[0]
    for given in (P.clone(), P.mT.contiguous().mT.requires_grad_()):
        before = given.detach().clone()
        Q = linalg.q_factor(given, overwrite=True)
        assert torch.equal(Q.detach(), expected) and torch.equal(given.detach(), before)


def _qr_with_nonnegative_diagonal_f64(X):
    """The thin QR of ``X`` computed in float64 by modified Gram–Schmidt twice, columns in order (an independent route
    to the unique Q with ``diag(R) > 0`` of a full-rank ``X``)."""
    X = X.double()
    Q = torch.zeros_like(X)
    for j in range(X.shape[-1]):
        v = X[..., j].clone()
        for _ in range(2):
            for i in range(j):
                v -= (Q[..., i] * v).sum(-1, keepdim=True) * Q[..., i]
        Q[..., j] = v / v.norm(dim=-1, keepdim=True)
    return Q


@pytest.mark.parametrize("shape", [(3, 9, 4), (2, 6, 6), (0, 5, 3), (2, 40, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthonormalize_overwrite_is_the_same_basis_in_the_inputs_memory(shape, dtype):
    """A column-major ``X`` the caller gives up holds the basis afterwards: the bits of the plain path (torch's QR on
    the same values), whose columns match an independent float64 Gram–Schmidt's (``diag(R) ≥ 0``, order kept)."""
    X = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    expected = linalg.orthonormalize(X)
    if shape[0]:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(expected.double(), _qr_with_nonnegative_diagonal_f64(X), atol=tol, rtol=0)
    X = X.mT.contiguous().mT
    Q = linalg.orthonormalize(X, overwrite=True)
    assert torch.equal(Q, expected)
    assert Q.data_ptr() == X.data_ptr() and torch.equal(X, expected)


def test_orthonormalize_overwrite_keeps_the_sign_convention_where_torch_flips_columns():
    """A column whose Householder reflection gives a negative ``R`` entry (LAPACK's sign is the column's own) comes out
    flipped to ``diag(R) ≥ 0`` in place too: an orthonormal ``X`` with negated columns comes back as itself."""
    Q0 = torch.linalg.qr(torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64))[0]
    Q0 = Q0 * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    positive = _qr_with_nonnegative_diagonal_f64(Q0)
    for overwrite in (False, True):
        X = Q0.mT.contiguous().mT
        assert torch.allclose(linalg.orthonormalize(X, overwrite=overwrite), positive, atol=1e-13, rtol=0)
        assert torch.allclose(positive, Q0, atol=1e-13, rtol=0)  # Gram–Schmidt keeps an orthonormal basis as it is


def test_orthonormalize_overwrite_leaves_other_layouts_and_tracked_inputs_alone():
    """A row-major ``X`` and one autograd tracks take the plain path: the same basis, ``X`` unchanged."""
    X = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(10))
    expected = linalg.orthonormalize(X)
    for given in (X.clone(), X.mT.contiguous().mT.requires_grad_()):
        before = given.detach().clone()
        Q = linalg.orthonormalize(given, overwrite=True)
        assert torch.equal(Q.detach(), expected) and torch.equal(given.detach(), before)


@pytest.fixture
def householder_shapes(monkeypatch):
    """The shapes ``torch.linalg.householder_product`` is called with, in order (the padded Q shows as ``n + 16`` rows)."""
    shapes = []
    householder_product = torch.linalg.householder_product

    def spy(A, tau, **kw):
        shapes.append(tuple(A.shape))
        return householder_product(A, tau, **kw)

    monkeypatch.setattr(torch.linalg, "householder_product", spy)
    return shapes


@pytest.fixture
def geqrf_shapes(monkeypatch):
    """The shapes ``torch.geqrf`` is called with, in order (a padded QR shows as ``n + 16`` rows)."""
    shapes = []
    geqrf = torch.geqrf

    def spy(A, **kw):
        shapes.append(tuple(A.shape))
        return geqrf(A, **kw)

    monkeypatch.setattr(torch, "geqrf", spy)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("b", [3, 0])
def test_q_factor_on_a_padded_side_is_the_q_of_torch_qr_up_to_rounding(
    monkeypatch, householder_shapes, geqrf_shapes, dtype, overwrite, b
):
    """A square side that is a multiple of ``_QR_PAD_SIDE`` (up to ``_QR_PAD_MAX``) takes its QR with zero rows below
    ``P`` (MKL's faster path there), both routines on the padded copy: torch's Q but for rounding, with the same
    column signs, orthonormal, column-major, in ``P``'s memory with ``overwrite``, and ``|R_jj|`` as torch's R's. A side
    that is not such a multiple is not padded. Would catch: a Q read off the wrong rows, or reflectors of the padded
    matrix whose zero rows were not zero (garbage of the freed buffer)."""
    if not torch.backends.mkl.is_available():
        pytest.skip("the padded Q is formed only where torch's LAPACK is MKL")
    monkeypatch.setattr(linalg, "_QR_PAD_SIDE", 8)
    monkeypatch.setattr(linalg, "_QR_PAD_MAX", 16)
    shapes = householder_shapes
    gen = torch.Generator().manual_seed(6)
    for n in (16, 12, 24):
        P = torch.randn(b, n, n, generator=gen, dtype=dtype).mT.contiguous().mT
        expected = torch.linalg.qr(P)[0]
        expected_r = torch.linalg.qr(P)[1].diagonal(dim1=-2, dim2=-1).abs()
        before = P.clone()
        del shapes[:], geqrf_shapes[:]
        torch.full((b, n, n + linalg._QR_PAD_ROWS), float("nan"), dtype=dtype)  # freed: garbage for the next buffer
        r = torch.empty(b, n, dtype=dtype)
        Q = linalg.q_factor(P, overwrite=overwrite, r_diagonal=r)
        padded = [(b, n + linalg._QR_PAD_ROWS, n) if n == 16 else (b, n, n)]  # 12: no multiple, 24: past the max
        assert shapes == padded and geqrf_shapes == padded
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        assert torch.allclose(Q, expected, atol=tol, rtol=0)
        assert torch.allclose(r, expected_r, atol=tol * n, rtol=tol)
        eye = torch.eye(n, dtype=dtype).expand(b, n, n)
        assert torch.allclose(Q.mT @ Q, eye, atol=tol, rtol=0)
        assert Q.mT.is_contiguous()
        if overwrite:
            assert Q.data_ptr() == P.data_ptr() and torch.equal(P, Q)
        else:
            assert torch.equal(P, before)
    # a tall stack, and one autograd tracks, are not padded (the latter: out= is refused under autograd)
    for P in (torch.randn(b, 16, 8, generator=gen, dtype=dtype), torch.randn(b, 16, 16, generator=gen, dtype=dtype).requires_grad_()):
        del shapes[:]
        Q = linalg.q_factor(P)
        assert shapes == [tuple(P.shape)]
        assert torch.equal(Q.detach(), torch.linalg.qr(P.detach())[0])


def test_q_factor_pads_the_sides_of_the_shipped_threshold(householder_shapes):
    """As shipped, a side of 512 takes the padded path and 256 and 768 do not; the Q is torch's up to rounding. Sides
    up to 4096 are padded (measured), 4608 not; a tall or tracked stack never."""
    if not torch.backends.mkl.is_available():
        pytest.skip("the padded Q is formed only where torch's LAPACK is MKL")
    pads = [linalg._pads_qr(torch.empty(1, n, k)) for n, k in [(1024, 1024), (4096, 4096), (4608, 4608), (4096, 2048)]]
    assert pads == [True, True, False, False]
    assert not linalg._pads_qr(torch.empty(1, 512, 512, requires_grad=True))
    shapes = householder_shapes
    gen = torch.Generator().manual_seed(7)
    for n in (256, 512, 768):
        P = torch.randn(1, n, n, generator=gen, dtype=torch.float64)
        expected = torch.linalg.qr(P)[0]
        Q = linalg.q_factor(P.mT.contiguous().mT, overwrite=True)
        assert torch.allclose(Q, expected, atol=1e-12, rtol=0)
    assert shapes == [(1, 256, 256), (1, 512 + linalg._QR_PAD_ROWS, 512), (1, 768, 768)]


def test_the_power_steps_let_q_factor_overwrite_their_own_products(monkeypatch):
    """The refresh's two QR callers hand over the products they made (the point of ``overwrite``)."""
    seen = []
    original = linalg.q_factor

    def spy(P, *, overwrite=False):
        seen.append(overwrite)
        return original(P, overwrite=overwrite)

    monkeypatch.setattr(linalg, "q_factor", spy)
    A = torch.eye(5).expand(2, 5, 5) * torch.arange(1.0, 6.0)
    Q = torch.linalg.qr(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(5)))[0]
    linalg.power_qr(A, Q)
    for sort in (False, True):
        linalg.sorted_power_step(A, Q, sort=sort, quotients=False)
    assert seen == [True, True, True]


@pytest.mark.parametrize("d", [8, 400])  # below and above the blocked CPU path
def test_sym_equals_half_the_sum_with_the_transpose_bit_for_bit(d):
    A = torch.randn(2, d, d, generator=torch.Generator().manual_seed(2))
    S = linalg.sym(A)
    assert torch.equal(S, (A + A.mT) * 0.5)
    assert torch.equal(S, S.mT)


# -- the state write of a whole record: compose.write_ ---------------------------------------------

import attrs


@attrs.frozen
class _Inner:
    x: torch.Tensor
    refreshes: int = 0


@attrs.frozen
class _Outer:
    inner: _Inner
    y: torch.Tensor | None
    calls: int


def _records(y_new):
    old = _Outer(_Inner(torch.zeros(2, 3)), torch.zeros(2, 4), calls=1)
    new = _Outer(_Inner(torch.ones(2, 3)), y_new, calls=2)
    return old, new


def test_write_keeps_the_stacks_and_their_records_and_takes_the_new_counters():
    old, new = _records(torch.full((2, 4), 2.0))
    x, y, inner = old.inner.x, old.y, old.inner
    kept, replaced = compose.write_(old, new, torch.tensor([True, False]))
    assert not replaced and kept.calls == 2
    assert kept.inner is inner and kept.inner.x is x and kept.y is y  # views of the stacks stay valid
    assert x[0].eq(1).all() and x[1].eq(0).all() and y[0].eq(2).all() and y[1].eq(0).all()


@pytest.mark.parametrize("y_new", [None, torch.full((2, 4), 2.0, dtype=torch.float64)])  # gone; another dtype
def test_write_reports_a_replaced_field(y_new):
    old, new = _records(y_new)
    y = old.y
    kept, replaced = compose.write_(old, new, torch.tensor([True, False]))
    assert replaced and y.eq(0).all()  # the old stack is left alone
    if y_new is None:
        assert kept.y is None
    else:  # selected per block into a tensor of the new dtype
        assert kept.y.dtype == torch.float64 and kept.y[0].eq(2).all() and kept.y[1].eq(0).all()


@attrs.frozen
class _Other:  # a record of another type with the same field names as _Inner
    x: torch.Tensor
    refreshes: int = 0


@attrs.frozen
class _Private:
    y: torch.Tensor
    _count: int = 0  # initialised as ``count``


def test_write_of_a_record_that_changes_type_still_keeps_the_masked_blocks():
    old = _Outer(_Inner(torch.zeros(2, 3)), torch.zeros(2, 4), calls=1)
    x = torch.ones(2, 3)
    x[1, 0] = float("nan")  # in the masked block
    new = _Outer(_Other(x, refreshes=1), torch.ones(2, 4), calls=2)
    kept, replaced = compose.write_(old, new, torch.tensor([True, False]))
    assert replaced and isinstance(kept.inner, _Other) and kept.inner.refreshes == 1
    assert kept.inner.x[0].eq(1).all() and kept.inner.x[1].eq(0).all()  # block 1 kept, no NaN
    assert kept.inner.x is old.inner.x  # the stack, written in place: its views stay valid


def test_write_reports_a_record_that_disappears_and_handles_nested_replacements_and_private_fields():
    old, new = _records(torch.ones(2, 4))
    kept, replaced = compose.write_(old, attrs.evolve(new, inner=None), torch.tensor([True, True]))
    assert replaced and kept.inner is None
    old, new = _records(torch.ones(2, 4))
    new = attrs.evolve(new, inner=_Inner(torch.ones(2, 3, dtype=torch.float64)))  # a nested field replaced
    kept, replaced = compose.write_(old, new, torch.tensor([True, False]))
    assert replaced and kept.inner.x.dtype == torch.float64 and kept.inner.x[1].eq(0).all()
    y = torch.zeros(2, 4)
    kept, replaced = compose.write_(_Private(y, count=1), _Private(torch.ones(2, 4), count=2), torch.tensor([True, True]))
    assert not replaced and kept.y is y and y.eq(1).all() and kept._count == 2


def test_write_refuses_a_field_that_changes_between_a_tensor_and_a_number():
    old, new = _records(torch.ones(2, 4))
    with pytest.raises(ValueError, match="'y' changed between a tensor and a int"):
        compose.write_(old, attrs.evolve(new, y=3), torch.tensor([True, True]))


class _Ops(TorchDispatchMode):
    """The names of the operators called (overloads dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("aliased", ["written_later", "written_first"])
@pytest.mark.parametrize("ok", [[True, True], [True, False]])
def test_write_with_every_block_ok_on_cpu_is_one_foreach_copy_and_reads_aliased_stacks_first(ok, aliased):
    """Every block ok on a CPU: all the record's writes in one ``_foreach_copy_``, after everything was
    read; a new field that is another field's stack arrives with that stack's values from before the
    write, whichever of the two is written first (the walk meets ``inner.x`` before ``y``). A masked
    block keeps its old values either way."""
    before = torch.arange(8.0).view(2, 4)
    old = _Outer(_Inner(torch.zeros(2, 4)), torch.zeros(2, 4), calls=1)
    if aliased == "written_later":  # inner.x ← the y stack itself, y ← fives
        old.y.copy_(before)
        new = _Outer(_Inner(old.y), torch.full((2, 4), 5.0), calls=2)
        took, fives = (lambda k: k.inner.x), (lambda k: k.y)
    else:  # inner.x ← fives, y ← the inner.x stack itself, which is written first
        old.inner.x.copy_(before)
        new = _Outer(_Inner(torch.full((2, 4), 5.0)), old.inner.x, calls=2)
        took, fives = (lambda k: k.y), (lambda k: k.inner.x)
    with _Ops() as ops:
        kept, replaced = compose.write_(old, new, torch.tensor(ok))
    assert not replaced and kept.inner.x is old.inner.x and kept.y is old.y
    assert torch.equal(took(kept)[0], before[0]) and fives(kept)[0].eq(5).all()
    if all(ok):
        assert ops.names.count("_foreach_copy_") == 1 and "where" not in ops.names
        assert torch.equal(took(kept), before) and fives(kept).eq(5).all()
    else:
        assert "_foreach_copy_" not in ops.names
        assert took(kept)[1].eq(0).all() and torch.equal(fives(kept)[1], before[1])  # both blocks as they were


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize(
    ("dtype", "d_dtype", "lr"),
    [
        (torch.float32, torch.float32, 0.0123456789),
        (torch.float64, torch.float32, 0.0123456789),
        (torch.float32, torch.bfloat16, 3),
        (torch.float64, torch.float32, torch.tensor(0.0123456789, dtype=torch.float64)),  # not taken: the masked form
    ],
)
def test_parameter_write_with_every_block_ok_on_cpu_is_the_masked_write_bit_for_bit(monkeypatch, order, weight_decay, dtype, d_dtype, lr):
    """Every block ok on a CPU: the step goes in with shared factors and no mask or zeroing, the same bits
    as the masked form (the factors computed as the mask form computes them); a masked block still takes the
    masked form, and so does a tensor learning rate (whose dtype the factors would take)."""
    from kronopt import post as post_module
    from kronopt.post import Post

    post = Post(weight_decay_order=order)
    gen = torch.Generator().manual_seed(6)
    start = [torch.randn(5, 7, generator=gen, dtype=dtype) for _ in range(3)]
    D = torch.randn(3, 5, 7, generator=gen).to(d_dtype)

    def run(ok, host):
        monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
        post_module._FACTORS.clear()
        params = [p.clone() for p in start]
        with _Ops() as ops:
            post.apply_(params, D.clone(), lr=lr, weight_decay=weight_decay, ok=torch.tensor(ok))
        return params, ops.names

    fast, names = run([True] * 3, True)
    masked, masked_names = run([True] * 3, False)
    assert ("nan_to_num_" not in names) == (not isinstance(lr, torch.Tensor)) and "nan_to_num_" in masked_names
    for a, b in zip(fast, masked):
        assert torch.equal(a, b)
    kept, _ = run([True, False, True], True)  # not every block ok: the mask form, block 1 untouched
    assert torch.equal(kept[1], start[1]) and torch.equal(kept[0], fast[0])


def test_mm_of_stacks_of_other_batch_sizes_broadcasts_as_matmul():
    """``linalg.mm`` calls ``bmm`` only for stacks of one batch size; a batch of one broadcasts as with ``@``."""
    gen = torch.Generator().manual_seed(7)
    A, B = torch.randn(1, 4, 3, generator=gen), torch.randn(5, 3, 2, generator=gen)
    assert torch.equal(linalg.mm(A, B), A @ B) and torch.equal(linalg.mm(B.mT, A.mT), B.mT @ A.mT)
    C = torch.randn(5, 4, 3, generator=gen)
    assert torch.equal(linalg.mm(C, B), torch.bmm(C, B))


@pytest.mark.parametrize(("a", "b"), [((3, 40, 70), (3, 70, 50)), ((2, 300, 200), (2, 200, 150))])
@pytest.mark.parametrize("transposed", ["none", "left", "right", "both"])
def test_mm_of_stacks_of_one_batch_size_gives_the_bits_of_matmul(a, b, transposed, monkeypatch):
    """Stacks of one batch size, contiguous or transposed views (as the steps pass them): ``linalg.mm``
    (``bmm`` itself) gives ``@``'s bits, so a call site may switch without changing a trajectory. Where oneDNN's
    kernels take a large product (a Zen 5's, off here) ``@``'s are MKL's and the bits differ;
    tests/unit/test_onednn_products.py checks that route. Stacks of column vectors on the right, and of rows on
    the left, go as rows (the next test)."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    gen = torch.Generator().manual_seed(8)
    A, B = torch.randn(*a, generator=gen), torch.randn(*b, generator=gen)
    if transposed in ("left", "both"):
        A = A.mT.contiguous().mT
    if transposed in ("right", "both"):
        B = B.mT.contiguous().mT
    assert torch.equal(linalg.mm(A, B), A @ B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("m", "k"), [(40, 100), (100, 300), (256, 1024), (7, 33)])
def test_mm_of_vector_stacks_gives_a_block_the_same_bits_in_a_stack_as_alone(dtype, m, k):
    """A stack of column vectors on the right (a rank-one subspace's ``G U``) and a stack of rows on the left
    with a column's strides (its ``Uᵀ`` against ``G``), each matrix row- or column-major: MKL's ``bmm`` rounds
    these by the stack's size (before, most blocks of these shapes differed), ``linalg.mm`` makes them in the layout
    whose bits do not depend on it (DESIGN.md's invariant 4), equal to the float64 product to rounding and, for a
    column stack, to :func:`linalg.matvec`'s."""
    gen = torch.Generator().manual_seed(m + k)
    for b in (2, 3, 8):
        for n in (5, m):  # not 1: a stack of dot products is one call and may round by its size
            A = torch.randn(b, m, k, generator=gen, dtype=dtype)
            x = torch.randn(b, k, 1, generator=gen, dtype=dtype)
            W = torch.randn(b, k, n, generator=gen, dtype=dtype)
            for lay in (lambda t: t, lambda t: t.mT.contiguous().mT):
                A_, W_ = lay(A), lay(W)
                col, row = linalg.mm(A_, x), linalg.mm(x.mT, W_)
                for i in range(b):
                    assert_block_as_alone(col[i : i + 1], linalg.mm(A_[i : i + 1], x[i : i + 1]), (b, n, i))
                    assert_block_as_alone(row[i : i + 1], linalg.mm(x[i : i + 1].mT, W_[i : i + 1]), (b, n, i))
                assert torch.equal(col.squeeze(-1), linalg.matvec(A_, x.squeeze(-1)))
                torch.testing.assert_close(col.double(), A.double() @ x.double(), rtol=1e-5, atol=1e-5 * k)
                torch.testing.assert_close(row.double(), x.double().mT @ W.double(), rtol=1e-5, atol=1e-5 * k)


@pytest.mark.parametrize("host", [True, False])  # the CPU's every-block-ok form and the masked one
def test_weight_decay_of_float32_parameters_survives_a_bfloat16_direction(monkeypatch, host):
    """With the direction in bfloat16 the factors are still float32: 1 − lr·wd = 1 − 1e-4 does not round
    to 1 (it did: weight decay vanished for lr·wd below about 2⁻⁹), and −lr keeps its float32 value."""
    from kronopt import post as post_module
    from kronopt.post import Post

    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    post_module._FACTORS.clear()
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(4, 6, generator=gen) for _ in range(2)]
    start = [p.clone() for p in params]
    D = torch.randn(2, 4, 6, generator=gen).to(torch.bfloat16)
    Post(weight_decay_order="after").apply_(params, D.clone(), lr=1e-3, weight_decay=0.1, ok=torch.tensor([True, True]))
    decay = 1 - torch.tensor(1e-3 * 0.1, dtype=torch.float32)
    for p, p0, d in zip(params, start, D):
        expected = (p0 + d.float() * torch.tensor(-1e-3, dtype=torch.float32)) * decay
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)
        assert not torch.equal(p, p0 + d.float() * torch.tensor(-1e-3, dtype=torch.float32))  # decayed


@pytest.mark.parametrize("host", [True, False])
def test_select_blocks_reads_a_cpu_verdict_on_the_host(monkeypatch, host):
    """On a CPU every block ok gives ``new`` itself and none ``old`` itself (no pass over either); a mixed verdict,
    tensors that only broadcast, and the device-agnostic path (``host`` False) take ``torch.where``: the same values."""
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    gen = torch.Generator().manual_seed(9)
    new, old = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    for flags, expected in (([True] * 3, new), ([False] * 3, old)):
        out = linalg.select_blocks(torch.tensor(flags), new, old)
        assert (out is expected) == host
        assert torch.equal(out, expected)
    mixed = linalg.select_blocks(torch.tensor([True, False, True]), new, old)
    assert mixed is not new and torch.equal(mixed[0], new[0]) and torch.equal(mixed[1], old[1])
    eye = torch.eye(5)  # shapes that only broadcast: torch.where even when every block is ok
    full = torch.randn(3, 5, 5, generator=gen)
    out = linalg.select_blocks(torch.tensor([True] * 3), full, eye)
    assert out is not full and torch.equal(out, full)
    out = linalg.select_blocks(torch.tensor([False] * 3), full, eye)
    assert out.shape == (3, 5, 5) and torch.equal(out, eye.expand(3, 5, 5))
    # a mask that is not one flag per block is never read as a whole (nested lists are all truthy)
    column = linalg.select_blocks(torch.tensor([[True], [False]]), torch.ones(2, 1), torch.zeros(2, 1))
    assert column.view(-1).tolist() == [1.0, 0.0]


@pytest.mark.filterwarnings("ignore:non-finite gradient")
@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("preset", ["dykaf", "pro_kl_shampoo", "soap"])
def test_a_non_finite_gradient_is_zeroed_before_the_pipeline_on_the_first_step_and_later(preset, scope):
    """A gradient read non-finite on the host is sanitised, not stacked as it is: on the first step (whose
    SVD start fails on a NaN: dykaf, pro_kl_shampoo) and on a later one, the stack the pipeline gets is
    finite and equals ``nan_to_num`` of the gradients; finite gradients are stacked as they are."""
    gen = torch.Generator().manual_seed(4)
    ws = [torch.nn.Parameter(torch.randn(6, 8, generator=gen)) for _ in range(3)]
    opt = kronopt.build([(f"w{i}", w) for i, w in enumerate(ws)], preset, nonfinite_scope=scope)
    bucket = next(b for b in opt._buckets if b.layout.m * b.layout.n == 48)
    for step in range(4):
        grads = [torch.randn(6, 8, generator=gen) for _ in ws]
        if step in (0, 2):
            grads[1][2, 3] = float("nan")
            grads[2][0, 0] = -float("inf")
        for w, g in zip(ws, grads):
            w.grad = g
        opt._all_finite()  # the step's check, whose host-read flags the stacking reads
        G, ok = opt._sanitized_gradients(bucket, [w.grad for w in ws], torch.float32)
        assert torch.equal(G, torch.stack(grads).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
        assert ok.tolist() == ([True, False, False] if step in (0, 2) else [True, True, True])
        opt.step()  # raises nowhere (the SVD start never sees the NaN)
    assert all(torch.isfinite(w).all() for w in ws)


@pytest.mark.parametrize("preset", ["dykaf", "soap", "pro_dykaf", "kl_shampoo", "muon"])
def test_host_verdicts_change_no_bit_of_a_trajectory(monkeypatch, preset):
    """The CPU's host-read verdicts (every block ok, every block started, every gradient finite) against the
    device-agnostic masked path, over refreshes, with one block whose first gradients are zero (started late, dykaf's `fresh`)
    and one non-finite gradient (a skipped block): the same parameters, bit for bit."""

    def run(host):
        monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
        gen = torch.Generator().manual_seed(10)
        ws = [torch.nn.Parameter(torch.randn(6, 8, generator=gen, dtype=torch.float64)) for _ in range(3)]
        opt = kronopt.build([(f"w{i}", w) for i, w in enumerate(ws)], preset, **{"refresh.every": 3})
        for k in range(9):
            for i, w in enumerate(ws):
                g = torch.randn(6, 8, generator=gen, dtype=torch.float64)
                w.grad = torch.zeros_like(g) if (i == 1 and k < 3) else g
            if k == 5:
                ws[2].grad[0, 0] = float("nan")
            opt.step()
        return [w.detach().clone() for w in ws]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def _nested(calls, refreshes, x, y):
    return _Outer(_Inner(x, refreshes=refreshes), y, calls=calls)


@pytest.mark.parametrize("ok", [[True, True], [True, False]])
def test_a_staged_write_takes_what_a_write_takes_and_names_the_counters_that_changed(ok):
    """The finiteness test and the write share one walk (``stage_write``): its writes leave the stacks, the kept
    record and the changed tensors as ``write_`` and ``changed_tensors`` make them, and its counters are the
    ``scalar_entries`` that differ from the old record's, by their dotted paths (``inner.refreshes`` nested),
    which is all a parameter's ``state[p]`` must take (its tensors are views)."""
    def run(staged):
        old = _nested(1, 4, torch.zeros(2, 3), torch.zeros(2, 4))
        new = _nested(2, 5 if staged != "same_refreshes" else 4, torch.ones(2, 3), torch.full((2, 4), 2.0))
        counters = {}
        if staged:
            s = compose.stage_write(old, new)
            assert s is not None
            changed = s.changed()
            kept = compose.write_staged_(s, torch.tensor(ok))
            counters = s.counters
        else:
            changed = compose.changed_tensors(new, old)
            kept, replaced = compose.write_(old, new, torch.tensor(ok), counters=counters)
            assert not replaced
        return old, kept, changed, counters

    old, kept, changed, counters = run(False)
    s_old, s_kept, s_changed, s_counters = run(True)
    assert s_kept.inner.x is s_old.inner.x and s_kept.y is s_old.y  # the stacks, written in place
    assert torch.equal(s_kept.inner.x, kept.inner.x) and torch.equal(s_kept.y, kept.y)
    assert (s_kept.calls, s_kept.inner.refreshes) == (kept.calls, kept.inner.refreshes) == (2, 5)
    assert [t.shape for t in s_changed] == [t.shape for t in changed] == [(2, 3), (2, 4)]
    assert s_counters == counters == {"calls": 2, "inner.refreshes": 5}
    assert run("same_refreshes")[3] == {"calls": 2}  # an unchanged counter is not named


def test_a_staged_write_leaves_a_replaced_field_to_write():
    """A field the write must replace (another dtype: selected per block from the verdicts, which the staged walk
    does not have yet; one that disappears) is no staged write: ``None``, and nothing was written."""
    for y_new in (torch.ones(2, 4, dtype=torch.float64), None):
        old = _nested(1, 0, torch.zeros(2, 3), torch.zeros(2, 4))
        assert compose.stage_write(old, _nested(2, 0, torch.ones(2, 3), y_new)) is None
        assert old.inner.x.eq(0).all() and old.y.eq(0).all()


@pytest.mark.parametrize("preset", sorted(kronopt.PRESETS))
def test_a_one_block_bucket_steps_on_its_gradient_itself_and_leaves_it_as_it_was(monkeypatch, preset):
    """A bucket of one block steps on a view of its gradient, not a stacked copy (a CPU step whose check read every
    gradient finite), and nothing writes into it: after each step, a refresh among them, every gradient holds its
    values bit for bit, and the parameters are those the same steps reach from copies of the gradients. Would catch:
    a stage or a write changing ``G`` in place (the user's gradient would change with it), or the view handed on
    where a copy's values or layout were needed."""
    from kronopt import optimizer as kopt

    shapes = [(12, 8), (8, 5), (8,)]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(12)]
    original = kopt.KronOptimizer._sanitized_gradients
    viewed = []

    def copies(self, bucket, grads_, dtype):
        G, ok = original(self, bucket, grads_, dtype)
        return G.clone(), ok

    def spy(self, bucket, grads_, dtype):
        G, ok = original(self, bucket, grads_, dtype)
        viewed.append(any(G.untyped_storage().data_ptr() == g.untyped_storage().data_ptr() for g in grads_))
        return G, ok

    finals = []
    for wrapper in (spy, copies):
        monkeypatch.setattr(kopt.KronOptimizer, "_sanitized_gradients", wrapper)
        params = [torch.nn.Parameter(x.clone()) for x in start]
        opt = kronopt.build(params, preset)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
            for p, g in zip(params, step):
                assert torch.equal(p.grad, g)
        finals.append([p.detach().clone() for p in params])
    if viewed:  # presets whose matrices go through the pipeline's buckets
        assert any(viewed)
    for a, b in zip(*finals):
        assert torch.equal(a, b)
