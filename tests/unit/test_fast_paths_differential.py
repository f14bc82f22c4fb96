"""Differential checks of the CPU's fast paths at the shipped thresholds (not thresholds lowered for the test).

The other fast-path tests force the tiled products, the split sandwiches and the KSL range rerun on tiny
blocks by lowering ``linalg._GRAM_TILE`` / ``_GRAM_TILED_MIN`` / ``_SPLIT_SANDWICH_MIN``. Here the blocks are
large enough to take those paths as shipped (several 256-tiles, a short last tile: 777 = 3 · 256 + 9), and
each fast path is run against the form it replaces, whole optimizer steps included.
"""

import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt import optimizer as kopt

#: sides that take the shipped paths: 777 takes the split sandwich (≥ _SPLIT_SANDWICH_MIN) by tiles with a
#: short last tile, 520 the tiled symmetric product only (≥ _GRAM_TILED_MIN)
WIDE, TALL = (24, 777), (777, 24)


def _spd(gen, b, d):
    X = torch.randn(b, d, d + 2, generator=gen)
    return linalg.gram_left(X)


def _state(gen, m, n, b=2):
    """A KSL state with ‖L‖ = ‖R‖ = ‖G‖ (the factors leave every step with equal norms, and the EMA of
    G ⊗ G is of the size of ‖G‖²: neither term of K = β‖R‖L + (1−β) G R̄ Gᵀ drowns the other), and the
    gradient stack ``G``."""
    L, R, G = _spd(gen, b, m), _spd(gen, b, n), torch.randn(b, m, n, generator=gen)
    g = linalg.block_norm(G)
    return L / linalg.block_norm(L) * g, R / linalg.block_norm(R) * g, G


@pytest.mark.parametrize("shape", [WIDE, TALL, (520, 40)], ids=["wide-split", "tall-split", "tiled"])
def test_ksl_range_rerun_at_the_shipped_thresholds_keeps_each_blocks_bits(shape, monkeypatch):
    """One block of a stack far out of the plain range (λ = 2^35 on L, R and G: ‖K‖ ≈ λ² past 2^60) makes the CPU
    run the stack again, scaled. The block in range keeps the plain step's bits, the other is the plain step's
    times λ bit for bit (the step is homogeneous and σ a power of two), and both agree with float64.

    Would catch: σ applied twice or not at all to one operand of the real split sandwich (``_times(G, sigma)``)
    or of the tiled ``K``/``R̂`` (a ``LowerTiles`` written with the wrong scale or ``divide``), a per-block σ
    leaking into the other block, or the rerun not happening (NaN or zero factors for the large block)."""
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    L, R, G = _state(gen, m, n)
    base = linalg.projector_split_ksl(L, R, G, 0.95)
    lam = 2.0**35
    L2, R2, G2 = L.clone(), R.clone(), G.clone()
    L2[1] *= lam
    R2[1] *= lam
    G2[1] *= lam
    runs = []
    real = linalg._ksl
    monkeypatch.setattr(linalg, "_ksl", lambda *a, **kw: runs.append(a[5] is None) or real(*a, **kw))
    got = linalg.projector_split_ksl(L2, R2, G2, 0.95)
    assert runs == [True, False]  # the plain step, then the scaled rerun
    ref = linalg.projector_split_ksl(L2.double(), R2.double(), G2.double(), 0.95)
    for t, b0, r in zip(got, base, ref):
        assert torch.equal(t[0], b0[0])
        assert torch.equal(t[1], b0[1] * lam)
        assert float((t.double() - r).norm() / r.norm()) < 1e-5


@pytest.mark.parametrize("shape", [WIDE, TALL, (520, 40)], ids=["wide-split", "tall-split", "tiled"])
def test_ksl_split_and_tiled_products_match_the_dense_ones_with_a_fresh_block(shape, monkeypatch):
    """The float32 KSL step through the shipped split sandwiches and tiled products against the float64 step
    with both turned off (one dense product each, then ``sym``), on a stack with a block flagged fresh (the
    direction I/√n, weight 1, in place of R/‖R‖): equal up to float32 rounding, per block. (Not against the
    dense float32 step: on a CPU ``torch.linalg.vector_norm`` of a whole 777 × 777 float32 matrix is off by
    about 1e-5 relative, where the tiled form's norms, taken part by part, are off by 1e-7.)

    Would catch: a fresh block's direction or weight lost in the split sandwich (``S, s`` for a fresh
    block), the tiles of a short last row (777 = 3 · 256 + 9) dropped or mirrored wrong, or ``K``'s
    ``LowerTiles`` read as something else than the dense ``K`` by the tall block's split."""
    gen = torch.Generator().manual_seed(4)
    m, n = shape
    L, R, G = _state(gen, m, n, b=3)
    fresh = torch.tensor([False, True, False])
    fast = linalg.projector_split_ksl(L, R, G, 0.95, fresh=fresh)
    monkeypatch.setattr(linalg, "_SPLIT_SANDWICH_MIN", 10**9)
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 10**9)
    dense = linalg.projector_split_ksl(L.double(), R.double(), G.double(), 0.95, fresh=fresh)
    for a, b in zip(fast, dense):
        for i in range(3):
            assert float((a[i].double() - b[i]).norm() / b[i].norm()) < 5e-6, i


def _dykaf_trajectory(monkeypatch, host, shapes, grads):
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = kronopt.build(
        [(f"blocks.{i}.weight", p) for i, p in enumerate(params)], "dykaf",
        nonfinite_scope="block", nonfinite="skip", **{"refresh.every": 2},
    )
    history = []
    for k, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        state = [(key, v.clone()) for p in params for key, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
        history.append(([p.detach().clone() for p in params], state))
    return history


@pytest.mark.filterwarnings("ignore:non-finite gradient")
@pytest.mark.parametrize("shape", [WIDE, TALL], ids=["wide-split", "tall-split"])
def test_dykaf_host_verdicts_change_no_bit_at_the_shipped_thresholds(shape, monkeypatch):
    """dykaf on buckets of two blocks that take the real split sandwich and tiled products, with the CPU's
    host-read verdicts (plain KSL step first, deferred factor writes, plain copies) against the device-agnostic
    path a GPU takes (always scaled, masked writes): the same parameters and state bit for bit, over refreshes,
    with a block that starts late (zero gradients: dykaf's fresh direction through the split), a NaN
    gradient (a skipped block, masked deferred write) and a gradient far out of the plain range (the rerun).

    Would catch: the plain and scaled KSL forms parting at real tile sizes (only tiny forced tiles are
    compared elsewhere), a fresh block's direction lost in the split sandwich (``s = inv + fresh``), or a
    deferred write of a skipped block not keeping its old factor."""
    gen = torch.Generator().manual_seed(2)
    grads = []
    for k in range(6):
        step = [torch.randn(shape, generator=gen) for _ in range(2)]
        if k < 2:
            step[1].zero_()  # block 1 starts late
        if k == 3:
            step[0][0, 0] = float("nan")  # block 0 skipped
        if k == 4:
            step[1] *= 1e9  # ‖G‖ ≈ 1e11: ‖K‖ past the plain range
        grads.append(step)
    fast = _dykaf_trajectory(monkeypatch, True, [shape, shape], grads)
    masked = _dykaf_trajectory(monkeypatch, False, [shape, shape], grads)
    for k, ((pa, sa), (pb, sb)) in enumerate(zip(fast, masked)):
        for i, (a, b) in enumerate(zip(pa, pb)):
            assert torch.equal(a, b), (k, i)
            assert torch.isfinite(a).all()
        assert [key for key, _ in sa] == [key for key, _ in sb]
        for (key, a), (_, b) in zip(sa, sb):
            assert torch.equal(a, b), (k, key)


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_tiles_in_place_or_apart_give_the_same_trajectory_on_whole_tiles(preset, monkeypatch):
    """``linalg._tiles_in_place`` picks the row panels in place (Intel, other systems) or the tiles made apart
    (AMD) by the processor, so CI exercises one of the two. On sides that are whole multiples of the 256-tile
    both must give the same bits (their docstring's promise), here over whole steps with deferred factor
    updates and refreshes (a 512 × 24 and a 24 × 512 block: a tiled left, resp. right factor).

    Would catch: a bug in the branch the CI processor does not take, e.g. a panel mirrored into the wrong
    tiles, β applied twice to a tile made apart, or a deferred in-place update reading a tile it wrote."""

    def run(in_place):
        monkeypatch.setattr(linalg, "_tiles_in_place", lambda: in_place)
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(512, 24), (24, 512)]]
        opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], preset, **{"refresh.every": 2})
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params] + [
            v.clone() for p in params for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)
        ]

    assert kopt._DEFER_FACTOR_UPDATES  # the deferred in-place form is part of what is compared
    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
