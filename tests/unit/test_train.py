"""kronopt.app.train and ``kronopt train``: the default task, the run directory, and clean failures."""

import json
import sys

import pytest
import torch

import kronopt
from kronopt.app import cli
from kronopt.config import ConfigError
from kronopt.optimizer import KronOptimizer
from kronopt.app.task import TinyGPT, load_corpus, stdlib_files
from kronopt.app.train import TaskConfig, task_from_dict, train

TINY = {"layers": 1, "width": 32, "heads": 2, "context": 32, "batch": 4, "steps": 5, "warmup": 1, "eval_every": 2,
        "eval_batches": 1, "device": "cpu"}
TINY_FLAGS = ["--layers", "1", "--width", "32", "--heads", "2", "--context", "32", "--batch", "4", "--steps", "5",
              "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--no-progress"]


def test_stdlib_split_is_deterministic_disjoint_and_nonempty():
    train_files, val_files = stdlib_files()
    assert (train_files, val_files) == stdlib_files()
    assert train_files and val_files and not set(train_files) & set(val_files)
    assert 0.03 < len(val_files) / (len(train_files) + len(val_files)) < 0.2
    corpus = load_corpus(None, context=32)
    again = load_corpus(None, context=32)
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 10_000
    assert torch.equal(corpus.val, again.val) and torch.equal(corpus.train[:4096], again.train[:4096])
    assert corpus.train.dtype == torch.uint8


def test_a_text_file_is_split_by_position(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = load_corpus(path, context=8)
    assert corpus.train.numel() + corpus.val.numel() == 1024 and corpus.val.numel() == 102
    assert corpus.val.tolist() == list((bytes(range(256)) * 4)[-102:])
    x, y = corpus.batch("train", 3, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_unusable_data_fails_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match="task.data: no such file"):
        load_corpus(tmp_path / "missing.txt", context=8)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="needs more than context"):
        load_corpus(tmp_path / "short.txt", context=8)


def test_model_names_route_embeddings_and_head_to_the_fallback():
    model = TinyGPT(layers=1, width=16, heads=2, context=8)
    opt = kronopt.build(model.named_parameters(), "muon")
    fallback = {n for g in opt.param_groups if g["pipeline"] == "fallback" for n in g["param_names"]}
    main = {n for g in opt.param_groups if g["pipeline"] == "main" for n in g["param_names"]}
    assert {"embed_tokens.weight", "embed_positions.weight", "head.weight", "norm_out.weight"} <= fallback
    assert main == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.up.weight",
                    "blocks.0.mlp.down.weight"}


def test_task_config_lists_every_error_with_its_path():
    with pytest.raises(ConfigError) as info:
        task_from_dict({"layers": 0, "widht": 8, "schedule": "linear"})
    paths = [p for p, _ in info.value.errors]
    assert paths == ["task.layers", "task.widht", "task.schedule"]
    with pytest.raises(ConfigError, match="task.width: must be a multiple of heads = 4"):
        task_from_dict({"width": 30, "heads": 4})


def test_on_step_is_called_once_per_step_with_the_optimizer_and_model():
    calls = []
    result = train(TaskConfig(**TINY), "adamw", on_step=lambda s, o, m: calls.append((s, o, m)), progress=False)
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
    assert all(isinstance(o, KronOptimizer) and isinstance(m, TinyGPT) for _, o, m in calls)
    assert result.status == "ok" and result.steps_done == 5 and len(result.history) == 5
    assert [e["step"] for e in result.evals] == [2, 4, 5]


def test_same_seed_same_run_and_lr_schedule_reaches_every_group():
    a = train(TaskConfig(**TINY), "muon", progress=False)
    b = train(TaskConfig(**TINY), "muon", progress=False)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    seen = []
    train(TaskConfig(**{**TINY, "warmup": 0}), "muon", progress=False,
          on_step=lambda s, o, m: seen.append([g["lr"] for g in o.param_groups]))
    main, fallback = seen[-1][0] / seen[0][0], seen[-1][1] / seen[0][1]
    assert main == pytest.approx(fallback) and main < 0.5  # cosine decays both pipelines alike


def test_a_non_finite_loss_stops_the_run_as_diverged():
    def poison(step, opt, model):
        if step == 1:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    result = train(TaskConfig(**TINY), "adamw", on_step=poison, progress=False)
    assert result.status == "diverged" and result.steps_done == 2
    assert "non-finite training loss" in result.reason and "step 2" in result.reason
    assert result.summary()["val_loss"] is None


def test_train_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    result = train(TaskConfig(**TINY), "soap", overrides={"refresh.every": 2}, out_dir=out, progress=False)
    assert {p.name for p in out.iterdir()} == {"config.toml", "task.toml", "metrics.jsonl", "summary.json", "loss.png"}
    assert "every = 2" in (out / "config.toml").read_text()
    assert "width = 32" in (out / "task.toml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 5 and sum("val_loss" in r for r in rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["optimizer_state_bytes"] == result.state_bytes > 0
    for key in ("train_loss", "val_loss", "median_opt_ms", "median_step_ms", "peak_memory_bytes"):
        assert summary[key] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "adamw", "--set", "lr=3e-3", *TINY_FLAGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adamw on cpu: 5 steps (ok)" in text and "val loss" in text and str(out) in text
    assert (out / "summary.json").exists() and (out / "loss.png").exists()
    # the run directory's config reruns as it is
    assert cli.main(["train", str(out / "config.toml"), *TINY_FLAGS, "--out", str(tmp_path / "again"), "--no-plot"]) == 0
    assert not (tmp_path / "again" / "loss.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "no_such_preset"], "unknown preset 'no_such_preset'"),
        (["train", "--preset", "soap", "configs/soap.toml"], "not both"),
        (["train", "--set", "basis.bogus=1"], "basis.bogus: unknown key"),
        (["train", "--set", "lr=fast"], "lr: must be a number, got 'fast'"),
        (["train", "--set", "novalue"], "expected KEY=VALUE"),
        (["train", "--data", "no/such/file.txt"], "task.data: no such file: 'no/such/file.txt'"),
        (["train", "--width", "30", "--heads", "4"], "task.width: must be a multiple of heads = 4"),
        (["train", "--heads", "3"], "--heads → task.heads: must divide the default width"),
        (["train", "--steps", "0"], "task.steps: must be ≥ 1, got 0"),
        (["train", "--device", "tpu9"], "task.device: must be 'auto' or a torch device"),
    ],
)
def test_cli_train_rejects_bad_input_without_traceback(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_matplotlib_is_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(["train", *TINY_FLAGS, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "loss plots need matplotlib" in err and "pip install 'kronopt[cli]'" in err
    assert "Traceback" not in err
    assert cli.main(["train", *TINY_FLAGS, "--out", str(tmp_path / "run"), "--no-plot"]) == 0
