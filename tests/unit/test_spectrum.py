"""``kronopt spectrum``: recording factor spectra, the tail AM/GM ratio, saved-state input, the plot."""

import pytest
import torch

import kronopt
from kronopt.app import cli, spectrum


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tail_am_gm_is_one_for_a_flat_tail_and_grows_with_spread():
    flat = torch.tensor([100.0, 50.0, 2.0, 2.0, 2.0, 2.0])
    assert spectrum.tail_am_gm(flat, 2) == pytest.approx(1.0, abs=1e-12)
    spread = torch.tensor([100.0, 1.0, 1.0, 1e-6])
    expected = (2 + 1e-6) / 3 / (1e-6) ** (1 / 3)
    assert spectrum.tail_am_gm(spread, 1) == pytest.approx(expected, rel=1e-9)


def test_a_fractional_head_counts_the_fraction_as_written():
    # 0.29 of 100 in floats reads 28.999…96: the head left one eigenvalue out of the tail's count before
    assert spectrum._head(100, 0.29) == 29 and spectrum._head(50, 0.58) == 29
    assert spectrum._head(10, 0.01) == 1 and spectrum._head(10, 3.0) == 3


def test_recorder_saved_state_and_plot_agree(tmp_path):
    pytest.importorskip("matplotlib")
    rec = spectrum.SpectrumRecorder(every=10, layers=r"^0\.")
    opt = spectrum.builtin_run("kl_shampoo", steps=20, on_step=rec, lr=1e-3)
    assert {(r.name, r.side) for r in rec.records} == {("0.weight", "left"), ("0.weight", "right")}
    assert sorted({r.step for r in rec.records}) == [10, 20]
    live = {(r.name, r.side): r for r in spectrum.spectra_from_optimizer(opt, 20)}
    # KL-Shampoo's tracked eigenvalues are 1/s² of the factor estimator's state
    bucket = next(b for b in opt._buckets if b.layout.m == 64 and b.layout.n == 32)
    s_L = bucket.state.factors.s_L[0].double()
    torch.testing.assert_close(live[("0.weight", "left")].eigvals, torch.sort(1 / s_L**2, descending=True).values)
    # a saved state dict gives the same spectra, names included
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    saved = {(r.name, r.side): r for r in spectrum.spectra_from_state_dict(torch.load(path, weights_only=False))}
    assert saved.keys() == live.keys()
    for key in live:
        torch.testing.assert_close(saved[key].eigvals, live[key].eigvals)
        assert saved[key].step == 20
    rows = spectrum.report(saved.values())
    assert all(r["tail_am_gm"] >= 1.0 - 1e-12 for r in rows)
    out = spectrum.plot(list(rec.records), tmp_path / "spec.png")
    assert out.stat().st_size > 1000


def test_restricted_side_reports_subspace_and_flat_eigenvalues():
    opt = spectrum.builtin_run("pro_kl_shampoo", steps=3)
    recs = {(r.name, r.side): r for r in spectrum.spectra_from_optimizer(opt, 3)}
    # 2.weight is 64×64: right side restricted to rank 16, the flat eigenvalue fills the other 48
    values = recs[("2.weight", "right")].eigvals
    assert values.numel() == 64
    bucket = next(b for b in opt._buckets if b.layout.right == "restricted" and b.layout.m == 64 and b.layout.n == 64)
    mu = float(bucket.state.factors.mu_R[0])
    assert (values == mu).sum() >= 48


def test_cli_spectrum_from_a_saved_state(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = kronopt.build([("blocks.0.weight", params[0]), ("blocks.0.bias", params[1])], "soap")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    code = cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--out", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "blocks.0.weight (left)" in out and "tail AM/GM" in out
    assert (tmp_path / "plots" / "spectrum.png").exists()


def test_cli_spectrum_builtin_run(tmp_path, capsys):
    code = cli.main(["spectrum", "kl_shampoo", "--builtin", "--steps", "10", "--every", "5", "--no-plot", "--layers", "^4"])
    out = capsys.readouterr().out
    assert code == 0 and "4.weight (right)" in out


def test_not_a_kronopt_state_dict_is_rejected():
    with pytest.raises(ValueError, match="not a kronopt optimizer state dict"):
        spectrum.spectra_from_state_dict({"state": {}, "param_groups": []})


def test_saved_state_of_both_versions_gives_the_live_spectra():
    from .test_state_dict import _v1_state_dict

    opt = spectrum.builtin_run("pro_kl_shampoo", steps=4)
    live = {(r.name, r.side): r.eigvals for r in spectrum.spectra_from_optimizer(opt, 4)}
    for sd in (opt.state_dict(), _v1_state_dict(opt)):
        saved = {(r.name, r.side): r for r in spectrum.spectra_from_state_dict(sd)}
        assert saved.keys() == live.keys() and live
        for key, values in live.items():
            assert torch.equal(saved[key].eigvals, values) and saved[key].step == 4


def _rank_deficient_state(tmp_path):
    """A shampoo block ``4 × 24`` after 3 float64 steps (refreshed each call) and the gradients it saw: the right
    factor, an EMA of three ``Gᵀ G``, has rank 12 of 24."""
    gen = torch.Generator().manual_seed(58)
    W = torch.nn.Parameter(torch.randn(4, 24, generator=gen, dtype=torch.float64))
    opt = kronopt.build([("w", W)], "shampoo", **{"refresh.every": 1})
    grads = []
    for _ in range(3):
        W.grad = torch.randn(4, 24, generator=gen, dtype=torch.float64)
        grads.append(W.grad.clone())
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    return opt, grads


def _ema(mats, beta=0.95):
    acc = torch.zeros_like(mats[0])
    for M in mats:
        acc = beta * acc + (1 - beta) * M
    return acc


def test_a_rank_deficient_factor_reports_its_size_rank_and_the_tail_above_rounding(tmp_path, capsys):
    """A right factor of rank 12 of 24: ``d`` is 24, ``rank`` 12, and the tail AM/GM is over λ₃..λ₁₂.

    Catches the old report: rounding-level positive eigenvalues (±1e-16 of the largest) kept as the spectrum,
    ``d`` printed as their count (19), and a tail AM/GM of about 1e6 made by them. The expected eigenvalues come
    from ``eigvalsh`` of the EMA rebuilt from the gradients, the rank from the construction (3 gradients of
    rank 4)."""
    import math

    opt, grads = _rank_deficient_state(tmp_path)
    view = opt.inspect()["w"]
    R = _ema([G.mT @ G for G in grads])
    exact = torch.linalg.eigvalsh(R).flip(0)[:12]
    values = view.spectrum("right")
    assert view.size("right") == 24 and values.shape == (12,)
    torch.testing.assert_close(values, exact, rtol=1e-9, atol=0)
    tail = exact[2:]  # the default head: 10 % of d = 24 is 2
    want = float(tail.mean()) / math.exp(float(tail.log().mean()))
    rows = {r["side"]: r for r in spectrum.report(spectrum.spectra_from_state_dict(torch.load(tmp_path / "state.pt")))}
    right = rows["right"]
    assert (right["d"], right["rank"], right["head"], right["tail"]) == (24, 12, 2, 10)
    assert right["tail_am_gm"] == pytest.approx(want, rel=1e-9)
    assert right["min"] == pytest.approx(float(exact[-1]), rel=1e-9)
    assert (rows["left"]["d"], rows["left"]["rank"]) == (4, 4)
    code = cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("w (right)"))
    assert line.split()[3:5] == ["24", "12"] and float(line.split()[-1]) == pytest.approx(want, rel=1e-4)


def test_a_head_that_takes_every_eigenvalue_above_rounding_says_there_is_no_tail(tmp_path, capsys):
    """``--head 12`` on the rank-12 factor of 24 leaves no eigenvalue above rounding in the tail: the table says
    ``none`` and a line says why. Catches a NaN printed bare, or a ratio made of the rounding-level values."""
    _rank_deficient_state(tmp_path)
    code = cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot", "--head", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "nan" not in out.lower()
    line = next(x for x in out.splitlines() if x.startswith("w (right)"))
    assert line.split()[-1] == "none"
    assert "w (right): the head of 12 takes all 12 eigenvalues above rounding of zero" in out
    assert "the other 12 of d = 24 are zero to rounding" in out


@pytest.mark.parametrize("text", ["1.5", "1.99", "12.25"])
def test_a_head_count_that_is_not_whole_is_refused(tmp_path, capsys, text):
    """``--head`` is a whole count ≥ 1 or a fraction below 1: ``1.5`` was read as 1 without a word. Catches the
    truncation coming back, in the command and in :func:`spectrum.report` called from Python."""
    _rank_deficient_state(tmp_path)
    code = cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot", "--head", text])
    err = capsys.readouterr().err
    assert code == 2 and f"--head: must be a whole count ≥ 1 or a fraction of d below 1, got '{text}'" in err
    records = spectrum.spectra_from_state_dict(torch.load(tmp_path / "state.pt"))
    with pytest.raises(ValueError, match="whole number"):
        spectrum.report(records, head=float(text))


def test_a_whole_head_written_as_a_float_is_that_count(tmp_path, capsys):
    """``--head 3.0`` is the count 3, the same report as ``--head 3`` (not refused as a fraction, not taken as 0.3)."""
    _rank_deficient_state(tmp_path)
    outs = []
    for text in ("3", "3.0"):
        assert cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot", "--head", text]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    rows = spectrum.report(spectrum.spectra_from_state_dict(torch.load(tmp_path / "state.pt")), head=3.0)
    assert {r["head"] for r in rows} == {3}


def test_a_head_of_the_whole_side_says_so_instead_of_nan(tmp_path, capsys):
    """``--head 100`` on sides of 4 and 24 printed ``nan``: now ``none`` and a line saying the head covers the whole
    side, with ``d``. Catches a bare NaN, and the rank's wording used where the side itself is covered."""
    _rank_deficient_state(tmp_path)
    code = cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--no-plot", "--head", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "nan" not in out.lower()
    assert "w (left): the head of 100 covers the whole side (d = 4): no tail to measure" in out
    assert "w (right): the head of 100 covers the whole side (d = 24): no tail to measure" in out
    assert [x.split()[-1] for x in out.splitlines() if x.startswith("w (")][:2] == ["none", "none"]
