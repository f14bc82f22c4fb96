"""Float32 products through oneDNN's kernels (``linalg._by_onednn``), taken on a Zen 5 where MKL runs its AVX2 kernels.

The path is chosen by the processor, so on most machines (CI's among them, perhaps) it is off; every test here
forces it on (``linalg._ONEDNN_FLOAT32 = True``) and checks it against float64 products, MKL's path and its own
rules: the operands oneDNN's call receives (a row-major input, a weight without gaps: one with a gap takes
oneDNN's reference kernel, a thousand times slower), the layout of the result (row-major, as ``torch.bmm``
lays it), ``out=`` and in-place accumulation, and whole optimizer steps of the presets that use it.
"""

import pytest
import torch

import kronopt
from kronopt import linalg
from tests.unit.test_linalg import _on_processor

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

_ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 2\nflags\t\t: fpu sse2 {flags}\n\n"


def spy_onednn(monkeypatch, on=True):
    """oneDNN's path forced on (or off), whatever the processor; the calls it makes to oneDNN, recorded as
    ``(x, w)``, each checked for a row-major input and a weight without gaps (else oneDNN's reference kernel,
    a thousand times slower)."""
    calls = []
    real = linalg._onednn_linear

    def spy(x, w):
        assert x.is_contiguous() and linalg._dense(w), (x.stride(), w.stride())
        calls.append((x, w))
        return real(x, w)

    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", on)
    monkeypatch.setattr(linalg, "_onednn_linear", spy)
    return calls


@pytest.fixture
def onednn(monkeypatch):
    return spy_onednn(monkeypatch)


def _choice():
    return linalg._onednn_products_fast(), linalg._processor().family


@pytest.mark.parametrize(
    ("text", "fast", "family"),
    [
        (_ZEN5.format(family=26, flags="avx2 avx512f avx512_bf16"), True, 26),  # Zen 5
        (_ZEN5.format(family=27, flags="avx2 avx512f"), True, 27),  # a later family
        (_ZEN5.format(family=25, flags="avx2 avx512f avx512_bf16"), False, 25),  # Zen 4: AVX-512 in two halves
        (_ZEN5.format(family=26, flags="avx2"), False, 26),  # no AVX-512 exposed (a virtual machine's choice)
        (_ZEN5.format(family="x", flags="avx512f"), False, 0),  # a family that is not a number
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: avx512f amx_bf16\n\n", False, 6),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n", False, 0),  # another architecture
        (None, False, 0),  # no file
    ],
)
def test_onednn_takes_the_float32_products_on_a_zen5_only(text, fast, family, tmp_path, monkeypatch):
    assert _on_processor(text, tmp_path, monkeypatch, _choice) == (fast, family)


def test_onednn_is_never_chosen_where_torch_has_no_onednn(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert _on_processor(_ZEN5.format(family=26, flags="avx512f"), tmp_path, monkeypatch, _choice) == (False, 26)


def test_which_products_go_to_onednn(monkeypatch):
    f32 = lambda *shape, **kw: torch.zeros(*shape, **kw)  # noqa: E731
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)
    A, B = f32(4, 256, 192), f32(4, 192, 320)
    assert linalg._by_onednn(A, B)
    assert linalg._by_onednn(A[0], B[0])  # matrices
    assert linalg._by_onednn(f32(1, 192, 192), f32(1, 192, 192))  # the work at the bound
    assert not linalg._by_onednn(f32(4, 191, 192), f32(4, 192, 192))  # less work a block: MKL, its calls cheaper
    assert not linalg._by_onednn(f32(4, 192, 191), f32(4, 191, 192))
    assert not linalg._by_onednn(f32(4, 192, 192), f32(4, 192, 191))
    assert not linalg._by_onednn(f32(4, 128, 128), f32(4, 128, 128))
    assert linalg._by_onednn(f32(4, 1024, 64), f32(4, 64, 256))  # a short inner side, work enough
    assert not linalg._by_onednn(f32(4, 1024, 63), f32(4, 63, 256))  # a side below the bound
    assert not linalg._by_onednn(f32(4, 63, 1024), f32(4, 1024, 256))
    assert not linalg._by_onednn(f32(4, 1024, 256), f32(4, 256, 63))
    assert not linalg._by_onednn(A.double(), B.double())  # float32 only
    assert not linalg._by_onednn(A.bfloat16(), B.bfloat16())
    assert not linalg._by_onednn(A, B[:2])  # batch sizes that differ (matmul broadcasts)
    assert not linalg._by_onednn(A, B[0])  # a stack against a matrix
    assert not linalg._by_onednn(f32(4, 256, 192), f32(4, 256, 192))  # inner sides that differ: torch's error
    tracked = A.clone().requires_grad_()
    assert not linalg._by_onednn(tracked, B)  # autograd: oneDNN's call has no derivative
    with torch.no_grad():
        assert linalg._by_onednn(tracked, B)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not linalg._by_onednn(A, B)  # inside torch.compile: its own kernels
    monkeypatch.undo()
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    assert not linalg._by_onednn(A, B)
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", None)  # the processor decides
    for fast in (True, False):
        monkeypatch.setattr(linalg, "_onednn_products_fast", lambda fast=fast: fast)
        assert linalg._by_onednn(A, B) is fast


def _layouts(gen, b, rows, cols):
    """A float64 stack ``(b rows cols)`` and its float32 copies in four layouts: row-major, column-major (a
    transposed view), the rows of a wider stack (a gap after each row) and the columns of a taller one
    read transposed (a gap after each column)."""
    X = torch.randn(b, rows, cols, generator=gen, dtype=torch.float64)
    x = X.float()
    wide = torch.randn(b, rows, cols + 7, generator=gen)
    wide[..., :cols] = x
    tall = torch.randn(b, cols + 5, rows, generator=gen)
    tall[:, :cols] = x.mT
    forms = {"rows": x.contiguous(), "columns": x.mT.contiguous().mT, "gapped rows": wide[..., :cols], "gapped columns": tall[:, :cols].mT}
    for form, t in forms.items():
        assert torch.equal(t, x), form
    return X, forms


@pytest.mark.parametrize("b", [None, 1, 3])
def test_onednn_products_in_every_layout_are_float32_products(onednn, gen, b):
    """Every pairing of the operands' layouts: the float64 product to float32's rounding, laid row-major, each
    call to oneDNN with a row-major input and a weight without gaps."""
    A64, As = _layouts(gen, b or 1, 200, 224)
    B64, Bs = _layouts(gen, b or 1, 224, 208)
    exact = A64 @ B64
    for a_form, A_form in As.items():
        for b_form, B_form in Bs.items():
            A, B = (A_form[0], B_form[0]) if b is None else (A_form, B_form)
            onednn.clear()
            C = linalg.mm(A, B)
            assert len(onednn) == (b or 1), (a_form, b_form)  # one call a block
            for x, w in onednn:
                assert x.is_contiguous() and linalg._dense(w), (a_form, b_form)
            assert C.dtype == torch.float32 and C.is_contiguous() and C.shape == exact.shape[-C.ndim :]
            err = ((C.double() - exact.view(C.shape)).abs().max() / exact.abs().max()).item()
            assert err < 1e-5, (a_form, b_form, err)


def test_a_block_of_a_stack_gets_its_bits_alone(onednn, gen):
    A, B = torch.randn(5, 256, 192, generator=gen), torch.randn(5, 192, 200, generator=gen)
    C = linalg.mm(A, B)
    for i in range(5):
        assert torch.equal(C[i], linalg.mm(A[i : i + 1], B[i : i + 1])[0])
        assert torch.equal(C[i], linalg.mm(A[i], B[i]))


def test_a_stack_of_one_block_is_its_product_uncopied(monkeypatch, gen):
    """A one-block stack's product, row-major as oneDNN writes it (the straight form), is the result itself, not a
    copy into a stack of its own (a fresh allocation each step, which at d = 1024 glibc faults in anew); a
    transposed one (the turned form) is still laid row-major, and both equal the block's product alone."""
    made = []
    real = linalg._onednn_linear

    def keep(x, w):
        made.append(real(x, w))
        return made[-1]

    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)
    monkeypatch.setattr(linalg, "_onednn_linear", keep)
    A, B = torch.randn(1, 256, 192, generator=gen), torch.randn(1, 192, 224, generator=gen)
    C = linalg.mm(A, B)
    assert C.untyped_storage().data_ptr() == made[-1].untyped_storage().data_ptr()
    assert C.shape == (1, 256, 224) and C.is_contiguous() and torch.equal(C[0], linalg.mm(A[0], B[0]))
    # both operands column-major (a basis as LAPACK lays it, a transposed view), the result narrower than the inner
    # side: the turned form, whose product lies transposed
    Q, E = torch.randn(1, 256, 256, generator=gen).mT, torch.randn(1, 128, 256, generator=gen).mT
    D = linalg.mm(Q, E)
    assert made[-1].shape == (128, 256)  # oneDNN made Eᵀ Qᵀ
    assert D.untyped_storage().data_ptr() != made[-1].untyped_storage().data_ptr() and D.is_contiguous()
    assert torch.equal(D[0], linalg.mm(Q[0], E[0]))
    assert torch.equal(linalg.mm(Q.expand(2, -1, -1), E.expand(2, -1, -1))[1], D[0])


def test_mm_into_writes_its_out_and_mkl_agrees(onednn, gen):
    A, B = torch.randn(3, 256, 192, generator=gen), torch.randn(3, 192, 224, generator=gen)
    out = torch.full((3, 256, 224), float("nan"))
    assert linalg.mm_into(A, B, out) is out and onednn
    mkl = torch.bmm(A, B)
    assert torch.allclose(out, mkl, rtol=1e-4, atol=1e-4 * mkl.abs().max().item())


@pytest.mark.parametrize(("beta", "alpha"), [(0.0, 1.0), (0.0, 0.5), (1.0, 1.0), (0.25, 3.0), (1.0, -1.0)])
def test_addmm_accumulates_as_baddbmm(onednn, gen, beta, alpha):
    """``X ← βX + αAB`` in place; with ``β = 0`` ``X`` is not read (NaN in it stays out), as BLAS."""
    A, B = torch.randn(2, 192, 256, generator=gen, dtype=torch.float64), torch.randn(2, 256, 200, generator=gen, dtype=torch.float64)
    X = torch.randn(2, 192, 200, generator=gen, dtype=torch.float64)
    if beta == 0.0:
        X[0, 3, 5] = float("nan")
    exact = alpha * (A @ B) + (0.0 if beta == 0.0 else beta * X)
    Y = X.float()
    assert linalg.addmm_(Y, A.float(), B.float(), beta=beta, alpha=alpha) is Y and onednn
    err = ((Y.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 1e-5


@pytest.mark.parametrize("per_block", [False, True])
def test_weighted_product_through_onednn(onednn, gen, per_block):
    """The tiles' and the dense symmetric product's ``βX + αABᵀ``, a number or a per-block ``β``."""
    A, B = torch.randn(3, 256, 192, generator=gen, dtype=torch.float64), torch.randn(3, 224, 192, generator=gen, dtype=torch.float64)
    X = torch.randn(3, 256, 224, generator=gen, dtype=torch.float64)
    beta = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64).view(3, 1, 1) if per_block else 0.75
    exact = beta * X + 1.5 * (A @ B.mT)
    P = linalg._weighted_product(X.float(), A.float(), B.float(), beta.float() if per_block else beta, 1.5)
    assert onednn and ((P.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


#: how far six float32 steps may lie from float64's, as a fraction of the change: Adam in the rotated basis
#: (soap, dykaf) scales the rotations' round-off up, to 1e-4 .. 7e-3 here with MKL's products as with
#: oneDNN's; the eigenvalue-scaled steps stay near float32's rounding (2e-7 .. 6e-6)
_FLOAT32_DISTANCE = {"soap": 3e-2, "dykaf": 3e-2, "kl_shampoo": 1e-4, "shampoo": 1e-4}


@pytest.mark.parametrize("preset", sorted(_FLOAT32_DISTANCE))
def test_preset_steps_through_onednn_stay_as_close_to_float64_as_mkls(preset, monkeypatch, gen):
    """Six float32 steps of a preset (a refresh at the first call and the fifth) on square blocks past the
    bound, with oneDNN's products and with MKL's, each against the same steps in float64: both within the
    float32 distance MKL's products keep (``_FLOAT32_DISTANCE``). A wrong product (a block multiplied by
    another's operand, a transposed result read as it lies, a tile misplaced) moves the parameters by the
    size of a step, a distance near 1. Square blocks of random gradients keep every eigenbasis well posed;
    DyKAF starts from its ``sum`` start, full rank (``kron``'s rank-one start leaves the rest of the first
    basis to the solver)."""
    shapes = [(256, 256), (192, 192), (256,)]
    params0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(6)]
    overrides = {"refresh.every": 4, **({"factors.init": "sum"} if preset == "dykaf" else {})}

    def run(dtype, on):
        calls = spy_onednn(monkeypatch, on)
        params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in params0]
        opt = kronopt.build(params, preset, **overrides)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.to(dtype)
            opt.step()
        return [p.detach().double() for p in params], len(calls)

    exact, _ = run(torch.float64, False)
    (onednn, used), (mkl, unused) = run(torch.float32, True), run(torch.float32, False)
    assert used > 0 and unused == 0
    bound = _FLOAT32_DISTANCE[preset]
    for p0, want, a, c in zip(params0, exact, onednn, mkl):
        moved = (want - p0).norm()
        assert (c - want).norm() / moved < bound  # the bound is MKL's own
        assert (a - want).norm() / moved < bound, preset


def test_the_stride_test_of_a_transposed_layout_is_torchs():
    """``_transposed_contiguous`` reads ``t.mT.is_contiguous()`` from the strides (no view): the same verdict as torch's on
    every small shape, each with row-major, column-major, gapped, stride-0 and odd strides, and empty ones."""
    storage = torch.zeros(400)
    for rows in range(0, 5):
        for cols in range(0, 5):
            for strides in {(cols, 1), (1, rows), (1, rows + 2), (cols + 3, 1), (0, 1), (1, 0), (0, 0), (2, 7), (rows, 1), (1, cols)}:
                t = storage.as_strided((rows, cols), strides)
                assert linalg._transposed_contiguous(t) == t.mT.is_contiguous(), (rows, cols, strides)
                assert linalg._dense(t) == (t.is_contiguous() or t.mT.is_contiguous()), (rows, cols, strides)


def test_a_wide_ksl_step_through_onednn_lays_g_once(onednn, monkeypatch, gen):
    """DyKAF's KSL step on a wide block whose ``R̂`` is tiled through oneDNN: ``(U G)ᵀ`` is made as ``Gᵀ U`` on ``Gᵀ``
    laid once, so the tiled product lays no operand again (one transposed copy a step, not two), and the step
    equals float64's within float32's rounding (a dropped scaling or a result read transposed would move ``R'``
    by its own size)."""
    laid = []
    real = linalg._rows_laid

    def count(A, B):
        A2, B2 = real(A, B)
        laid.append(sum(x is not y for x, y in ((A, A2), (B, B2))))
        return A2, B2

    monkeypatch.setattr(linalg, "_rows_laid", count)
    G = torch.randn(2, 256, 640, generator=gen, dtype=torch.float64)
    L0 = torch.randn(2, 256, 256, generator=gen, dtype=torch.float64)
    R0 = torch.randn(2, 640, 640, generator=gen, dtype=torch.float64)
    L0, R0 = L0 @ L0.mT / 256, R0 @ R0.mT / 640
    L, R = linalg.projector_split_ksl(L0.float(), R0.float(), G.float(), 0.95)
    assert onednn and laid == [0]  # R̂'s tiles found both operands' rows laid
    L64, R64 = linalg.projector_split_ksl(L0, R0, G, 0.95)  # float64: MKL's products
    for x, ref in ((L, L64), (R, R64)):
        assert ((x.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
