"""A review of the forty-first session's three oneDNN changes in ``kronopt.linalg``:

1. ``_onednn_mm`` returns a one-block stack's product itself (unsqueezed) where oneDNN lays it row-major;
2. ``_transposed_contiguous`` reads ``t.mT.is_contiguous()`` from the strides; ``_weighted_product`` takes ``B.mT`` once;
3. ``_ksl`` makes ``(U G)ᵀ`` as ``Gᵀ U`` on ``Gᵀ`` laid once where oneDNN takes ``R̂``'s tiles.

Each is checked against float64 (or torch's own verdict), never against the path's own output alone, and for
aliasing: a result mutated in place must not reach an operand, and operands are never written.
"""

import itertools

import pytest
import torch

from kronopt import linalg
from tests.torch_compat import assert_block_as_alone
from tests.unit.test_onednn_products import _layouts, onednn, spy_onednn  # noqa: F401 (onednn: a fixture)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

_F64 = torch.float64


def _rel(got, want):
    want = want.to(_F64)
    return ((got.to(_F64) - want).abs().max() / want.abs().max()).item()


def _shares(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _pairings(As, Bs):
    """Each layout of A with B's same layout and with B's next one: 8 of the 16 pairings, every layout of each operand
    twice, both of oneDNN's forms (straight and turned) among them."""
    a, b = list(As.items()), list(Bs.items())
    return [(a[i], b[(i + s) % len(b)]) for s in (0, 1) for i in range(len(a))]


def _one_block_forms(gen, m=200, k=224, n=208):
    A64, As = _layouts(gen, 1, m, k)
    B64, Bs = _layouts(gen, 1, k, n)
    return A64, As, B64, Bs


# -- 1. a one-block stack's product ------------------------------------------------------------------------------


def test_one_block_product_is_fresh_row_major_and_owns_its_memory(onednn, gen):
    """Every pairing of layouts: ``(1 m n)``, float32, torch.bmm's strides, float64's values; it shares no storage
    with an operand, a second call gives another tensor, and scaling the result in place touches neither."""
    A64, As, B64, Bs = _one_block_forms(gen)
    exact = A64 @ B64
    for (a_form, A), (b_form, B) in itertools.product(As.items(), Bs.items()):
        A0, B0 = A.clone(), B.clone()
        onednn.clear()
        C = linalg.mm(A, B)
        assert len(onednn) == 1, (a_form, b_form)
        assert C.shape == (1, 200, 208) and C.dtype == torch.float32, (a_form, b_form)
        assert C.stride() == torch.bmm(A, B).stride(), (a_form, b_form, C.stride())
        assert _rel(C, exact) < 1e-5, (a_form, b_form)
        assert not _shares(C, A) and not _shares(C, B)
        first = C.clone()
        D = linalg.mm(A, B)
        assert not _shares(C, D) and torch.equal(D, first)
        C.mul_(-3.0).add_(1.0)  # as _weighted_product and addmm_ treat their products
        assert torch.equal(A, A0) and torch.equal(B, B0), (a_form, b_form)
        assert torch.equal(D, first), (a_form, b_form)
        assert torch.equal(linalg.mm(A, B), first), (a_form, b_form)


def test_one_block_product_has_the_bits_of_the_matrix_and_of_a_stack(onednn, gen):
    """A one-block stack's product (the returned result) equals the matrix product and its block in a stack of three
    (copied into a stack), every layout pairing, the stacks' other blocks different."""
    A64, As, B64, Bs = _one_block_forms(gen)
    for (a_form, A), (b_form, B) in itertools.product(As.items(), Bs.items()):
        A3 = torch.cat([torch.randn(1, 200, 224, generator=gen), A, torch.randn(1, 200, 224, generator=gen)])
        B3 = torch.cat([torch.randn(1, 224, 208, generator=gen), B, torch.randn(1, 224, 208, generator=gen)])
        one = linalg.mm(A, B)
        assert torch.equal(one[0], linalg.mm(A[0], B[0])), (a_form, b_form)
        assert torch.equal(one[0], linalg.mm(A3, B3)[1]), (a_form, b_form)


@pytest.mark.parametrize(("beta", "alpha"), [(0.0, 1.0), (0.0, -2.5), (0.5, -2.5), (1.0, 1.0)])
def test_one_block_addmm_and_mm_into(onednn, gen, beta, alpha):
    """``addmm_`` (β X + α A B in place) and ``mm_into`` on one-block stacks of every layout: float64's values, the
    operands unchanged (the product is scaled in place before it is added), ``X``'s NaN unread at β = 0."""
    A64, As, B64, Bs = _one_block_forms(gen)
    X64 = torch.randn(1, 200, 208, generator=gen, dtype=_F64)
    exact = alpha * (A64 @ B64) + (0.0 if beta == 0.0 else beta * X64)
    for (a_form, A), (b_form, B) in _pairings(As, Bs):
        A0, B0 = A.clone(), B.clone()
        X = X64.float()
        if beta == 0.0:
            X[0, 7, 9] = float("nan")
        onednn.clear()
        assert linalg.addmm_(X, A, B, beta=beta, alpha=alpha) is X and len(onednn) == 1
        assert _rel(X, exact) < 1e-5, (a_form, b_form)
        assert torch.equal(A, A0) and torch.equal(B, B0)
        out = torch.full((1, 200, 208), float("nan"))
        assert linalg.mm_into(A, B, out) is out
        assert _rel(out, A64 @ B64) < 1e-5 and torch.equal(A, A0) and torch.equal(B, B0)


@pytest.mark.parametrize(("beta", "alpha"), [(0.0, 1.0), (0.75, -1.5), ("per block", 1.0), ("per block", -1.5)])
def test_one_block_weighted_product(onednn, gen, beta, alpha):
    """``_weighted_product`` (β X + α A Bᵀ, a new tensor) on one-block stacks of every layout, a number β or a
    per-block one: float64's values; ``X``, ``A``, ``B`` and a tensor β unchanged, the result none of them."""
    A64, As = _layouts(gen, 1, 200, 224)
    B64, Bs = _layouts(gen, 1, 208, 224)
    X64 = torch.randn(1, 200, 208, generator=gen, dtype=_F64)
    b64 = torch.tensor([0.3], dtype=_F64).view(1, 1, 1) if beta == "per block" else beta
    exact = b64 * X64 + alpha * (A64 @ B64.mT)
    for (a_form, A), (b_form, B) in _pairings(As, Bs):
        X = X64.float()
        bt = b64.float() if beta == "per block" else beta
        saved = [t.clone() for t in (X, A, B)]
        onednn.clear()
        P = linalg._weighted_product(X, A, B, bt, alpha)
        assert len(onednn) == 1 and P.shape == (1, 200, 208) and P.is_contiguous()
        assert _rel(P, exact) < 1e-5, (a_form, b_form)
        assert all(torch.equal(t, s) for t, s in zip((X, A, B), saved)), (a_form, b_form)
        assert not any(_shares(P, t) for t in (X, A, B))
        if beta == "per block":
            assert bt.item() == pytest.approx(0.3)


def test_one_block_products_of_inference_tensors_outside_inference_mode(onednn, gen):
    """Operands made under ``inference_mode`` used outside it (and the other way round): the one-block product,
    returned without a copy, is a normal tensor there that the in-place callers may scale."""
    with torch.inference_mode():
        A = torch.randn(1, 256, 192, generator=gen)
        B = torch.randn(1, 192, 224, generator=gen)
        Bw = torch.randn(1, 224, 192, generator=gen)
    exact = A.double() @ B.double()
    C = linalg.mm(A, B)
    assert not C.is_inference()
    C.mul_(2.0)
    assert _rel(C, 2 * exact) < 1e-5
    X = torch.randn(1, 256, 224, generator=gen)
    want = 0.5 * X.double() + 3.0 * exact
    assert _rel(linalg.addmm_(X, A, B, beta=0.5, alpha=3.0), want) < 1e-5
    P = linalg._weighted_product(torch.zeros(1, 256, 224), A, Bw, 1.0, -1.0)
    assert not P.is_inference() and _rel(P, -(A.double() @ Bw.double().mT)) < 1e-5
    A2, B2 = A.clone(), B.clone()  # normal tensors under inference_mode
    with torch.inference_mode():
        D = linalg.mm(A2, B2)
        D.mul_(2.0)
        assert D.is_inference() and _rel(D, 2 * exact) < 1e-5
    assert onednn


def test_one_block_product_under_no_grad_of_tracked_operands(onednn, gen):
    """Under ``no_grad`` a tracked operand goes to oneDNN; its one-block product needs no gradient and is a leaf that
    a later tracked computation can use, the operands' gradients then those of that computation alone."""
    A = torch.randn(1, 256, 192, generator=gen, requires_grad=True)
    B = torch.randn(1, 192, 224, generator=gen)
    with torch.no_grad():
        C = linalg.mm(A, B)
    assert onednn and not C.requires_grad and C.grad_fn is None
    C.mul_(2.0)
    (A * 3.0).sum().backward()
    assert torch.equal(A.grad, torch.full_like(A, 3.0))
    onednn.clear()
    D = linalg.mm(A, B)  # tracked: torch's product, its gradient
    assert not onednn and D.requires_grad
    D.sum().backward()
    assert torch.allclose(A.grad, 3.0 + B.sum(-1).unsqueeze(-2).expand_as(A), rtol=1e-5, atol=1e-4)


# -- 2. the stride test of a transposed layout ----------------------------------------------------------------------


def _strided_views():
    storage = torch.zeros(20000)
    shapes = [(r, c) for r in (0, 1, 2, 3, 7, 64) for c in (0, 1, 2, 5, 64)] + [(1, 300), (300, 1), (256, 192)]
    for rows, cols in shapes:
        strides = {
            (cols, 1), (1, rows), (1, rows + 1), (cols + 1, 1), (0, 1), (1, 0), (0, 0), (0, rows), (cols, 0),
            (1, 1), (2, 1), (1, 2), (rows, 1), (1, cols), (cols, 2), (2, rows), (2 * rows, 2), (rows, rows),
            (cols * 2, 1), (1, max(rows - 1, 0)), (3, 5),
        }
        for st in strides:
            span = sum((s - 1) * d for s, d in zip((rows, cols), st) if s) + 1
            for offset in (0, 3):
                if offset + span <= storage.numel():
                    yield storage.as_strided((rows, cols), st, offset)
    base = torch.zeros(6, 64, 70)
    yield from (base[0, :, :64], base[0, :, :64].mT, base[0, ::2], base[0, ::2].mT, base[:, 0, :64], base[:, 0, :64].mT)
    yield from (torch.zeros(64, 1).expand(64, 70), torch.zeros(1, 70).expand(64, 70), torch.zeros(()).expand(64, 70))
    yield from (torch.zeros(64, 70).mT.contiguous().mT, torch.zeros(70, 64)[:, :1], torch.zeros(70, 64)[:1, :])
    yield from (torch.zeros(64, 70).unsqueeze(0)[0], torch.zeros(64, 1, 70).squeeze(1), torch.zeros(3, 64, 70)[1].mT)


def test_transposed_contiguous_is_torchs_verdict_on_every_view():
    """``_transposed_contiguous`` and ``_dense`` give torch's verdicts (``t.mT.is_contiguous()``, and with
    ``t.is_contiguous()``) on empty, size-1, stride-0, expanded, gapped, offset and overlapping views."""
    count = 0
    for t in _strided_views():
        count += 1
        assert linalg._transposed_contiguous(t) == t.mT.is_contiguous(), (t.shape, t.stride())
        assert linalg._dense(t) == (t.is_contiguous() or t.mT.is_contiguous()), (t.shape, t.stride())
    assert count > 500


def test_onednn_block_of_odd_weights_is_the_product_with_a_dense_weight(monkeypatch, gen):
    """Matrices whose weight is stride-0 (expanded), a column of one, a gapped slice, or transposed views of those:
    each call to oneDNN has a row-major input and a weight torch itself finds row- or column-major (not the
    stride test under review), and the product is float64's."""
    seen = []
    real = linalg._onednn_linear

    def spy(x, w):
        assert x.is_contiguous() and (w.is_contiguous() or w.mT.is_contiguous()), (x.stride(), w.stride())
        seen.append(w)
        return real(x, w)

    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)
    monkeypatch.setattr(linalg, "_onednn_linear", spy)
    A = torch.randn(256, 192, generator=gen)
    Bs = {
        "expanded row": torch.randn(1, 224, generator=gen).expand(192, 224),
        "expanded column": torch.randn(192, 1, generator=gen).expand(192, 224),
        "expanded scalar": torch.randn((), generator=gen).expand(192, 224),
        "gapped columns": torch.randn(192, 230, generator=gen)[:, 3:227],
        "gapped rows": torch.randn(230, 192, generator=gen)[3:227].mT,
        "every other row": torch.randn(384, 224, generator=gen)[::2],
        "every other column": torch.randn(224, 384, generator=gen)[:, ::2].mT,
    }
    for form, B in Bs.items():
        for a_form, a in (("rows", A), ("columns", A.mT.contiguous().mT), ("expanded", A[:1].expand(256, 192))):
            seen.clear()
            C = linalg.mm(a, B)
            assert seen and C.is_contiguous(), (form, a_form)
            assert _rel(C, a.double() @ B.double()) < 1e-5, (form, a_form)
            C3 = linalg.mm(a.expand(1, -1, -1), B.expand(1, -1, -1))
            assert torch.equal(C3[0], C), (form, a_form)


# -- 3. DyKAF's KSL step --------------------------------------------------------------------------------------------


def _psd(gen, b, d, scale=1.0):
    X = torch.randn(b, d, d, generator=gen, dtype=_F64)
    return X @ X.mT / d * scale


def _ksl_inputs(gen, b, m, n, *, g_scale=1.0):
    L, R = _psd(gen, b, m), _psd(gen, b, n)
    # the state's factors leave each step with equal norms
    R = R * (linalg.block_norm(L) / linalg.block_norm(R))
    G = torch.randn(b, m, n, generator=gen, dtype=_F64) * g_scale
    return L, R, G


def _check_ksl(got, want, tol=1e-4):
    for x, ref, name in zip(got, want, "LR"):
        assert x.dtype == torch.float32
        assert _rel(x, ref) < tol, (name, _rel(x, ref))
        assert torch.equal(x, x.mT), name  # exactly symmetric


def _count_new_form(monkeypatch):
    """How often ``_ksl`` takes the new form (``_tiles_by_onednn`` true)."""
    verdicts = []
    real = linalg._tiles_by_onednn

    def spy(X, A, B):
        verdicts.append(real(X, A, B))
        return verdicts[-1]

    monkeypatch.setattr(linalg, "_tiles_by_onednn", spy)
    return verdicts


#: (m, n): wide with R̂ tiled and K by two products (640) or by R's split sandwich (800), square, tall below the split
_KSL_SHAPES = [(128, 640), (128, 800), (512, 512), (640, 512)]


@pytest.mark.parametrize(("m", "n"), _KSL_SHAPES)
@pytest.mark.parametrize("on", [True, False])
def test_ksl_step_against_float64(monkeypatch, gen, m, n, on):
    """The step on a stack of three (one block fresh) with oneDNN's products and MKL's: float64's within 1e-4,
    exactly symmetric, the inputs unchanged, each block's bits those of the block alone (bucket invariance)."""
    calls = spy_onednn(monkeypatch, on)
    verdicts = _count_new_form(monkeypatch)
    L64, R64, G64 = _ksl_inputs(gen, 3, m, n)
    fresh = torch.tensor([False, True, False])
    L, R, G = L64.float(), R64.float(), G64.float()
    saved = [t.clone() for t in (L, R, G)]
    got = linalg.projector_split_ksl(L, R, G, 0.9, fresh=fresh)
    assert all(torch.equal(t, s) for t, s in zip((L, R, G), saved))
    assert verdicts == [on] and bool(calls) == on
    _check_ksl(got, linalg.projector_split_ksl(L64, R64, G64, 0.9, fresh=fresh))
    for i in range(3):
        alone = linalg.projector_split_ksl(L[i : i + 1], R[i : i + 1], G[i : i + 1], 0.9, fresh=fresh[i : i + 1])
        for x, y, name in zip(got, alone, "LR"):
            if on:  # oneDNN's products are block by block: the same bits (where MKL's smaller ones give them too)
                assert_block_as_alone(x[i], y[0], (i, name, _rel(y[0], x[i])))
            else:  # MKL's batched tiles may round by the stack's size (seen at 640 × 512, before these changes too)
                assert _rel(y[0], x[i]) < 1e-6, (i, name, _rel(y[0], x[i]))


@pytest.mark.parametrize(("m", "n"), [(128, 640), (512, 512)])
def test_ksl_new_form_is_the_old_forms_product(monkeypatch, gen, m, n):
    """The step with ``(U G)ᵀ`` as ``Gᵀ U`` equals the old form's (``mm(K, G).mT``, forced by ``_tiles_by_onednn``
    false in ``_ksl``: the tiles themselves decide oneDNN apart) within float32's rounding, and float64's."""
    spy_onednn(monkeypatch, True)
    L64, R64, G64 = _ksl_inputs(gen, 2, m, n)
    L, R, G = L64.float(), R64.float(), G64.float()
    new = linalg.projector_split_ksl(L, R, G, 0.95)
    monkeypatch.setattr(linalg, "_tiles_by_onednn", lambda X, A, B: False)
    old = linalg.projector_split_ksl(L, R, G, 0.95)
    for x, y in zip(new, old):
        assert _rel(x, y) < 1e-5
    _check_ksl(new, linalg.projector_split_ksl(L64, R64, G64, 0.95), tol=1e-5)


@pytest.mark.parametrize("layout", ["column-major G", "gapped G", "G of one block"])
def test_ksl_step_with_g_laid_otherwise(monkeypatch, gen, layout):
    """``Gᵀ.contiguous()`` is ``G``'s own memory where ``G`` lies column-major: the step must not write it. A gapped
    ``G`` and a one-block stack (whose ``Gᵀ U`` is oneDNN's result itself) too; float64's result."""
    calls = spy_onednn(monkeypatch, True)
    verdicts = _count_new_form(monkeypatch)
    b = 1 if layout == "G of one block" else 2
    L64, R64, G64 = _ksl_inputs(gen, b, 128, 640)
    if layout == "column-major G":
        G = G64.float().mT.contiguous().mT
        assert G.mT.is_contiguous()
    elif layout == "gapped G":
        wide = torch.randn(b, 128, 650, generator=gen)
        wide[..., 5:645] = G64.float()
        G = wide[..., 5:645]
    else:
        G = G64.float()
    L, R = L64.float(), R64.float()
    G0 = G.clone()
    got = linalg.projector_split_ksl(L, R, G, 0.9)
    assert torch.equal(G, G0) and verdicts == [True] and calls
    assert not any(_shares(x, G) for x in got)
    _check_ksl(got, linalg.projector_split_ksl(L64, R64, G64, 0.9))


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize(("m", "n"), [(128, 640), (128, 800)])
def test_ksl_deferred_writes(monkeypatch, gen, on, m, n):
    """With ``defer=[]`` the step returns ``L`` and ``R`` themselves, unchanged, and two records whose ``into`` fills a
    copy of each target with the bits of the step's own results (some blocks fresh)."""
    spy_onednn(monkeypatch, on)
    L64, R64, G64 = _ksl_inputs(gen, 3, m, n)
    fresh = torch.tensor([True, False, False])
    L, R, G = L64.float(), R64.float(), G64.float()
    want = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9, fresh=fresh)
    saved = L.clone(), R.clone()
    defer = []
    got = linalg.projector_split_ksl(L, R, G, 0.9, fresh=fresh, defer=defer)
    assert got[0] is L and got[1] is R and torch.equal(L, saved[0]) and torch.equal(R, saved[1])
    assert [d.target for d in defer] == [L, R] or [d.target is t for d, t in zip(defer, (L, R))] == [True, True]
    outs = []
    for d in defer:
        out = d.target.clone()
        d.into(out)
        outs.append(out)
    assert torch.equal(L, saved[0]) and torch.equal(R, saved[1])  # into wrote the copies only
    for x, y, name in zip(outs, want, "LR"):
        assert torch.equal(x, y), (name, _rel(x, y))
    _check_ksl(outs, linalg.projector_split_ksl(L64, R64, G64, 0.9, fresh=fresh))
    # and into the targets themselves (a state write with every block written)
    for d in defer:
        d.into(d.target)
    for x, y, name in zip((L, R), want, "LR"):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("on", [True, False])
def test_ksl_scaled_step(monkeypatch, gen, on):
    """Gradient entries near 1e9 leave float32's plain range: the stack runs again scaled (σ a power of two),
    float64's step within 1e-4, and a block of ordinary size in that stack has its bits alone (run plain)."""
    spy_onednn(monkeypatch, on)
    sigmas = []
    real = linalg._ksl

    def spy(*args):
        sigmas.append(args[5] is not None)
        return real(*args)

    monkeypatch.setattr(linalg, "_ksl", spy)
    L64, R64, G64 = _ksl_inputs(gen, 3, 128, 640)
    G64[0] *= 1e9
    L64[0], R64[0] = L64[0] * 1e18, R64[0] * 1e18
    L, R, G = L64.float(), R64.float(), G64.float()
    got = linalg.projector_split_ksl(L, R, G, 0.9)
    assert sigmas == [False, True]
    _check_ksl(got, linalg.projector_split_ksl(L64, R64, G64, 0.9))
    sigmas.clear()
    alone = linalg.projector_split_ksl(L[1:2], R[1:2], G[1:2], 0.9)
    assert sigmas == [False]
    for x, y, name in zip(got, alone, "LR"):
        assert_block_as_alone(x[1], y[0], (name, _rel(y[0], x[1])))
    sigmas.clear()
    defer = []
    linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9, defer=defer)
    outs = [d.target.clone() for d in defer]
    for d, out in zip(defer, outs):
        d.into(out)
    assert len(outs) == 2 and all(torch.equal(x, y) for x, y in zip(outs, got))


def test_ksl_step_tracked_through_l(onednn, gen):
    """Autograd tracking ``L`` (not ``G``): the new form's oneDNN verdict reads ``G`` alone, so ``Gᵀ`` is laid and ``Gᵀ U``
    made by torch (``K`` tracked, no oneDNN); the step is float64's, its results are tracked and its backward runs
    (``test_projector_splitting.py`` checks the gradients themselves against finite differences)."""
    verdicts = []
    real = linalg._tiles_by_onednn
    linalg_spy = lambda X, A, B: verdicts.append(real(X, A, B)) or verdicts[-1]  # noqa: E731
    L64, R64, G64 = _ksl_inputs(gen, 2, 128, 640)
    L = L64.float().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "_tiles_by_onednn", linalg_spy)
        Lp, Rp = linalg.projector_split_ksl(L, R64.float(), G64.float(), 0.9)
    assert verdicts == [True] and Lp.requires_grad and Rp.requires_grad
    _check_ksl((Lp.detach(), Rp.detach()), linalg.projector_split_ksl(L64, R64, G64, 0.9))
    (Lp.sum() + Rp.sum()).backward()
    assert L.grad is not None and bool(torch.isfinite(L.grad).all())


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_ksl_step_of_one_block_under_inference_and_no_grad(onednn, gen, mode):
    """A one-block stack's step under ``inference_mode``/``no_grad`` (its products oneDNN's own results, scaled in
    place) and of inference tensors outside inference mode: float64's."""
    L64, R64, G64 = _ksl_inputs(gen, 1, 128, 640)
    want = linalg.projector_split_ksl(L64, R64, G64, 0.9)
    with getattr(torch, mode)():
        L, R, G = L64.float(), R64.float(), G64.float()
        got = linalg.projector_split_ksl(L, R, G, 0.9)
    _check_ksl(got, want)
    got = linalg.projector_split_ksl(L, R, G, 0.9)  # made under the mode, used outside it
    _check_ksl(got, want)
    assert onednn
