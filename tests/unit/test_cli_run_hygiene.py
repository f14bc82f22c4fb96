"""Command line: what a run reports and keeps when things go wrong (skipped steps, Ctrl-C, odd files and names).

Each test fails on the code before its fix: a run whose optimizer skipped steps read as ``ok`` and could win an
ablation's grid; ``--threads`` had no bound outside ``bench``; a file that is not UTF-8 ended in a traceback;
``train --device meta`` passed the checks (and ``--overwrite`` removed the earlier run first); a variant named
``results.csv`` crashed at the end; two lrs alike to 6 digits shared a run directory; the ablation file was read
again at the end; ``[task] data`` was relative to the current folder; ``fisher`` named the lab's own keys as the
user's; Ctrl-C printed a traceback; ``train --out ''`` and ``spectrum --state`` with run flags were not refused.
Runs are a 1-layer, 16-wide model for a few steps.
"""

import json
import os
import warnings
from pathlib import Path

import attrs
import pytest
import torch

import kronopt
import kronopt.app.ablate
import kronopt.app.fisher
import kronopt.app.spectrum
import kronopt.app.train
from kronopt.app import _args, cli
from kronopt.app.ablate import OUTPUT_NAMES, load_ablation, lr_labels, parse_ablation, run_ablation
from kronopt.app.train import TaskConfig
from kronopt.config import ConfigError

TINY = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2", "--eval-batches", "1",
        "--threads", "1", "--device", "cpu", "--no-progress", "--no-plot"]
TINY_TASK = TaskConfig(layers=1, width=16, heads=2, context=16, batch=2, steps=4, warmup=0, eval_every=2,
                       eval_batches=1, threads=1, device="cpu")
#: SGD at this lr overflows every update after the first: the optimizer skips them, and the loss stays finite
HUGE_LR = 1e30


def run(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``kronopt ARGV`` in this process; Ctrl-C escaping ``main`` fails."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped kronopt's main (a traceback for the user)")
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


class Reached(Exception):
    """The command got past its checks and started working."""


def _forbidden(*args, **kwargs):
    raise Reached


@pytest.fixture
def no_work(monkeypatch):
    for module, name in [(kronopt.app.train, "train"), (kronopt.app.ablate, "run_ablation"),
                         (kronopt.app.fisher, "run_lab"), (kronopt.app.fisher, "hessian_experiment"),
                         (kronopt.app.spectrum, "training_run")]:
        monkeypatch.setattr(module, name, _forbidden)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the optimizer's own warnings of skipped steps
        yield


def _ablation_file(path: Path, body: str) -> Path:
    path.write_text('[ablation]\nbase = "adamw"\n' + body, encoding="utf-8")
    return path


# -- 1. skipped steps -------------------------------------------------------------------------------------------


def test_train_records_and_prints_the_steps_the_optimizer_skipped(tmp_path, capsys, quiet):
    out = tmp_path / "run"
    argv = ["train", "--preset", "adamw", "--set", "inner.type=sgd", "--set", f"lr={HUGE_LR}", "--steps", "4",
            "--warmup", "0", *TINY, "--out", str(out)]
    rc, stdout, _ = run(argv, capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"  # the loss never stopped being finite ...
    assert summary["skipped_steps"] == 3 and summary["first_skipped_step"] == 2  # ... but steps 2-4 were skipped
    assert "4 steps (ok, 3 skipped)" in stdout and "skipped: 3 of 4 steps" in stdout
    assert rc == 0


def test_an_optimizer_that_stops_the_run_makes_it_diverged_not_a_traceback(tmp_path, capsys, quiet):
    """``nonfinite = "raise"`` (the advice the skipped-steps line gives) raises FloatingPointError at the first
    non-finite update: the run ends "diverged" with its reason and summary, as a non-finite loss does, and an
    ablation counts the unit diverged (cached), not failed."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "adamw", "--set", "inner.type=sgd", "--set", f"lr={HUGE_LR}", "--set", "nonfinite=raise",
            "--steps", "4", "--warmup", "0", *TINY, "--out", str(out)]
    rc, stdout, _ = run(argv, capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 1 and summary["status"] == "diverged" and "optimizer stopped at step 2" in summary["reason"]
    ablation = parse_ablation({"ablation": {"base": "adamw", "set": {"inner.type": "sgd", "nonfinite": "raise"}},
                               "tune": {"lr": [1e-3, HUGE_LR]}, "variant": [{"name": "raise"}]})
    result = run_ablation(ablation, task=TINY_TASK, out_dir=tmp_path / "ab", progress=False)
    (variant,) = result.variants
    assert variant.best_lr == 1e-3 and [u.status for u in variant.units] == ["ok", "diverged"]


def test_ablate_counts_a_run_that_skipped_steps_as_diverged(tmp_path, quiet):
    """At lr 1e30 every update after the first is skipped and the loss sits near ln 256, which on a tiny task can
    beat a real lr: such a run must count as +inf, so the grid picks the lr that trained."""
    ablation = parse_ablation({"ablation": {"base": "adamw", "set": {"inner.type": "sgd"}},
                               "tune": {"lr": [1e-3, HUGE_LR]}, "variant": [{"name": "sgd"}]})
    result = run_ablation(ablation, task=TINY_TASK, out_dir=tmp_path / "ab", progress=False)
    (variant,) = result.variants
    assert variant.status == "ok" and variant.best_lr == 1e-3
    bad = next(u for u in variant.units if u.lr == HUGE_LR)
    assert bad.status == "diverged" and bad.skipped_steps == 3 and "3 of 4 steps skipped" in bad.reason
    assert [u.row()["skipped_steps"] for u in variant.units] == [0, 3]
    again = run_ablation(ablation, task=TINY_TASK, out_dir=tmp_path / "ab", progress=False)
    assert again.reused == 2 and again.variants[0].units[1].skipped_steps == 3  # the count is cached


# -- 2. --threads -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train"], ["ablate", "{ablation}"], ["fisher", "--no-plot"]])
def test_threads_past_the_bound_bench_uses_are_refused_by_every_command(command, tmp_path, capsys, no_work):
    ablation = _ablation_file(tmp_path / "a.toml", '[[variant]]\nname = "a"\n')
    argv = [a.format(ablation=ablation) for a in command]
    bound = 4 * (os.cpu_count() or 1)  # README: "--threads at most 4 × the machine's CPUs"
    rc, _, err = run([*argv, "--threads", str(bound + 1), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--threads" in err and f"must be ≤ {bound}, got {bound + 1}" in err
    assert _args.MAX_THREADS == bound  # one rule, which bench reads too (test_bench_inputs_and_records)


# -- 3. files that are not UTF-8 --------------------------------------------------------------------------------


def test_a_config_or_ablation_file_that_is_not_utf8_is_a_clean_error(tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"lr = 0.01 # caf\xe9\n")
    ablation = tmp_path / "latin1_abl.toml"
    ablation.write_bytes(b'[ablation]\nbase = "adamw" # caf\xe9\n[[variant]]\nname = "a"\n')
    for read, path in [(kronopt.load, config), (kronopt.resolve, config), (load_ablation, ablation)]:
        with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9"):
            read(path)
    rc, _, err = run(["show", str(config)], capsys)
    assert rc == 2 and f"{str(config)!r} is not UTF-8" in err


# -- 4. devices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_train_refuses_a_device_other_than_cpu_or_cuda_and_keeps_the_earlier_run(device, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"config.toml": "lr = 0.001\n", "summary.json": "{}\n", "metrics.jsonl": ""}
    for name, text in earlier.items():
        (out / name).write_text(text)
    rc, _, err = run(["train", *TINY, "--device", device, "--out", str(out), "--overwrite"], capsys)
    assert rc == 2 and "--device → task.device" in err and f"got {device!r}" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    with pytest.raises(ValueError, match="'cpu' or a CUDA device"):
        TaskConfig(device=device)


# -- 5-8. ablate: variant names, run directories, the file's copy, [task] data -------------------------------


@pytest.mark.parametrize("name", [*OUTPUT_NAMES, "Results.CSV"])
def test_a_variant_named_like_an_output_of_the_ablation_is_refused(name):
    with pytest.raises(ConfigError, match="a name the ablation writes its outputs to"):
        parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": name}, {"name": "ok"}]})


def test_learning_rates_alike_to_six_digits_get_run_directories_of_their_own(tmp_path):
    odd = 3e-4 * 3  # 0.0009000000000000001, as lr_mult makes it
    assert lr_labels([1e-3, 3e-3, odd]) == {1e-3: "0.001", 3e-3: "0.003", odd: "0.0009"}  # the names of before
    ablation = parse_ablation({"ablation": {"base": "adamw"}, "tune": {"lr": [1e-3, 1.0000001e-3]},
                               "variant": [{"name": "a"}]})
    task = attrs.evolve(TINY_TASK, steps=2)
    first = run_ablation(ablation, task=task, out_dir=tmp_path / "ab", progress=False)
    assert first.ran == 2
    assert sorted(p.name for p in (tmp_path / "ab" / "a").iterdir()) == ["lr0.001-seed0", "lr0.0010000001-seed0"]
    again = run_ablation(ablation, task=task, out_dir=tmp_path / "ab", progress=False)
    assert (again.ran, again.reused) == (0, 2)  # neither evicted the other's run


def test_ablate_copies_the_file_as_it_was_read_at_the_start(tmp_path, capsys, monkeypatch):
    path = _ablation_file(tmp_path / "abl.toml", "[task]\nsteps = 1\n[[variant]]\nname = \"a\"\n")
    text = path.read_text()
    real = kronopt.app.ablate.run_ablation

    def moved_while_running(*args, **kwargs):
        path.rename(tmp_path / "moved.toml")  # a file moved (or edited) while the units train
        return real(*args, **kwargs)

    monkeypatch.setattr(kronopt.app.ablate, "run_ablation", moved_while_running)
    rc, stdout, _ = run(["ablate", str(path), *TINY, "--out", str(tmp_path / "ab")], capsys)
    assert rc == 0 and "units:   1 trained" in stdout
    assert (tmp_path / "ab" / "ablation.toml").read_text() == text


def test_task_data_in_an_ablation_file_is_relative_to_the_file(tmp_path, capsys, monkeypatch, no_work):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "data.txt").write_text("hello world " * 500)
    _ablation_file(sub / "abl.toml", '[task]\ndata = "data.txt"\n[[variant]]\nname = "a"\n')
    assert load_ablation(sub / "abl.toml").task["data"] == str(sub / "data.txt")
    monkeypatch.chdir(tmp_path)  # the file's folder is not the current one
    with pytest.raises(Reached):  # the checks pass: the data file is found
        cli.main(["ablate", "sub/abl.toml", *TINY, "--out", str(tmp_path / "ab")])


# -- 9. fisher --hessian-optimizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["adamw", "muon", "shampoo", "kl_shampoo", "pro_kl_shampoo"])
def test_fisher_names_why_a_preset_does_not_fit_the_hessian_experiment(preset, tmp_path, capsys, no_work):
    rc, _, err = run(["fisher", "--source", "", "--hessian-optimizers", preset, "--no-plot",
                      "--out", str(tmp_path / "f")], capsys)
    assert rc == 2 and f"{preset} does not fit the Hessian experiment" in err
    assert "unknown key" not in err  # the lab's own keys are not reported as the user's
    assert "soap, dykaf" in err  # the presets it does take


# -- 10. Ctrl-C -------------------------------------------------------------------------------------------------


def _interrupt_at_second_evaluation(monkeypatch, module):
    real = module._evaluate
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_evaluate", evaluate)


def test_ctrl_c_in_train_is_one_line_naming_the_run_and_exit_130(tmp_path, capsys, monkeypatch):
    _interrupt_at_second_evaluation(monkeypatch, kronopt.app.train)
    out = tmp_path / "run"
    rc, _, err = run(["train", *TINY, "--steps", "6", "--eval-every", "2", "--out", str(out)], capsys)
    assert rc == 130
    assert err.strip().splitlines() == [f"kronopt train: interrupted; the partial run is in {out} "
                                        "(metrics.jsonl to the last step done, no summary.json)"]
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 4


def test_ctrl_c_in_ablate_names_the_cached_units_and_exits_130(tmp_path, capsys, monkeypatch):
    path = _ablation_file(tmp_path / "abl.toml",
                          '[task]\nsteps = 2\n[tune]\nlr = [1e-3, 2e-3]\n[[variant]]\nname = "a"\n')
    _interrupt_at_second_evaluation(monkeypatch, kronopt.app.train)
    rc, _, err = run(["ablate", str(path), *TINY, "--out", str(tmp_path / "ab")], capsys)
    assert rc == 130 and "Traceback" not in err
    assert f"kronopt ablate: interrupted; the finished units are cached in {tmp_path / 'ab' / 'units'}" in err
    assert len(list((tmp_path / "ab" / "units").glob("*.json"))) == 1  # the first unit finished


# -- minor: train --out '', spectrum --state with run flags -----------------------------------------------------


def test_train_refuses_an_empty_out_as_ablate_and_fisher_do(capsys, no_work):
    rc, _, err = run(["train", *TINY, "--out", ""], capsys)
    assert rc == 2 and "--out: must be a directory path, got ''" in err


@pytest.mark.parametrize("extra", [["soap"], ["--set", "lr=-1"], ["--steps", "5"], ["--every", "2"], ["--builtin"]])
def test_spectrum_refuses_run_flags_beside_a_saved_state(extra, tmp_path, capsys, no_work):
    model = torch.nn.Linear(4, 3)
    opt = kronopt.build(model.parameters(), "soap")
    model(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    state = tmp_path / "state.pt"
    torch.save(opt.state_dict(), state)
    rc, _, err = run(["spectrum", "--state", str(state), "--no-plot", *extra], capsys)
    assert rc == 2 and "--state: reads a saved state instead of a run" in err
    rc, stdout, _ = run(["spectrum", "--state", str(state), "--no-plot"], capsys)
    assert rc == 0 and "(left)" in stdout
