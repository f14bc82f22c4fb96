"""Review of ea210cc (pro presets' refresh: ``orthonormalize(overwrite=)``, ``restricted_refresh``'s column-major
``W``, ``subspace_join`` / ``restricted_power_product`` through ``_weighted_product``, ``reproject_flat``'s ``T``,
KL's power increment through ``linalg.addmm_``).

Every check compares with values computed another way: float64 Gram–Schmidt and float64 eigh, torch's own QR with
the sign fixed out of place (the pre-commit plain path), finite differences, or the pre-commit formula written out
here. Both product routes are covered (``_ONEDNN_FLOAT32`` forced on with the size thresholds lowered, and off).
"""

import pytest
import torch

import kronopt
from kronopt import linalg

from tests.unit.test_fast_paths import _qr_with_nonnegative_diagonal_f64 as _gram_schmidt64  # float64 Gram–Schmidt, no LAPACK

F32 = torch.float32
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------- helpers


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _col_major(X):
    return X.mT.contiguous().mT


def _plain_q(X):
    """The pre-commit plain path: torch's QR, the signs of R's diagonal applied out of place (0 → 1)."""
    Q, R = torch.linalg.qr(X)
    s = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    return Q * torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-2)


def _case(b, d, r, seed, dtype=F32, gap=True):
    """A PSD factor with a spread spectrum, an orthonormal U and the power product P = A U."""
    g = _gen(seed)
    Z = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=F64))[0]
    ev = torch.linspace(1.0, 30.0, d, dtype=F64) ** 2 if gap else torch.rand(b, d, generator=g, dtype=F64)
    A = (Z * ev) @ Z.mT
    U = torch.linalg.qr(torch.randn(b, d, r, generator=g, dtype=F64))[0]
    return (A @ U).to(dtype), U.to(dtype), torch.ones(b, r, dtype=dtype)


def _delta(P):
    """restricted_refresh's δ, computed in float64 from the block norm (the dtype's eps and tiny)."""
    info = torch.finfo(P.dtype)
    return info.eps * P.double().flatten(1).norm(dim=1).view(-1, 1, 1) + info.tiny


def _refresh64(P, U, *, first):
    """orth(P + δU) (first) or orth(P V + δ U V) with V from float64 eigh of sym(Uᵀ P), descending, in float64."""
    P64, U64, delta = P.double(), U.double(), _delta(P)
    if first:
        Q = _gram_schmidt64(P64 + delta * U64)
        return Q, (Q * P64).sum(-2)
    M = U64.mT @ P64
    e, V = torch.linalg.eigh((M + M.mT) / 2)
    e, V = e.flip(-1), V.flip(-1)
    return _gram_schmidt64(P64 @ V + delta * (U64 @ V)), e


def _signs_aligned(X, ref):
    """X's columns flipped to agree with ref's (a Ritz vector's sign is eigh's choice)."""
    s = torch.sign((X.double() * ref).sum(-2, keepdim=True))
    return X.double() * torch.where(s == 0, torch.ones_like(s), s)


def _old_refresh(P, U, lam, *, first):
    """restricted_refresh as it was before ea210cc (P @ V + δ (U @ V), torch's QR, signs out of place)."""
    finite = linalg.finite_blocks(P)
    P = linalg.select_blocks(finite, P, U)
    scale = linalg.power_of_two_scale(P.abs().amax(dim=(-2, -1), keepdim=True))
    delta = torch.finfo(P.dtype).eps * (linalg.block_norm(P * scale) / scale) + torch.finfo(P.dtype).tiny
    ok = finite
    if first:
        W, lam_new = P + delta * U, None
    else:
        eig = linalg.eigh_descending(linalg.sym(U.mT @ P))
        V, lam_new, ok = eig.Q, eig.lam, ok & eig.ok
        W = P @ V + delta * (U @ V)
    U_new = _plain_q(W)
    if lam_new is None:
        lam_new = (U_new * P).sum(-2)
    ok = ok & linalg.finite_blocks(U_new, lam_new)
    return linalg.select_blocks(ok, U_new, U), linalg.select_blocks(ok, lam_new, lam), ok


@pytest.fixture(params=[False, True], ids=["mkl", "onednn"])
def route(request, monkeypatch):
    """Both product routes: oneDNN forced on for every float32 product (thresholds lowered), or off. Counts the
    oneDNN calls so a test can check the route really ran."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", request.param)
    calls = []
    if request.param:
        monkeypatch.setattr(linalg, "_ONEDNN_MIN_WORK", 1)
        monkeypatch.setattr(linalg, "_ONEDNN_MIN_SIDE", 1)
        real = linalg._onednn_mm

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(linalg, "_onednn_mm", counted)
    return request.param, calls


# ------------------------------------------------------------------------------------- orthonormalize(overwrite=)


@pytest.mark.parametrize(
    "shape",
    [(2, 7, 1), (3, 1, 1), (1, 9, 4), (0, 5, 3), (2, 6, 6), (2, 33, 17)],
    ids=["one-column", "one-by-one", "batch-1", "b=0", "square", "odd"],
)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_overwrite_is_torch_qr_bits_in_the_inputs_memory(shape, dtype):
    """A column-major X (a 1-column or 1×1 block is row-major too) comes back as X itself holding the bits of
    torch's QR with the signs fixed, and those match float64 Gram–Schmidt."""
    X = torch.randn(shape, generator=_gen(1), dtype=dtype)
    X = _col_major(X)
    if shape[-1] == 1:
        assert X.is_contiguous()  # row-major as well
    expected = _plain_q(X.clone())
    if X.numel():
        tol = 2e-5 if dtype == F32 else 1e-12
        torch.testing.assert_close(expected.double(), _gram_schmidt64(X), atol=tol, rtol=0)
    ptr = X.data_ptr()
    Q = linalg.orthonormalize(X, overwrite=True)
    assert torch.equal(Q, expected)
    assert Q.data_ptr() == ptr and torch.equal(X, expected)


def test_overwrite_k0_returns_x_untouched():
    X = _col_major(torch.randn(2, 5, 0))
    assert linalg.orthonormalize(X, overwrite=True) is X


def test_overwrite_zero_and_dependent_columns_take_sign_one_like_torch():
    """R's diagonal 0 (a zero column, a repeated column) gives sign 1 on both paths: the pre-commit bits."""
    X = torch.randn(3, 8, 4, generator=_gen(2), dtype=F64)
    X[0, :, 1] = 0
    X[1, :, 2] = X[1, :, 0]
    X[2] = 0
    expected = _plain_q(X.clone())
    assert torch.equal(linalg.orthonormalize(X.clone()), expected)
    assert torch.equal(linalg.orthonormalize(_col_major(X), overwrite=True), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_overwrite_nonfinite_block_stays_in_its_block(bad):
    X = torch.randn(3, 10, 4, generator=_gen(3))
    X[1, 4, 2] = bad
    expected_good = _plain_q(X[[0, 2]].clone())
    Q = linalg.orthonormalize(_col_major(X), overwrite=True)
    assert torch.equal(Q[[0, 2]], expected_good)
    assert not torch.isfinite(Q[1]).all()


def test_overwrite_under_inference_mode_and_with_a_tracked_input_under_no_grad():
    X = torch.randn(2, 9, 3, generator=_gen(4))
    expected = _plain_q(X.clone())
    with torch.inference_mode():
        Y = _col_major(X)
        assert torch.equal(linalg.orthonormalize(Y, overwrite=True), expected)
        Z = _col_major(X)  # an inference tensor, used inside inference mode
        assert torch.equal(linalg.orthonormalize(Z, overwrite=True), expected)
    T = _col_major(X).requires_grad_()
    with torch.no_grad():
        assert torch.equal(linalg.orthonormalize(T, overwrite=True), expected)


def test_plain_path_q_is_a_new_tensor_the_input_is_left_alone():
    """The plain path's in-place sign multiply writes into torch's Q, never into X (row-major, and a
    column-major X without overwrite)."""
    X = torch.randn(2, 8, 3, generator=_gen(5))
    for given in (X.clone(), _col_major(X)):
        before = given.clone()
        Q = linalg.orthonormalize(given)
        assert Q.data_ptr() != given.data_ptr() and torch.equal(given, before)
        assert torch.equal(Q, _plain_q(X))


@pytest.mark.parametrize("overwrite", [False, True])
def test_orthonormalize_backward_through_a_tracked_input(overwrite):
    """BUG: the plain path now multiplies torch's Q by the signs in place (``Q.mul_``); ``linalg_qr`` saves Q for
    its backward, so autograd refuses the backward pass ("modified by an inplace operation"). Before ea210cc the
    product was out of place and X's gradient came back. Compared with the gradient of the pre-commit formula."""
    X = torch.randn(2, 7, 3, generator=_gen(6), dtype=F64)
    C = torch.randn(2, 7, 3, generator=_gen(7), dtype=F64)
    ref = _col_major(X).requires_grad_()
    (_plain_q(ref) * C).sum().backward()
    ours = _col_major(X).requires_grad_()
    Q = linalg.orthonormalize(ours, overwrite=True) if overwrite else linalg.orthonormalize(ours)
    (Q * C).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_restricted_refresh_backward_through_p():
    """BUG (same cause): reverse-mode autograd through restricted_refresh, which worked before ea210cc."""
    P, U, lam = _case(2, 24, 6, seed=8, dtype=F64)
    C = torch.randn(2, 24, 6, generator=_gen(9), dtype=F64)
    for first in (True, False):
        ref_P = P.clone().requires_grad_()
        U_ref = _old_refresh(ref_P, U, lam, first=first)[0]
        (U_ref * C).sum().backward()
        ours_P = P.clone().requires_grad_()
        (linalg.restricted_refresh(ours_P, U, lam, first=first)[0] * C).sum().backward()
        torch.testing.assert_close(ours_P.grad, ref_P.grad, rtol=1e-8, atol=1e-10)


def test_restricted_refresh_forward_mode_ad_later_refresh():
    """BUG: forward-mode AD through a later refresh. ``orthonormalize(overwrite=True)`` guards only on
    ``requires_grad``, not on the forward tangent or a torch.func wrapper that ``linalg._plain`` checks for every
    other ``out=`` path, so ``geqrf(X, out=...)`` raises for a dual W (NotImplementedError: geqrf_out). Before
    ea210cc it gave the derivative; checked against a central finite difference in float64."""
    import torch.autograd.forward_ad as fwAD

    P, U, lam = _case(2, 16, 4, seed=10, dtype=F64)
    T = torch.randn(P.shape, generator=_gen(11), dtype=F64)
    h = 1e-6
    fd = (
        linalg.restricted_refresh(P + h * T, U, lam, first=False)[0]
        - linalg.restricted_refresh(P - h * T, U, lam, first=False)[0]
    ) / (2 * h)
    with fwAD.dual_level():
        out = linalg.restricted_refresh(fwAD.make_dual(P, T), U, lam, first=False)[0]
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, pad_side", [(64, 64), (512, None)], ids=["patched-64", "default-512"])
def test_overwrite_same_bits_as_plain_on_padded_square_sides(monkeypatch, n, pad_side):
    """BUG (rounding, minor): the docstring promises the overwrite path "the same bits" as torch.linalg.qr, but a
    square side that ``q_factor`` pads (``_padded``: a multiple of ``_QR_PAD_SIDE``, 512 by default, up to
    ``_QR_PAD_MAX``) is formed with zero rows below on the overwrite path only: ~1e-7 differences. The plain path never
    pads."""
    if pad_side is not None:
        monkeypatch.setattr(linalg, "_QR_PAD_SIDE", pad_side)
    if not torch.backends.mkl.is_available():
        pytest.skip("the padding is MKL-only")
    X = torch.randn(1, n, n, generator=_gen(12))
    expected = _plain_q(X.clone())
    Q = linalg.orthonormalize(_col_major(X), overwrite=True)
    torch.testing.assert_close(Q, expected, atol=1e-5, rtol=0)  # the same basis up to rounding (passes)
    assert torch.equal(Q, expected)  # the promised bits (fails)


# ------------------------------------------------------------------------------------------ restricted_refresh


@pytest.mark.parametrize(
    "b, d, r",
    [(3, 40, 8), (2, 24, 6), (2, 12, 12), (2, 9, 1), (1, 70, 66), (3, 40, 10)],
    ids=["40x8", "24x6", "r=d", "r=1", "onednn-size", "40x10"],
)
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_restricted_refresh_matches_float64(route, b, d, r, first):
    on, calls = route
    P, U, lam = _case(b, d, r, seed=100 + d + r)
    U_new, lam_new, ok = linalg.restricted_refresh(P, U, lam, first=first)
    ref, ref_lam = _refresh64(P, U, first=first)
    assert ok.all()
    got = U_new.double() if first else _signs_aligned(U_new, ref)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(lam_new.double(), ref_lam, rtol=1e-4, atol=1e-4)
    I = torch.eye(r, dtype=F64)
    torch.testing.assert_close(U_new.double().mT @ U_new.double(), I.expand(b, r, r), atol=1e-5, rtol=0)
    if on and not first:
        assert calls, "the oneDNN route did not run"


def test_restricted_refresh_rank_zero(route):
    P, U, lam = torch.zeros(2, 5, 0), torch.zeros(2, 5, 0), torch.zeros(2, 0)
    for first in (True, False):
        U_new, lam_new, ok = linalg.restricted_refresh(P, U, lam, first=first)
        assert U_new.shape == (2, 5, 0) and lam_new.shape == (2, 0) and ok.all()


def test_restricted_refresh_keeps_u_where_p_v_vanishes(route):
    """P vanishes on two directions of span(U): the δ U V term keeps them (in span(U), orthogonal to the rest),
    as float64 orth(P V + δ U V) does. U is exact (identity columns) so P V's null columns are exact zeros."""
    b, d, r = 2, 20, 6
    U = torch.eye(d)[:, :r].expand(b, d, r).contiguous()
    P = torch.zeros(b, d, r)
    P[:, :r, :] = torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0, 0.0, 0.0]))
    P[:, r:, :4] = 0.1 * torch.randn(b, d - r, 4, generator=_gen(13))
    U_new, lam_new, ok = linalg.restricted_refresh(P, U, torch.ones(b, r), first=False)
    assert ok.all() and torch.isfinite(U_new).all()
    ref, ref_lam = _refresh64(P, U, first=False)
    U64, null = U.double(), U_new[..., 4:].double()  # the vanishing directions: in span(U)
    assert (null - U64 @ (U64.mT @ null)).abs().max() < 1e-6
    proj = lambda Q: Q @ Q.mT  # noqa: E731  (the null pair's basis is eigh's choice: compare the subspace)
    torch.testing.assert_close(proj(U_new[..., 4:].double()), proj(ref[..., 4:]), atol=1e-5, rtol=0)
    torch.testing.assert_close(_signs_aligned(U_new[..., :4], ref[..., :4]), ref[..., :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(lam_new.double(), ref_lam, atol=1e-5, rtol=1e-5)


def test_restricted_refresh_delta_is_per_block(route):
    """Blocks of scale 1e-20, 1 and 1e18 in one stack: each gets its own δ. The scale-1 block has a
    vanishing direction, where a δ broadcast from another block would change its basis."""
    b, d, r = 3, 16, 4
    U = torch.linalg.qr(torch.randn(b, d, r, generator=_gen(14), dtype=F64))[0]
    A = torch.randn(b, d, d, generator=_gen(15), dtype=F64)
    A = A @ A.mT
    A[1] = A[1] - (A[1] @ U[1][:, :1]) @ U[1][:, :1].mT  # kills P's first direction on block 1 (approximately)
    A[1] = (A[1] + A[1].mT) / 2
    A = A * torch.tensor([1e-20, 1.0, 1e18], dtype=F64).view(-1, 1, 1)
    P, U = (A @ U).float(), U.float()
    U_new, lam_new, ok = linalg.restricted_refresh(P, U, torch.ones(b, r), first=False)
    assert ok.all()
    for i in range(b):
        alone = linalg.restricted_refresh(P[i:i + 1], U[i:i + 1], torch.ones(1, r), first=False)[0]
        ref = _refresh64(P[i:i + 1], U[i:i + 1], first=False)[0]
        torch.testing.assert_close(_signs_aligned(U_new[i:i + 1], ref)[..., :3], ref[..., :3], atol=1e-4, rtol=0)
        torch.testing.assert_close(_signs_aligned(U_new[i:i + 1], alone.double()), alone.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_restricted_refresh_nonfinite_or_overflowing_block_keeps_u(route, bad):
    """A non-finite P block (or one whose products overflow) keeps U and λ; the others are what they get alone."""
    P, U, lam = _case(3, 24, 4, seed=16)
    lam = torch.arange(12.0).view(3, 4)
    P[1, 3, 2] = bad
    U_new, lam_new, ok = linalg.restricted_refresh(P, U, lam, first=False)
    assert torch.isfinite(U_new).all() and torch.isfinite(lam_new).all()
    if bad != 3e38:
        assert not ok[1] and torch.equal(U_new[1], U[1]) and torch.equal(lam_new[1], lam[1])
    for i in (0, 2):
        alone = linalg.restricted_refresh(P[i:i + 1], U[i:i + 1], lam[i:i + 1], first=False)
        ref = _refresh64(P[i:i + 1], U[i:i + 1], first=False)[0]
        assert ok[i]
        torch.testing.assert_close(_signs_aligned(U_new[i:i + 1], ref), ref, atol=2e-4, rtol=0)
        torch.testing.assert_close(U_new[i:i + 1], alone[0], atol=1e-6, rtol=0)


def test_restricted_refresh_leaves_its_inputs_alone(route):
    """The overwrite path factors a W of its own: P, U and λ are not written."""
    P, U, lam = _case(2, 24, 8, seed=17)
    P0, U0, lam0 = P.clone(), U.clone(), lam.clone()
    for first in (True, False):
        U_new, _, _ = linalg.restricted_refresh(P, U, lam, first=first)
        assert torch.equal(P, P0) and torch.equal(U, U0) and torch.equal(lam, lam0)
        assert U_new.data_ptr() not in (P.data_ptr(), U.data_ptr())


def test_restricted_refresh_inference_mode_both_ways():
    P, U, lam = _case(2, 24, 8, seed=18)
    expected = linalg.restricted_refresh(P, U, lam, first=False)[0]
    with torch.inference_mode():
        inside = linalg.restricted_refresh(P, U, lam, first=False)[0]
        Pi, Ui, lami = P.clone(), U.clone(), lam.clone()  # inference tensors (a state made in inference mode)
    outside = linalg.restricted_refresh(Pi, Ui, lami, first=False)[0]
    assert torch.equal(inside, expected) and torch.equal(outside, expected)


def test_restricted_refresh_mkl_bits_match_the_pre_commit_formula(monkeypatch):
    """CLAIM (rounding, minor): "the plain path's bits unchanged where oneDNN is not used". Vᵀ Pᵀ is a different
    MKL call from P V (the operands swapped), and on the processor of the forty-third session it rounded otherwise
    for small ranks: a 40 × 8 stack of 3 differed from the pre-commit U' in the last bit. The bits are compared where
    this processor's MKL gives the two calls the same bits on the case (the premise; on the Zen 4 of the
    seventy-fourth session it does not for the 40 × 8 stack), the values to rounding everywhere."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    for b, d, r in [(3, 40, 8), (2, 100, 30), (2, 16, 16)]:
        P, U, lam = _case(b, d, r, seed=1)
        new, old = linalg.restricted_refresh(P, U, lam, first=False), _old_refresh(P, U, lam, first=False)
        torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=0)
        V = linalg.eigh_descending(linalg.sym(U.mT @ P)).Q
        if torch.equal(linalg.mm(V.mT, P.mT).mT, P @ V):
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), (b, d, r)


def _old_bucket_invariant(b, d, r, seed):
    P, U, lam = _case(b, d, r, seed)
    stack = _old_refresh(P, U, lam, first=False)[0]
    alone = torch.cat([_old_refresh(P[i:i + 1], U[i:i + 1], lam[i:i + 1], first=False)[0] for i in range(b)])
    return torch.equal(stack, alone)


@pytest.mark.parametrize("d, r", [(24, 6), (40, 6), (64, 10), (32, 8)])
def test_restricted_refresh_bucket_bits_equal_alone(monkeypatch, d, r):
    """BUG (invariant 4, rounding): a later refresh of a block in a stack of 3 has the bits it has alone wherever
    the pre-commit formula had them on this processor (the premise; skipped otherwise). MKL rounds the new
    r × r by r × d product Vᵀ Pᵀ by the stack for r = 5, 6, 10 (32 × 8 passes): 24 × 24 blocks (rank 6 =
    0.25 × 24) of all three pro presets now step differently in a bucket than alone, which docs/architecture.md
    says they do not (only rank-10 products are named as exceptions)."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    b, seed = 3, 1000 + d + r
    if not _old_bucket_invariant(b, d, r, seed):
        pytest.skip("the pre-commit formula rounds by the stack on this processor too")
    P, U, lam = _case(b, d, r, seed)
    stack = linalg.restricted_refresh(P, U, lam, first=False)[0]
    alone = torch.cat([linalg.restricted_refresh(P[i:i + 1], U[i:i + 1], lam[i:i + 1], first=False)[0] for i in range(b)])
    torch.testing.assert_close(stack, alone, atol=1e-5, rtol=0)
    assert torch.equal(stack, alone)


def test_pro_kl_shampoo_24x24_bucket_steps_as_alone(monkeypatch):
    """BUG (same cause, preset level): three 24 × 24 blocks in one bucket against each alone, refresh every 3
    steps, float32: before ea210cc the same bits for 9 steps on this processor; now they part at the first later
    refresh (step 4, ~1e-7). Premise checked as above."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    if not _old_bucket_invariant(3, 24, 6, 1024 + 6):
        pytest.skip("the pre-commit formula rounds by the stack on this processor too")
    gen = _gen(6)
    A = [torch.nn.Parameter(torch.randn(24, 24, generator=gen)) for _ in range(3)]
    B = [torch.nn.Parameter(p.detach().clone()) for p in A]
    one = kronopt.build([(f"e.{i}.weight", p) for i, p in enumerate(A)], "pro_kl_shampoo", **{"refresh.every": 3})
    alone = [kronopt.build([(f"e.{i}.weight", p)], "pro_kl_shampoo", **{"refresh.every": 3}) for i, p in enumerate(B)]
    for t in range(9):
        grads = [torch.randn(24, 24, generator=gen) for _ in range(3)]
        for ps in (A, B):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        one.step()
        for o in alone:
            o.step()
        for i in range(3):
            assert torch.equal(A[i], B[i]), (t, i, (A[i] - B[i]).abs().max().item())


# ---------------------------------------------------------------- subspace_join, power product, reproject_flat


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_subspace_join_matches_float64(route, left):
    on, calls = route
    g = _gen(20)
    b, m, n, r = 2, 12, 20, 5
    if left:
        coords, C, U = torch.randn(b, r, n, generator=g), torch.randn(b, m, n, generator=g), torch.randn(b, m, r, generator=g)
        ref = U.double() @ coords.double() + C.double()
    else:
        coords, C, U = torch.randn(b, m, r, generator=g), torch.randn(b, m, n, generator=g), torch.randn(b, n, r, generator=g)
        ref = coords.double() @ U.double().mT + C.double()
    out = linalg.subspace_join(coords, C, U, left=left)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert out.dtype == F32
    # a transposed complement and a bfloat16 basis (read in the complement's dtype)
    out2 = linalg.subspace_join(coords, _col_major(C), U.bfloat16(), left=left)
    Ub = U.bfloat16().double()
    ref2 = (Ub @ coords.double() if left else coords.double() @ Ub.mT) + C.double()
    torch.testing.assert_close(out2.double(), ref2, atol=1e-5, rtol=1e-5)
    if on:
        assert calls
    # a bfloat16 complement and coordinates with a float32 basis: U cast down, bfloat16 arithmetic
    out3 = linalg.subspace_join(coords.bfloat16(), C.bfloat16(), U, left=left)
    assert out3.dtype == torch.bfloat16
    Ub = U.bfloat16().double()
    cb = coords.bfloat16().double()
    ref3 = (Ub @ cb if left else cb @ Ub.mT) + C.bfloat16().double()
    torch.testing.assert_close(out3.double(), ref3, atol=0.1, rtol=0.02)


def test_subspace_join_and_power_product_with_tracked_tensors(route):
    """requires_grad tensors under grad mode take baddbmm (differentiable): gradients as float64 formulas give."""
    g = _gen(21)
    b, m, n, r = 2, 10, 14, 4
    coords = torch.randn(b, m, r, generator=g, requires_grad=True)
    C = torch.randn(b, m, n, generator=g, requires_grad=True)
    U = torch.randn(b, n, r, generator=g)
    W = torch.randn(b, m, n, generator=g)
    (linalg.subspace_join(coords, C, U) * W).sum().backward()
    torch.testing.assert_close(C.grad, W)
    torch.testing.assert_close(coords.grad.double(), W.double() @ U.double(), atol=1e-5, rtol=1e-5)
    S = torch.randn(b, r, r, generator=g, requires_grad=True)
    inc = torch.randn(b, n, r, generator=g, requires_grad=True)
    Wp = torch.randn(b, n, r, generator=g)
    (linalg.restricted_power_product(U, S, inc, 0.9) * Wp).sum().backward()
    torch.testing.assert_close(inc.grad, Wp)
    torch.testing.assert_close(S.grad.double(), 0.9 * U.double().mT @ Wp.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rho", [0.0, 0.37, 1.0])
def test_restricted_power_product_matches_float64(route, rho):
    on, calls = route
    g = _gen(22)
    U, S, inc = torch.randn(3, 30, 7, generator=g), torch.randn(3, 7, 7, generator=g), torch.randn(3, 30, 7, generator=g)
    out = linalg.restricted_power_product(U, S, inc, rho)
    ref = rho * U.double() @ S.double() + inc.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(inc, inc.clone())  # not written
    if on:
        assert calls


def test_reproject_flat_matches_float64(route):
    g = _gen(23)
    b, d, r = 2, 20, 5
    U_old = torch.linalg.qr(torch.randn(b, d, r, generator=g, dtype=F64))[0]
    U_new = torch.linalg.qr(U_old + 0.3 * torch.randn(b, d, r, generator=g, dtype=F64))[0]
    S = torch.randn(b, r, r, generator=g, dtype=F64)
    S = S @ S.mT + torch.eye(r, dtype=F64)
    mu = torch.tensor([0.5, 2.0], dtype=F64)
    lam = torch.rand(b, r, generator=g, dtype=F64) + 1
    T = U_new.mT @ U_old
    S_ref = T @ S @ T.mT + mu.view(-1, 1, 1) * (torch.eye(r, dtype=F64) - T @ T.mT)
    tr = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    mu_ref = (tr(S) + (d - r) * mu - tr(S_ref)) / (d - r)
    lam_ref = (T.square() * lam.unsqueeze(-2)).sum(-1) + mu.unsqueeze(-1) * (1 - T.square().sum(-1))
    S_new, mu_new, lam_new = linalg.reproject_flat(U_new.float(), U_old.float(), S.float(), mu.float(), lam.float())
    torch.testing.assert_close(S_new.double(), S_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mu_new.double(), mu_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lam_new.double(), lam_ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ the pro presets, both routes


#: how far a float32 run may stand from the float64 run, relative to the parameters' move, and from the other route:
#: measured before ea210cc on this setup (pro_kl_shampoo 2.0e-3 after its first later refresh, pro_soap 8e-6;
#: pro_dykaf's rank-one start is a degenerate eigenspace, 0.4 from the first step, so only its routes are compared)
TOL_F64 = {"pro_kl_shampoo": 5e-3, "pro_soap": 1e-4, "pro_dykaf": None}
TOL_ROUTES = {"pro_kl_shampoo": 5e-3, "pro_soap": 1e-5, "pro_dykaf": 1e-5}


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "pro_soap", "pro_dykaf"])
def test_pro_presets_float32_both_routes_track_their_float64_run(monkeypatch, preset):
    """float32 with every product through oneDNN, and with none, against the float64 run of the same preset
    (which tests/equivalence/test_pro_*.py tie to the clean-room references) and against each other: 8 steps,
    refresh every 3, a wide and a tall block (the restricted products, KL's addmm_ increment included)."""
    shapes = [(12, 28), (28, 12)]
    g = _gen(30)
    init = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=F64) for s in shapes] for _ in range(8)]
    calls = []
    real = linalg._onednn_mm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(linalg, "_onednn_mm", counted)

    def run(dtype, onednn):
        monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
        monkeypatch.setattr(linalg, "_ONEDNN_MIN_WORK", 1 if onednn else 192**3)
        monkeypatch.setattr(linalg, "_ONEDNN_MIN_SIDE", 1 if onednn else 64)
        ps = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in init]
        opt = kronopt.build([(f"b.{i}.weight", p) for i, p in enumerate(ps)], preset, **{"refresh.every": 3})
        assert all("restricted" in s["sides"] for s in opt.bucket_summary())
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.to(dtype)
            opt.step()
        return [p.detach().double() for p in ps]

    ref = run(F64, False)
    mkl = run(F32, False)
    assert not calls
    onednn = run(F32, True)
    assert calls
    for a, b, r, p0 in zip(mkl, onednn, ref, init):
        moved = (r - p0).abs().max()
        assert moved > 1e-2
        assert (a - b).abs().max() < TOL_ROUTES[preset] * moved, ((a - b).abs().max().item(), moved.item())
        if TOL_F64[preset] is not None:
            for x in (a, b):
                assert (x - r).abs().max() < TOL_F64[preset] * moved, ((x - r).abs().max().item(), moved.item())
