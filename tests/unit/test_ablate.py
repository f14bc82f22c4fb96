"""kronopt.ablate and ``kronopt ablate``: the file format, failures as rows, the outputs."""

import csv
import json
import tomllib
from pathlib import Path

import pytest

from kronopt import cli
from kronopt.ablate import load_ablation, parse_ablation, run_ablation
from kronopt.config import ConfigError
from kronopt.train import TaskConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_TASK = """
[task]
layers = 1
width = 16
heads = 2
context = 16
batch = 2
steps = 4
warmup = 1
eval_every = 2
eval_batches = 1
threads = 1
device = "cpu"
"""


def test_sweep_and_variants_become_specs_with_overrides(tmp_path):
    ab = parse_ablation(tomllib.loads("""
        [ablation]
        base = "soap"
        set = { lr = 1e-3 }
        [sweep]
        key = "factors.type"
        values = ["ema", "kl"]
        [[variant]]
        name = "muon"
        preset = "muon"
        [[variant]]
        name = "nested"
        set = { refresh.every = 5, "inner.eps" = 1e-6 }
        [[variant]]
        name = "file"
        config = "mine.toml"
    """), name="x", relative_to=tmp_path)
    got = {v.name: (v.spec, v.overrides) for v in ab.variants}
    assert got == {
        "ema": ("soap", {"lr": 1e-3, "factors.type": "ema"}),
        "kl": ("soap", {"lr": 1e-3, "factors.type": "kl"}),
        "muon": ("muon", {"lr": 1e-3}),
        "nested": ("soap", {"lr": 1e-3, "refresh.every": 5, "inner.eps": 1e-6}),
        "file": (str(tmp_path / "mine.toml"), {"lr": 1e-3}),
    }
    assert ab.name == "x"
    presets = parse_ablation({"sweep": {"key": "preset", "values": ["adamw", "not_yet_a_preset"]}})
    assert [(v.name, v.spec) for v in presets.variants] == [("adamw", "adamw"), ("not_yet_a_preset", "not_yet_a_preset")]


def test_format_errors_are_listed_with_their_paths():
    with pytest.raises(ConfigError) as info:
        parse_ablation({
            "ablaton": {},
            "task": {"steps": 0},
            "sweep": {"key": "factors.type", "values": ["ema"]},
            "variant": [{"name": "a", "preset": "soap", "colour": 1}, {"name": "a", "preset": "adamw"}, {"preset": "x"}],
        })
    paths = [p for p, _ in info.value.errors]
    assert paths == ["ablaton", "task.steps", "sweep", "variant[0].colour", "variant[2].name", "variant"]
    assert "no base" in info.value.errors[2][1] and "'a' is used twice" in info.value.errors[-1][1]
    with pytest.raises(ConfigError, match="no variants"):
        parse_ablation({"ablation": {"base": "soap"}})


@pytest.mark.parametrize("name", ["paper", "factors", "inner"])
def test_shipped_ablation_files_parse(name):
    ab = load_ablation(ROOT / "configs" / "ablations" / f"{name}.toml")
    assert ab.name == name and len(ab.variants) >= 3
    assert TaskConfig(**ab.task).steps >= 100


def test_paper_ablation_names_the_papers_optimizers():
    ab = load_ablation(ROOT / "configs" / "ablations" / "paper.toml")
    assert [v.spec for v in ab.variants] == ["adamw", "muon", "soap", "dykaf", "kl_shampoo", "pro_kl_shampoo"]


def test_failing_variants_are_reported_and_the_others_still_run(tmp_path, capsys):
    path = tmp_path / "ab.toml"
    path.write_text(TINY_TASK + """
        [ablation]
        name = "mixed"
        base = "adamw"
        [[variant]]
        name = "adamw"
        [[variant]]
        name = "bad_stage"
        set = { "inner.type" = "no_such_rule" }
        [[variant]]
        name = "bad_value"
        set = { "refresh.every" = 0 }
        [[variant]]
        name = "no_preset"
        preset = "no_such_preset"
        [[variant]]
        name = "muon"
        preset = "muon"
    """)
    out = tmp_path / "out"
    assert cli.main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"results.csv", "grid.csv", "results.json", "loss.png", "lr.png",
                                               "cost.png", "ablation.toml", "units", "adamw", "muon"}
    for png in ("loss.png", "lr.png", "cost.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "failed", "failed", "ok"]
    assert "unknown inner stage 'no_such_rule'" in rows["bad_stage"]["reason"]
    assert "refresh.every: must be ≥ 1, got 0" in rows["bad_value"]["reason"]
    assert "unknown preset 'no_such_preset'" in rows["no_preset"]["reason"]
    assert float(rows["adamw"]["val_loss"]) > 0 and int(rows["muon"]["optimizer_state_bytes"]) > 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["ablation"] == "mixed" and doc["task"]["steps"] == 4 and len(doc["results"]) == 5
    lines = text.splitlines()
    assert lines[1].startswith("target validation loss")
    assert lines[2].split()[:4] == ["variant", "status", "best", "lr"]
    assert any(line.startswith("no_preset") and "failed" in line and "unknown preset" in line for line in lines)


def test_every_variant_sees_the_same_task(tmp_path):
    ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}, {"name": "b"}]})
    task = TaskConfig(**tomllib.loads(TINY_TASK)["task"])
    a, b = run_ablation(ab, task=task, progress=False).variants
    (ua,), (ub,) = a.units, b.units
    assert ua.history[0]["loss"] == ub.history[0]["loss"]  # same weights, same first batch
    assert [r["loss"] for r in ua.history] == [r["loss"] for r in ub.history]


def test_task_flags_override_the_file_and_only_selects(tmp_path, capsys):
    path = tmp_path / "ab.toml"
    path.write_text(TINY_TASK + '[sweep]\nkey = "preset"\nvalues = ["adamw", "soap"]\n')
    out = tmp_path / "out"
    assert cli.main(["ablate", str(path), "--steps", "2", "--only", "soap", "--out", str(out), "--no-progress",
                     "--no-plot"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["results"]] == ["soap"] and doc["results"][0]["steps"] == 2
    assert not (out / "loss.png").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read ablation file"),
        ("[ablation\n", "is not valid TOML"),
        ('[ablation]\nbase = "soap"\nbogus = 1\n[sweep]\nkey="lr"\nvalues=[1e-3]\n', "ablation.bogus: unknown key"),
        ('[task]\nwidth = 30\nheads = 4\n[sweep]\nkey="preset"\nvalues=["adamw"]\n', "task.width: must be a multiple"),
        ('[task]\ndata = "no/such.txt"\n[sweep]\nkey="preset"\nvalues=["adamw"]\n', "task.data: no such file"),
    ],
)
def test_cli_ablate_rejects_bad_files_without_traceback(content, message, tmp_path, capsys):
    path = tmp_path / "ab.toml"
    if content is not None:
        path.write_text(content)
    assert cli.main(["ablate", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
