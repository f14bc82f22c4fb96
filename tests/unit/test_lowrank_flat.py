"""The ``lowrank_flat`` split and restricted sides (Pro-KLShampoo, pro_kl_shampoo.md §3–§10)."""

import math

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import compose, linalg
from kronopt.factors import KlKronFactors
from kronopt.inner_rules import EigenvalueInner
from kronopt.splits import LowRankFlatSplit
from kronopt.types import BasisChange, BasisState, Layout, StepContext
from tests.assertions import assert_orthonormal, assert_psd, assert_symmetric
from tests.reference import newton_schulz as ns_ref
from tests.strategies import generator, orthonormal, randn, spd_from, spd_matrix

F64 = {"dtype": torch.float64, "device": torch.device("cpu")}


pytestmark = pytest.mark.usefixtures("one_thread")


def _root(A, p):
    e = torch.linalg.eigh(A)
    return e.eigenvectors @ torch.diag_embed(e.eigenvalues.clamp(min=0) ** p) @ e.eigenvectors.mT


def _polar(X):
    P, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return P @ Vh


def _pro(**split):
    cfg = kronopt.PRESETS["pro_kl_shampoo"]
    return attrs.evolve(cfg, split=attrs.evolve(cfg.split, **split)) if split else cfg


# -- sides and validation -------------------------------------------------------------------------


def test_sides_resolve_rank_and_side():
    s = LowRankFlatSplit()
    assert s.sides(64, 1024, (True, True)) == (("full", 0), ("restricted", 128))
    assert s.sides(1024, 64, (True, True)) == (("restricted", 128), ("full", 0))
    assert s.sides(40, 40, (True, True)) == (("full", 0), ("restricted", 10))  # square: right
    assert s.sides(40, 80, (True, False)) == (("full", 0), ("none", 0))  # a side not rotated stays none
    assert LowRankFlatSplit(rank=3, side="left").sides(8, 20, (True, True)) == (("restricted", 3), ("full", 0))
    assert LowRankFlatSplit(rank=0).sides(8, 20, (True, True)) == (("full", 0), ("restricted", 0))
    assert LowRankFlatSplit(rank=20).sides(8, 20, (True, True)) == (("full", 0), ("full", 0))  # r = n: full
    assert LowRankFlatSplit(rank=1.0).sides(8, 20, (True, True)) == (("full", 0), ("full", 0))


@pytest.mark.parametrize("rank,d,r", [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.1, 30, 3), (0.25, 7, 1), (0.3, 3, 0)])
def test_a_fractional_rank_is_the_floor_of_the_fraction_as_written(rank, d, r):
    # 0.29 · 100 in floats reads 28.999…96, whose floor took one direction fewer than the fraction gives
    assert LowRankFlatSplit(rank=rank, max_rank=0).resolve_rank(d) == r
    assert LowRankFlatSplit(rank=rank, max_rank=0, side="right").sides(4, d, (True, True))[1] == (
        ("restricted", r) if r < d else ("full", 0)
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"split.rank": -1}, "split.rank: must be ≥ 0"),
        ({"split.rank": 1.5}, "split.rank: a fractional rank must be in [0, 1]"),
        ({"split.rank": True}, "split.rank: must be an integer rank"),
        ({"split.complement_scale": "bogus"}, "split.complement_scale: must be one of"),
        ({"split.complement_scale": -2.0}, "split.complement_scale: a numeric complement scale must be > 0"),
        ({"split.side": "top"}, "split.side: must be one of"),
        # an infinite scale made every complement step non-finite (each block's step skipped, with a warning)
        ({"split.complement_scale": float("inf")}, "split.complement_scale: must be a finite number"),
        ({"split.complement_scale": 1e308, "split.complement_mult": 10.0}, "complement_scale × complement_mult must be finite"),
    ],
)
def test_invalid_split_options_are_rejected_with_their_path(overrides, message):
    with pytest.raises(kronopt.ConfigError) as exc:
        kronopt.resolve("pro_kl_shampoo", **overrides)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "overrides,names",
    [
        ({"inner.type": "adam_rank1"}, ("inner 'adam_rank1'", "split 'lowrank_flat'")),
        ({"basis.type": "eigh"}, ("basis 'eigh'", "split 'lowrank_flat'")),
        ({"factors.type": "none", "basis.type": "identity"}, ("factors 'none'", "split 'lowrank_flat'")),
    ],
)
def test_combinations_that_cannot_hold_a_restricted_side_fail_at_build(overrides, names):
    with pytest.raises(kronopt.ConfigError) as exc:
        kronopt.resolve("pro_kl_shampoo", **overrides)
    for name in names:
        assert name in str(exc.value)


# -- reductions ------------------------------------------------------------------------------------


def _run(cfg, shapes, steps, gen, *, lr=1e-2):
    params = [torch.nn.Parameter(randn(gen, *s)) for s in shapes]
    opt = kronopt.KronOptimizer([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], cfg)
    grads = [[randn(gen, *s) for s in shapes] for _ in range(steps)]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return opt, params


def test_rank_equal_to_the_side_is_exactly_kl_shampoo():
    shapes = [(6, 4), (4, 6), (5, 5)]
    # (with the momentum in the original coordinates, as Pro-KLShampoo keeps it: the eigenbasis form of
    # kl_shampoo is the same step only up to rounding, tests/unit/test_eigen_momentum.py)
    kl = attrs.evolve(kronopt.PRESETS["kl_shampoo"], lr=1e-2, inner=kronopt.PRESETS["pro_kl_shampoo"].inner)
    pro = attrs.evolve(_pro(rank=1.0), lr=1e-2)
    _, a = _run(kl, shapes, 30, generator(3))
    opt, b = _run(pro, shapes, 30, generator(3))
    assert all(s == ("full", "full") for s in (r["sides"] for r in opt.bucket_summary()))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_rank_zero_step_is_the_orthogonalized_momentum_scaled_by_sqrt_n(gen):
    """pro_kl_shampoo.md §5 and §10 test 3: r = 0 gives c·NS(M) with c = √n."""
    m, n, lr, beta1 = 5, 8, 0.1, 0.9
    cfg = attrs.evolve(
        _pro(rank=0, ns_dtype="float64", ns_coefficients="polar_express", ns_steps=8, complement_scale="identity"),
        lr=lr, weight_decay=0.0,
    )
    W = torch.nn.Parameter(randn(gen, m, n))
    opt = kronopt.KronOptimizer([("blocks.0.weight", W)], cfg)
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    M = torch.zeros(m, n, dtype=torch.float64)
    for call in range(4):
        G = randn(gen, m, n)
        before = W.detach().clone()
        W.grad = G
        opt.step()
        if call == 0:
            assert torch.equal(W, before)
            continue
        M = beta1 * M + (1 - beta1) * G
        D = (before - W.detach()) / lr
        expected = math.sqrt(n) * linalg.newton_schulz(M[None], opt.config.split and _ns(cfg), dtype=torch.float64)[0]
        torch.testing.assert_close(D, expected, rtol=1e-10, atol=1e-12)


def _ns(cfg):
    """The split's schedule from the spec-typed table of tests/reference/newton_schulz.py."""
    return ns_ref.coefficients(cfg.split.ns_coefficients, cfg.split.ns_steps)


def test_complement_scale_rules():
    layout = Layout(batch=1, m=6, n=10, left="full", right="restricted", rank_right=2)
    assert LowRankFlatSplit().scale(layout) == 1.0  # "whitened": the norm comes per block, see below
    assert LowRankFlatSplit(complement_mult=0.5).scale(layout) == 0.5
    assert LowRankFlatSplit(complement_scale="identity").scale(layout) == pytest.approx(math.sqrt(8))
    assert LowRankFlatSplit(complement_scale="muon").scale(layout) == pytest.approx(1.0)
    assert LowRankFlatSplit(complement_scale="match_rms_adamw").scale(layout) == pytest.approx(0.2 * math.sqrt(10))
    assert LowRankFlatSplit(complement_scale=3.0, complement_mult=0.5).scale(layout) == pytest.approx(1.5)


# -- the identities (§3, §4, §10 tests 1, 2, 4, 6) ----------------------------------------------------


def _spike_and_flat(gen, n, r, mu0):
    U = orthonormal(gen, 1, n)[:, :, :r]
    Sigma = spd_matrix(gen, 1, r, log10_range=(0.5, 2.0))
    R = U @ Sigma @ U.mT + mu0 * (torch.eye(n, dtype=torch.float64) - U @ U.mT)
    return U, Sigma, R


@pytest.mark.parametrize("mu0", [1e-2, 1.0, 37.0])
def test_complement_whitening_is_orthogonalization(gen, mu0):
    """§10 test 1: L⊥^{-1/2}(M P⊥) μ^{-1/2} = √(n−r)·polar(M P⊥), independent of μ."""
    m, n, r = 3, 9, 2
    U, _, _ = _spike_and_flat(gen, n, r, mu0)
    M = randn(gen, 1, m, n)
    MP = M - M @ U @ U.mT
    L_perp = MP @ MP.mT / (mu0 * (n - r))
    lhs = _root(L_perp, -0.5) @ MP * mu0**-0.5
    torch.testing.assert_close(lhs, math.sqrt(n - r) * _polar(MP), rtol=1e-10, atol=1e-12)
    # ... and the stage computes it: the split's identity-scaled complement of M is that whitened block.
    # polar_express past its 8 tuples repeats (1.875, −1.25, 0.375), which fixes 1 to third order, so 12
    # steps take every normalized singular value ≥ 1e-3 to 1 within round-off (checked below)
    s = torch.linalg.svdvals(MP) / MP.norm()
    assert s.min() > 1e-2
    split = LowRankFlatSplit(ns_coefficients="polar_express", ns_steps=12, ns_dtype="float64", complement_scale="identity")
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    basis = BasisState(Q_L=None, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    ctx = StepContext(step=1, layout=layout, basis=basis, flat=(None, torch.tensor([mu0], **F64)))
    D0 = randn(gen, 1, m, n)
    D, _ = split.complement(None, M, D0, ctx, lambda: M)
    torch.testing.assert_close(D - D0, lhs, rtol=1e-9, atol=1e-11)


def test_rank_deficient_complement_matches_newton_schulz(gen):
    """§10 test 2: m > n − r: the pseudo-inverse root gives √(n−r) times the partial isometry; NS matches."""
    m, n, r = 8, 6, 2
    U, _, _ = _spike_and_flat(gen, n, r, 1.0)
    MP = linalg.project_out_right(randn(gen, 1, m, n), U)
    P, S, Vh = torch.linalg.svd(MP, full_matrices=False)
    keep = S > 1e-10 * S.max()
    iso = (P * keep.unsqueeze(-2)) @ Vh
    ns = ns_ref.newton_schulz(MP[0], ns_ref.coefficients("polar_express", 8))[None]
    assert (ns - iso).norm() / iso.norm() < 0.05
    split = LowRankFlatSplit(ns_coefficients="polar_express", ns_steps=8, ns_dtype="float64", complement_scale="identity")
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    basis = BasisState(Q_L=None, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    D, _ = split.complement(None, MP, torch.zeros_like(MP), StepContext(step=1, layout=layout, basis=basis), lambda: MP)
    torch.testing.assert_close(D, math.sqrt(n - r) * ns, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["identity", "whitened", "match_subspace_rms"])
@pytest.mark.parametrize(("ns_dtype", "dtype"), [("bfloat16", torch.float32), ("float64", torch.float32), ("float32", torch.float64)])
@pytest.mark.parametrize(("m", "n"), [(12, 7), (7, 12)])
def test_complement_is_added_in_the_direction_dtype(gen, scale, ns_dtype, dtype, m, n):
    """The complement block is read straight from the iteration's output (narrower or wider than the step)
    and added to D in D's dtype: D + c · NS(C) rescaled, the same as converting the block first (tall and
    wide blocks)."""
    r = 2
    U, _, _ = _spike_and_flat(gen, n, r, 1.0)
    U = U.to(dtype)
    M = randn(gen, 1, m, n).to(dtype)
    D0 = randn(gen, 1, m, n).to(dtype)
    split = LowRankFlatSplit(ns_dtype=ns_dtype, complement_scale=scale, complement_mult=1.7)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    Q_L = torch.linalg.qr(randn(gen, 1, m, m))[0].to(dtype)
    basis = BasisState(Q_L=Q_L, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    lam_L = torch.linspace(0.5, 2.0, m, dtype=dtype).unsqueeze(0)
    ctx = StepContext(step=1, layout=layout, basis=basis, eigvals=(lam_L, None), flat=(None, torch.tensor([0.3], dtype=dtype)))
    D, _ = split.complement(None, M, D0, ctx, lambda: M)
    assert D.dtype == dtype
    C = M - (M @ U) @ U.mT
    O = linalg.newton_schulz(C, linalg.ns_schedule("kj", 5), eps=1e-7, dtype=linalg.DTYPES[ns_dtype]).to(dtype)
    if scale == "whitened":  # μ^{-1/2} ‖diag(λ^{-1/2}) Q_Lᵀ C‖_F
        target = (lam_L.rsqrt().unsqueeze(-1) * (Q_L.mT @ C)).norm() / math.sqrt(0.3)
        O = O * (target / O.norm())
    elif scale == "match_subspace_rms":  # ‖D‖_F √((n − r)/r)
        O = O * (D0.norm() * math.sqrt((n - r) / r) / O.norm())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(D, D0 + split.scale(layout) * O, rtol=tol, atol=tol)


def test_whitened_norm_is_the_weighted_frobenius_norm_of_the_rotated_complement(gen):
    """ν = μ^{-1/2} ‖diag(λ^{-1/2}) Q_Lᵀ C‖_F (right restricted) and μ^{-1/2} ‖C Q_R diag(λ^{-1/2})‖_F (left),
    written here as the dense weighted product: a weight on the wrong axis or a missing root fails."""
    m, n = 6, 9
    C = randn(gen, 2, m, n)
    Q_L, Q_R = torch.linalg.qr(randn(gen, 2, m, m))[0], torch.linalg.qr(randn(gen, 2, n, n))[0]
    lam_L, lam_R = torch.rand(2, m, generator=gen, **F64) + 0.1, torch.rand(2, n, generator=gen, **F64) + 0.1
    mu = torch.tensor([0.5, 2.0], **F64)
    right = torch.diag_embed(lam_L.rsqrt()) @ Q_L.mT @ C
    left = C @ Q_R @ torch.diag_embed(lam_R.rsqrt())
    torch.testing.assert_close(
        linalg.whitened_complement_norm(C, Q_L, lam_L, mu, restricted="right").view(-1),
        right.flatten(1).norm(dim=-1) / mu.sqrt(), rtol=1e-12, atol=0,
    )
    torch.testing.assert_close(
        linalg.whitened_complement_norm(C, Q_R, lam_R, mu, restricted="left").view(-1),
        left.flatten(1).norm(dim=-1) / mu.sqrt(), rtol=1e-12, atol=0,
    )


def test_subspace_coordinates_are_the_restricted_products_and_are_shared(gen):
    """StepContext.subspace_coordinates: X U (right restricted) or Uᵀ X (left), reused for this very X and U only."""
    b, m, n, r = 2, 6, 9, 3
    X = randn(gen, b, m, n)
    U_R, U_L, Q = orthonormal(gen, b, n)[..., :r], orthonormal(gen, b, m)[..., :r], orthonormal(gen, b, m)
    fails = torch.zeros(b, dtype=torch.int64)

    def ctx(layout, Q_L, Q_R, shared):
        return StepContext(step=1, layout=layout, basis=BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=None, lam_R=None, failures=fails), shared=shared)

    right = Layout(batch=b, m=m, n=n, left="full", right="restricted", rank_right=r)
    shared: dict = {}
    Y = ctx(right, Q, U_R, shared).subspace_coordinates(X)
    torch.testing.assert_close(Y, X @ U_R, rtol=1e-13, atol=1e-13)
    assert ctx(right, Q, U_R, shared).subspace_coordinates(X) is Y  # same X, same U: reused
    assert ctx(right, Q, U_R.clone(), shared).subspace_coordinates(X) is not Y  # another basis: computed again
    assert ctx(right, Q, U_R, shared).subspace_coordinates(X.clone()) is not Y
    left = Layout(batch=b, m=m, n=n, left="restricted", right="full", rank_left=r)
    torch.testing.assert_close(
        ctx(left, U_L, None, {}).subspace_coordinates(X), U_L.mT @ X, rtol=1e-13, atol=1e-13
    )
    with pytest.raises(ValueError, match="restricted side"):
        ctx(Layout(batch=b, m=m, n=n, left="full", right="full"), Q, None, {}).subspace_coordinates(X)


def test_the_eigenvalue_rules_rotation_with_two_restricted_sides_is_the_plain_rotation(gen):
    """A layout with both sides restricted (no built-in split makes one; a plugin may) rotates as
    ``linalg.rotate``: the shared subspace coordinates serve one restricted side only."""
    from kronopt.inner_rules.eigenvalue import _rotated

    b, m, n = 1, 6, 8
    X = randn(gen, b, m, n)
    U_L, U_R = orthonormal(gen, b, m)[..., :2], orthonormal(gen, b, n)[..., :3]
    layout = Layout(batch=b, m=m, n=n, left="restricted", right="restricted", rank_left=2, rank_right=3)
    basis = BasisState(Q_L=U_L, Q_R=U_R, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))
    out = _rotated(X, StepContext(step=1, layout=layout, basis=basis))
    assert out.shape == (b, 2, 3)
    torch.testing.assert_close(out, U_L.mT @ X @ U_R, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(6, 16), (16, 6)])
def test_the_momentums_subspace_coordinates_are_computed_once_per_step(shape, monkeypatch):
    """With the momentum kept whole (``momentum_basis = "original"``), the eigenvalue rule's rotation and the
    split's complement share M U (or Uᵀ M): on a plain step each restricted bucket computes it once and reads
    it twice (the factor update asks once more, for the gradient's). A moment() that handed the split another
    tensor than the rule rotated would compute it twice."""
    calls: dict[int, list[int]] = {}
    original = StepContext.subspace_coordinates

    def spy(self, X):
        out = original(self, X)
        calls.setdefault(id(X), []).append(id(out))
        return out

    monkeypatch.setattr(StepContext, "subspace_coordinates", spy)
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    opt = kronopt.build([("w", w)], "pro_kl_shampoo", **{"refresh.every": 100, "split.rank": 2, "inner.momentum_basis": "original"})
    for _ in range(3):  # a first call, the first refresh, a plain step
        w.grad = torch.randn(*shape, generator=gen)
        opt.step()
    calls.clear()
    w.grad = torch.randn(*shape, generator=gen)
    opt.step()
    assert sorted(len(v) for v in calls.values()) == [1, 2]  # the gradient's once, the momentum's twice
    assert all(len(set(v)) == 1 for v in calls.values())


@pytest.mark.parametrize("preset", ["pro_kl_shampoo", "pro_soap", "pro_dykaf"])
@pytest.mark.parametrize("shape", [(6, 16), (16, 6)])
def test_the_power_product_is_computed_only_when_a_refresh_follows(preset, shape, monkeypatch):
    """A restricted side's power product R̂U is read by the refresh alone, so each factor estimator computes it
    only on the updates a refresh follows (``StepContext.refresh_follows``) and keeps the old one otherwise.
    Against the same run with the product computed on every update: the same parameters and the same
    power product at every refresh, bit for bit. An estimator that skipped the product before a refresh,
    or whose skipping changed anything else, fails."""

    def run(always: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
        with monkeypatch.context() as patch:
            if always:
                context = compose.context
                patch.setattr(compose, "context", lambda *a, **kw: context(*a, **{**kw, "refresh_follows": True}))
            gen = torch.Generator().manual_seed(0)
            w = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
            opt = kronopt.build([("w", w)], preset, **{"refresh.every": 3, "split.rank": 2})
            params, powers, kept = [], [], []
            for _ in range(11):
                w.grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
                before = [v.clone() for k, v in compose.flatten(opt._buckets[0].state).items() if "power" in k and v is not None]
                opt.step()
                after = [v for k, v in compose.flatten(opt._buckets[0].state).items() if "power" in k and v is not None]
                assert len(after) == 1
                params.append(w.detach().clone())
                powers.append(after[0].clone())
                kept.append(torch.equal(before[0], after[0]))
            return params, powers, kept

    lazy, eager = run(False), run(True)
    for a, b in zip(lazy[0], eager[0]):
        assert torch.equal(a, b)
    # the first call builds the factors (skip_first_call), then refreshes at the updates 3, 6, 9 (calls 4, 7, 10)
    refreshed = [3, 6, 9]
    for k in refreshed:
        assert torch.equal(lazy[1][k], eager[1][k])
    assert not any(lazy[2][k] for k in refreshed)
    assert all(lazy[2][k] for k in (1, 2, 4, 5, 7, 8, 10))  # no refresh follows: the old product is kept
    assert not any(eager[2][k] for k in (1, 2, 4, 5))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("restricted", ["right", "left"])
def test_whitened_norm_through_onednn_takes_each_blocks_norm_where_its_product_lies(monkeypatch, gen, restricted):
    """Where oneDNN makes the float32 products, ν is each block's norm of its own product, never stacked: the
    float64 formula's value, each block's bits the same in a stack as alone (DESIGN.md's invariant 4), the
    MKL route's value to float32 rounding, and no ``m × n`` product copied anywhere (only its norm is read)."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", True)
    b, m, n = 3, 256, 320
    C = randn(gen, b, m, n).float()
    k = m if restricted == "right" else n
    Q = torch.linalg.qr(randn(gen, b, k, k))[0].float().mT.contiguous().mT  # column-major, as LAPACK lays a basis
    lam = (torch.rand(b, k, generator=gen, **F64) + 0.1).float()
    mu = torch.tensor([0.5, 2.0, 1.5]).float()
    assert linalg._by_onednn(Q.mT, C) if restricted == "right" else linalg._by_onednn(C, Q)

    class Copies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten.stack.default):
                self.shapes += [tuple(t.shape) for t in args if isinstance(t, torch.Tensor)]
            return func(*args, **(kwargs or {}))

    with Copies() as copies:
        got = linalg.whitened_complement_norm(C, Q, lam, mu, restricted=restricted)
    assert got.shape == (b, 1, 1)
    assert not any(s[-2:] == (m, n) for s in copies.shapes), copies.shapes
    C64, Q64, lam64 = C.double(), Q.double(), lam.double()
    if restricted == "right":
        exact = (lam64.rsqrt().unsqueeze(-1) * (Q64.mT @ C64)).flatten(1).norm(dim=-1)
    else:
        exact = ((C64 @ Q64) * lam64.rsqrt().unsqueeze(-2)).flatten(1).norm(dim=-1)
    torch.testing.assert_close(got.view(-1).double(), exact / mu.double().sqrt(), rtol=1e-5, atol=0)
    for i in range(b):
        alone = linalg.whitened_complement_norm(C[i:i + 1], Q[i:i + 1], lam[i:i + 1], mu[i:i + 1], restricted=restricted)
        assert torch.equal(alone.view(()), got[i].view(())), i
    empty = linalg.whitened_complement_norm(C[:0], Q[:0], lam[:0], mu[:0], restricted=restricted)
    assert empty.shape == (0, 1, 1)
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", False)
    mkl = linalg.whitened_complement_norm(C, Q, lam, mu, restricted=restricted)
    torch.testing.assert_close(mkl, got, rtol=1e-5, atol=0)


def test_whitened_norm_edge_eigenvalues(gen):
    """λ = +∞ drops its direction (the norm of the other directions alone), λ = 0 or < 0 gives a non-finite ν
    (the split then drops the complement), and an unrotated side with eigenvalues weighs the rows or columns
    of C itself: written out per direction."""
    m, n = 5, 7
    C = randn(gen, 1, m, n)
    Q_L, Q_R = torch.linalg.qr(randn(gen, 1, m, m))[0], torch.linalg.qr(randn(gen, 1, n, n))[0]
    mu = torch.tensor([0.5], **F64)
    lam_L = torch.tensor([[0.3, math.inf, 2.0, 1.0, 4.0]], **F64)
    keep = [0, 2, 3, 4]
    rotated = Q_L.mT @ C
    expected = (rotated[:, keep] * lam_L[:, keep].rsqrt().unsqueeze(-1)).norm() / math.sqrt(0.5)
    got = linalg.whitened_complement_norm(C, Q_L, lam_L, mu, restricted="right")
    assert got.shape == (1, 1, 1)
    torch.testing.assert_close(got.view(()), expected, rtol=1e-12, atol=0)
    lam_R = torch.full((1, n), 2.0, **F64)
    lam_R[0, 3] = math.inf
    cols = [j for j in range(n) if j != 3]
    expected = ((C @ Q_R)[..., cols] / math.sqrt(2.0)).norm() / math.sqrt(0.5)
    torch.testing.assert_close(
        linalg.whitened_complement_norm(C, Q_R, lam_R, mu, restricted="left").view(()), expected, rtol=1e-12, atol=0
    )
    for bad in (0.0, -1.0):
        lam = lam_L.clone()
        lam[0, 2] = bad
        assert not torch.isfinite(linalg.whitened_complement_norm(C, Q_L, lam, mu, restricted="right")).any()
    # no rotation on the other side: the eigenvalues weigh C's rows (right restricted) or columns (left)
    lam_m, lam_n = torch.rand(1, m, generator=gen, **F64) + 0.1, torch.rand(1, n, generator=gen, **F64) + 0.1
    torch.testing.assert_close(
        linalg.whitened_complement_norm(C, None, lam_m, mu, restricted="right").view(()),
        (C * lam_m.rsqrt().unsqueeze(-1)).norm() / math.sqrt(0.5), rtol=1e-12, atol=0,
    )
    torch.testing.assert_close(
        linalg.whitened_complement_norm(C, None, lam_n, mu, restricted="left").view(()),
        (C * lam_n.rsqrt().unsqueeze(-2)).norm() / math.sqrt(0.5), rtol=1e-12, atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whitened_norm_of_solver_eigenvalues_takes_the_pseudo_inverse_root_below_their_rounding(gen, dtype):
    """``solved``: the other side's eigenvalues are an eigensolver's. A factor of rank 2 (6 × 6, the other side of
    a block whose first gradient has 2 rows) has four eigenvalues of the size of rounding, of either sign; the norm
    is that of ``(L⁺)^{1/2} C`` (``torch.linalg.pinv`` of the float64 factor, its own rank cut), finite, where the
    plain inverse root weighs those directions by 1e7 or more, or gives a NaN. Estimates at 17 ulps of the largest
    and at 1e-3 keep their weights; NaN and infinite ones weigh 0."""
    m, n = 6, 9
    A = randn(gen, 1, m, 2)
    L = (A @ A.mT).to(dtype)  # rank 2
    lam, Q = torch.linalg.eigh(L)
    C = randn(gen, 1, m, n).to(dtype)
    mu = torch.tensor([0.25], dtype=dtype)
    got = linalg.whitened_complement_norm(C, Q, lam, mu, restricted="right", solved=True)
    L64 = (A @ A.mT)[0]
    w, V = torch.linalg.eigh(torch.linalg.pinv(L64, hermitian=True))
    root = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.mT  # (L⁺)^{1/2}
    expected = (root @ C[0].double()).norm() / 0.5
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.view(()).double(), expected, rtol=tol, atol=0)
    plain = linalg.whitened_complement_norm(C, Q, lam, mu, restricted="right")
    assert not (plain.abs() < 1e3 * expected).all(), "the plain inverse root of rounding should blow the norm up"
    # the left-restricted case reads C's columns: the same through C's transpose
    got_left = linalg.whitened_complement_norm(C.mT, Q, lam, mu, restricted="left", solved=True)
    torch.testing.assert_close(got_left, got, rtol=tol, atol=0)
    # the floor, 4 √max(k, 16) ulps of each block's largest (16 ulps at k = 6, 128 at k = 1024): an estimate just
    # above keeps its weight, one just below weighs 0, as NaN and ±inf do; per block, at any scale of the factor
    eps = torch.finfo(torch.float64).eps
    for scale in (2.0, 2e-10, 2e10):
        lam2 = scale * torch.tensor([[17 * eps, 15 * eps, 1e-3, 1.0, math.nan, math.inf, -math.inf]], dtype=torch.float64)
        weights = torch.tensor([(17 * eps) ** -0.5, 0.0, 1e-3**-0.5, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64) / math.sqrt(scale)
        C2, Q2 = randn(gen, 1, 7, n), torch.eye(7, dtype=torch.float64).unsqueeze(0)
        got2 = linalg.whitened_complement_norm(C2, Q2, lam2, torch.ones(1, dtype=torch.float64), restricted="right", solved=True)
        torch.testing.assert_close(got2.view(()), (C2[0] * weights.unsqueeze(-1)).norm(), rtol=1e-12, atol=0)
    k = 1024
    lam3 = torch.ones(2, k, dtype=torch.float64)
    lam3[0, 1], lam3[0, 2] = 130 * eps, 126 * eps
    lam3[1, 1], lam3[1, 2:] = 200 * eps, 1e-20  # the second block 1e-10 the first's size: its own floor, not the first's
    lam3[1] *= 1e-10
    C3, Q3 = randn(gen, 2, k, 2), torch.eye(k, dtype=torch.float64).expand(2, k, k)
    got3 = linalg.whitened_complement_norm(C3, Q3, lam3, torch.ones(2, dtype=torch.float64), restricted="right", solved=True)
    w3 = lam3.rsqrt()
    w3[0, 2], w3[1, 2:] = 0.0, 0.0
    torch.testing.assert_close(got3.view(-1), (C3 * w3.unsqueeze(-1)).norm(dim=(-2, -1)), rtol=1e-12, atol=0)
    # no eigenvalues (k = 0): no weights, a zero norm
    empty = linalg.whitened_complement_norm(C3[:, :0], None, lam3[:, :0], torch.ones(2, dtype=torch.float64), restricted="right", solved=True)
    assert empty.shape == (2, 1, 1) and not empty.any()


def test_the_split_floors_a_basis_s_eigenvalues_and_not_a_kl_estimator_s(gen):
    """``lowrank_flat``'s whitened complement passes ``ctx.eigvals_from_basis`` as ``solved``: the same eigenvalues
    (a spread of 1e17, beyond any floor) weigh the complement by their inverse roots where a KL estimator tracks them
    (pro_kl_shampoo) and by the pseudo-inverse root's 0 below the floor where they are the basis's."""
    m, n, r = 5, 8, 3
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    Q_L, U = torch.linalg.qr(randn(gen, 1, m, m))[0], torch.linalg.qr(randn(gen, 1, n, r))[0]
    lam_L = torch.tensor([[1.0, 0.5, 0.1, 1e-17, 1e-17]], **F64)
    basis = BasisState(Q_L=Q_L, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    M = randn(gen, 1, m, n)
    split = LowRankFlatSplit(ns_coefficients="polar_express", ns_steps=12, ns_dtype="float64", complement_scale="whitened")
    mu = torch.tensor([0.5], **F64)
    C = linalg.project_out_right(M, U)
    blocks = {}
    for own in (True, False):
        ctx = StepContext(step=1, layout=layout, basis=basis, eigvals=(lam_L, torch.ones(1, r, **F64)),
                          eigvals_from_basis=own, flat=(None, mu))
        D, _ = split.complement(None, M, torch.zeros_like(M), ctx, lambda: M)
        blocks[own] = D.norm().item()
    rotated = Q_L.mT @ C
    kept = [0, 1, 2]
    expected_basis = (rotated[:, kept] * lam_L[:, kept].rsqrt().unsqueeze(-1)).norm().item() / math.sqrt(0.5)
    expected_kl = (rotated * lam_L.rsqrt().unsqueeze(-1)).norm().item() / math.sqrt(0.5)
    assert math.isclose(blocks[True], expected_basis, rel_tol=1e-9), (blocks[True], expected_basis)
    assert math.isclose(blocks[False], expected_kl, rel_tol=1e-9), (blocks[False], expected_kl)


def test_spike_and_flat_restricted_preconditioner_equals_full_kl_shampoo(gen):
    """§10 test 4 through the stages: subspace block (inner rule) + whitened complement = L^{-1/2} M R^{-1/2}."""
    m, n, r, mu0 = 4, 9, 3, 0.7
    U, Sigma, R = _spike_and_flat(gen, n, r, mu0)
    e = torch.linalg.eigh(Sigma)
    U_eig = U @ e.eigenvectors  # the subspace in Σ's eigenbasis, as the basis stage keeps it
    L = spd_matrix(gen, 1, m, log10_range=(-1.0, 1.0))
    lam_L, Q_L = torch.linalg.eigh(L)
    M = randn(gen, 1, m, n)
    full = _root(L, -0.5) @ M @ _root(R, -0.5)
    rule = EigenvalueInner(momentum=0.0, exponent=-0.5, eps=0.0, eps_placement="product", bias_correction=False)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    basis = BasisState(Q_L=Q_L, Q_R=U_eig, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    ctx = StepContext(step=1, layout=layout, basis=basis, eigvals=(lam_L, e.eigenvalues))
    D_sub, _ = rule.direction(rule.init(layout, **F64), M, ctx)
    complement = mu0**-0.5 * _root(L, -0.5) @ linalg.project_out_right(M, U)
    torch.testing.assert_close(D_sub + complement, full, rtol=1e-10, atol=1e-12)
    # with L := L⊥ the complement term is the orthogonalized complement (the identity)
    MP = M - M @ U @ U.mT
    L_perp = MP @ MP.mT / (mu0 * (n - r))
    torch.testing.assert_close(
        mu0**-0.5 * _root(L_perp, -0.5) @ MP, math.sqrt(n - r) * _polar(MP), rtol=1e-10, atol=1e-12
    )
    # ... so with L := L⊥ the three stages together give full KL-Shampoo's L⊥^{-1/2} M R^{-1/2}: the KL
    # estimator hands its tracked roots (λ = 1/s²) and flat eigenvalue μ to the context, the eigenvalue rule
    # gives the subspace block, the split (identity or whitened scale, accurate NS) the complement
    full_perp = _root(L_perp, -0.5) @ M @ _root(R, -0.5)
    lam_P, Q_P = torch.linalg.eigh(L_perp)
    est = KlKronFactors(clamping=False)
    kl = attrs.evolve(est.init(layout, **F64), s_L=lam_P.rsqrt(), s_R=e.eigenvalues.rsqrt(), mu_R=torch.tensor([mu0], **F64))
    basis = BasisState(Q_L=Q_P, Q_R=U_eig, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    ctx = StepContext(
        step=1, layout=layout, basis=basis, eigvals=est.eigvals(kl), eigvals_from_basis=False, flat=est.flat_eigvals(kl)
    )
    for scale in ("identity", "whitened"):
        split = LowRankFlatSplit(ns_coefficients="polar_express", ns_steps=12, ns_dtype="float64", complement_scale=scale)
        inner = rule.init(layout, **F64)
        D, inner = rule.direction(inner, M, ctx)
        D, _ = split.complement(split.init(layout, **F64), M, D, ctx, lambda: rule.moment(inner, ctx))
        torch.testing.assert_close(D, full_perp, rtol=1e-9, atol=1e-11, msg=lambda msg: f"{scale}: {msg}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_whitened_complement_has_full_kl_shampoos_norm(gen, side):
    """The default scale: NS(C) rescaled to ‖μ^{-1/2} L^{-1/2} C‖ (right side restricted; mirrored on the left)."""
    m, n, r, mu0, mult = 5, 9, 3, 0.37, 0.5
    d, o = (n, m) if side == "right" else (m, n)
    U = orthonormal(gen, 1, d)[:, :, :r]
    A = spd_matrix(gen, 1, o, log10_range=(-2.0, 1.0))  # the other side's factor
    lam, Q = torch.linalg.eigh(A)
    M = randn(gen, 1, m, n)
    if side == "right":
        C = M - M @ U @ U.mT
        expected_norm = (mu0**-0.5 * _root(A, -0.5) @ C).norm()
        layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
        basis = BasisState(Q_L=Q, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
        ctx = StepContext(step=1, layout=layout, basis=basis, eigvals=(lam, None), flat=(None, torch.tensor([mu0], **F64)))
    else:
        C = M - U @ U.mT @ M
        expected_norm = (mu0**-0.5 * C @ _root(A, -0.5)).norm()
        layout = Layout(batch=1, m=m, n=n, left="restricted", right="full", rank_left=r)
        basis = BasisState(Q_L=U, Q_R=Q, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
        ctx = StepContext(step=1, layout=layout, basis=basis, eigvals=(None, lam), flat=(torch.tensor([mu0], **F64), None))
    split = LowRankFlatSplit(ns_coefficients="polar_express", ns_steps=8, ns_dtype="float64", complement_mult=mult)
    D0 = randn(gen, 1, m, n)
    D, _ = split.complement(None, M, D0, ctx, lambda: M)
    block = D - D0
    torch.testing.assert_close(block.norm(), mult * expected_norm, rtol=1e-12, atol=0)
    ns = ns_ref.newton_schulz(C[0], ns_ref.coefficients("polar_express", 8))[None]
    torch.testing.assert_close(block, ns * (mult * expected_norm / ns.norm()), rtol=1e-10, atol=1e-12)
    # a zero momentum gives a zero block, not NaN
    Z = torch.zeros_like(M)
    D, _ = split.complement(None, Z, D0, ctx, lambda: Z)
    assert torch.equal(D, D0)


def _update_rms_ratios(scale, complement_scale):
    """Per-step update RMS of pro_kl_shampoo (r = 16) over kl_shampoo's, same gradients (rank-4 signal + noise)."""
    m = n = 64
    gen = generator(7)
    signal = randn(gen, m, 4, dtype=torch.float32) @ randn(gen, 4, n, dtype=torch.float32) / 4
    grads = [scale * (signal + randn(gen, m, n, dtype=torch.float32)) for _ in range(30)]
    rms = {}
    for name, over in (("kl_shampoo", {}), ("pro_kl_shampoo", {"split.rank": 16, "split.complement_scale": complement_scale})):
        W = torch.nn.Parameter(torch.zeros(m, n))
        opt = kronopt.build([("blocks.0.weight", W)], name, lr=1.0, weight_decay=0.0, **over)
        out = []
        for G in grads:
            before = W.detach().clone()
            W.grad = G.clone()
            opt.step()
            out.append((W.detach() - before).square().mean().sqrt())
        rms[name] = torch.stack(out[1:])  # the first call only builds the factors
    assert (rms["kl_shampoo"] > 0).all()
    return rms["pro_kl_shampoo"] / rms["kl_shampoo"]


@pytest.mark.parametrize("scale", [1e-2, 1.0])
def test_pro_kl_shampoo_steps_like_kl_shampoo_from_the_first_step(scale):
    """One learning rate serves both presets: the update RMS stays within 1.5× of KL-Shampoo's."""
    ratios = _update_rms_ratios(scale, "whitened")
    assert ((ratios > 1 / 1.5) & (ratios < 1.5)).all(), ratios
    # the old default, √(d − r), fails the same check on small gradients (KL-Shampoo's steps start damped)
    if scale == 1e-2:
        assert _update_rms_ratios(scale, "identity")[0] > 10


def _restricted_state(gen, m, n, r, *, tracker="power"):
    est = KlKronFactors(beta=0.8, clamping=False, tracker=tracker)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    st = est.init(layout, **F64)
    U = orthonormal(gen, 1, n)[:, :, :r]
    st = attrs.evolve(
        st,
        L=spd_matrix(gen, 1, m),
        s_L=0.5 + torch.rand(1, m, generator=gen, dtype=torch.float64),
        s_R=0.5 + torch.rand(1, r, generator=gen, dtype=torch.float64),
        sub_R=spd_matrix(gen, 1, r),
        mu_R=torch.tensor([0.4], dtype=torch.float64),
    )
    basis = BasisState(Q_L=orthonormal(gen, 1, m), Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    return est, layout, st, basis


# the left side's statistics from the Gram of G P⊥ (n > m) or from Q_Lᵀ G P⊥ (n ≤ m), with and without the
# power product (made only where a refresh follows; the statistics must not depend on it)
@pytest.mark.parametrize(("m", "n", "r", "follows"), [(5, 8, 3, True), (5, 8, 3, False), (9, 6, 2, True), (9, 6, 2, False)])
def test_restricted_updates_are_the_m_projection_and_the_sandwich(gen, m, n, r, follows):
    """§10 test 6: (S, μ) = M-projection of ρR̂ + (1−ρ)GᵀL̂⁻¹G/m; G R̂⁻¹ Gᵀ sandwich; power identity."""
    est, layout, st, basis = _restricted_state(gen, m, n, r)
    rho, U, Q_L = est.beta, basis.Q_R, basis.Q_L
    G = randn(gen, 1, m, n)
    new = est.update(st, G, StepContext(step=4, layout=layout, basis=basis, refresh_follows=follows))
    P_perp = torch.eye(n, dtype=torch.float64) - U @ U.mT
    R_hat = U @ st.sub_R @ U.mT + st.mu_R * P_perp
    inv_L = Q_L @ torch.diag_embed(st.s_L**2) @ Q_L.mT
    target = rho * R_hat + (1 - rho) * G.mT @ inv_L @ G / m
    torch.testing.assert_close(new.sub_R, U.mT @ target @ U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.mu_R, torch.diagonal(P_perp @ target, dim1=-2, dim2=-1).sum(-1) / (n - r), rtol=1e-12, atol=0)
    if follows:
        torch.testing.assert_close(new.power_R, target @ U, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(new.power_R, st.power_R)
    inv_R = U @ torch.diag_embed(st.s_R**2) @ U.mT + P_perp / st.mu_R
    torch.testing.assert_close(new.L, rho * st.L + (1 - rho) / n * G @ inv_R @ G.mT, rtol=1e-12, atol=1e-12)
    d_L = torch.diagonal(Q_L.mT @ G @ inv_R @ G.mT @ Q_L, dim1=-2, dim2=-1) / n
    torch.testing.assert_close(new.s_L, (rho / st.s_L**2 + (1 - rho) * d_L).rsqrt(), rtol=1e-12, atol=0)
    d_R = torch.diagonal(U.mT @ G.mT @ inv_L @ G @ U, dim1=-2, dim2=-1) / m
    torch.testing.assert_close(new.s_R, (rho / st.s_R**2 + (1 - rho) * d_R).rsqrt(), rtol=1e-12, atol=0)


def test_restricted_update_beside_a_side_that_is_not_rotated(gen):
    """A restricted right side beside a left side of kind ``none`` (identity, no factor): S, μ and the tracked
    values from G itself, the complement's energy ‖G P⊥‖² feeding μ (a statistic lost there fails)."""
    m, n, r = 5, 8, 3
    est = KlKronFactors(beta=0.8, clamping=False)
    layout = Layout(batch=1, m=m, n=n, left="none", right="restricted", rank_right=r)
    st = attrs.evolve(
        est.init(layout, **F64), s_R=0.5 + torch.rand(1, r, generator=gen, dtype=torch.float64),
        sub_R=spd_matrix(gen, 1, r), mu_R=torch.tensor([0.4], dtype=torch.float64),
    )
    U = orthonormal(gen, 1, n)[:, :, :r]
    basis = BasisState(Q_L=None, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    G = randn(gen, 1, m, n)
    new = est.update(st, G, StepContext(step=4, layout=layout, basis=basis))
    rho = est.beta
    P_perp = torch.eye(n, dtype=torch.float64) - U @ U.mT
    target = rho * (U @ st.sub_R @ U.mT + st.mu_R * P_perp) + (1 - rho) * G.mT @ G / m
    torch.testing.assert_close(new.sub_R, U.mT @ target @ U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.mu_R, torch.diagonal(P_perp @ target, dim1=-2, dim2=-1).sum(-1) / (n - r), rtol=1e-12, atol=0)
    torch.testing.assert_close(new.power_R, target @ U, rtol=1e-12, atol=1e-12)
    assert new.L is None and new.s_L is None


def test_reprojection_preserves_the_trace_and_keeps_s_spd(gen):
    """§10 test 8."""
    m, n, r = 4, 10, 3
    est, layout, st, basis = _restricted_state(gen, m, n, r)
    U_new = linalg.orthonormalize(basis.Q_R + 0.3 * randn(gen, 1, n, r))
    new_basis = attrs.evolve(basis, Q_R=U_new)
    out = est.on_basis_change(st, BasisChange(old=basis, new=new_basis))
    trace = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    torch.testing.assert_close(trace(out.sub_R) + (n - r) * out.mu_R, trace(st.sub_R) + (n - r) * st.mu_R)
    assert_symmetric(out.sub_R)
    assert torch.linalg.eigvalsh(out.sub_R).min() > 0 and (out.mu_R > 0).all()
    P_perp = torch.eye(n, dtype=torch.float64) - basis.Q_R @ basis.Q_R.mT
    R_hat = basis.Q_R @ st.sub_R @ basis.Q_R.mT + st.mu_R * P_perp
    torch.testing.assert_close(out.sub_R, U_new.mT @ R_hat @ U_new, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tracker", ["power", "sketch"])
def test_tracking_finds_the_signal_subspace(tracker):
    """§10 test 7: G = A + νZ, rank A = k ≤ r: span(U) contains A's right singular subspace."""
    gen = generator(11)
    m, n, r, k = 6, 24, 4, 2
    A = randn(gen, 1, m, k) @ randn(gen, 1, k, n)
    V_A = torch.linalg.svd(A, full_matrices=False).Vh[:, :k, :].mT
    cfg = _pro(rank=r, side="right")
    # `power` lets new directions in at weight (1 − ρ) per refresh only, so it refreshes every step here
    every = 1 if tracker == "power" else 5
    cfg = attrs.evolve(cfg, factors=attrs.evolve(cfg.factors, tracker=tracker), refresh=attrs.evolve(cfg.refresh, every=every))
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    state = compose.init_state(cfg, layout, **F64)
    # start away from the signal: the first gradient is pure noise
    _, state = compose.step(cfg, layout, state, randn(gen, 1, m, n))
    for _ in range(300):
        _, state = compose.step(cfg, layout, state, A + 0.3 * randn(gen, 1, m, n))
    U = state.basis.Q_R
    assert_orthonormal(U, atol=1e-10)
    leak = (V_A - U @ (U.mT @ V_A)).norm() / math.sqrt(k)
    assert leak < 0.1, f"signal subspace outside span(U): {leak:.3f}"


def test_restricted_side_holds_order_n_r_numbers():
    m, n = 16, 96
    cfg = _pro(rank=6, side="right")
    opt, _ = _run(cfg, [(m, n)], 3, generator(5))
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    r = 6
    state = opt._buckets[0].state
    numbers = sum(v.numel() for v in compose.flatten(state).values() if isinstance(v, torch.Tensor))
    for path, v in compose.flatten(state).items():
        if isinstance(v, torch.Tensor):
            assert n * n > v.numel() or v.shape[-2:] != (n, n), f"{path} has a full {n}×{n} side"
            assert v.numel() <= max(m * n, m * m, 2 * n * r), f"{path} {tuple(v.shape)}"
    # momentum mn and its subspace coordinates mr (momentum_basis = "subspace"); left: factor + basis m², roots +
    # eigenvalues m; right: U, power product nr; S r²; roots r; μ
    expected = m * n + m * r + 2 * m * m + 2 * m + 2 * n * r + r * r + 2 * r + 1
    assert numbers <= expected + 4, (numbers, expected)  # + per-block counters
    kl_opt, _ = _run(kronopt.PRESETS["kl_shampoo"], [(m, n)], 3, generator(5))
    assert opt.state_bytes() < kl_opt.state_bytes() / 4


def test_restricted_pipeline_stays_finite_and_psd_on_hard_gradients():
    gen = generator(2)
    cfg = attrs.evolve(_pro(rank=2), refresh=attrs.evolve(kronopt.PRESETS["pro_kl_shampoo"].refresh, every=2))
    layout = Layout(batch=2, m=4, n=7, left="full", right="restricted", rank_right=2)
    state = compose.init_state(cfg, layout, dtype=torch.float32, device=torch.device("cpu"))
    grads = [torch.zeros(2, 4, 7), randn(gen, 2, 4, 1, dtype=torch.float32) @ randn(gen, 2, 1, 7, dtype=torch.float32)]
    grads += [randn(gen, 2, 4, 7, dtype=torch.float32) * 1e4, torch.zeros(2, 4, 7)] * 3
    for G in grads:
        D, state = compose.step(cfg, layout, state, G)
        if D is not None:
            assert torch.isfinite(D).all()
        for path, v in compose.flatten(state).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), path
    assert_psd(state.factors.sub_R.double(), rel=1e-5)
    assert_orthonormal(state.basis.Q_R, atol=1e-5)


def test_first_call_initialises_the_subspace_from_the_top_singular_vectors(gen):
    m, n, r = 5, 12, 3
    cfg = _pro(rank=r, side="right")
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    state = compose.init_state(cfg, layout, **F64)
    G = randn(gen, 1, m, n)
    _, state = compose.step(cfg, layout, state, G)
    V = torch.linalg.svd(G, full_matrices=False).Vh[:, :r, :].mT
    U = state.basis.Q_R
    torch.testing.assert_close(U @ U.mT, V @ V.mT, rtol=1e-10, atol=1e-10)
    rho = cfg.factors.beta
    torch.testing.assert_close(state.factors.sub_R, (1 - rho) * U.mT @ G.mT @ G @ U / m, rtol=1e-10, atol=1e-12)
    assert torch.allclose(state.factors.mu_R, torch.full_like(state.factors.mu_R, cfg.factors.init_factor))


def test_top_right_singular_completes_a_rank_deficient_gradient(gen):
    G = randn(gen, 2, 2, 9)
    U = linalg.top_right_singular(G, 5)
    assert U.shape == (2, 9, 5)
    assert_orthonormal(U, atol=1e-12)
    V = torch.linalg.svd(G, full_matrices=False).Vh.mT
    torch.testing.assert_close(U[:, :, :2] @ U[:, :, :2].mT, V @ V.mT, rtol=1e-10, atol=1e-12)


def test_spd_helper_sanity(gen):
    Q = orthonormal(gen, 1, 3)
    assert_psd(spd_from(Q, torch.ones(1, 3, dtype=torch.float64)))


# -- the split on every axis: ema factors and the adam inner rule (pro_soap) -------------------------


def test_pro_soap_builds_and_still_refuses_what_cannot_hold_a_restricted_side():
    W = torch.nn.Parameter(torch.zeros(8, 12))
    opt = kronopt.build([("blocks.0.weight", W)], "pro_soap")
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    for overrides, names in (
        ({"basis.type": "eigh"}, ("basis 'eigh'", "split 'lowrank_flat'")),
        ({"inner.type": "adam_rank1"}, ("inner 'adam_rank1'", "split 'lowrank_flat'")),
    ):
        with pytest.raises(kronopt.ConfigError) as exc:
            kronopt.resolve("pro_soap", **overrides)
        for name in names:
            assert name in str(exc.value)


def test_ema_restricted_side_is_the_m_projection_of_the_ema(gen):
    """S = Uᵀ R U, μ = (tr R − tr S)/(n − r) of the dense EMA R, and the power product R U, for a fixed U."""
    from kronopt.factors import EmaKronFactors

    m, n, r, beta = 5, 9, 3, 0.8
    est = EmaKronFactors(beta=beta)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    st = est.init(layout, **F64)
    assert st.R is None and st.sub_R.shape == (1, r, r) and st.power_R.shape == (1, n, r)
    U = orthonormal(gen, 1, n)[:, :, :r]
    basis = BasisState(Q_L=orthonormal(gen, 1, m), Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    R = torch.zeros(1, n, n, **F64)
    for t in range(1, 5):
        G = randn(gen, 1, m, n)
        R_old = R
        R = beta * R + (1 - beta) * G.mT @ G
        st = est.update(st, G, StepContext(step=t, layout=layout, basis=basis))
        S_old_dense = U.mT @ R_old @ U
        torch.testing.assert_close(st.power_R, beta * U @ S_old_dense + (1 - beta) * G.mT @ G @ U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.sub_R, U.mT @ R @ U, rtol=1e-12, atol=1e-12)
    mu = (torch.diagonal(R, dim1=-2, dim2=-1).sum(-1) - torch.diagonal(st.sub_R, dim1=-2, dim2=-1).sum(-1)) / (n - r)
    torch.testing.assert_close(st.mu_R, mu, rtol=1e-12, atol=1e-12)
    assert est.flat_eigvals(st) == (None, st.mu_R)
    # a basis change re-projects (S, μ) onto the new family, trace kept: S' = U'ᵀ R̂ U'
    U_new = orthonormal(gen, 1, n)[:, :, :r]
    new = attrs.evolve(basis, Q_R=U_new)
    st2 = est.on_basis_change(st, BasisChange(old=basis, new=new))
    R_hat = U @ st.sub_R @ U.mT + st.mu_R.view(-1, 1, 1) * (torch.eye(n, **F64) - U @ U.mT)
    torch.testing.assert_close(st2.sub_R, U_new.mT @ R_hat @ U_new, rtol=1e-12, atol=1e-12)
    trace = lambda X: torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    torch.testing.assert_close(trace(st2.sub_R) + (n - r) * st2.mu_R, trace(R_hat), rtol=1e-12, atol=1e-12)


def test_pro_soap_restricted_side_holds_order_n_r_numbers():
    m, n, r = 16, 96, 6
    cfg = attrs.evolve(kronopt.PRESETS["pro_soap"], split=attrs.evolve(kronopt.PRESETS["pro_soap"].split, rank=r, side="right"))
    opt, _ = _run(cfg, [(m, n)], 3, generator(5))
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    state = opt._buckets[0].state
    numbers = sum(v.numel() for v in compose.flatten(state).values() if isinstance(v, torch.Tensor))
    for path, v in compose.flatten(state).items():
        if isinstance(v, torch.Tensor):
            assert v.shape[-2:] != (n, n), f"{path} has a full {n}×{n} side"
            assert v.numel() <= max(m * n, m * m), f"{path} {tuple(v.shape)}"
    # first moment mn, second moment mr; left: factor + basis m², eigenvalues m; right: U, power product nr;
    # S r²; Ritz values r; μ
    expected = m * n + m * r + 2 * m * m + m + 2 * n * r + r * r + r + 1
    assert numbers <= expected + 4, (numbers, expected)  # + per-block counters
    soap_opt, _ = _run(kronopt.PRESETS["soap"], [(m, n)], 3, generator(5))
    assert opt.state_bytes() < soap_opt.state_bytes() / 3


def _soap_rms_ratios(scale, complement_scale, steps=60):
    """Per-step update RMS of pro_soap (r = 16) over soap's, same gradients (rank-4 signal + noise, 64×64)."""
    m = n = 64
    gen = generator(7)
    signal = randn(gen, m, 4, dtype=torch.float32) @ randn(gen, 4, n, dtype=torch.float32) / 4
    grads = [scale * (signal + randn(gen, m, n, dtype=torch.float32)) for _ in range(steps)]
    rms = {}
    for name, over in (("soap", {}), ("pro_soap", {"split.rank": 16, "split.complement_scale": complement_scale})):
        W = torch.nn.Parameter(torch.zeros(m, n))
        opt = kronopt.build([("blocks.0.weight", W)], name, lr=1.0, weight_decay=0.0, **over)
        out = []
        for G in grads:
            before = W.detach().clone()
            W.grad = G.clone()
            opt.step()
            out.append((W.detach() - before).square().mean().sqrt())
        rms[name] = torch.stack(out[1:])
    assert (rms["soap"] > 0).all()
    return rms["pro_soap"] / rms["soap"]


@pytest.mark.parametrize("scale", [1e-2, 1.0])
def test_pro_soap_steps_like_soap_from_the_first_step(scale):
    """One learning rate serves soap and pro_soap: match_subspace_rms keeps the update RMS within 1.5× of SOAP's
    (measured 1.00–1.17); the KL rule "whitened" is not scale-free under EMA factors and fails on small gradients."""
    ratios = _soap_rms_ratios(scale, "match_subspace_rms")
    assert ((ratios > 1 / 1.5) & (ratios < 1.5)).all(), ratios
    if scale == 1e-2:
        assert _soap_rms_ratios(scale, "whitened", steps=4)[0] > 10


def test_match_subspace_rms_gives_the_complement_the_subspace_blocks_rms(gen):
    m, n, r = 6, 10, 3
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    U = orthonormal(gen, 1, n)[:, :, :r]
    Q_L = orthonormal(gen, 1, m)
    basis = BasisState(Q_L=Q_L, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    ctx = StepContext(step=3, layout=layout, basis=basis, flat=(None, torch.ones(1, **F64)))
    split = LowRankFlatSplit(rank=r, complement_scale="match_subspace_rms", ns_dtype="float64")
    M = randn(gen, 1, m, n)
    D0 = Q_L @ randn(gen, 1, m, r) @ U.mT
    D, _ = split.complement(None, M, D0, ctx, lambda: M)
    block = D - D0
    torch.testing.assert_close(block @ U, torch.zeros(1, m, r, **F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(block.norm() / math.sqrt(m * (n - r)), D0.norm() / math.sqrt(m * r), rtol=1e-12, atol=0)


def test_projector_splitting_restricted_step_is_the_dense_ksl_step_projected(gen):
    """The restricted KSL step equals the dense one on R = U S Uᵀ + μ P⊥ (linalg.projector_split_ksl), its R̂ then
    M-projected onto the family (S' = Uᵀ R̂ U, μ' = (tr R̂ − tr S')/(n − r), power product R̂ U), up to the balance
    of the two factors' norms (L ⊗ R is what is compared)."""
    from kronopt.factors import ProjectorSplittingFactors

    m, n, r, beta = 5, 9, 3, 0.9
    est = ProjectorSplittingFactors(beta=beta)
    layout = Layout(batch=1, m=m, n=n, left="full", right="restricted", rank_right=r)
    st = est.init(layout, **F64)
    U = orthonormal(gen, 1, n)[:, :, :r]
    L, S, mu = spd_matrix(gen, 1, m), spd_matrix(gen, 1, r), torch.tensor([0.3], **F64)
    st = attrs.evolve(st, L=L, sub_R=S, mu_R=mu, initialised=torch.ones(1, dtype=torch.bool), calls=3)
    basis = BasisState(Q_L=orthonormal(gen, 1, m), Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(1, dtype=torch.int64))
    G = randn(gen, 1, m, n)
    new = est.update(st, G, StepContext(step=4, layout=layout, basis=basis))
    R_dense = U @ S @ U.mT + mu.view(-1, 1, 1) * (torch.eye(n, **F64) - U @ U.mT)
    L_d, R_d = linalg.projector_split_ksl(L, R_dense, G, beta)
    a, b = L_d.norm(), new.L.norm()
    torch.testing.assert_close(new.L / b, L_d / a, rtol=1e-10, atol=1e-12)
    S_d = U.mT @ R_d @ U
    torch.testing.assert_close(new.sub_R * b, S_d * a, rtol=1e-10, atol=1e-12)
    mu_d = (torch.diagonal(R_d, dim1=-2, dim2=-1).sum(-1) - torch.diagonal(S_d, dim1=-2, dim2=-1).sum(-1)) / (n - r)
    torch.testing.assert_close(new.mu_R * b, mu_d * a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new.power_R * b, R_d @ U * a, rtol=1e-10, atol=1e-12)
    # the projected factors are balanced: ‖L‖ = ‖U S Uᵀ + μ P⊥‖
    torch.testing.assert_close(b**2, new.sub_R.square().sum() + (n - r) * new.mu_R.square().sum(), rtol=1e-12, atol=0)
    assert est.flat_eigvals(new) == (None, new.mu_R)


def test_projector_splitting_refuses_a_restricted_side_it_cannot_integrate():
    from kronopt.factors import ProjectorSplittingFactors

    layout = Layout(batch=1, m=4, n=8, left="full", right="restricted", rank_right=2)
    with pytest.raises(ValueError, match="projector_splitting.*variant = 'ksl'"):
        ProjectorSplittingFactors(variant="parallel").init(layout, **F64)


def test_pro_dykaf_holds_order_n_r_numbers_and_steps_like_dykaf():
    m, n, r = 16, 96, 6
    cfg = attrs.evolve(kronopt.PRESETS["pro_dykaf"], split=attrs.evolve(kronopt.PRESETS["pro_dykaf"].split, rank=r, side="right"))
    opt, _ = _run(cfg, [(m, n)], 3, generator(5))
    assert opt.bucket_summary()[0]["sides"] == ("full", "restricted")
    for path, v in compose.flatten(opt._buckets[0].state).items():
        if isinstance(v, torch.Tensor):
            assert v.shape[-2:] != (n, n), f"{path} has a full {n}×{n} side"
    dykaf_opt, _ = _run(kronopt.PRESETS["dykaf"], [(m, n)], 3, generator(5))
    assert opt.state_bytes() < dykaf_opt.state_bytes() / 3
    # update RMS within 1.5× of DyKAF's on the rank-4-plus-noise stream (the median step), and no step
    # off by 1.75×: right after a refresh the two bases of the nearly isotropic noise part differ, by how
    # much depends on the rounding of the machine's kernels (one step at 1.51 on an AMX CPU, median 1.35)
    size = 64
    gen = generator(7)
    signal = randn(gen, size, 4, dtype=torch.float32) @ randn(gen, 4, size, dtype=torch.float32) / 4
    grads = [signal + randn(gen, size, size, dtype=torch.float32) for _ in range(40)]
    rms = {}
    for name, over in (("dykaf", {}), ("pro_dykaf", {"split.rank": 16})):
        W = torch.nn.Parameter(torch.zeros(size, size))
        o = kronopt.build([("blocks.0.weight", W)], name, lr=1.0, weight_decay=0.0, **over)
        out = []
        for G in grads:
            before = W.detach().clone()
            W.grad = G.clone()
            o.step()
            out.append((W.detach() - before).square().mean().sqrt())
        rms[name] = torch.stack(out[1:])
    ratios = rms["pro_dykaf"] / rms["dykaf"]
    assert torch.isfinite(ratios).all() and ((ratios > 1 / 1.75) & (ratios < 1.75)).all(), ratios
    assert 1 / 1.5 < ratios.median() < 1.5, ratios
