"""A review of the float32 products through oneDNN (``linalg._by_onednn``): each call site's contract kept against
float64 products or MKL's path (``_ONEDNN_FLOAT32 = False``), never against the path's own output.

Every test forces the path on (``linalg._ONEDNN_FLOAT32 = True``) and counts the calls that reach oneDNN, so a
test whose operands fall below the bounds (and so test nothing) fails rather than passes.
"""

import copy
import warnings

import pytest
import torch

import kronopt
from kronopt import linalg
from tests.unit.test_onednn_products import spy_onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

_F64 = torch.float64


@pytest.fixture
def onednn(monkeypatch):
    """The path forced on; the oneDNN calls made (each checked: a row-major input, a weight without gaps)."""
    return spy_onednn(monkeypatch)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.to(_F64)
    return ((got.to(_F64) - want).abs().max() / want.abs().max()).item()


def _rand(gen, *shape, dtype=_F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# -- operands of every kind -------------------------------------------------------------------------------------


def _odd_operands(gen):
    """Float32 operand pairs ``(A, B)`` past the bounds in layouts beyond the plain four: stride-0 rows, a
    batch-broadcast matrix, a batch dimension with odd strides, storage offsets, a transposed stack whose batch
    is its middle dimension, a one-block stack."""
    A = _rand(gen, 3, 256, 192).float()
    B = _rand(gen, 3, 192, 200).float()
    row = _rand(gen, 1, 1, 192).float()
    mat = _rand(gen, 192, 200).float()
    wide = _rand(gen, 256, 5, 192).float()
    buf = _rand(gen, 11 + 3 * 256 * 192).float()
    mid = _rand(gen, 200, 3, 192).float()
    return {
        "stride-0 rows": (row.expand(3, 256, 192), B),
        "stride-0 columns": (A, _rand(gen, 3, 192, 1).float().expand(3, 192, 200)),
        "batch-broadcast weight": (A, mat.expand(3, 192, 200)),
        "batch-broadcast input": (A[:1].expand(3, 256, 192), B),
        "odd batch stride": (wide.permute(1, 0, 2)[::2], B),
        "storage offset": (buf[11:].view(3, 256, 192), B),
        "batch in the middle": (A, mid.permute(1, 2, 0)),
        "one block": (A[1:2], B[2:3]),
    }


@pytest.mark.parametrize("form", list(_odd_operands(torch.Generator().manual_seed(0))))
def test_mm_of_odd_layouts_is_the_float32_product(onednn, gen, form):
    A, B = _odd_operands(gen)[form]
    C = linalg.mm(A, B)
    assert len(onednn) == A.shape[0], form
    assert C.dtype == torch.float32 and C.shape == (A.shape[0], A.shape[1], B.shape[2]) and C.is_contiguous(), form
    assert _rel(C, A.double() @ B.double()) < 1e-5, form


def test_matrices_in_every_odd_layout(onednn, gen):
    """2-D operands: a transposed result must come back row-major, a stride-0 operand read as it means."""
    A, B = _rand(gen, 300, 192).float(), _rand(gen, 192, 260).float()
    forms = [
        (A, B),
        (A.mT.contiguous().mT, B),
        (A, B.mT.contiguous().mT),
        (_rand(gen, 1, 192).float().expand(300, 192), B),
        (A, _rand(gen, 192, 1).float().expand(192, 260)),
        (A[::1, :], _rand(gen, 192, 520).float()[:, ::2]),  # a weight with a column stride of 2
    ]
    for i, (a, b) in enumerate(forms):
        onednn.clear()
        C = linalg.mm(a, b)
        assert len(onednn) == 1 and C.is_contiguous() and C.shape == (300, 260), i
        assert _rel(C, a.double() @ b.double()) < 1e-5, i


def test_the_same_product_twice_gives_the_same_bits(onednn, gen):
    A, B = _rand(gen, 3, 256, 192).float(), _rand(gen, 3, 192, 200).float().mT.contiguous().mT
    assert torch.equal(linalg.mm(A, B), linalg.mm(A.clone(), B.clone()))


def test_a_stack_of_no_blocks(onednn):
    A, B = torch.zeros(0, 256, 192), torch.zeros(0, 192, 200)
    assert linalg.mm(A, B).shape == (0, 256, 200)
    X = torch.zeros(0, 256, 200)
    assert linalg.addmm_(X, A, B, beta=0.5) is X
    assert linalg.mm_into(A, B, X) is X


def test_operands_changed_in_place_between_calls(onednn, gen):
    """oneDNN must not keep a reordered weight by its address: the same storage with new values is a new product."""
    A, B = _rand(gen, 2, 256, 192).float(), _rand(gen, 2, 192, 224).float()
    linalg.mm(A, B)
    B.copy_(_rand(gen, 2, 192, 224).float())
    A.mT.copy_(_rand(gen, 2, 192, 256).float())
    assert _rel(linalg.mm(A, B), A.double() @ B.double()) < 1e-5
    assert _rel(linalg.mm(A, B.mT.contiguous().mT), A.double() @ B.double()) < 1e-5


# -- out= and accumulation ----------------------------------------------------------------------------------------


def test_mm_into_a_view_of_a_larger_buffer(onednn, gen):
    """``split_sandwich``'s ``out``: a view at the start of a longer buffer; nothing past it written."""
    A, B = _rand(gen, 3, 256, 192), _rand(gen, 3, 192, 200)
    buffer = torch.full((3 * 256 * 200 + 17,), float("nan"))
    out = buffer[: 3 * 256 * 200].view(3, 256, 200)
    assert linalg.mm_into(A.float()[..., :192], B.float(), out) is out and len(onednn) == 3
    assert _rel(out, A @ B) < 1e-5
    assert buffer[3 * 256 * 200 :].isnan().all()
    offset = torch.full((5 + 3 * 256 * 200,), float("nan"))[5:].view(3, 256, 200)
    assert linalg.mm_into(A.float(), B.float(), offset) is offset and _rel(offset, A @ B) < 1e-5
    transposed = torch.full((3, 200, 256), float("nan")).mT
    assert linalg.mm_into(A.float(), B.float(), transposed) is transposed and _rel(transposed, A @ B) < 1e-5


@pytest.mark.parametrize("out_shape", [(0,), (2, 256, 200)])
def test_mm_into_resizes_out_as_bmm(onednn, gen, out_shape):
    """``mm_into`` is ``torch.bmm(A, B, out=out)``: bmm resizes an ``out`` of another shape (an empty one
    silently) and writes the whole product into it; the oneDNN path must not leave it empty or fill only as
    many blocks as it has."""
    A, B = _rand(gen, 3, 256, 192).float(), _rand(gen, 3, 192, 200).float()
    out = torch.zeros(out_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bmm's notice that it resized a non-empty out
        got = linalg.mm_into(A, B, out)
    assert got.shape == (3, 256, 200)
    assert _rel(got, A.double() @ B.double()) < 1e-5


def test_mm_into_refuses_an_out_of_another_dtype(onednn, gen):
    """``torch.bmm`` refuses a float64 ``out`` for float32 operands; the oneDNN path must not cast into it."""
    A, B = _rand(gen, 3, 256, 192).float(), _rand(gen, 3, 192, 200).float()
    with pytest.raises(RuntimeError):
        torch.bmm(A, B, out=torch.zeros(3, 256, 200, dtype=_F64))
    with pytest.raises(RuntimeError):
        linalg.mm_into(A, B, torch.zeros(3, 256, 200, dtype=_F64))


@pytest.mark.parametrize(("beta", "alpha"), [(0.0, 1.0), (0.0, -2.0), (1.0, 1.0), (0.5, 0.25), (-1.0, 1.0)])
@pytest.mark.parametrize("layout", ["rows", "columns", "slice"])
def test_addmm_into_every_layout_of_x(onednn, gen, beta, alpha, layout):
    """In place into ``X`` whatever its layout, ``X`` returned, ``X`` unread at ``β = 0`` (NaN and Inf in it)."""
    A, B, X = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 208), _rand(gen, 2, 256, 208)
    want = alpha * (A @ B) + (0.0 if beta == 0.0 else beta * X)
    if beta == 0.0:
        X[0, 1, 2], X[1, 7, 9] = float("nan"), float("inf")
    if layout == "rows":
        Y = X.float()
    elif layout == "columns":
        Y = X.float().mT.contiguous().mT
    else:
        big = torch.zeros(2, 256, 300)
        big[..., 50:258] = X.float()
        Y = big[..., 50:258]
    out = linalg.addmm_(Y, A.float(), B.float(), beta=beta, alpha=alpha)
    assert out is Y and len(onednn) == 2
    assert _rel(Y, want) < 1e-5
    if layout == "slice":
        assert (big[..., :50] == 0).all() and (big[..., 258:] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, "tensor"])
def test_weighted_product_never_reads_x_at_beta_zero_and_scales_per_block(onednn, gen, beta):
    A, B, X = _rand(gen, 3, 256, 192), _rand(gen, 3, 224, 192), _rand(gen, 3, 256, 224)
    if beta == "tensor":
        beta = torch.tensor([0.5, -1.0, 2.0], dtype=_F64).view(3, 1, 1)
        want = beta * X - 0.75 * (A @ B.mT)
        got = linalg._weighted_product(X.float(), A.float(), B.float(), beta.float(), -0.75)
    else:
        want = -0.75 * (A @ B.mT) + (beta * X if beta else 0.0)
        Xf = X.float() if beta else torch.full((3, 256, 224), float("nan"))
        got = linalg._weighted_product(Xf, A.float(), B.float(), beta, -0.75)
    assert len(onednn) == 3 and got.shape == (3, 256, 224) and got.dtype == torch.float32
    assert _rel(got, want) < 1e-5


def test_weighted_product_broadcasts_x_as_baddbmm(onednn, gen):
    """``torch.baddbmm`` broadcasts its input: an ``X`` of one block (or a stride-0 one) against a stack."""
    A, B = _rand(gen, 3, 256, 192), _rand(gen, 3, 224, 192)
    X = _rand(gen, 1, 256, 224)
    want = 0.5 * X + A @ B.mT
    got = linalg._weighted_product(X.float().expand(3, 256, 224), A.float(), B.float(), 0.5, 1.0)
    assert len(onednn) == 3 and _rel(got, want) < 1e-5


# -- the call sites ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [256, 600])
@pytest.mark.parametrize("beta", [0.0, 0.9, "tensor"])
def test_sym_product_and_its_stats_through_onednn(onednn, gen, side, beta):
    """``sym_product`` / ``sym_product_stats`` dense (256) and tiled (600: tiles of 256, a short last one past the
    bound too), ``X`` unread at ``β = 0``, per-block ``β``, the held tiles' form."""
    k = 208
    A, S = _rand(gen, 2, side, k), _rand(gen, 2, k, k)
    B = A @ (S + S.mT)  # A Bᵀ symmetric in exact arithmetic, as sym_product requires
    X = _rand(gen, 2, side, side)
    X = X + X.mT
    Y = _rand(gen, 2, side, side)
    Y = Y + Y.mT
    if beta == "tensor":
        b64 = torch.tensor([0.25, 3.0], dtype=_F64).view(2, 1, 1)
        b32 = b64.float()
    else:
        b64 = b32 = beta
    prod = A @ B.mT
    want = (b64 * X if beta != 0.0 else 0.0) + 1.5 * prod
    Xf = X.float() if beta != 0.0 else torch.full((2, side, side), float("nan"))
    got = linalg.sym_product(Xf, A.float(), B.float(), beta=b32, alpha=1.5)
    assert len(onednn) > 0
    assert _rel(got, want) < 2e-6 and torch.equal(got, got.mT)
    P, dot, norm = linalg.sym_product_stats(Xf, A.float(), B.float(), beta=b32, alpha=1.5, other=Y.float(), tiles=True)
    dense = P if isinstance(P, torch.Tensor) else P.write(scale=torch.ones(2, 1, 1))
    assert _rel(dense, want) < 2e-6
    assert _rel(dot.view(2), (want * Y).sum((-2, -1))) < 1e-5
    assert _rel(norm.view(2), want.flatten(1).norm(dim=1)) < 1e-5


def test_deferred_gram_update_into_the_state_itself(onednn, gen, monkeypatch):
    """``accumulate_gram_left`` with ``defer``: the tiled product computed later into ``X`` itself (``out = X``), the
    tiles through oneDNN (the short last row's too, k = 320; its 88-wide diagonal tile alone stays under the
    bound, in MKL), reading ``X``'s tiles before they are overwritten. The tiles made apart, as on the AMD processors
    where oneDNN takes the products (on an Intel processor a row's tiles go in place as one panel, through MKL)."""
    monkeypatch.setattr(linalg, "_tiles_in_place", lambda: False)
    side, k = 600, 320
    A = _rand(gen, 2, side, k)
    W = _rand(gen, 2, side, side)
    X = W @ W.mT / side
    want = 0.9 * X + 0.1 * (A @ A.mT)
    Xf = X.float()
    defer = []
    assert linalg.accumulate_gram_left(Xf, A.float(), 0.9, 0.1, defer=defer) is Xf and len(defer) == 1
    defer[0].into(Xf)
    assert len(onednn) == 2 * 5  # 6 tiles on and below the diagonal, all but the last diagonal one, a call a block
    assert _rel(Xf, want) < 2e-6 and torch.equal(Xf, Xf.mT)


@pytest.mark.parametrize("side", [256, 700])
def test_sandwiches_through_onednn(onednn, gen, side):
    """``sandwich`` (G X Gᵀ), ``sandwich_t`` (Gᵀ Y G) and ``split_sandwich`` of a symmetric middle, with a
    basis as LAPACK lays it (column-major) and a row-major one."""
    G = _rand(gen, 2, side, side)
    X = _rand(gen, 2, side, side)
    X = X + X.mT
    want = G @ X @ G.mT
    want_t = G.mT @ X @ G
    for Gf in (G.float(), G.float().mT.contiguous().mT):
        onednn.clear()
        assert _rel(linalg.sandwich(Gf, X.float()), want) < 1e-5
        assert _rel(linalg.sandwich_t(Gf, X.float()), want_t) < 1e-5
        assert _rel(linalg.split_sandwich(Gf, X.float()), want) < 1e-5
        assert len(onednn) > 0


@pytest.mark.parametrize("panels", [False, True], ids=["tiles", "panels"])
def test_split_sandwich_of_held_tiles(onednn, gen, monkeypatch, panels):
    """``S`` as the :class:`LowerTiles` ``sym_product_stats`` keeps (its tiles made apart, or a row's as one panel:
    ``linalg._held_panels`` set either way, whatever the processor's choice)."""
    monkeypatch.setattr(linalg, "_held_panels", lambda: panels)
    A = _rand(gen, 2, 600, 200)
    S = A @ A.mT
    G = _rand(gen, 2, 300, 600)
    held, _, _ = linalg.sym_product_stats(torch.full((2, 600, 600), float("nan")), A.float(), A.float(), beta=0.0, alpha=1.0, tiles=True)
    assert isinstance(held, linalg.LowerTiles) and bool(held.panels) is panels
    assert _rel(linalg.split_sandwich(G.float(), held), G @ S @ G.mT) < 1e-5
    assert len(onednn) > 0


def test_split_sandwich_alpha(onednn, gen):
    G = _rand(gen, 2, 600, 600)
    S = _rand(gen, 2, 600, 600)
    S = S + S.mT
    alpha = torch.tensor([0.5, -2.0], dtype=_F64).view(2, 1, 1)
    want = alpha * (G @ S @ G.mT)
    assert _rel(linalg.split_sandwich(G.float(), S.float(), alpha=alpha.float()), want) < 1e-5
    assert _rel(linalg.split_sandwich(G.float(), S.float(), alpha=0.25), 0.25 * (G @ S @ G.mT)) < 1e-5
    assert len(onednn) > 0


@pytest.mark.parametrize("side", [256, 600])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_two_gram_updates_through_onednn(onednn, gen, side, beta):
    A, B = _rand(gen, 2, side, 192), _rand(gen, 2, side, 224)
    w = torch.tensor([0.5, 2.0], dtype=_F64).view(2, 1, 1)
    X = _rand(gen, 2, side, side)
    X = X + X.mT
    want = (beta * X if beta else 0.0) + 0.3 * (A @ A.mT + w * (B @ B.mT))
    Xf = X.float() if beta else torch.full((2, side, side), float("nan"))
    got = linalg.accumulate_two_grams_left(Xf, A.float(), B.float(), w.float(), beta, 0.3)
    assert len(onednn) > 0 and _rel(got, want) < 2e-6
    Q = torch.linalg.qr(_rand(gen, 2, side, side)).Q
    res = linalg.accumulate_two_grams_left_with_energy(Xf, A.float(), B.float(), w.float(), beta, 0.3, Q.float())
    assert _rel(res[0], want) < 2e-6


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_project_out_right_through_onednn(onednn, gen, layout):
    M = _rand(gen, 2, 320, 256)
    U = torch.linalg.qr(_rand(gen, 2, 256, 96)).Q
    want = M - (M @ U) @ U.mT
    Mf = M.float() if layout == "rows" else M.float().mT.contiguous().mT
    got = linalg.project_out_right(Mf, U.float())
    assert len(onednn) > 0 and got.shape == want.shape
    assert ((got.double() - want).abs().max() / M.abs().max()).item() < 1e-5
    mkl_layout = (got.mT if layout == "columns" else got).is_contiguous()
    assert mkl_layout, layout  # as torch.baddbmm lays it: the layout of M


# -- autograd, modes, precision ---------------------------------------------------------------------------------


def test_tracked_operands_go_to_torch_with_their_gradients(onednn, gen):
    A, B = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 224)
    a, b = A.float().requires_grad_(), B.float().requires_grad_()
    C = linalg.mm(a, b)
    assert C.requires_grad and len(onednn) == 0
    G = _rand(gen, 2, 256, 224)
    C.backward(G.float())
    assert _rel(a.grad, G @ B.mT) < 1e-5 and _rel(b.grad, A.mT @ G) < 1e-5
    X = _rand(gen, 2, 256, 256).float().requires_grad_()
    a.grad = None
    P = linalg._weighted_product(X, a, a, 0.5, 2.0)
    P.backward(torch.ones_like(P))
    assert _rel(X.grad, torch.full((2, 256, 256), 0.5, dtype=_F64)) < 1e-6
    assert _rel(a.grad, 4.0 * torch.ones(2, 256, 256, dtype=_F64) @ A) < 1e-5


def test_gradients_through_the_call_sites_are_torchs(onednn, gen):
    """``sandwich``, ``project_out_right`` and the two-Gram update with tracked operands: torch's products and
    float64's gradients to float32's rounding."""
    G64, X64 = _rand(gen, 2, 256, 256), _rand(gen, 2, 256, 256)
    X64 = X64 + X64.mT
    M64, U64 = _rand(gen, 2, 320, 256), torch.linalg.qr(_rand(gen, 2, 256, 96)).Q

    def grads(dtype):
        G, X, M = (t.to(dtype).requires_grad_() for t in (G64, X64, M64))
        loss = (linalg.sandwich(G, X) ** 2).sum() + (linalg.project_out_right(M, U64.to(dtype)) ** 2).sum()
        loss = loss + (linalg.accumulate_two_grams_left(X, G, M[:, :256], torch.ones(2, 1, 1, dtype=dtype), 0.5, 1.0) ** 2).sum()
        return torch.autograd.grad(loss, (G, X, M))

    for want, got in zip(grads(_F64), grads(torch.float32)):
        assert _rel(got, want) < 1e-4
    assert len(onednn) == 0


def test_func_transforms_over_the_operands_are_torchs(onednn, gen):
    A, B = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 224)
    T = _rand(gen, 2, 256, 192)
    _, tangent = torch.func.jvp(lambda a: linalg.mm(a, B.float()), (A.float(),), (T.float(),))
    assert _rel(tangent, T @ B) < 1e-5
    g = torch.func.grad(lambda a: linalg.mm(a, B.float()).sum())(A.float())
    assert _rel(g, torch.ones(2, 256, 224, dtype=_F64) @ B.mT) < 1e-5
    As = _rand(gen, 3, 2, 256, 192)
    v = torch.func.vmap(lambda a: linalg.mm(a, B.float()))(As.float())
    assert _rel(v, As @ B) < 1e-5
    assert len(onednn) == 0


def test_a_tracked_x_alone_keeps_its_gradient(onednn, gen):
    """Only the accumulator ``X`` requires grad: the product may go to oneDNN, but ``β X`` must stay in the graph."""
    A, B = _rand(gen, 2, 256, 192).float(), _rand(gen, 2, 224, 192).float()
    X = _rand(gen, 2, 256, 224).float().requires_grad_()
    P = linalg._weighted_product(X, A, B, 0.5, 1.0)
    (g,) = torch.autograd.grad(P.sum(), X)
    assert torch.allclose(g, torch.full_like(g, 0.5))
    Xn = X * 1.0
    linalg.addmm_(Xn, A, B.mT, beta=0.25)
    (g,) = torch.autograd.grad(Xn.sum(), X)
    assert torch.allclose(g, torch.full_like(g, 0.25))


def test_weighted_product_under_vmap_over_x(onednn, gen):
    """``torch.func.vmap`` over the accumulator only (``A`` and ``B`` captured plain): ``torch.baddbmm`` maps
    over ``X``; the oneDNN path adds a batched ``X`` into its plain product in place, which vmap refuses."""
    A, B = _rand(gen, 2, 256, 192).float(), _rand(gen, 2, 224, 192).float()
    Xs = _rand(gen, 4, 2, 256, 224).float()
    got = torch.func.vmap(lambda X: linalg._weighted_product(X, A, B, 0.5, 1.0))(Xs)
    want = 0.5 * Xs.double() + (A.double() @ B.double().mT)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_products_under_no_grad_and_inference_mode(onednn, gen, mode):
    A, B = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 224)
    a, b = A.float().requires_grad_(), B.float()
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        C = linalg.mm(a, b)
        X = torch.zeros(2, 256, 224)
        linalg.addmm_(X, a, b, beta=0.0)
        inner = torch.randn(2, 256, 192), torch.randn(2, 192, 224)
        D = linalg.mm(*inner)
    assert len(onednn) == 6 and not C.requires_grad
    assert _rel(C, A @ B) < 1e-5 and _rel(X, A @ B) < 1e-5
    assert _rel(D, inner[0].double() @ inner[1].double()) < 1e-5
    E = linalg.mm(*inner)  # inference tensors outside the mode
    assert _rel(E, inner[0].double() @ inner[1].double()) < 1e-5


@pytest.mark.parametrize("setting", ["bf16", "tf32", "legacy medium"])
def test_full_float32_products_holds_for_onednn(onednn, gen, setting, monkeypatch):
    """A user's reduced float32 precision for oneDNN's products: inside ``full_float32_products`` the oneDNN
    route must still multiply at float32's precision (torch's linear layer reads the same setting)."""
    saved = torch.backends.mkldnn.matmul.fp32_precision, torch.get_float32_matmul_precision()
    try:
        if setting == "legacy medium":
            torch.set_float32_matmul_precision("medium")
        else:
            torch.backends.mkldnn.matmul.fp32_precision = setting
        A, B = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 224)
        with linalg.full_float32_products():
            C = linalg.mm(A.float(), B.float())
            S = linalg.sandwich(A.float(), torch.eye(192).expand(2, 192, 192).contiguous())
    finally:
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.mkldnn.matmul.fp32_precision = saved[0]
    assert len(onednn) > 0
    assert _rel(C, A @ B) < 1e-5
    assert _rel(S, A @ A.mT) < 1e-5


@pytest.mark.parametrize("where", ["A row", "B column", "A inf", "B inf times zero"])
def test_non_finite_operands_propagate_as_mkls(onednn, gen, where):
    A, B = _rand(gen, 2, 256, 192).float(), _rand(gen, 2, 192, 224).float()
    if where == "A row":
        A[0, 5, 7] = float("nan")
    elif where == "B column":
        B[1, 3, 9] = float("nan")
    elif where == "A inf":
        A[1, 10, 0] = float("inf")
    else:
        A[0, :, 3] = 0.0
        B[0, 3, 10] = float("inf")
    for Af, Bf in ((A, B), (A.mT.contiguous().mT, B), (A, B.mT.contiguous().mT)):
        got = linalg.mm(Af, Bf)
        want = torch.bmm(A.double(), B.double()).float()
        assert torch.equal(got.isnan(), want.isnan()), where
        assert torch.equal(got.isinf(), want.isinf()), where
        assert torch.equal(got[got.isinf()].sign(), want[want.isinf()].sign()), where


def test_subnormal_products_are_kept(onednn, gen):
    """Denormals are not flushed (MKL keeps them): a tiny block's product stays a nonzero float32 number."""
    A, B = _rand(gen, 2, 256, 192), _rand(gen, 2, 192, 224)
    As, Bs = (A * 1e-20).float(), (B * 1e-20).float()
    got = linalg.mm(As, Bs)
    mkl = torch.bmm(As, Bs)
    assert len(onednn) == 2 and (got != 0).sum() == (mkl != 0).sum()
    assert ((got.double() - mkl.double()).abs().max() / mkl.abs().max()).item() < 1e-4


# -- the switch ---------------------------------------------------------------------------------------------------


def test_gpu_paths_turn_onednn_off(gen):
    from tests.unit.test_device_paths_differential import gpu_paths

    with gpu_paths(tripwire=False):
        assert linalg._ONEDNN_FLOAT32 is False
        assert not linalg._by_onednn(torch.zeros(2, 256, 256), torch.zeros(2, 256, 256))
    with gpu_paths():  # the trip wire: a call that reached _onednn_mm would fail
        A = _rand(gen, 2, 256, 256).float()
        linalg.mm(A, A)


def test_onednn_is_on_by_default_here_or_off(gen):
    """With the switch on ``None`` it follows the processor and nothing else."""
    assert linalg._ONEDNN_FLOAT32 is None
    A = torch.zeros(2, 256, 256)
    assert linalg._by_onednn(A, A) is linalg._onednn_products_fast()


# -- whole steps --------------------------------------------------------------------------------------------------

#: float32 distance to float64 as a fraction of the change, bound = max(MKL's own distance × 4, floor)
_FLOOR = 1e-4


def _steps(preset, dtype, on, monkeypatch, params0, grads, overrides, *, reload_at=None):
    calls = spy_onednn(monkeypatch, on)
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in params0]
    opt = kronopt.build(params, preset, **overrides)
    for t, g in enumerate(grads):
        if t == reload_at:
            sd = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = kronopt.build(params, preset, **overrides)
            opt.load_state_dict(sd)
        for p, gi in zip(params, g):
            p.grad = gi.to(dtype)
        opt.step()
    return [p.detach().double() for p in params], len(calls)


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "kl_soap", "pro_soap"])
def test_preset_steps_through_onednn_with_a_reload_and_bf16_set(preset, monkeypatch, gen):
    """Six float32 steps of a preset (refreshes at the first and fifth), a state_dict round trip after the third,
    and a user's bf16 products for oneDNN set throughout: oneDNN's path within 4× MKL's own distance to float64."""
    shapes = [(256, 256), (320, 320), (192,)]
    params0 = [_rand(gen, *s) for s in shapes]
    grads = [[_rand(gen, *s) for s in shapes] for _ in range(6)]
    overrides = {"refresh.every": 4}
    exact, _ = _steps(preset, _F64, False, monkeypatch, params0, grads, overrides)
    mkl, none = _steps(preset, torch.float32, False, monkeypatch, params0, grads, overrides, reload_at=3)
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        one, used = _steps(preset, torch.float32, True, monkeypatch, params0, grads, overrides, reload_at=3)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    assert used > 0 and none == 0
    for p0, want, a, c in zip(params0, exact, one, mkl):
        moved = (want - p0).norm()
        d_mkl = ((c - want).norm() / moved).item()
        d_one = ((a - want).norm() / moved).item()
        assert d_one < max(4 * d_mkl, _FLOOR), (preset, d_one, d_mkl)
