"""A held symmetric product's rows below the diagonal made as one panel each (``linalg._held_panels``).

DyKAF's ``K`` and ``R̂`` come from the tiled ``sym_product_stats(..., tiles=True)`` as a ``LowerTiles``: its tiles
on and below the diagonal, read by ``split_sandwich`` and written scaled with their mirrors by ``LowerTiles.write``.
Where the processor runs panels faster (not on AMD processors), a row's tiles below the diagonal are made as one
panel and held as views of it. Both forms run here on every processor (``_held_panels`` set either way), and each
is checked against float64 products made densely, and the two against each other: a panel's tiles taken from the
wrong columns, a row left out of the write or of the split, a panel's mirror or a reduction of the wrong weight
each fail one of these.
"""

import pytest
import torch

from kronopt import linalg
from tests.strategies import generator, held_matrix, randn, spd_matrix

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return randn(generator(seed), *shape, dtype=dtype)


def _sym(b: int, d: int, seed: int) -> torch.Tensor:
    return spd_matrix(generator(seed), b, d, log10_range=(-1.0, 1.0))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max())


def _held(monkeypatch, panels: bool, X, A, B, *, beta, alpha, other=None, tile=3):
    """``sym_product_stats(..., tiles=True)`` with tiles of ``tile`` from side 1, its rows as panels or tile by tile."""
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 1)
    monkeypatch.setattr(linalg, "_GRAM_TILE", tile)
    monkeypatch.setattr(linalg, "_held_panels", lambda: panels)
    return linalg.sym_product_stats(X, A, B, beta=beta, alpha=alpha, other=other, tiles=True)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d", [4, 7, 9, 12])
@pytest.mark.parametrize("per_block", [False, True], ids=["beta", "block-beta"])
@pytest.mark.parametrize("b", [1, 3])
def test_a_held_product_by_panels_is_the_float64_product(monkeypatch, dtype, d, per_block, b):
    """Rows as panels: every row below the first holds one contiguous panel whose tiles are its views; the matrix
    they hold, ``⟨P, Y⟩`` and ``‖P‖`` are the float64 product's to rounding, and the tile-by-tile form's."""
    k = 5
    X, Y = _sym(b, d, seed=d).to(dtype), _sym(b, d, seed=d + 1).to(dtype)
    # a sandwich (F S) Fᵀ: symmetric in exact arithmetic, as sym_product asks
    F, S = _randn(b, d, k, seed=d + 2), _sym(b, k, seed=d + 3)
    A, B = (F @ S).to(dtype), F.to(dtype)
    beta = (torch.rand(b, 1, 1, generator=generator(d), dtype=F64) + 0.5).to(dtype) if per_block else 0.6
    expected = (beta.double() if per_block else beta) * X.double() + 0.3 * (A.double() @ B.double().mT)
    tol = 1e-12 if dtype == F64 else 2e-6
    results = {}
    for panels in (True, False):
        P, dot, norm = _held(monkeypatch, panels, X, A, B, beta=beta, alpha=0.3, other=Y)
        rows = len(P.slices)
        if panels:
            assert sorted(P.panels) == list(range(1, rows))
            for i, panel in P.panels.items():
                assert panel.is_contiguous() and panel.shape == (b, P.slices[i].stop - P.slices[i].start, P.slices[i].start)
                for j in range(i):
                    assert P.tiles[i, j].data_ptr() == panel[..., P.slices[j]].data_ptr()
        else:
            assert not P.panels
        D = held_matrix(P)
        assert _rel(D, expected) < tol
        assert _rel(dot.view(b), (expected * Y.double()).sum((-2, -1))) < tol
        assert _rel(norm.view(b), expected.norm(dim=(-2, -1))) < tol
        results[panels] = D
    assert _rel(results[True], results[False].double()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.complex64], ids=["f32", "f64", "c64"])
@pytest.mark.parametrize("d", [5, 9, 13])
def test_write_of_panels_is_the_dense_matrix_scaled_bit_for_bit(monkeypatch, dtype, d):
    """``LowerTiles.write`` with a panel a row: each panel and its mirror scaled into place, the same bits as
    the dense matrix scaled, into a new tensor or over NaN; the panels only read."""
    b = 2
    monkeypatch.setattr(linalg, "_GRAM_TILE", 4)
    P = linalg.LowerTiles(torch.Size((b, d, d)), dtype, torch.device("cpu"))
    g = generator(d)
    for i, I in enumerate(P.slices):
        t = torch.randn(b, I.stop - I.start, I.stop - I.start, generator=g, dtype=F64)
        P.tiles[i, i] = (t + t.mT).to(dtype)
        if i:
            P.hold_panel(i, torch.randn(b, I.stop - I.start, I.start, generator=g, dtype=F64).to(dtype))
    dense = held_matrix(P)
    before = {i: p.clone() for i, p in P.panels.items()}
    scale = torch.rand(b, 1, 1, generator=g, dtype=F64).add(0.5).to(dtype)
    calls = []
    real_mul = torch.mul
    monkeypatch.setattr(torch, "mul", lambda *a, **kw: calls.append(1) or real_mul(*a, **kw))
    for out in (None, torch.full((b, d, d), float("nan"), dtype=dtype)):
        calls.clear()
        W = P.write(out, scale=scale)
        assert out is None or W is out
        assert torch.equal(W, W.mT) and torch.equal(W, dense * scale)
        rows = len(P.slices)
        # a panel in one placement and (real dtypes) one mirror, a diagonal tile in one: not one a tile
        assert len(calls) == rows + (rows - 1) * (1 if dtype.is_complex else 2)
    assert all(torch.equal(P.panels[i], p) for i, p in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("paneled", [(1,), (2,), (1, 3)], ids=str)
def test_a_middle_held_partly_by_panels_is_read_whole(monkeypatch, dtype, paneled):
    """Rows held by panels beside rows held tile by tile (no product makes such a middle, but ``hold_panel`` may):
    ``write`` gives the dense matrix scaled bit for bit and ``split_sandwich`` the float64 product."""
    b, d = 2, 15
    monkeypatch.setattr(linalg, "_GRAM_TILE", 4)
    P = linalg.LowerTiles(torch.Size((b, d, d)), dtype, torch.device("cpu"))
    g = generator(sum(paneled))
    for i, I in enumerate(P.slices):
        t = torch.randn(b, I.stop - I.start, I.stop - I.start, generator=g, dtype=F64)
        P.tiles[i, i] = (t + t.mT).to(dtype)
        if i in paneled:
            P.hold_panel(i, torch.randn(b, I.stop - I.start, I.start, generator=g, dtype=F64).to(dtype))
        else:
            for j, J in enumerate(P.slices[:i]):
                P.tiles[i, j] = torch.randn(b, I.stop - I.start, J.stop - J.start, generator=g, dtype=F64).to(dtype)
    assert sorted(P.panels) == sorted(paneled)
    dense = held_matrix(P)
    scale = torch.tensor([0.75, 1.5], dtype=dtype).view(b, 1, 1)
    assert torch.equal(P.write(scale=scale), dense * scale)
    A = _randn(b, 3, d, seed=7, dtype=dtype)
    out = linalg.split_sandwich(A, P, alpha=0.5)
    expected = 0.5 * (A.double() @ dense.double() @ A.double().mT)
    assert torch.equal(out, out.mT) and _rel(out, expected) < (1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d", [5, 9, 12])
def test_split_sandwich_of_held_panels_is_the_float64_product(monkeypatch, dtype, d):
    """``α A S Aᵀ`` from a middle held by panels: the float64 product of the matrix it holds, exactly symmetric,
    the tile-by-tile middle's to rounding, the panels only read."""
    b = 2
    X, F = _sym(b, d, seed=3 * d).to(dtype), _randn(b, d, 4, seed=3 * d + 1, dtype=dtype)
    alpha = torch.tensor([0.5, 2.0], dtype=dtype).view(b, 1, 1)
    outs = {}
    for panels in (True, False):
        S, _, _ = _held(monkeypatch, panels, X, F, F, beta=0.6, alpha=0.3)
        assert bool(S.panels) is panels
        before = {key: t.clone() for key, t in S.tiles.items()}
        D = held_matrix(S).double()
        rows = len(S.slices)
        for k in (1, 3):
            A = _randn(b, k, d, seed=k + d, dtype=dtype)
            adds, diagonal = [], []
            real_addmm = linalg.addmm_
            # the accumulating products apart from the diagonal tiles' (made with beta = 0)
            monkeypatch.setattr(
                linalg, "addmm_",
                lambda *a, **kw: (diagonal if kw.get("beta", 1.0) == 0 else adds).append(1) or real_addmm(*a, **kw),
            )
            out = linalg.split_sandwich(A, S, alpha=alpha)
            monkeypatch.setattr(linalg, "addmm_", real_addmm)
            # one product a row below the first by panels, one a tile below the diagonal by tiles
            assert len(adds) == (rows - 1 if panels else rows * (rows - 1) // 2) and len(diagonal) == rows
            expected = alpha.double() * (A.double() @ D @ A.double().mT)
            assert out.dtype == dtype and torch.equal(out, out.mT)
            assert _rel(out, expected) < (1e-12 if dtype == F64 else 2e-6)
            outs[panels, k] = out
        assert all(torch.equal(S.tiles[key], t) for key, t in before.items())
    for k in (1, 3):
        assert _rel(outs[True, k], outs[False, k].double()) < (1e-12 if dtype == F64 else 2e-6)


@pytest.mark.parametrize(
    ("shape", "split"),
    [((11, 4), "held"), ((4, 11), "dense"), ((10, 10), None)],
    ids=["tall", "wide", "square"],
)
def test_dykaf_step_by_panels_is_the_step_by_tiles(monkeypatch, shape, split):
    """DyKAF's KSL step with its products by tiles of 3 and its larger side's sandwich split (``K`` or ``R̂`` held):
    by panels the factors the tiles give, to float64 rounding, exactly symmetric; and so through the deferred
    write into the state's own stacks.

    Each case's route is asserted, so that none passes by not reaching what it is about: a tall block splits
    ``Gᵀ K G`` with ``K`` held (its rows by panels, or tile by tile), a wide one ``G R Gᵀ`` with ``R`` dense, and
    ``R̂`` (wide, square) or ``K`` (tall) is held and written from its panels. A square block has no larger side,
    so no split (``split_pays`` asks the middle's side to exceed the outer one's): its case covers the held
    ``R̂``'s write from panels alone."""
    m, n = shape
    L, R, G = _sym(2, m, seed=m), _sym(2, n, seed=n + 50), _randn(2, m, n, seed=m * n)
    monkeypatch.setattr(linalg, "_SPLIT_SANDWICH_MIN", 1)
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 1)
    monkeypatch.setattr(linalg, "_GRAM_TILE", 3)
    splits, writes = [], []  # per call: its middle's form; per write of held tiles: whether by panels
    real_split, real_write = linalg.split_sandwich, linalg.LowerTiles.write

    def split_sandwich(A, S, **kw):
        splits.append(("held", bool(S.panels)) if isinstance(S, linalg.LowerTiles) else ("dense", False))
        return real_split(A, S, **kw)

    def write(self, *a, **kw):
        writes.append(bool(self.panels))
        return real_write(self, *a, **kw)

    monkeypatch.setattr(linalg, "split_sandwich", split_sandwich)
    monkeypatch.setattr(linalg.LowerTiles, "write", write)
    made = {}
    for panels in (True, False):
        monkeypatch.setattr(linalg, "_held_panels", lambda panels=panels: panels)
        splits.clear()
        writes.clear()
        L1, R1 = linalg.projector_split_ksl(L, R, G, 0.9)
        records: list[linalg.DeferredWrite] = []
        L2, R2 = L.clone(), R.clone()
        linalg.projector_split_ksl(L2, R2, G, 0.9, defer=records)
        for record in records:
            record.into(record.target)
        # two steps (returned, deferred): each one split of its larger side's sandwich, one held product written
        expected_splits = {"held": [("held", panels)] * 2, "dense": [("dense", False)] * 2, None: []}[split]
        assert splits == expected_splits
        assert writes == [panels] * 2
        assert torch.equal(L1, L1.mT) and torch.equal(R1, R1.mT)
        assert torch.equal(L2, L1) and torch.equal(R2, R1)
        made[panels] = (L1, R1)
    for by_panels, by_tiles in zip(made[True], made[False]):
        torch.testing.assert_close(by_panels, by_tiles, rtol=1e-12, atol=1e-14)
