"""The eigenvalue rule's momentum kept in the eigenbasis (``inner.momentum_basis = "eigen"``, kl_shampoo's preset):
the same optimizer as the momentum in the original coordinates, two products fewer per step."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import config
from tests.unit._momentum_runs import run_momentum_basis

SHAPES = [(12, 8), (8, 20), (6, 6)]


def _run(preset, basis, steps=23, **overrides):
    return run_momentum_basis(preset, basis, SHAPES, steps, **overrides)


@pytest.mark.parametrize(
    "preset, overrides",
    [("kl_shampoo", {"basis.sort": False}), ("kl_shampoo", {"basis.sort": True}), ("shampoo", {})],
    ids=["kl_shampoo", "kl_shampoo_sorted", "shampoo_eigh"],
)
def test_eigenbasis_momentum_is_the_same_optimizer(preset, overrides):
    """Over 23 steps with a refresh every 3 (the first refresh from the identity; QR power steps sorted or
    not, or eigh), the weights and the momentum in the original coordinates (``moment``) agree to float64
    rounding."""
    a, pa = _run(preset, "original", **overrides)
    b, pb = _run(preset, "eigen", **overrides)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for bucket_a, bucket_b in zip(a._buckets, b._buckets):
        cfg = a._bucket_config(bucket_a)
        ctx_a = kronopt.compose.context(cfg, bucket_a.layout, bucket_a.state, bucket_a.state.step)
        ctx_b = kronopt.compose.context(b._bucket_config(bucket_b), bucket_b.layout, bucket_b.state, bucket_b.state.step)
        torch.testing.assert_close(
            b._bucket_config(bucket_b).inner.moment(bucket_b.state.inner, ctx_b),
            cfg.inner.moment(bucket_a.state.inner, ctx_a),
            rtol=1e-12, atol=1e-12,
        )


class _Products(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # matrix products only: a matrix-vector product (a trailing size of 1) is a weighted row sum
        mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
        if func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "baddbmm") and all(min(a.shape[-2:]) > 1 for a in mats):
            self.count += 1
        return func(*args, **(kwargs or {}))


# products of a plain step: the rotation (2), the Gram operand a half product does not give (1), the two Gram
# updates (2), the way back (2); a block more than twice as long on one side takes its short side's update
# through the sandwich Q (H̃ H̃ᵀ) Qᵀ (3 smaller products) and needs no extra operand
@pytest.mark.parametrize(("shape", "eigen"), [((12, 8), 7), ((8, 12), 7), ((12, 4), 8), ((4, 12), 8)])
def test_kl_shampoo_shares_the_rotation_of_the_gradient(shape, eigen):
    """A plain step (no refresh) of a two-sided block makes two products fewer with the momentum in the basis:
    the factor update reuses the direction's Q_Lᵀ G Q_R and its half product (StepContext.rotated)."""
    counts = {}
    for basis in ("original", "eigen"):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(*shape, generator=gen))
        opt = kronopt.build([("w", w)], "kl_shampoo", **{"inner.momentum_basis": basis, "refresh.every": 100})
        for _ in range(3):  # the first call only observes, the second refreshes at the first call's schedule
            w.grad = torch.randn(*shape, generator=gen)
            opt.step()
        w.grad = torch.randn(*shape, generator=gen)
        with _Products() as products:
            opt.step()
        counts[basis] = products.count
    assert counts == {"original": eigen + 2, "eigen": eigen}


def test_a_restricted_side_refuses_the_eigenbasis_momentum():
    with pytest.raises(config.ConfigError, match="momentum_basis"):
        config.with_overrides(kronopt.PRESETS["pro_kl_shampoo"], {"inner.momentum_basis": "eigen"})


def test_an_old_checkpoint_with_momentum_in_original_coordinates_is_refused_not_misread():
    a, pa = _run("kl_shampoo", "original", steps=5)
    b, _ = _run("kl_shampoo", "eigen", steps=5)
    with pytest.warns(UserWarning, match="different config"), pytest.raises(ValueError, match="momentum"):
        b.load_state_dict(a.state_dict())


class _ProductShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "baddbmm"):
            a, b = args[-2], args[-1]
            self.shapes.append((tuple(a.shape[-2:]), tuple(b.shape[-2:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("basis_storage", "by_n_square"), [("compute", 2), ("float32", 2), ("bfloat16", 3)])
def test_kl_factor_update_of_a_wide_block_applies_the_right_basis_once(basis_storage, by_n_square):
    """On a wide block (m < n) the left factor's ``G Q_R`` is taken as ``Q_L (Q_Lᵀ G Q_R)`` (``m²n``), so a plain
    step multiplies an ``m × n`` matrix by an ``n × n`` one only twice: the rotation ``Q_Lᵀ G Q_R`` and the
    direction's ``P Q_Rᵀ`` (not a third time for ``G Q_R``). A basis stored in bfloat16 is orthonormal only to
    its rounding (``StepContext.exact_basis`` False), so there ``G Q_R`` is multiplied out."""
    m, n = 6, 20
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(m, n, generator=gen))
    opt = kronopt.build([("w", w)], "kl_shampoo", **{"refresh.every": 100, "storage.basis": basis_storage})
    for _ in range(3):
        w.grad = torch.randn(m, n, generator=gen)
        opt.step()
    w.grad = torch.randn(m, n, generator=gen)
    with _ProductShapes() as products:
        opt.step()
    made = [s for s in products.shapes if s[0] == (m, n) and s[1] == (n, n)]
    assert len(made) == by_n_square, products.shapes


@pytest.mark.parametrize(("preset", "products"), [("kl_soap", 7), ("soap", 6)])
def test_adam_in_the_basis_reuses_the_factor_estimators_rotation(preset, products):
    """kl_soap: the KL factor update rotates G (Q_Lᵀ G, Q_Lᵀ G Q_R, plus G Q_R and the two Grams), and Adam's
    direction reuses that Q_Lᵀ G Q_R (StepContext.rotated) instead of rotating G again, then rotates back:
    7 products per plain step, not 9. soap's factors do not rotate G: its Grams, Adam's rotation and the way
    back, 6."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, generator=gen))
    opt = kronopt.build([("w", w)], preset, **{"refresh.every": 100})
    for _ in range(3):
        w.grad = torch.randn(12, 8, generator=gen)
        opt.step()
    w.grad = torch.randn(12, 8, generator=gen)
    with _Products() as counted:
        opt.step()
    assert counted.count == products


def test_rotated_is_reused_only_for_the_same_gradient_and_the_same_bases():
    """StepContext.rotated: contexts of one call share the product, but a context whose basis differs (the
    direction after a refresh with ``factor_update = "before"``) or another gradient tensor gets its own."""
    from kronopt.types import BasisState, Layout, StepContext

    gen = torch.Generator().manual_seed(0)
    b, m, n = 2, 5, 4
    G = torch.randn(b, m, n, generator=gen, dtype=torch.float64)
    Q = lambda d: torch.linalg.qr(torch.randn(b, d, d, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    Q_L, Q_R, Q_L2 = Q(m), Q(n), Q(m)
    layout = Layout(batch=b, m=m, n=n, left="full", right="full")

    def ctx(Q_left, shared):
        basis = BasisState(Q_L=Q_left, Q_R=Q_R, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))
        return StepContext(step=1, layout=layout, basis=basis, shared=shared)

    shared: dict = {}
    first = ctx(Q_L, shared).rotated(G)
    assert ctx(Q_L, shared).rotated(G).H is first.H  # same G, same bases: the product is reused
    moved = ctx(Q_L2, shared).rotated(G)
    assert moved.left is None  # a tall block held in the compute dtype goes right first
    torch.testing.assert_close(moved.right, G @ Q_R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved.H, Q_L2.mT @ G @ Q_R, rtol=1e-12, atol=1e-12)
    other = G.clone()
    again = ctx(Q_L2, shared).rotated(other)
    assert again.H is not moved.H
    torch.testing.assert_close(again.H, moved.H, rtol=0, atol=0)


@pytest.mark.parametrize(("m", "n", "exact", "first"), [(5, 4, True, "right"), (5, 4, False, "left"), (4, 5, True, "left"), (4, 4, True, "left")])
def test_rotated_goes_right_first_only_on_a_tall_block_held_exactly(m, n, exact, first):
    """StepContext.rotated: the half product it keeps is ``G Q_R`` on a tall block whose bases are held in the
    compute dtype (KL's left Gram operand then comes free), ``Q_Lᵀ G`` otherwise; ``H`` is the same either way."""
    from kronopt.types import BasisState, Layout, StepContext

    gen = torch.Generator().manual_seed(1)
    G = torch.randn(2, m, n, generator=gen, dtype=torch.float64)
    Q_L, Q_R = (torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))[0] for d in (m, n))
    basis = BasisState(Q_L=Q_L, Q_R=Q_R, lam_L=None, lam_R=None, failures=torch.zeros(2, dtype=torch.int64))
    layout = Layout(batch=2, m=m, n=n, left="full", right="full")
    rotation = StepContext(step=1, layout=layout, basis=basis, exact_basis=exact).rotated(G)
    torch.testing.assert_close(rotation.H, Q_L.mT @ G @ Q_R, rtol=1e-12, atol=1e-12)
    if first == "right":
        assert rotation.left is None
        torch.testing.assert_close(rotation.right, G @ Q_R, rtol=1e-12, atol=1e-12)
    else:
        assert rotation.right is None
        torch.testing.assert_close(rotation.left, Q_L.mT @ G, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("preset", "kept"), [("kl_soap", True), ("soap", False)])
def test_the_directions_rotation_is_kept_for_the_factor_update_only_when_it_reads_it(preset, kept, monkeypatch):
    """With ``factor_update = "after"`` the direction's ``Q_Lᵀ G Q_R`` stays in the call's cache for a factor
    estimator that reads it (KL, ``reads_rotated``) and is dropped before an update that does not (soap's EMA
    factors), so two gradient-sized tensors are not held through the update and a refresh. (The pipeline's: a CPU's
    small buckets made together, ``compose.rotated_adams``, are turned off here.)"""
    from kronopt import optimizer as optimizer_module

    monkeypatch.setattr(optimizer_module, "_ROTATED_ADAMS_TOGETHER", False)
    seen = []
    observe = kronopt.compose._observe

    def spy(cfg, layout, state, G, *, shared, **kw):
        seen.append("rotated" in shared)
        return observe(cfg, layout, state, G, shared=shared, **kw)

    monkeypatch.setattr(kronopt.compose, "_observe", spy)
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, generator=gen))
    opt = kronopt.build([("w", w)], preset, **{"refresh.every": 100, "factor_update": "after"})
    for _ in range(4):
        w.grad = torch.randn(12, 8, generator=gen)
        opt.step()
    assert seen[-1] is kept


@pytest.mark.parametrize("together", [False, True], ids=["pipeline", "small buckets together"])
@pytest.mark.parametrize(("order", "calls"), [("after", 1), ("before", 2)])
def test_the_estimators_eigenvalues_are_taken_once_per_factor_record(order, calls, together, monkeypatch):
    """The contexts of one call share the estimator's eigenvalues while they see the same factor record: once per
    plain step with the update after the direction; twice with it before (the direction must see the updated
    record's, not the cached ones of the record before). The same where a CPU's small buckets step together
    (``compose.eigen_steps``, whose contexts take them for many buckets at once: ``eigvals_each``)."""
    from kronopt import optimizer as optimizer_module
    from kronopt.factors import KlKronFactors

    seen = []
    eigvals, eigvals_each = KlKronFactors.eigvals, KlKronFactors.eigvals_each

    def spy(self, state):
        seen.append(state)
        return eigvals(self, state)

    def spy_each(self, states):
        seen.extend(states)
        return eigvals_each(self, states)

    monkeypatch.setattr(KlKronFactors, "eigvals", spy)
    monkeypatch.setattr(KlKronFactors, "eigvals_each", spy_each)
    monkeypatch.setattr(optimizer_module, "_EIGEN_STEPS_TOGETHER", together)
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, generator=gen))
    opt = kronopt.build([("w", w)], "kl_shampoo", **{"refresh.every": 100, "factor_update": order})
    for _ in range(3):
        w.grad = torch.randn(12, 8, generator=gen)
        opt.step()
    seen.clear()
    w.grad = torch.randn(12, 8, generator=gen)
    opt.step()
    assert len(seen) == calls and len({id(s) for s in seen}) == calls
