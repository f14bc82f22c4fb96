"""Review of the forty-fifth session's four commits (50bef01, 081056c, 6997bce, 3f71eeb).

``split_sandwich`` making ``A T`` whole and ``H = (A T) Aᵀ`` in one product a block; DyKAF's KSL step scaling
``R̂`` by the reciprocal of ``√S``; ``split_pays`` splitting a dense middle on oneDNN's path only from an outer
side of ``_SPLIT_DENSE_MIN_OUTER`` (held tiles as before, ``_ksl``'s tall case); the KL restricted update's
``"power"`` increment as ``Gᵀ (Q_L W)``. Every value check is against a value made another way: float64 dense
products, the KSL step written out from its docstring's formulas in float64, pro_kl_shampoo.md §6–7's identities
in float64, or the other tracker.
"""

import math

import attrs
import pytest
import torch

import kronopt
from kronopt import linalg
from kronopt.factors import KlKronFactors
from kronopt.types import BasisState, Layout, StepContext
from tests.strategies import held_matrix
from tests.torch_compat import assert_block_as_alone

pytestmark = pytest.mark.usefixtures("one_thread")

_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_MODES = [
    pytest.param(True, id="onednn", marks=pytest.mark.skipif(not _ONEDNN, reason="no oneDNN")),
    pytest.param(False, id="mkl"),
]
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _sym(b: int, d: int, seed: int) -> torch.Tensor:
    X = _randn(b, d, d, seed=seed)
    return (X + X.mT) / 2


def _orthonormal(b: int, n: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(_randn(b, n, n, seed=seed))
    return Q


def _spd(b: int, n: int, seed: int) -> torch.Tensor:
    F = _randn(b, n, n + 3, seed=seed)
    return F @ F.mT / (n + 3) + 0.1 * torch.eye(n, dtype=F64)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative Frobenius error over the blocks."""
    num = torch.linalg.matrix_norm(x.double() - ref)
    den = torch.linalg.matrix_norm(ref)
    return float((num / den).max())


def _upper_tiles_nan(S: torch.Tensor, tile: int) -> torch.Tensor:
    """``S`` with NaN in its tiles above the diagonal (which ``split_sandwich`` must not read)."""
    index = torch.arange(S.shape[-1]) // tile
    return S.masked_fill(index.view(-1, 1) < index.view(1, -1), float("nan"))


def _same_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


def _no_shared_memory(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    return all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)


# --------------------------------------------------------------------------------------------------------------
# split_sandwich: A T whole, H = (A T) Aᵀ in one product
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("per_block", [False, True], ids=["scalar-alpha", "block-alpha"])
def test_split_sandwich_of_a_dense_middle_is_the_float64_product(monkeypatch, tile, dtype, per_block):
    """α A S Aᵀ from the lower tiles of a dense ``S`` (NaN above them: never read), uneven last tiles, b = 1..3,
    k = 1..5: exactly symmetric, the float64 product to rounding, inputs untouched, a result of its own."""
    monkeypatch.setattr(linalg, "_GRAM_TILE", tile)
    seed = 100 * tile + (7 if per_block else 3)
    for b in (1, 2, 3):
        for k in (1, 3, 5):
            for d in (1, tile + 1, 7, 10):
                seed += 1
                A = _randn(b, k, d, seed=seed).to(dtype)
                S = _sym(b, d, seed=seed + 5000).to(dtype)
                alpha = (torch.rand(b, 1, 1, generator=_gen(seed), dtype=F64) + 0.5).to(dtype) if per_block else 0.7
                S_in = _upper_tiles_nan(S, tile)
                A0, S0 = A.clone(), S_in.clone()
                out = linalg.split_sandwich(A, S_in, alpha=alpha)
                expected = (alpha.double() if per_block else alpha) * (A.double() @ S.double() @ A.double().mT)
                assert out.shape == (b, k, k) and out.dtype == dtype, (b, k, d)
                assert torch.equal(out, out.mT), (b, k, d)
                tol = 1e-12 if dtype == F64 else 2e-6
                scale = expected.abs().amax().item() + 1e-30
                torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
                assert torch.equal(A, A0) and _same_nan(S_in, S0)
                assert _no_shared_memory(out, A, S_in)


@pytest.mark.parametrize("tile", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_split_sandwich_of_held_tiles_is_the_float64_product(monkeypatch, tile, dtype):
    """A ``LowerTiles`` middle from ``sym_product_stats(..., tiles=True)`` (tiles of 2–4, the grid it was made
    with kept whatever ``_GRAM_TILE`` says later): the float64 product of the matrix its tiles hold, exactly
    symmetric, the tiles untouched."""
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 1)
    seed = 40 * tile
    for b in (1, 3):
        for d in (5, 9):
            seed += 1
            monkeypatch.setattr(linalg, "_GRAM_TILE", tile)
            X = _sym(b, d, seed=seed).to(dtype)
            F = _randn(b, d, 4, seed=seed + 1).to(dtype)
            held, _, _ = linalg.sym_product_stats(X, F, F, beta=0.6, alpha=0.3, tiles=True)
            assert isinstance(held, linalg.LowerTiles) and held.slices[0] == slice(0, min(tile, d))
            D = held_matrix(held)
            # the tiles are the tiled product: βX + α F Fᵀ to rounding (checked apart from split_sandwich)
            torch.testing.assert_close(D.double(), 0.6 * X.double() + 0.3 * F.double() @ F.double().mT,
                                       rtol=1e-5, atol=1e-5)
            tiles0 = {key: t.clone() for key, t in held.tiles.items()}
            alpha = torch.tensor([0.5, 1.25, 2.0][:b], dtype=dtype).view(b, 1, 1)
            for k in (1, 4):
                A = _randn(b, k, d, seed=seed + 10 + k).to(dtype)
                expected = alpha.double() * (A.double() @ D.double() @ A.double().mT)
                for later_tile in (tile, 1, 256):  # the held grid is read as made
                    monkeypatch.setattr(linalg, "_GRAM_TILE", later_tile)
                    out = linalg.split_sandwich(A, held, alpha=alpha)
                    assert out.dtype == dtype and torch.equal(out, out.mT)
                    tol = 1e-12 if dtype == F64 else 2e-6
                    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().amax().item())
                    assert _no_shared_memory(out, A, *held.tiles.values())
            assert all(torch.equal(held.tiles[key], t) for key, t in tiles0.items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_split_sandwich_of_empty_sides(monkeypatch, dtype):
    """d = 0: zeros ``(b k k)`` of the inputs' dtype (for a dense and a held middle); k = 0: ``(b 0 0)``."""
    monkeypatch.setattr(linalg, "_GRAM_TILE", 2)
    for b, k in ((1, 3), (3, 1), (2, 0)):
        out = linalg.split_sandwich(torch.zeros(b, k, 0, dtype=dtype), torch.zeros(b, 0, 0, dtype=dtype), alpha=0.5)
        assert out.shape == (b, k, k) and out.dtype == dtype and not out.any()
        held = linalg.LowerTiles(torch.Size((b, 0, 0)), dtype, torch.device("cpu"))
        out = linalg.split_sandwich(torch.zeros(b, k, 0, dtype=dtype), held)
        assert out.shape == (b, k, k) and out.dtype == dtype and not out.any()
    out = linalg.split_sandwich(torch.zeros(2, 0, 5, dtype=dtype), _sym(2, 5, seed=1).to(dtype))
    assert out.shape == (2, 0, 0) and out.dtype == dtype


def test_split_sandwich_with_a_float64_alpha_keeps_a_float32_result():
    A, S = _randn(2, 3, 9, seed=2, dtype=torch.float32), _sym(2, 9, seed=3).float()
    alpha = torch.tensor([0.3, 3.0], dtype=F64).view(2, 1, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linalg, "_GRAM_TILE", 4)
        out = linalg.split_sandwich(A, S, alpha=alpha)
    assert out.dtype == torch.float32 and torch.equal(out, out.mT)
    expected = alpha * (A.double() @ S.double() @ A.double().mT)
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().amax().item())


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("middle", ["dense", "held", "held-panels"])
@pytest.mark.parametrize("b", [1, 2])
def test_split_sandwich_at_onednn_sizes_is_the_float64_product(monkeypatch, onednn, middle, b):
    """k = 256, d = 768, float32: the tile products go to oneDNN where forced (its column blocks of A made once,
    A itself in H's product), to MKL otherwise. The float64 product to rounding, exactly symmetric, a block in
    the stack the same bits as alone, the inputs untouched."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    k, d = 256, 768
    A = _randn(b, k, d, seed=60 + b, dtype=torch.float32)
    F = _randn(b, d, 300, seed=61 + b, dtype=torch.float32) / math.sqrt(300)
    X = _sym(b, d, seed=62 + b).float()
    if middle == "dense":
        S = X + F @ F.mT
        S = (S + S.mT) / 2
        S_in = _upper_tiles_nan(S, linalg._gram_tile(d))
        assert linalg._by_onednn(A[..., :256], S[:, :256, :256]) is onednn
    else:  # held: its tiles made apart, or a row's as one panel (linalg._held_panels set either way)
        monkeypatch.setattr(linalg, "_held_panels", lambda: middle == "held-panels")
        S_in, _, _ = linalg.sym_product_stats(X, F, F, beta=1.0, alpha=1.0, tiles=True)
        assert isinstance(S_in, linalg.LowerTiles) and bool(S_in.panels) is (middle == "held-panels")
        S = held_matrix(S_in)
    alpha = torch.tensor([0.75, 1.5][:b], dtype=torch.float32).view(b, 1, 1)
    A0 = A.clone()
    out = linalg.split_sandwich(A, S_in, alpha=alpha)
    expected = alpha.double() * (A.double() @ S.double() @ A.double().mT)
    assert out.shape == (b, k, k) and out.dtype == torch.float32
    assert torch.equal(out, out.mT)
    assert _rel(out, expected) < 2e-6
    assert torch.equal(A, A0)
    if b > 1:
        one = S_in[1:2] if middle == "dense" else None
        if middle != "dense":
            one = linalg.LowerTiles(torch.Size((1, d, d)), S_in.dtype, S_in.device)
            one.tiles = {key: t[1:2].contiguous() for key, t in S_in.tiles.items()}
            for i, panel in S_in.panels.items():  # rows held as panels (linalg._held_panels) stay so
                one.hold_panel(i, panel[1:2].contiguous())
        alone = linalg.split_sandwich(A[1:2].contiguous(), one, alpha=alpha[1:2])
        assert torch.equal(alone[0], out[1])


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
def test_split_sandwich_of_a_transposed_outer_side_is_the_float64_product(monkeypatch, onednn):
    """The tall DyKAF block's ``Gᵀ`` comes as a transposed view: the same values as from its contiguous copy, to
    rounding, and the float64 product."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    G = _randn(2, 768, 256, seed=70, dtype=torch.float32)
    S = _sym(2, 768, seed=71).float()
    out = linalg.split_sandwich(G.mT, S, alpha=0.5)
    expected = 0.5 * (G.double().mT @ S.double() @ G.double())
    assert torch.equal(out, out.mT) and _rel(out, expected) < 2e-6


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
def test_sandwich_of_an_expanded_middle_is_the_float64_product(monkeypatch, onednn):
    """``sandwich`` (Fisher's ``G R Gᵀ`` with one ``R`` expanded over the stack) on either side of the split rule."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    G = _randn(2, 256, 768, seed=72, dtype=torch.float32)
    R = _sym(1, 768, seed=73).float()[0]
    out = linalg.sandwich(G, R.expand(2, 768, 768))
    expected = G.double() @ R.double() @ G.double().mT
    assert torch.equal(out, out.mT) and _rel(out, expected) < 2e-6


# --------------------------------------------------------------------------------------------------------------
# split_pays: the decision table
# --------------------------------------------------------------------------------------------------------------


def _pays(k, d, *, held=False, device="cpu", dtype=torch.float32, grad=None):
    A = torch.empty(1, k, d, device=device, dtype=dtype)
    S = torch.empty(1, d, d, device=device, dtype=dtype)
    if grad == "A":
        A.requires_grad_(True)
    elif grad == "S":
        S.requires_grad_(True)
    return linalg.split_pays(A, S, held=held)


# (k, d): expected on oneDNN's path for a dense middle; held tiles and MKL's path split wherever the old rule did
_TABLE = [
    ((256, 1024), False), ((383, 1024), False), ((384, 1024), True), ((256, 768), False), ((767, 768), True),
    ((512, 2048), True), ((8, 768), True), ((63, 1024), True),
    # a first tile 256 × 256 against k rows: oneDNN from 192³ multiply-adds, k = 108 (108 · 256² = 192³)
    ((107, 1024), True), ((108, 1024), False),
]
_NEVER = [(768, 768), (1024, 768), (256, 512), (256, 767), (0, 0)]


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
def test_split_pays_decision_table(monkeypatch, onednn):
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    assert linalg._SPLIT_DENSE_MIN_OUTER == 384 and linalg._SPLIT_SANDWICH_MIN == 768
    for (k, d), on_onednn in _TABLE:
        assert _pays(k, d) is (on_onednn if onednn else True), (k, d)
        assert _pays(k, d, held=True) is True, (k, d)
    for k, d in _NEVER:
        assert _pays(k, d) is False and _pays(k, d, held=True) is False, (k, d)
    for held in (False, True):
        assert _pays(256, 1024, held=held, device="meta") is False
        assert _pays(512, 2048, held=held, device="meta") is False
        for grad in ("A", "S"):
            assert _pays(256, 1024, held=held, grad=grad) is False
            assert _pays(512, 2048, held=held, grad=grad) is False
            with torch.no_grad():  # nothing tracked: the rule as for plain tensors
                assert _pays(256, 1024, held=held, grad=grad) is (held or not onednn)
                assert _pays(512, 2048, held=held, grad=grad) is True
    # products oneDNN never takes (another dtype), or tiles too small for it: the split, as on MKL's path
    for dtype in (torch.float64, torch.bfloat16):
        assert _pays(256, 1024, dtype=dtype) is True
    monkeypatch.setattr(linalg, "_GRAM_TILE", 32)
    assert _pays(256, 1024) is True and _pays(256, 767) is False


def test_split_pays_on_the_processors_own_choice_follows_it(monkeypatch):
    """``_ONEDNN_FLOAT32 = None``: the dense rule follows ``_onednn_products_fast``."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", None)
    for fast in (False, True):
        monkeypatch.setattr(linalg, "_onednn_products_fast", lambda fast=fast: fast)
        assert _pays(256, 1024) is (not fast) and _pays(256, 1024, held=True) and _pays(384, 1024)


# --------------------------------------------------------------------------------------------------------------
# projector_split_ksl: R̂ times 1/√S; the split taken per split_pays (held=True for the tall case)
# --------------------------------------------------------------------------------------------------------------


def _ksl_state(b, m, n, seed):
    G = _randn(b, m, n, seed=seed)
    Lf, Rf = _randn(b, m, m, seed=seed + 1), _randn(b, n, n, seed=seed + 2)
    L, R = Lf @ Lf.mT / m, Rf @ Rf.mT / n
    R = R * (torch.linalg.matrix_norm(L) / torch.linalg.matrix_norm(R)).view(b, 1, 1)
    return L, R, G


def _ksl_reference(L, R, G, beta, fresh=None):
    """The KSL step written out from ``projector_split_ksl``'s docstring, in float64, with dense products:
    K = rL + G R̄ Gᵀ, U = K/‖K‖, S̃ = r⟨U, L⟩, R̂ = S̃ R̄ + Gᵀ U G, S = ‖R̂‖, (√S U, R̂/√S), on the state
    scaled by √β per factor and G by √(1−β); a fresh block from L = 0 in the direction R̄ = I/√n."""
    L, R, G = L.double(), R.double(), G.double()
    b, n = R.shape[0], R.shape[-1]
    L0, R0, G0 = math.sqrt(beta) * L, math.sqrt(beta) * R, math.sqrt(1 - beta) * G
    r = torch.linalg.matrix_norm(R0).view(b, 1, 1)
    R_bar = R0 / r
    if fresh is not None:
        f = fresh.view(b, 1, 1)
        L0 = torch.where(f, 0.0, L0)
        R_bar = torch.where(f, torch.eye(n, dtype=F64) / math.sqrt(n), R_bar)
        r = torch.where(f, 0.0, r)
    K = r * L0 + G0 @ R_bar @ G0.mT
    U = K / torch.linalg.matrix_norm(K).view(b, 1, 1)
    S_tilde = r * (U * L0).sum((-2, -1), keepdim=True)
    R_hat = S_tilde * R_bar + G0.mT @ U @ G0
    S = torch.linalg.matrix_norm(R_hat).view(b, 1, 1)
    return S.sqrt() * U, R_hat / S.sqrt()


def _spy_splits(monkeypatch):
    calls = []
    real = linalg.split_sandwich

    def spy(A, S, **kw):
        calls.append(type(S).__name__)
        return real(A, S, **kw)

    monkeypatch.setattr(linalg, "split_sandwich", spy)
    return calls


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("shape", [(2, 256, 1024), (1, 1024, 256), (2, 1024, 256)], ids=["wide", "tall-1", "tall-2"])
@pytest.mark.parametrize("fresh", [False, True])
def test_ksl_step_is_its_formulas_in_float64(monkeypatch, onednn, shape, fresh):
    """The float32 step against its defining formulas in float64 (dense products), on the paths the split rule
    picks: a wide 256 × 1024 block splits ``G R̄ Gᵀ`` (dense R) on MKL's path only, a tall 1024 × 256 block
    splits ``Gᵀ K G`` (K held as its tiles) on both. Exactly symmetric, ‖L'‖ = ‖R'‖ to rounding, inputs untouched."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    calls = _spy_splits(monkeypatch)
    b, m, n = shape
    L64, R64, G64 = _ksl_state(b, m, n, seed=m + 3 * n + b)
    mask = torch.tensor([True] + [False] * (b - 1)) if fresh else None
    L, R, G = L64.float(), R64.float(), G64.float()
    L0, R0, G0 = L.clone(), R.clone(), G.clone()
    new_L, new_R = linalg.projector_split_ksl(L, R, G, 0.9, fresh=mask)
    if m < n:
        assert calls == ([] if onednn else ["Tensor"])
    else:
        assert calls == ["LowerTiles"]
    ref_L, ref_R = _ksl_reference(L, R, G, 0.9, fresh=mask)
    assert new_L.dtype == new_R.dtype == torch.float32
    assert torch.equal(new_L, new_L.mT) and torch.equal(new_R, new_R.mT)
    assert _rel(new_L, ref_L) < 2e-5 and _rel(new_R, ref_R) < 2e-5
    torch.testing.assert_close(torch.linalg.matrix_norm(new_L.double()), torch.linalg.matrix_norm(new_R.double()),
                               rtol=1e-5, atol=0)
    assert torch.equal(L, L0) and torch.equal(R, R0) and torch.equal(G, G0)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9)], ids=["tall", "wide"])
def test_ksl_step_in_float64_is_its_formulas(shape):
    """Small float64 blocks: the formulas to 1e-12 (a wrong scaling of R̂ by any factor ≠ 1 fails)."""
    m, n = shape
    L, R, G = _ksl_state(3, m, n, seed=80)
    new_L, new_R = linalg.projector_split_ksl(L, R, G, 0.8)
    ref_L, ref_R = _ksl_reference(L, R, G, 0.8)
    torch.testing.assert_close(new_L, ref_L, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(new_R, ref_R, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256)], ids=["wide", "tall"])
def test_ksl_block_beside_an_out_of_range_neighbour_keeps_its_bits(monkeypatch, onednn, shape):
    """A neighbour whose G is 1e12 times larger sends the stack through the σ-scaled step (σ ≠ 1 on the first
    block too): the first block's factors are those it gets alone (plain), bit for bit, and those of the
    device's always-scaled path; the neighbour's follow the float64 formulas."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    m, n = shape
    L64, R64, G64 = _ksl_state(2, m, n, seed=90 + m)
    L, R, G = L64.float(), R64.float(), G64.float()
    G[1] *= 1e12
    sigma = linalg.power_of_two_scale(linalg.block_norm(R), linalg.block_norm(G)).view(-1)
    assert float(sigma[0]) != 1.0 and float(sigma[1]) != 1.0
    runs = []
    real = linalg._ksl
    monkeypatch.setattr(linalg, "_ksl", lambda *a, **kw: runs.append(a[5] is None) or real(*a, **kw))
    alone = linalg.projector_split_ksl(L[:1].clone(), R[:1].clone(), G[:1].clone(), 0.9)
    assert runs == [True]  # in range: the plain step
    runs.clear()
    together = linalg.projector_split_ksl(L, R, G, 0.9)
    assert runs == [True, False]  # the plain step, refused, then the scaled one
    for t, a in zip(together, alone):
        assert torch.equal(t[:1], a)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", False)
    device = linalg.projector_split_ksl(L[:1].clone(), R[:1].clone(), G[:1].clone(), 0.9)
    for t, a in zip(device, alone):
        assert torch.equal(t, a)
    ref_L, ref_R = _ksl_reference(L[1:], R[1:], G[1:], 0.9)
    assert _rel(together[0][1:], ref_L) < 2e-5 and _rel(together[1][1:], ref_R) < 2e-5
    assert torch.equal(together[0], together[0].mT) and torch.equal(together[1], together[1].mT)


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("shape", [(2, 256, 1024), (2, 1024, 256)], ids=["wide", "tall"])
@pytest.mark.parametrize("neighbour", [False, True], ids=["in-range", "scaled"])
def test_ksl_deferred_writes_are_the_returned_step_bit_for_bit(monkeypatch, onednn, shape, neighbour):
    """``defer=[]`` then each record's ``into(target)``: the returned step's bits, in the state's own stacks,
    on the plain and on the σ-scaled step."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    L64, R64, G64 = _ksl_state(*shape, seed=95)
    L, R, G = L64.float(), R64.float(), G64.float()
    if neighbour:
        G[1] *= 1e12
    new_L, new_R = linalg.projector_split_ksl(L.clone(), R.clone(), G, 0.9)
    records: list = []
    Lw, Rw = L.clone(), R.clone()
    got = linalg.projector_split_ksl(Lw, Rw, G, 0.9, defer=records)
    assert got[0] is Lw and got[1] is Rw and len(records) == 2
    assert torch.equal(Lw, L) and torch.equal(Rw, R)  # nothing written before the state write
    for record in records:
        record.into(record.target)
    assert torch.equal(Lw, new_L) and torch.equal(Rw, new_R)


def test_ksl_with_nothing_to_integrate_is_zero_not_nan():
    """L = R = 0 and G = 0 (√S = 0, its reciprocal taken of the clamped root): zeros, also deferred."""
    L, R, G = torch.zeros(2, 4, 4), torch.zeros(2, 6, 6), torch.zeros(2, 4, 6)
    for defer in (None, []):
        Lw, Rw = L.clone(), R.clone()
        got = linalg.projector_split_ksl(Lw, Rw, G, 0.9, defer=defer)
        for record in defer or []:
            record.into(record.target)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in got)


# --------------------------------------------------------------------------------------------------------------
# KL restricted update: the "power" increment as Gᵀ (Q_L W)
# --------------------------------------------------------------------------------------------------------------


def _kl_case(b, m, n, r, *, side, tracker, seed, dtype=F64, exact_q=True):
    """A KL estimator with one restricted side of rank ``r`` (``side``: which), a random state and basis, and
    the float64 quantities of pro_kl_shampoo.md §6–7 with the restricted side on the right (for ``side =
    "left"`` everything transposed: ``G`` is the block's ``Gᵀ``). ``exact_q``: the full side's basis is
    orthonormal (else perturbed: the identities hold for any ``Q``)."""
    est = KlKronFactors(beta=0.8, clamping=False, tracker=tracker)
    p, q = (m, n) if side == "right" else (n, m)  # the full side's size p, the restricted one's q
    kw = {"rank_right": r} if side == "right" else {"rank_left": r}
    layout = Layout(batch=b, m=m, n=n, left="full" if side == "right" else "restricted",
                    right="restricted" if side == "right" else "full", **kw)
    U = _orthonormal(b, q, seed)[:, :, :r]
    Q = _orthonormal(b, p, seed + 1)
    if not exact_q:
        Q = Q + 1e-2 * _randn(b, p, p, seed=seed + 9)
    F = _spd(b, p, seed + 2)
    s_full = 0.5 + torch.rand(b, p, generator=_gen(seed + 3), dtype=F64)
    s_sub = 0.5 + torch.rand(b, r, generator=_gen(seed + 4), dtype=F64)
    sub = _spd(b, r, seed + 5)
    mu = 0.2 + torch.rand(b, generator=_gen(seed + 6), dtype=F64)
    st = est.init(layout, dtype=F64, device=torch.device("cpu"))
    if side == "right":
        st = attrs.evolve(st, L=F, s_L=s_full, s_R=s_sub, sub_R=sub, mu_R=mu)
        basis = BasisState(Q_L=Q, Q_R=U, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))
    else:
        st = attrs.evolve(st, R=F, s_R=s_full, s_L=s_sub, sub_L=sub, mu_L=mu)
        basis = BasisState(Q_L=U, Q_R=Q, lam_L=None, lam_R=None, failures=torch.zeros(b, dtype=torch.int64))
    G = _randn(b, m, n, seed=seed + 7)
    Gr = G if side == "right" else G.mT  # the restricted side on the right
    if tracker == "sketch":  # as reset at a refresh: U S
        power = U @ sub
        st = attrs.evolve(st, **({"power_R": power} if side == "right" else {"power_L": power}))
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in attrs.asdict(st, recurse=False).items()}
    st = type(st)(**cast)
    basis = attrs.evolve(basis, Q_L=basis.Q_L.to(dtype), Q_R=basis.Q_R.to(dtype))
    ctx = StepContext(step=4, layout=layout, basis=basis, refresh_follows=True)
    return est, st, ctx, G.to(dtype), {"U": U, "Q": Q, "s": s_full, "sub": sub, "mu": mu, "G": Gr, "rho": est.beta}


def _power_identity(ref):
    """R̂_new U = ρ U S_old + (1−ρ)/m · Gᵀ L̂⁻¹ G U with L̂⁻¹ = Q_L diag(s_L²) Q_Lᵀ (pro_kl_shampoo.md §7)."""
    U, Q, s, G, rho = ref["U"], ref["Q"], ref["s"], ref["G"], ref["rho"]
    m = G.shape[-2]
    inv_L = Q @ torch.diag_embed(s.square()) @ Q.mT
    return rho * U @ ref["sub"] + (1 - rho) / m * G.mT @ inv_L @ G @ U


def _power_of(new, side):
    return new.power_R if side == "right" else new.power_L


def _sub_of(new, side):
    return new.sub_R if side == "right" else new.sub_L


def _spy_gram_route(monkeypatch):
    """Records whether the complement's rotation ``Q_Lᵀ G P⊥`` was made (``False``: the Gram route, the power
    increment then as Gᵀ (Q_L W))."""
    made = []
    real = linalg.accumulate_two_grams_left_with_energy

    def spy(*a, **kw):
        out = real(*a, **kw)
        made.append(out[2] is not None)
        return out

    monkeypatch.setattr(linalg, "accumulate_two_grams_left_with_energy", spy)
    return made


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", [(1, 5, 8, 3), (3, 6, 10, 2), (2, 4, 12, 4)], ids=["1x5x8", "3x6x10", "2x4x12"])
@pytest.mark.parametrize("exact_q", [True, False], ids=["orthonormal-Q", "perturbed-Q"])
def test_power_product_is_the_spec_identity_in_float64(monkeypatch, side, shape, exact_q):
    """The "power" tracker's product on the Gram route (the restricted side the larger, as the preset keeps it)
    against §7's float64 identity, and against its second form U S_new + (1−ρ)/m P⊥ Ĝᵀ Ŷ."""
    b, p, q, r = shape  # full side p, restricted side q > p
    m, n = (p, q) if side == "right" else (q, p)
    made = _spy_gram_route(monkeypatch)
    est, st, ctx, G, ref = _kl_case(b, m, n, r, side=side, tracker="power", seed=11 * q + p, exact_q=exact_q)
    new = est.update(st, G, ctx)
    assert made == [False]  # the new product's route
    power = _power_of(new, side)
    expected = _power_identity(ref)
    assert power.shape == (b, q, r)
    torch.testing.assert_close(power, expected, rtol=1e-12, atol=1e-12)
    if exact_q:
        U, Q, s, Gr, rho = ref["U"], ref["Q"], ref["s"], ref["G"], ref["rho"]
        G_hat = s.unsqueeze(-1) * (Q.mT @ Gr)
        P_perp = torch.eye(q, dtype=F64) - U @ U.mT
        second = U @ _sub_of(new, side) + (1 - rho) / p * P_perp @ G_hat.mT @ (G_hat @ U)
        torch.testing.assert_close(power, second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 3), (1, 7, 12, 4)])
def test_power_and_sketch_agree_on_the_first_update_after_a_refresh(monkeypatch, side, shape):
    """After a refresh "sketch" holds U S, so one update gives both trackers R̂_new U (§7): the same product
    (one made as Gᵀ (Q_L W), the other assembled from Q_Lᵀ G P⊥), and the same statistics."""
    b, p, q, r = shape
    m, n = (p, q) if side == "right" else (q, p)
    made = _spy_gram_route(monkeypatch)
    out = {}
    for tracker in ("power", "sketch"):
        est, st, ctx, G, _ = _kl_case(b, m, n, r, side=side, tracker=tracker, seed=5 * q)
        out[tracker] = est.update(st, G, ctx)
    assert made == [False, True]  # the two routes
    a, s = out["power"], out["sketch"]
    torch.testing.assert_close(_power_of(a, side), _power_of(s, side), rtol=1e-12, atol=1e-12)
    for name in ("L", "R", "s_L", "s_R", "sub_L", "sub_R", "mu_L", "mu_R"):
        x, y = getattr(a, name), getattr(s, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_power_product_in_float32_at_onednn_sizes_is_the_float64_identity(monkeypatch, onednn, side):
    """256 × 1024 with rank 64 in float32 (Gᵀ (Q_L W) of 1024 × 256 × 64: oneDNN's where forced, its Gᵀ a
    transposed view): the float64 identity to float32 rounding."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    m, n = (256, 1024) if side == "right" else (1024, 256)
    made = _spy_gram_route(monkeypatch)
    est, st, ctx, G, ref = _kl_case(2, m, n, 64, side=side, tracker="power", seed=21, dtype=torch.float32)
    new = est.update(st, G, ctx)
    assert made == [False]
    power = _power_of(new, side)
    assert power.dtype == torch.float32
    assert _rel(power, _power_identity(ref)) < 1e-5


@pytest.mark.parametrize("onednn", _ONEDNN_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(40, 100, 3), (256, 1024, 64), (40, 100, 1), (100, 300, 1)], ids=["40x100r3", "256x1024r64", "40x100r1", "100x300r1"]
)
def test_power_product_of_a_block_in_a_stack_is_its_own(monkeypatch, onednn, side, shape, dtype):
    """A block's update in a stack of three gives the bits it gets alone (DESIGN.md's invariant 4), the new
    product's included. A rank-1 side's products are matrix-vector ones, which MKL rounds by the stack's size
    in the layouts ``bmm`` is handed by default (found by this review, before these commits as after; ``linalg.mm``
    now makes them in the row layout whose bits do not depend on it)."""
    monkeypatch.setattr(linalg, "_ONEDNN_FLOAT32", onednn)
    p, q, r = shape
    m, n = (p, q) if side == "right" else (q, p)
    est, st, ctx, G, _ = _kl_case(3, m, n, r, side=side, tracker="power", seed=31, dtype=dtype)
    together = est.update(st, G, ctx)

    def one(t):
        return t[1:2] if isinstance(t, torch.Tensor) else t

    st1 = type(st)(**{k: one(v) for k, v in attrs.asdict(st, recurse=False).items()})
    basis = attrs.evolve(ctx.basis, Q_L=one(ctx.basis.Q_L), Q_R=one(ctx.basis.Q_R), failures=one(ctx.basis.failures))
    alone = est.update(st1, G[1:2].clone(), attrs.evolve(ctx, layout=attrs.evolve(ctx.layout, batch=1), basis=basis))
    for name in ("L", "R", "s_L", "s_R", "sub_L", "sub_R", "mu_L", "mu_R", "power_L", "power_R"):
        x, y = getattr(together, name), getattr(alone, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert_block_as_alone(x[1:2], y, name)


def test_power_product_is_kept_where_no_refresh_follows(monkeypatch):
    """Without a refresh following, "power" keeps its old product (the new route is not taken)."""
    est, st, ctx, G, _ = _kl_case(2, 5, 9, 3, side="right", tracker="power", seed=3)
    st = attrs.evolve(st, power_R=_randn(2, 9, 3, seed=4))
    new = est.update(st, G, attrs.evolve(ctx, refresh_follows=False))
    assert torch.equal(new.power_R, st.power_R)


@pytest.mark.parametrize("shape", [(6, 16), (16, 6)], ids=["right-restricted", "left-restricted"])
def test_pro_kl_shampoo_power_and_sketch_step_alike_when_refreshed_every_step(shape):
    """Through the optimizer (two blocks in one bucket, float64): refreshed after every update, the two trackers
    build each new subspace from the same product R̂_new U (§7), so the parameters agree to rounding; refreshed
    every 3 updates they differ (the check can see a difference)."""

    def run(tracker, every):
        gen = torch.Generator().manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=F64)) for _ in range(2)]
        opt = kronopt.build([(f"w{i}", w) for i, w in enumerate(ws)], "pro_kl_shampoo",
                            **{"refresh.every": every, "split.rank": 3, "factors.tracker": tracker})
        for _ in range(8):
            for w in ws:
                w.grad = torch.randn(*shape, generator=gen, dtype=F64)
            opt.step()
        return [w.detach().clone() for w in ws]

    for a, b in zip(run("power", 1), run("sketch", 1)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(run("power", 3), run("sketch", 3)))
