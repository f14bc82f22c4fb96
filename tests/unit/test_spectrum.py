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
