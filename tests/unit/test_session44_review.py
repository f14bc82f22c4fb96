"""Review of the forty-fourth session's two copies (commits 6dcc2cc and 2c7b138).

``linalg.contiguous`` (a stack of transposed blocks copied block by block), ``_onednn_mm``'s one-block result made
contiguous as a matrix, and ``LowerTiles.write`` scaling each tile's mirror from the tile's transpose. Every
check compares against a value made another way: ``Tensor.contiguous()``, the dense matrix assembled from the
tiles then scaled, or float64 arithmetic.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from kronopt import linalg
from kronopt.linalg import LowerTiles
from tests.strategies import held_matrix

_ONEDNN = torch.backends.mkldnn.is_available()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _same_as_contiguous(out: torch.Tensor, T: torch.Tensor) -> None:
    """``out`` is what ``T.contiguous()`` gives: values, shape, dtype, layout, device, never ``T``'s memory unless
    ``T.contiguous()`` is ``T`` itself."""
    ref = T.contiguous()
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    assert out.is_contiguous() and out.stride() == ref.stride()
    if out.device.type != "meta":
        assert torch.equal(out.resolve_conj().resolve_neg(), ref.resolve_conj().resolve_neg())
    if ref is T:
        assert out is T
    elif T.numel() and T.device.type != "meta":
        assert out.untyped_storage().data_ptr() != T.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------------------------
# linalg.contiguous
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool,
     torch.complex64],
)
def test_contiguous_every_dtype_is_copied_exactly_and_the_source_is_only_read(dtype):
    G = _randn(3, 256, 300, seed=1).mul(40).to(dtype) if not dtype.is_complex else torch.complex(
        _randn(3, 256, 300, seed=1), _randn(3, 256, 300, seed=2)).to(dtype)
    before = G.clone()
    T = G.mT
    out = linalg.contiguous(T)
    _same_as_contiguous(out, T)
    assert torch.equal(G, before)
    out.fill_(0)  # the result is memory of its own: writing it leaves the source as it was
    assert torch.equal(G, before)


@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_contiguous_of_a_conjugate_or_negative_view_holds_the_resolved_values(bit):
    G = torch.complex(_randn(2, 256, 320, seed=3), _randn(2, 256, 320, seed=4)).to(torch.complex64)
    if bit == "conj":
        V, expected = G.conj(), torch.conj_physical(G)
    else:
        V, expected = torch._neg_view(G.real.contiguous()), -G.real  # a negative-bit view of a float32 stack
        assert V.is_neg()
    T = V.mT
    assert T.mT.is_contiguous() and not T.is_contiguous()
    out = linalg.contiguous(T)
    assert out.is_contiguous()
    assert torch.equal(out.resolve_conj().resolve_neg(), expected.mT.contiguous())
    assert torch.equal(G, torch.complex(_randn(2, 256, 320, seed=3), _randn(2, 256, 320, seed=4)).to(torch.complex64))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _randn(0, 300, 256).mT, id="batch-0"),
        pytest.param(lambda: _randn(1, 1024, 96).mT, id="batch-1"),
        pytest.param(lambda: _randn(1, 300, 256)[:, :, :].mT, id="batch-1-view"),
        pytest.param(lambda: _randn(2, 1, 70000).mT, id="one-row-blocks"),
        pytest.param(lambda: _randn(2, 70000, 1).mT, id="one-column-blocks"),
        pytest.param(lambda: _randn(3, 0, 70000).mT, id="empty-blocks"),
        pytest.param(lambda: _randn(6, 256, 300)[::2].mT, id="every-other-block"),
        pytest.param(lambda: _randn(6, 256, 300)[1:4].mT, id="sliced-batch-with-offset"),
        pytest.param(lambda: _randn(1, 256, 300).expand(3, 256, 300).mT, id="expanded-batch"),
        pytest.param(lambda: _randn(256, 300).expand(3, 256, 300).mT, id="expanded-matrix"),
        pytest.param(lambda: _randn(256, 300, 3).permute(2, 0, 1).mT, id="batch-innermost"),
        pytest.param(lambda: _randn(3, 300, 256).transpose(0, 1), id="batch-and-rows-swapped"),
        pytest.param(lambda: _randn(2, 256, 256).mT, id="at-the-threshold"),
        pytest.param(lambda: _randn(2, 255, 257).mT, id="one-below-the-threshold"),
        pytest.param(lambda: _randn(2, 256, 300).mT.mT, id="already-contiguous"),
        pytest.param(lambda: _randn(2, 256, 600)[:, :, 1::2].mT, id="strided-columns"),
    ],
)
def test_contiguous_of_any_layout_is_what_tensor_contiguous_gives(make):
    T = make()
    before = T.clone()
    out = linalg.contiguous(T)
    _same_as_contiguous(out, T)
    assert torch.equal(T, before)


@pytest.mark.parametrize("shape", [(3, 1, 5), (3, 5, 1), (2, 7, 3), (1, 9, 4), (4, 2, 2), (2, 1, 1), (0, 4, 5)])
def test_contiguous_forced_onto_tiny_blocks_is_what_tensor_contiguous_gives(monkeypatch, shape):
    """The block-by-block copy on every block size (the threshold at 0): blocks of one row or column, one entry."""
    monkeypatch.setattr(linalg, "_BLOCKWISE_TRANSPOSE_MIN", 0)
    G = _randn(*shape, seed=5)
    for T in (G.mT, G, G[::2].mT if shape[0] else G.mT):
        out = linalg.contiguous(T)
        _same_as_contiguous(out, T)


def test_contiguous_keeps_the_gradient_where_autograd_tracks_the_stack():
    G = _randn(2, 256, 300, seed=6).requires_grad_()
    out = linalg.contiguous(G.mT)
    assert out.requires_grad and out.grad_fn is not None
    w = _randn(*out.shape, seed=7)
    (out * w).sum().backward()
    assert torch.equal(G.grad, w.mT)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_contiguous_of_a_tracked_stack_outside_grad_mode_is_what_tensor_contiguous_gives(mode):
    G = _randn(2, 256, 300, seed=8).requires_grad_()
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        out = linalg.contiguous(G.mT)
        ref = G.mT.contiguous()
    assert torch.equal(out, ref) and out.is_contiguous()
    assert out.requires_grad == ref.requires_grad
    assert out.is_inference() == ref.is_inference()
    assert G.grad is None and torch.equal(G.detach(), _randn(2, 256, 300, seed=8))


def test_contiguous_of_an_inference_tensor_outside_inference_mode():
    with torch.inference_mode():
        G = _randn(2, 256, 300, seed=9)
    out = linalg.contiguous(G.mT)
    _same_as_contiguous(out, G.mT)


def test_contiguous_carries_a_forward_mode_tangent():
    G, dG = _randn(2, 256, 300, seed=10), _randn(2, 256, 300, seed=11)
    with fwAD.dual_level():
        out = linalg.contiguous(fwAD.make_dual(G, dG).mT)
        primal, tangent = fwAD.unpack_dual(out)
        assert tangent is not None, "the tangent was dropped"
        assert torch.equal(primal, G.mT.contiguous()) and torch.equal(tangent, dG.mT)


def test_contiguous_under_vmap_is_what_tensor_contiguous_gives():
    X = _randn(2, 3, 256, 300, seed=12)
    out = torch.func.vmap(linalg.contiguous)(X.mT)
    assert out.shape == (2, 3, 300, 256)
    assert torch.equal(out, X.mT.contiguous())


def test_contiguous_of_a_grad_transform_carries_its_gradient():
    G = _randn(2, 256, 300, seed=13)
    w = _randn(2, 300, 256, seed=14)
    grad = torch.func.grad(lambda g: (linalg.contiguous(g.mT) * w).sum())(G)
    assert torch.equal(grad, w.mT)


class _Sub(torch.Tensor):
    pass


def test_contiguous_of_a_subclass_keeps_it():
    T = _randn(2, 256, 300, seed=15).as_subclass(_Sub).mT
    out = linalg.contiguous(T)
    assert type(out) is type(T.contiguous()) is _Sub
    assert torch.equal(out.as_subclass(torch.Tensor), T.as_subclass(torch.Tensor).contiguous())


def test_contiguous_inside_torch_compile_is_what_tensor_contiguous_gives():
    """Traced whole (``fullgraph``): inside ``torch.compile`` it is ``Tensor.contiguous`` itself, no loop of copies."""
    torch._dynamo.reset()
    compiled = torch.compile(linalg.contiguous, backend="eager", fullgraph=True)
    X = _randn(2, 256, 300, seed=19)
    out = compiled(X.mT)
    assert out.is_contiguous() and torch.equal(out, X.mT.contiguous())
    torch._dynamo.reset()


def test_contiguous_on_the_meta_device():
    T = torch.empty(3, 256, 300, device="meta").mT
    out = linalg.contiguous(T)
    _same_as_contiguous(out, T)


def test_rows_laid_copies_a_gram_operand_once_and_exactly():
    G = _randn(2, 256, 300, seed=16)
    A, B = linalg._rows_laid(G.mT, G.mT)
    assert A is B and A.is_contiguous() and torch.equal(A, G.mT.contiguous())
    assert A.untyped_storage().data_ptr() != G.untyped_storage().data_ptr()
    H = _randn(2, 256, 300, seed=17)
    A, B = linalg._rows_laid(G.mT, H.mT)
    assert torch.equal(A, G.mT.contiguous()) and torch.equal(B, H.mT.contiguous())
    rows = _randn(2, 300, 256, seed=18)
    A, B = linalg._rows_laid(rows, G.mT)
    assert A is rows and torch.equal(B, G.mT.contiguous())


# --------------------------------------------------------------------------------------------------------------
# mm / mm_into of one block (oneDNN's one-block result made contiguous as a matrix)
# --------------------------------------------------------------------------------------------------------------


def _laid(X: torch.Tensor, layout: str) -> torch.Tensor:
    return X.mT.contiguous().mT if layout == "columns" else X


_ONEDNN_MODES = [pytest.param(True, id="onednn", marks=pytest.mark.skipif(not _ONEDNN, reason="no oneDNN")),
                 pytest.param(False, id="mkl")]


@pytest.mark.parametrize("oned", _ONEDNN_MODES)
@pytest.mark.parametrize("a_layout", ["rows", "columns"])
@pytest.mark.parametrize("b_layout", ["rows", "columns"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_mm_of_one_block_is_row_major_and_right(monkeypatch, oned, a_layout, b_layout, ndim):
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", oned)
    # k > n: with both column-major oneDNN takes the turned form (Bᵀ Aᵀ, its result transposed back)
    A = _laid(_randn(1, 300, 384, seed=20), a_layout)
    B = _laid(_randn(1, 384, 257, seed=21), b_layout)
    if ndim == 2:
        A, B = A[0], B[0]
    A0, B0 = A.clone(), B.clone()
    C = linalg.mm(A, B)
    assert C.shape == A.shape[:-1] + B.shape[-1:] and C.dtype == torch.float32 and C.is_contiguous()
    assert C.stride() == torch.empty(C.shape).stride()
    assert C.untyped_storage().data_ptr() not in (A.untyped_storage().data_ptr(), B.untyped_storage().data_ptr())
    torch.testing.assert_close(C.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(A, A0) and torch.equal(B, B0)


@pytest.mark.parametrize("oned", _ONEDNN_MODES)
@pytest.mark.parametrize("a_layout", ["rows", "columns"])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("out_layout", ["rows", "columns"])
def test_mm_into_writes_its_out_exactly_where_it_lies(monkeypatch, oned, a_layout, b, out_layout):
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", oned)
    A = _laid(_randn(b, 300, 257, seed=22), a_layout)
    B = _randn(b, 257, 384, seed=23)
    out = _laid(torch.full((b, 300, 384), float("nan")), out_layout)
    got = linalg.mm_into(A, B, out)
    assert got.data_ptr() == out.data_ptr() and got.stride() == out.stride()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not _ONEDNN, reason="no oneDNN")
@pytest.mark.parametrize("a_layout", ["rows", "columns"])
def test_onednn_mm_of_one_matrix_into_a_given_out(a_layout):
    A = _laid(_randn(1, 300, 384, seed=24), a_layout)[0]
    B = _randn(257, 384, seed=25).mT  # column-major: with a column-major A, the turned form
    out = torch.full((300, 257), float("nan"))
    got = linalg._onednn_mm(A, B, out=out)
    assert got is out
    torch.testing.assert_close(out.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)
    fresh = linalg._onednn_mm(A[None], B[None])
    assert fresh.shape == (1, 300, 257) and fresh.is_contiguous() and torch.equal(fresh[0], out)


# --------------------------------------------------------------------------------------------------------------
# LowerTiles.write
# --------------------------------------------------------------------------------------------------------------


def _tiles(d: int, b: int, dtype: torch.dtype, seed: int) -> LowerTiles:
    """Random tiles on and below the diagonal (each diagonal tile symmetric, as the tiled product makes it)."""
    P = LowerTiles(torch.Size((b, d, d)), dtype, torch.device("cpu"))
    g = _gen(seed)
    for i, I in enumerate(P.slices):
        for j, J in enumerate(P.slices[: i + 1]):
            t = torch.randn(b, I.stop - I.start, J.stop - J.start, generator=g, dtype=torch.float64)
            if dtype.is_complex:
                t = torch.complex(t, torch.randn(t.shape, generator=g, dtype=torch.float64))
            t = t.to(dtype)
            P.tiles[i, j] = t + t.mT if i == j else t
    return P


def _scaled_dense(D: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense matrix times ``scale``, in the common dtype, then rounded to ``D``'s."""
    return torch.mul(D, scale).to(D.dtype)


@pytest.mark.parametrize("d", [520, 777, 1024])
@pytest.mark.parametrize("b", [1, 2, 3])
@pytest.mark.parametrize("given", ["new", "nan-out"])
def test_write_is_the_dense_matrix_scaled_bit_for_bit(d, b, given):
    P = _tiles(d, b, torch.float32, seed=d + b)
    scale = _randn(b, 1, 1, seed=30).abs().add(0.25)
    tiles_before = {k: t.clone() for k, t in P.tiles.items()}
    out = None if given == "new" else torch.full((b, d, d), float("nan"))
    W = P.write(out, scale=scale)
    if out is not None:
        assert W is out
    assert W.shape == (b, d, d) and W.dtype == torch.float32
    assert torch.equal(W, W.mT)  # exactly symmetric
    assert torch.equal(W, _scaled_dense(held_matrix(P), scale))
    assert all(torch.equal(P.tiles[k], t) for k, t in tiles_before.items())  # the tiles are only read


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [1, 2])
def test_write_of_other_dtypes_is_the_dense_matrix_scaled(dtype, b):
    P = _tiles(777, b, dtype, seed=31)
    scale = _randn(b, 1, 1, seed=32, dtype=dtype).abs().add(0.25)
    W = P.write(scale=scale)
    assert torch.equal(W, W.mT) and torch.equal(W, _scaled_dense(held_matrix(P), scale))


@pytest.mark.parametrize("b", [1, 3])
def test_write_with_a_float64_scale_rounds_each_entry_once_to_float32(b):
    P = _tiles(520, b, torch.float32, seed=33)
    scale = _randn(b, 1, 1, seed=34, dtype=torch.float64).mul(1 / 3).add(0.1)  # float64, no float32 value
    assert scale.dtype == torch.float64 and not torch.equal(scale.float().double(), scale)
    out = torch.full((b, 520, 520), float("nan"))
    W = P.write(out, scale=scale)
    expected = torch.mul(held_matrix(P).double(), scale).float()  # each entry in float64, then rounded to float32
    assert W is out and torch.equal(W, expected) and torch.equal(W, W.mT)


def test_write_with_a_number_scale_and_into_a_column_major_out():
    P = _tiles(777, 2, torch.float32, seed=35)
    out = torch.full((2, 777, 777), float("nan")).mT  # a transposed view: another place for each tile
    W = P.write(out, scale=torch.tensor(0.3))
    assert W is out and torch.equal(W, held_matrix(P) * torch.tensor(0.3)) and torch.equal(W, W.mT)


@pytest.mark.parametrize("d", [520, 1024])
def test_write_of_the_tiled_products_own_tiles_is_its_dense_form_scaled(monkeypatch, d):
    """The tiles ``sym_product_stats`` keeps (``tiles=True``), written scaled, against the same product made dense
    tile by tile and then scaled: the same bits, and the same reductions."""
    monkeypatch.setattr(linalg, "_tiles_in_place", lambda: False)  # the dense form tile by tile, as the held one
    b = 2
    X = _randn(b, d, d, seed=36)
    X = X + X.mT
    A = _randn(b, d, 96, seed=37)
    Bm = _randn(b, d, 96, seed=38)
    beta = _randn(b, 1, 1, seed=39).abs()
    held, dot_h, norm_h = linalg.sym_product_stats(X, A, Bm, beta=beta, alpha=0.3, other=X, tiles=True)
    dense, dot_d, norm_d = linalg.sym_product_stats(X, A, Bm, beta=beta, alpha=0.3, other=X, tiles=False)
    assert isinstance(held, LowerTiles) and isinstance(dense, torch.Tensor)
    scale = norm_h.reciprocal()
    W = held.write(torch.full((b, d, d), float("nan")), scale=scale)
    assert torch.equal(W, dense * scale) and torch.equal(W, W.mT)
    assert torch.equal(norm_h, norm_d) and torch.equal(dot_h, dot_d)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_write_of_complex_tiles_is_the_dense_matrix_scaled(dtype):
    """Found by the review (2c7b138): a complex mirror multiplied from the tile's transpose (torch's strided loop)
    rounded otherwise than its place (the vectorised one), so the matrix was not exactly symmetric. A complex
    tile's mirror is copied from its place again."""
    P = _tiles(520, 2, dtype, seed=40)
    scale = torch.complex(_randn(2, 1, 1, seed=41), _randn(2, 1, 1, seed=42)).to(dtype)
    W = P.write(scale=scale)
    assert torch.equal(W, W.mT) and torch.equal(W, held_matrix(P) * scale)


# --------------------------------------------------------------------------------------------------------------
# DyKAF's step on wide and tall blocks (both touched: Gᵀ laid by contiguous, K / R̂ written by LowerTiles.write)
# --------------------------------------------------------------------------------------------------------------


def _state(b: int, m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    G = torch.randn(b, m, n, generator=g, dtype=torch.float64)
    Lf = torch.randn(b, m, m, generator=g, dtype=torch.float64)
    Rf = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    L = Lf @ Lf.mT / m
    R = Rf @ Rf.mT / n
    # equal norms, as the state leaves every step
    R = R * (torch.linalg.matrix_norm(L) / torch.linalg.matrix_norm(R)).view(b, 1, 1)
    return L, R, G


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref)).max())


@pytest.mark.parametrize("oned", _ONEDNN_MODES)
@pytest.mark.parametrize("shape", [(2, 256, 1024), (2, 1024, 256), (1, 300, 777)], ids=["wide", "tall", "odd-wide"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("fresh", [False, True])
def test_dykaf_step_in_float32_is_its_float64_step(monkeypatch, oned, shape, deferred, fresh):
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", oned)
    L64, R64, G64 = _state(*shape, seed=sum(shape))
    mask = torch.tensor([True] + [False] * (shape[0] - 1)) if fresh else None  # the first block holds nothing yet
    L, R, G = L64.float(), R64.float(), G64.float()
    L0, R0, G0 = L.clone(), R.clone(), G.clone()
    ref_L, ref_R = linalg.projector_split_ksl(L64.clone(), R64.clone(), G64, 0.9, fresh=mask)
    if deferred:
        defer: list = []
        Lw, Rw = L.clone(), R.clone()
        got = linalg.projector_split_ksl(Lw, Rw, G, 0.9, fresh=mask, defer=defer)
        for write in defer:
            write.into(write.target)
        new_L, new_R = got
        assert new_L is Lw and new_R is Rw and len(defer) == 2
        assert torch.equal(L, L0) and torch.equal(R, R0)
    else:
        new_L, new_R = linalg.projector_split_ksl(L, R, G, 0.9, fresh=mask)
        assert torch.equal(L, L0) and torch.equal(R, R0)
    assert torch.equal(G, G0)
    assert new_L.dtype == new_R.dtype == torch.float32
    assert torch.equal(new_L, new_L.mT) and torch.equal(new_R, new_R.mT)
    assert _rel(new_L, ref_L) < 1e-4 and _rel(new_R, ref_R) < 1e-4


@pytest.mark.parametrize("shape", [(2, 256, 1024), (2, 1024, 256)], ids=["wide", "tall"])
def test_dykaf_step_deferred_is_its_step_returned_bit_for_bit(shape):
    """The deferred writes (``LowerTiles.write`` into the state itself) against the returned step (into new tensors)."""
    L64, R64, G64 = _state(*shape, seed=50)
    L, R, G = L64.float(), R64.float(), G64.float()
    new_L, new_R = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    defer: list = []
    Lw, Rw = L.clone(), R.clone()
    linalg.projector_split_ksl(Lw, Rw, G, 0.9, defer=defer)
    for write in defer:
        write.into(write.target)
    assert torch.equal(Lw, new_L) and torch.equal(Rw, new_R)


@pytest.mark.skipif(not _ONEDNN, reason="no oneDNN")
@pytest.mark.parametrize("shape", [(2, 256, 1024), (1, 300, 777)], ids=["wide", "odd-wide"])
def test_dykaf_step_with_its_transposed_operand_laid_by_tensor_contiguous_is_the_same_bits(monkeypatch, shape):
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)
    L64, R64, G64 = _state(*shape, seed=60)
    L, R, G = L64.float(), R64.float(), G64.float()
    new = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    monkeypatch.setattr(linalg, "contiguous", lambda T: T.contiguous())
    old = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
