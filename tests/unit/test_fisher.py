"""kronopt.app.fisher: the Fisher-approximation lab and ``kronopt fisher``."""

import csv
import json
import sys

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronopt
from kronopt.types import capabilities
from kronopt import linalg
from kronopt.app import fisher
from kronopt.app.cli import main
from tests.strategies import SEEDS, generator, randn

F64 = torch.float64


def _dense_fisher(grads, beta):
    g = grads.reshape(grads.shape[0], -1)
    w = fisher.ema_weights(len(grads), beta)
    return g.mT @ (w.unsqueeze(-1) * g)


def test_track_ema_is_the_closed_form(gen):
    beta = 0.9
    grads = [randn(gen, 4, 3) for _ in range(5)]
    history = fisher.track("ema", grads, beta=beta)
    assert len(history) == 5
    L, R = history[-1]
    w = fisher.ema_weights(5, beta)
    torch.testing.assert_close(L, sum(wi * G @ G.T for wi, G in zip(w, grads)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(R, sum(wi * G.T @ G for wi, G in zip(w, grads)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", [e.key for e in kronopt.FACTORS.entries() if capabilities(e.cls).provides_factors])
def test_track_drives_every_registered_estimator(gen, key):
    grads = [randn(gen, 5, 4) for _ in range(6)]
    history = fisher.track(key, grads)
    for L, R in history:
        assert L.shape == (5, 5) and R.shape == (4, 4)
        assert torch.isfinite(L).all() and torch.isfinite(R).all()
        torch.testing.assert_close(L, L.T, rtol=0, atol=1e-12)


def test_projector_splitting_starts_at_the_exact_nkp(gen):
    grads = torch.stack([randn(gen, 5, 4) for _ in range(3)])
    L, R = fisher.track("projector_splitting", list(grads), beta=0.9)[0]
    w = fisher.ema_weights(1, 0.9)
    met = fisher.fisher_metrics(grads[:1], w, L, R, fisher.exact_nkp(grads[:1], w))
    assert met["gap"] <= 1e-10 and met["gap_s"] <= 1e-6
    assert met["e"] == pytest.approx(met["e_nkp"], abs=1e-10)


@settings(max_examples=10)
@given(seed=SEEDS, T=st.integers(1, 6), beta=st.floats(0.5, 0.99))
def test_metrics_match_the_dense_definitions(seed, T, beta):
    gen = generator(seed)
    m, n = 4, 3
    grads = randn(gen, T, m, n)
    L, R = fisher.track("ema", list(grads), beta=beta)[-1]
    w = fisher.ema_weights(T, beta)
    nkp = fisher.exact_nkp(grads, w)
    met = fisher.fisher_metrics(grads, w, L, R, nkp)
    F = _dense_fisher(grads, beta)
    K = torch.kron(L, R)
    Ks = nkp.sigma[0] * torch.kron(nkp.U[0], nkp.V[0])
    assert met["e"] == pytest.approx(float((F - K).norm() / F.norm()), rel=1e-8, abs=1e-10)
    c = float((F * K).sum() / (K * K).sum())
    assert met["e_s"] == pytest.approx(float((F - c * K).norm() / F.norm()), rel=1e-6, abs=1e-7)
    assert met["gap"] == pytest.approx(float((K - Ks).norm() / Ks.norm()), rel=1e-8, abs=1e-10)
    # the exact NKP is optimal: no Kronecker product does better, and it equals the SVD floor
    assert met["e_nkp"] <= met["e_s"] + 1e-12
    S = torch.linalg.svdvals(linalg.rearrange_kron(F, m, n))
    assert met["e_nkp"] == pytest.approx(float(S[1:].norm() / S.norm()), rel=1e-6, abs=1e-8)


@given(seed=SEEDS)
@settings(max_examples=10)
def test_matrix_free_nkp_equals_the_dense_svd(seed):
    gen = generator(seed)
    grads = randn(gen, 6, 4, 3)
    w = fisher.ema_weights(6, 0.9)
    dense = fisher.exact_nkp(grads, w)
    power = fisher.exact_nkp(grads, w, dense_max=0)
    assert power.iterations >= 1
    torch.testing.assert_close(power.sigma, dense.sigma, rtol=1e-8, atol=0)
    torch.testing.assert_close(
        power.sigma[0] * torch.kron(power.U[0], power.V[0]), dense.sigma[0] * torch.kron(dense.U[0], dense.V[0]), rtol=1e-5, atol=1e-8
    )


def test_sources_are_deterministic_and_shaped():
    for source in fisher.SOURCES:
        a = fisher.gradient_stream(source, 5, 3, 4, seed=1)
        b = fisher.gradient_stream(source, 5, 3, 4, seed=1)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert a[0].shape == ((fisher.CLASSES, fisher.FEATURES) if source == "real" else (5, 3))
    X, y = fisher.byte_dataset(200)
    assert X.shape == (200, 16) and set(X.unique().tolist()) <= {-0.25, 0.25}
    assert y.min() >= 0 and y.max() < fisher.CLASSES and len(y.unique()) >= 3
    with pytest.raises(ValueError, match="unknown source"):
        fisher.gradient_stream("nope", 2, 2, 1)


def test_exact_hessian_matches_autograd(gen):
    X, _ = fisher.byte_dataset(50)
    W = randn(gen, 3, 16) * 0.3
    y = torch.arange(50) % 3

    def loss(w):
        return torch.nn.functional.cross_entropy(X @ w.reshape(3, 16).T, y)

    H = torch.autograd.functional.hessian(loss, W.reshape(-1))  # row-major vec, class-major
    RH = fisher.exact_hessian_rearranged(W, X)
    torch.testing.assert_close(linalg.rearrange_kron(H, 3, 16), RH, rtol=1e-10, atol=1e-12)


def test_estimator_specs_parse():
    assert fisher.parse_estimator("projector_splitting:variant=parallel:beta=0.9") == (
        "projector_splitting",
        {"variant": "parallel", "beta": 0.9},
    )
    with pytest.raises(ValueError, match="NAME=VALUE"):
        fisher.parse_estimator("ema:beta")


def test_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "lab"
    rc = main(
        ["fisher", "--out", str(out), "--source", "anisotropic,real", "--steps", "4,8", "--m", "4", "--n", "3",
         "--estimators", "ema,projector_splitting", "--hessian-rows", "300", "--hessian-epochs", "1",
         "--hessian-optimizers", "soap,dykaf"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "projector_splitting" in text and "Hessian experiment" in text
    for name in ("fisher.csv", "fisher.json", "fisher.png", "hessian.csv", "hessian.json", "hessian.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "fisher.csv").open()))
    assert len(rows) == 2 * 2 * 2
    assert {r["estimator"] for r in rows} == {"ema", "projector_splitting"}
    for r in rows:
        assert 0 <= float(r["e_nkp"]) <= float(r["e_s"]) + 1e-9 <= 1 + 1e-9
    data = json.loads((out / "hessian.json").read_text())
    assert {r["optimizer"] for r in data["final"]} == {"soap", "dykaf"}
    assert all(len(run["curve"]["step"]) == 3 for run in data["runs"])  # 210 training rows, batch 100


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["fisher", "--out", str(tmp_path), "--source", "iid", "--steps", "3", "--m", "3", "--n", "2", "--no-hessian"])
    assert rc == 2
    assert "matplotlib" in capsys.readouterr().err
    rc = main(["fisher", "--out", str(tmp_path), "--source", "iid", "--steps", "3", "--m", "3", "--n", "2", "--no-hessian", "--no-plot"])
    assert rc == 0 and (tmp_path / "fisher.csv").exists()


def _dense_metrics(grads, w, L, R, nkp):
    """The five metrics by their definitions, on F and the Kronecker products formed whole in float64."""
    g = grads.reshape(grads.shape[0], -1)
    F = g.mT @ (w.unsqueeze(-1) * g)
    K = torch.kron(L, R)
    Ks = nkp.sigma[0] * torch.kron(nkp.U[0], nkp.V[0])
    c, cs = (F * K).sum() / (K * K).sum(), (Ks * K).sum() / (K * K).sum()
    return {"e": (F - K).norm() / F.norm(), "e_s": (F - c * K).norm() / F.norm(), "e_nkp": (F - Ks).norm() / F.norm(),
            "gap": (K - Ks).norm() / Ks.norm(), "gap_s": (cs * K - Ks).norm() / Ks.norm()}


@pytest.mark.parametrize("dense_max", [fisher.DENSE_MAX, 0])  # differences formed; expanded norms, then formed
@pytest.mark.parametrize(("m", "n", "T"), [(1, 4, 2), (1, 4, 6), (5, 1, 3), (1, 7, 9)])
def test_an_exact_kronecker_fisher_reads_zero_not_the_square_root_of_rounding(one_thread, dense_max, m, n, T):
    """With one row (or one column) every F is a Kronecker product (1×1 ⊗ R) and the EMA factors are it up to
    scale: e_s, e_nkp and gap_s are 0, and must read at rounding (≤ 1e-14), where the differences of squares
    under a square root read about 1e-8. Catches the cancelling forms coming back, on either path: the sizes that
    form F, and the large-block path (``dense_max=0``) that must fall back to the formed differences."""
    grads = torch.stack(fisher.gradient_stream("iid", m, n, T))
    w = fisher.ema_weights(T, 0.9)
    L, R = fisher.track("ema", list(grads), beta=0.9)[-1]
    met = fisher.fisher_metrics(grads, w, L, R, fisher.exact_nkp(grads, w), dense_max=dense_max)
    assert max(met["e_s"], met["e_nkp"], met["gap_s"]) <= 1e-14, met
    dense = _dense_metrics(grads, w, L, R, fisher.exact_nkp(grads, w))
    assert met["e"] == pytest.approx(float(dense["e"]), rel=1e-12)  # the scale is off: e is not small
    assert met["gap"] == pytest.approx(float(dense["gap"]), rel=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 1e-10])
def test_gap_of_nearly_equal_kronecker_products_keeps_its_digits(eps):
    """L ⊗ R against K* = σ U ⊗ V with L = 2U + ε P and R = 3V (a direction P orthogonal to U): ``gap_s`` is the
    sine of the angle, ε‖P‖/‖2U + εP‖, and ``gap`` is ‖L ⊗ R − K*‖/σ; both must keep most digits at ε = 1e-10,
    where √(1 − cos²) keeps none (it reads ~1e-8). The expected values are hand-derived closed forms."""
    gen = generator(7)
    U = randn(gen, 3, 3)
    U = (U + U.mT) / (U + U.mT).norm()
    V = randn(gen, 4, 4)
    V = (V + V.mT) / (V + V.mT).norm()
    P = randn(gen, 3, 3)
    P = P - (P * U).sum() * U  # orthogonal to U, unit
    P = P / P.norm()
    sigma = 5.0
    nkp = linalg.NearestKron(sigma=torch.tensor([sigma], dtype=F64), U=U[None], V=V[None], iterations=0, residual=0.0)
    L, R = 2 * U + eps * P, 3 * V
    grads = randn(gen, 2, 3, 4)
    met = fisher.fisher_metrics(grads, fisher.ema_weights(2, 0.9), L, R, nkp)
    assert met["gap_s"] == pytest.approx(eps / (4 + eps**2) ** 0.5, rel=1e-6)
    # L ⊗ R − σ U ⊗ V = (6 − σ) U ⊗ V + 3ε P ⊗ V, the two terms orthogonal
    assert met["gap"] == pytest.approx(((6 - sigma) ** 2 + 9 * eps**2) ** 0.5 / sigma, rel=1e-12)
    nkp6 = attrs.evolve(nkp, sigma=torch.tensor([6.0], dtype=F64))  # the scale matches: gap is 3ε/6
    met = fisher.fisher_metrics(grads, fisher.ema_weights(2, 0.9), L, R, nkp6)
    assert met["gap"] == pytest.approx(3 * eps / 6, rel=1e-6)


@pytest.mark.parametrize("source", ["iid", "anisotropic", "mixture", "real"])
def test_metrics_on_ordinary_streams_equal_the_dense_definitions_closely(one_thread, source, monkeypatch):
    """On ordinary streams (metrics 1e-3 to 1) each metric equals its dense float64 definition to 1e-11, F formed
    in blocks of one row of G at a time as well as whole. Catches a row block misplaced (a wrong slice of G or of
    A ⊗ B), a Kronecker product in column-major vec, and a scale c taken from the wrong pair."""
    m, n = 4, 3
    grads = torch.stack(fisher.gradient_stream(source, m, n, 12, seed=2))
    for est in ("ema", "projector_splitting"):
        for T in (2, 12):
            w = fisher.ema_weights(T, 0.9)
            L, R = fisher.track(est, list(grads), beta=0.9)[T - 1]
            nkp = fisher.exact_nkp(grads[:T], w)
            want = {k: float(v) for k, v in _dense_metrics(grads[:T], w, L, R, nkp).items()}
            got = fisher.fisher_metrics(grads[:T], w, L, R, nkp)
            monkeypatch.setattr(fisher, "ROW_BLOCK", 1)
            by_rows = fisher.fisher_metrics(grads[:T], w, L, R, nkp)
            monkeypatch.undo()
            for key, value in want.items():
                tol = dict(rel=1e-11) if value > 1e-6 else dict(abs=1e-14)
                assert got[key] == pytest.approx(value, **tol), (source, est, T, key)
                assert by_rows[key] == pytest.approx(got[key], rel=1e-13, abs=1e-15), (source, est, T, key)
