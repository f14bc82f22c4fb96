import pytest

from kronopt.app import bench, cli


def test_stages_lists_every_registered_stage(capsys):
    assert cli.main(["stages"]) == 0
    out = capsys.readouterr().out
    for slot, key in [("factors", "ema"), ("basis", "qr"), ("inner", "orthogonalize"), ("split", "full"), ("refresh", "every")]:
        assert f"[{slot}]" in out and key in out
    assert "presets: adamw, soap, shampoo, muon" in out


def test_show_prints_the_resolved_config(capsys):
    assert cli.main(["show", "soap", "--set", "refresh.every=20", "--set", "inner.betas=[0.9, 0.99]"]) == 0
    out = capsys.readouterr().out
    assert "every = 20" in out and "betas = [0.9, 0.99]" in out and 'type = "qr"' in out


def test_show_lists_every_error_without_traceback(capsys):
    assert cli.main(["show", "soap", "--set", "refresh.every=0", "--set", "basis.bogus=1", "--set", "lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "3 errors" in err and "refresh.every: must be ≥ 1, got 0" in err and "lr: must be a number, got 'fast'" in err
    assert "Traceback" not in err


def test_show_rejects_malformed_set(capsys):
    assert cli.main(["show", "soap", "--set", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_bench_reports_every_optimizer(capsys):
    assert cli.main(["bench", "torch.AdamW", "torch.Muon", "adamw", "soap", "--shapes", "8x4,4", "--steps", "3", "--warmup", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert set(rows) == {"torch.AdamW", "torch.Muon", "adamw", "soap"}
    assert float(rows["torch.AdamW"][3]) == pytest.approx(1.0)
    # AdamW state: two moments of 36 float32 numbers
    assert float(rows["adamw"][4]) == pytest.approx(2 * 36 * 4 / 2**20, abs=1e-2)


def test_bench_torch_muon_on_matrices_only(capsys):
    # torch.Muon pairs with AdamW for non-matrices; with none, AdamW would get an empty parameter list
    assert cli.main(["bench", "torch.Muon", "torch.AdamW", "--shapes", "8x4,6x6", "--steps", "2", "--warmup", "1"]) == 0
    rows = {line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows == {"torch.Muon", "torch.AdamW"}


def test_bench_function_refuses_zero_steps():
    with pytest.raises(ValueError, match="steps ≥ 1"):
        bench.bench(["adamw"], [(4, 3)], steps=0, warmup=0, device="cpu")
