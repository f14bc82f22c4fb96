"""DyKAF's ``product_dtype = "bfloat16"``: the KSL step's four sandwich products with bfloat16 operands and results.

The expected values come from the reference's §3 pseudo-code rounded by hand (``tests/reference/dykaf.py``,
``ksl_sandwich(rounded=True)``: ``G``, ``R̄``, ``U`` and each product rounded to bfloat16, the sums exact, the rest in
float64), one block at a time. The emulated form (float64 blocks, small products, a CPU without fast bfloat16
products) gives those values but for a sum's last bits; the bfloat16 kernels sum in float32, so an entry whose sum
lies within its rounding of a bfloat16 boundary may round the other way: float32 blocks are compared by how far they
lie from the hand-rounded step against how far the exact step lies from it.

The tiled form of a product's symmetric part (a side of ``_GRAM_TILED_MIN`` or more, on a CPU) mirrors the
product's tiles below the diagonal where the dense form averages the product with its transpose: the rounded
``(G R̄) Gᵀ`` is symmetric only up to its operand's rounding, so the two differ by about that much, and the hand
rounding follows the form (``_symmetric_part``).
"""

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.config import ConfigError
from tests.reference.dykaf import ksl_sandwich, parallel_sandwich
from tests.unit.test_rotation_dtype import _run

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16


def _rounded(X):
    return X.to(BF16).to(torch.float64)


def _sym_psd(gen, b, d, dtype=torch.float64):
    B = torch.randn(b, d, d + 3, generator=gen, dtype=torch.float64)
    return linalg.sym(B @ B.mT).to(dtype)


def _symmetric_part(C):
    """The symmetric part kronopt takes of a ``d × d`` product: the average with its transpose (dense form), or its
    tiles below the diagonal mirrored and each diagonal tile averaged (tiled form, a side of ``_GRAM_TILED_MIN``)."""
    d = C.shape[-1]
    if d < linalg._GRAM_TILED_MIN:
        return (C + C.mT) / 2
    out = torch.empty_like(C)
    slices = linalg._tile_slices(d)
    for i, I in enumerate(slices):
        for J in slices[:i]:
            out[..., I, J] = C[..., I, J]
            out[..., J, I] = C[..., I, J].mT
        out[..., I, I] = (C[..., I, I] + C[..., I, I].mT) / 2
    return out


def _by_hand(L, R, G, beta, *, fresh=False):
    """The rounded KSL step of one block in float64, with kronopt's symmetric part of each product (dense or tiled):
    ``ksl_sandwich(rounded=True)`` written out where a side is tiled. ``fresh``: the step from ``L = 0`` in the
    direction ``R̄ = I/√n``, as kronopt starts a block that holds nothing."""
    L, R, G = L.double(), R.double(), G.double()
    if fresh:
        L, R = torch.zeros_like(L), torch.eye(R.shape[-1], dtype=torch.float64)
    weight = beta * torch.linalg.norm(R)
    R_bar = R / torch.linalg.norm(R)
    G_ = _rounded(G)
    C = _symmetric_part(_rounded(_rounded(G_ @ _rounded(R_bar)) @ G_.T))
    K = weight * L + (1 - beta) * C
    U = K / torch.linalg.norm(K)
    D = _symmetric_part(_rounded(G_.T @ _rounded(_rounded(U) @ G_)))
    R_hat = weight * (U * L).sum() * R_bar + (1 - beta) * D
    S = torch.linalg.norm(R_hat)
    return U * S.sqrt(), R_hat / S.sqrt()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _state(gen, b, m, n, dtype=torch.float64):
    """Factors of Frobenius norm 1 each (balanced, as the step leaves them): a unit-variance gradient's increment
    outweighs them, so its products' rounding shows in the step."""
    L, R = _sym_psd(gen, b, m), _sym_psd(gen, b, n)
    return (L / linalg.block_norm(L)).to(dtype), (R / linalg.block_norm(R)).to(dtype)


SHAPES = [(3, 6, 4), (2, 5, 12), (2, 12, 5), (1, 520, 24), (1, 24, 520)]
IDS = ["dense", "wide", "tall", "tall-tiled", "wide-tiled"]


@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_the_hand_rounding_is_the_references_pseudo_code_where_both_sides_are_dense(gen, shape):
    """The test's own hand rounding (written out for the tiled form) is the reference's on dense sides (where the
    reference's average of each product with its transpose is kronopt's too)."""
    b, m, n = shape
    L, R = _state(gen, b, m, n)
    G = torch.randn(b, m, n, generator=gen, dtype=torch.float64)
    for k in range(b):
        for a, c in zip(_by_hand(L[k], R[k], G[k], 0.9), ksl_sandwich(L[k], R[k], G[k], 0.9, rounded=True)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_the_emulated_step_rounds_the_spec_products_by_hand(gen, shape):
    """float64 blocks round in their own kernels (the emulated form): the step is the hand rounding to float64's
    digits on every form (dense, wide and tall, each side tiled), and a bfloat16 rounding off the exact step."""
    b, m, n = shape
    L, R = _state(gen, b, m, n)
    G = 3.0 * torch.randn(b, m, n, generator=gen, dtype=torch.float64)
    assert linalg.NarrowProducts.of_sandwiches(G, BF16).emulated
    L1, R1 = linalg.projector_split_ksl(L, R, G, 0.8, dtype=BF16)
    exact = linalg.projector_split_ksl(L, R, G, 0.8)
    assert torch.equal(L1, L1.mT) and torch.equal(R1, R1.mT)
    for k in range(b):
        for ours, hand, plain in zip((L1[k], R1[k]), _by_hand(L[k], R[k], G[k], 0.8), (exact[0][k], exact[1][k])):
            torch.testing.assert_close(ours, hand, rtol=1e-10, atol=1e-12 * hand.abs().max().item())
            assert 1e-6 < _rel(ours, plain) < 1e-2


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_float32_blocks_take_the_narrow_products_in_either_form(gen, shape, monkeypatch):
    """On float32 blocks the bfloat16 kernels and the emulated form (the block's own kernels on rounded values, whose
    roundings the float64 test above pins to the hand rounding) make the same narrow step but for a float32 sum that
    tips a rounding now and then: far nearer each other than either is to the float32 step, and each a bfloat16
    rounding off it. (Against the hand rounding in float64 a float32 block is not compared: its ‖R‖, about 1e-7 off
    in float32, moves R̄'s every entry, and a 24 × 520 block's sandwiches then round hundreds of entries otherwise.)"""
    b, m, n = shape
    L, R = _state(gen, b, m, n, torch.float32)
    G = 3.0 * torch.randn(b, m, n, generator=gen)
    made = {}
    for emulated in (True, False):
        monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work, e=emulated: e)
        made[emulated] = linalg.projector_split_ksl(L, R, G, 0.8, dtype=BF16)
    plain = linalg.projector_split_ksl(L, R, G, 0.8)
    for kernels, emulated, exact in zip(made[False], made[True], plain):
        assert kernels.dtype == torch.float32 and torch.equal(kernels, kernels.mT)
        for k in range(b):
            assert _rel(kernels[k], emulated[k]) < 0.1 * _rel(exact[k], emulated[k])
            assert 1e-5 < _rel(kernels[k], exact[k]) < 1e-2


def test_a_fresh_block_starts_from_the_identity_direction_in_the_narrow_products(gen):
    L, R = _state(gen, 3, 7, 5)
    G = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    fresh = torch.tensor([False, True, False])
    L1, R1 = linalg.projector_split_ksl(L, R, G, 0.9, fresh=fresh, dtype=BF16)
    for k in range(3):
        for ours, hand in zip((L1[k], R1[k]), _by_hand(L[k], R[k], G[k], 0.9, fresh=bool(fresh[k]))):
            torch.testing.assert_close(ours, hand, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("side", [200, 520], ids=["dense", "tiled"])
def test_the_deferred_write_gives_the_bits_of_the_step_made_in_place(gen, side, monkeypatch):
    monkeypatch.setattr(linalg, "_narrow_emulated", lambda X, dtype, work: False)
    L, R = _state(gen, 2, side, 24, torch.float32)
    G = torch.randn(2, side, 24, generator=gen)
    made = linalg.projector_split_ksl(L, R, G, 0.95, dtype=BF16)
    defer: list = []
    back = linalg.projector_split_ksl(L, R, G, 0.95, defer=defer, dtype=BF16)
    assert back[0] is L and back[1] is R and len(defer) == 2
    for record in defer:
        record.into(record.target)
    assert torch.equal(L, made[0]) and torch.equal(R, made[1])


def test_a_step_out_of_the_plain_range_runs_scaled_and_stays_finite(gen, monkeypatch):
    """Norms past the plain range (float32's ends at 2⁶⁰: a sum of their squares would overflow) take the scaled step,
    the narrow products as on the plain one: the step of the inputs times 2⁵⁰ is their step times 2⁵⁰
    (homogeneous; every scaling a power of two), up to float32 and a bfloat16 rounding tipped here and there."""
    runs = []
    real = linalg._ksl
    monkeypatch.setattr(linalg, "_ksl", lambda *a, **k: runs.append(a[5] is not None) or real(*a, **k))
    L, R = _state(gen, 2, 20, 12, torch.float32)
    G = torch.randn(2, 20, 12, generator=gen)
    small = linalg.projector_split_ksl(L, R, G, 0.9, dtype=BF16)
    assert runs == [False]
    big = linalg.projector_split_ksl(L * 2.0**50, R * 2.0**50, G * 2.0**50, 0.9, dtype=BF16)
    assert runs == [False, False, True]  # the plain step left its range: made again, scaled
    for a, s in zip(big, small):
        assert torch.isfinite(a).all()
        assert _rel(a / 2.0**50, s) < 1e-3


@pytest.mark.parametrize("scale", [2.0**-100, 2.0**140], ids=["tiny", "huge"])
def test_a_float64_block_past_bfloat16s_range_runs_scaled(gen, scale):
    """A float64 block's norms may lie far inside float64's range and outside bfloat16's (float32's): its plain range
    is the narrow products' there, so it runs scaled (σ G near 1) and its step is the step of the unscaled inputs
    times the scale, where the plain step would under- or overflow in the products and lose the gradient."""
    L, R = _state(gen, 2, 9, 6)
    G = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    small = linalg.projector_split_ksl(L, R, G, 0.9, dtype=BF16)
    big = linalg.projector_split_ksl(L * scale, R * scale, G * scale, 0.9, dtype=BF16)
    for a, s in zip(big, small):
        torch.testing.assert_close(a / scale, s, rtol=1e-12, atol=1e-14)


def test_a_sandwich_past_bfloat16s_range_runs_scaled(gen):
    """A gradient whose sandwich is finite in float32 but past bfloat16's largest value: the rounded product is
    infinite, so the plain step leaves its range and the scaled step (a power of two) makes it finite."""
    L, R = _state(gen, 1, 16, 8, torch.float32)
    G = torch.zeros(1, 16, 8)
    G[0, 0, 0] = 1.5 * 2.0**63
    G[0, 1, 1] = 1.0
    L1, R1 = linalg.projector_split_ksl(L, R, G, 0.9, dtype=BF16)
    assert torch.isfinite(L1).all() and torch.isfinite(R1).all()
    exact = linalg.projector_split_ksl(L, R, G, 0.9)
    assert _rel(L1, exact[0]) < 1e-2 and _rel(R1, exact[1]) < 1e-2


@pytest.mark.parametrize("side", [64, 128])  # a block's products below and above the emulated form's bound
def test_a_block_rounds_alike_in_a_bucket_and_alone(gen, side, monkeypatch):
    """The form a block's narrow products take goes by the block's own size, not its stack's: a block steps the same
    bits in one bucket of eight as in a bucket of its own."""
    monkeypatch.setattr(linalg, "_bfloat16_products_fast", lambda: True)
    ws = [torch.randn(side, side, generator=gen) for _ in range(8)]
    grads = [[torch.randn(side, side, generator=gen) for _ in ws] for _ in range(6)]
    narrow = {"factors.product_dtype": "bfloat16", "refresh.every": 2}  # the factors reach the weights
    together, one = _run("dykaf", ws, grads, **narrow)
    apart, opt = _run("dykaf", ws, grads, **narrow, bucket_cap_mib=side * side * 4 * 6 / 2**20)
    assert len(one._buckets) == 1 and len(opt._buckets) == 8
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    for p, q in zip(one.param_groups[0]["params"], opt.param_groups[0]["params"]):
        assert torch.equal(one.state[p]["factors.L"], opt.state[q]["factors.L"])
        assert torch.equal(one.state[p]["factors.R"], opt.state[q]["factors.R"])


def test_many_buckets_together_give_each_buckets_own_bits(gen):
    shapes = [(2, 6, 4), (3, 9, 11), (1, 30, 17)]
    Ls, Rs, Gs = [], [], []
    for b, m, n in shapes:
        L, R = _state(gen, b, m, n, torch.float32)
        Ls.append(L), Rs.append(R), Gs.append(torch.randn(b, m, n, generator=gen))
    together = linalg.projector_split_ksl_each(Ls, Rs, Gs, 0.9, dtype=BF16)
    for L, R, G, got in zip(Ls, Rs, Gs, together):
        alone = linalg.projector_split_ksl(L, R, G, 0.9, dtype=BF16)
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
        assert not torch.equal(got[0], linalg.projector_split_ksl(L, R, G, 0.9)[0])


@pytest.mark.parametrize("small_together", [True, False], ids=["small-buckets-together", "bucket-by-bucket"])
def test_dykafs_factors_stay_near_the_float32_ones(gen, small_together, monkeypatch):
    """The same gradients with the sandwiches in bfloat16 leave DyKAF's factors near the float32 run's and not
    within float32's rounding of it; a vector keeps no factors."""
    if not small_together:
        monkeypatch.setattr(kronopt.optimizer, "_SMALL_TOGETHER_MAX", 0)
    ws = [torch.randn(24, 40, generator=gen), torch.randn(40, 24, generator=gen), torch.randn(8, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(14)]
    exact, plain = _run("dykaf", ws, grads)
    narrow, opt = _run("dykaf", ws, grads, **{"factors.product_dtype": "bfloat16"})
    for p, q in zip(plain.param_groups[0]["params"][:2], opt.param_groups[0]["params"][:2]):
        for key in ("factors.L", "factors.R"):
            assert 1e-5 < _rel(opt.state[q][key], plain.state[p][key]) < 5e-2
    assert all(torch.isfinite(w).all() for w in narrow)
    assert torch.equal(exact[2], narrow[2])


@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_the_parallel_step_rounds_its_six_products_by_hand(gen, shape):
    """The parallel integrator (dykaf.md §4) under the option: its three sandwiches' products rounded as the
    reference's pseudo-code rounds them (float64 blocks, the emulated form), a fresh block's too."""
    b, m, n = shape
    L, R = _state(gen, b, m, n)
    G = 3.0 * torch.randn(b, m, n, generator=gen, dtype=torch.float64)
    L1, R1 = linalg.projector_split_parallel(L, R, G, 0.8, dtype=BF16)
    exact = linalg.projector_split_parallel(L, R, G, 0.8)
    assert torch.equal(L1, L1.mT) and torch.equal(R1, R1.mT)
    for k in range(b):
        for ours, hand, plain in zip((L1[k], R1[k]), parallel_sandwich(L[k], R[k], G[k], 0.8, rounded=True), exact):
            torch.testing.assert_close(ours, hand, rtol=1e-10, atol=1e-14)
            assert 1e-6 < _rel(ours, plain[k]) < 1e-2
    # a fresh block: S₀ = 0 and the directions I/√m, I/√n, so U ∝ G G ᵀ/√n, V ∝ Gᵀ G/√m and S₁ = ⟨U, G V Gᵀ⟩
    fresh = torch.zeros(b, dtype=torch.bool)
    fresh[0] = True
    L1, R1 = linalg.projector_split_parallel(L, R, G, 0.8, fresh=fresh, dtype=BF16)
    G_ = _rounded(G[0])

    def sandwich(A, X):
        P = _rounded(_rounded(A @ _rounded(X)) @ A.T)
        return 0.2 * (P + P.T) / 2

    U = sandwich(G_, torch.eye(n, dtype=torch.float64) / n**0.5)
    V = sandwich(G_.T, torch.eye(m, dtype=torch.float64) / m**0.5)
    U, V = U / U.norm(), V / V.norm()
    root = (U * sandwich(G_, V)).sum().sqrt()
    torch.testing.assert_close(L1[0], U * root, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(R1[0], V * root, rtol=1e-10, atol=1e-14)


def test_a_bad_product_dtype_is_listed_with_the_other_errors():
    with pytest.raises(ConfigError) as err:
        kronopt.resolve("dykaf", **{"factors.product_dtype": "float16", "lr": -1.0})
    text = str(err.value)
    assert "product_dtype" in text and "'float16'" in text and "lr" in text
    assert kronopt.resolve("dykaf", **{"factors.product_dtype": "bfloat16", "factors.variant": "parallel"})
    assert kronopt.resolve("dykaf").factors.product_dtype == "compute"


def test_the_setting_survives_a_dump_and_a_load():
    cfg = kronopt.resolve("dykaf", **{"factors.product_dtype": "bfloat16"})
    again = kronopt.resolve(kronopt.config.to_dict(cfg))
    assert again.factors.product_dtype == "bfloat16" and again == cfg


def test_pro_dykafs_restricted_blocks_keep_the_compute_dtype(gen):
    """pro_dykaf restricts a side of a matrix block with both sides rotated, whose step (a full side beside a
    restricted one) has no narrow form: the option leaves such blocks as they were, their factors and weights bit for
    bit past two refreshes (docs/configs.md); a block with a side past shapes.max_dim keeps its other side's one-sided
    factor, which the option narrows as ema's."""
    ws = [torch.randn(24, 30, generator=gen), torch.randn(12, 10, generator=gen), torch.randn(40, 6, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(12)]
    options = {"refresh.every": 4, "shapes.max_dim": 32}  # the 40 × 6 block's long side is not rotated
    plain, before = _run("pro_dykaf", ws, grads, **options)
    narrow, opt = _run("pro_dykaf", ws, grads, **options, **{"factors.product_dtype": "bfloat16"})
    assert opt.config.factors.product_dtype == "bfloat16"
    ps, qs = before.param_groups[0]["params"], opt.param_groups[0]["params"]
    for p, q in zip(ps[:2], qs[:2]):
        assert {k for k in before.state[p] if k.startswith("factors.sub_")}  # a restricted side
        assert all(torch.equal(v, opt.state[q][k]) for k, v in before.state[p].items() if isinstance(v, torch.Tensor))
    assert torch.equal(plain[0], narrow[0]) and torch.equal(plain[1], narrow[1])
    one_sided = before.state[ps[2]]["factors.R"], opt.state[qs[2]]["factors.R"]
    assert "factors.L" not in before.state[ps[2]] or before.state[ps[2]]["factors.L"] is None
    assert 1e-5 < _rel(one_sided[1], one_sided[0]) < 5e-2
    assert not torch.equal(plain[2], narrow[2])
