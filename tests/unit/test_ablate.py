"""kronopt.app.ablate and ``kronopt ablate``: the file format, failures as rows, the outputs."""

import csv
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

import kronopt
from kronopt.app import ablate, cli
from kronopt.app.ablate import load_ablation, parse_ablation, plan_units, run_ablation, time_to_target
from kronopt.config import ConfigError
from kronopt.app.task import Corpus
from kronopt.app.train import RunResult, TaskConfig

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


@pytest.mark.parametrize("name", ["paper", "factors", "inner", "storage", "precision"])
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
    assert lines[2].split()[:4] == ["variant", "status", "lr", "(fixed)"]  # one lr each: no grid was searched
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


# -- tuning, seeds, resume, target: a fake train with known losses ------------------------------

#: final validation loss of the fake runs, by (preset, lr, seed); None: the run diverges
FAKE_VAL = {
    ("adamw", 1e-3, 0): 3.0, ("adamw", 1e-3, 1): 3.2, ("adamw", 1e-3, 2): 3.4,   # mean 3.2
    ("adamw", 2e-3, 0): 2.9, ("adamw", 2e-3, 1): 3.0, ("adamw", 2e-3, 2): 3.4,   # mean 3.1: the best
    ("adamw", 4e-3, 0): 2.5, ("adamw", 4e-3, 1): None, ("adamw", 4e-3, 2): 2.6,  # a diverged seed: +inf
    ("soap", 1e-3, 0): 4.0, ("soap", 1e-3, 1): 4.0, ("soap", 1e-3, 2): 4.0,     # mean 4.0
    ("soap", 2e-3, 0): 3.8, ("soap", 2e-3, 1): 3.9, ("soap", 2e-3, 2): 4.0,     # mean 3.9
    ("soap", 4e-3, 0): 3.5, ("soap", 4e-3, 1): 3.6, ("soap", 4e-3, 2): 3.7,     # mean 3.6: the best, at the edge
}
TUNED = {
    "ablation": {"name": "tuned"},
    "tune": {"lr": [4e-3, 1e-3, 2e-3], "seeds": [0, 1, 2]},
    "sweep": {"key": "preset", "values": ["adamw", "soap"]},
}


class FakeTrain:
    """Stands in for kronopt.app.train.train: 4 steps of ``10·(seed+1)`` ms, evaluations at steps 2 (final + 0.5) and 4.

    Records every call as ``(spec, lr, seed)``; raises ``interrupt_at``-th call's KeyboardInterrupt when set.
    """

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[tuple[str, float, int]] = []
        self.interrupt_at = interrupt_at

    def __call__(self, task, spec, *, overrides=None, out_dir=None, progress=True, plot=True, desc="", corpus=None):
        lr = overrides["lr"]
        self.calls.append((spec, lr, task.seed))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        final = FAKE_VAL[(spec, lr, task.seed)]
        ms = 10.0 * (task.seed + 1)
        history = tuple({"step": s, "loss": 5.0, "lr": lr, "step_ms": ms, "opt_ms": ms / 2} for s in range(1, 5))
        diverged = final is None
        evals = ({"step": 2, "val_loss": None},) if diverged else (
            {"step": 2, "val_loss": final + 0.5}, {"step": 4, "val_loss": final})
        return RunResult(task=task, config=kronopt.resolve(spec, **overrides), spec=spec, device="cpu",
                         status="diverged" if diverged else "ok", reason="non-finite validation loss at step 2"
                         if diverged else None, steps_done=len(history), train_loss=4.5,
                         val_loss=math.nan if diverged else final, median_opt_ms=ms / 2, median_step_ms=ms,
                         state_bytes=1000 if spec == "adamw" else 3000, peak_memory_bytes=None,
                         peak_memory_kind="unavailable", history=history, evals=evals)


#: the corpus the fake trainings are handed (they read none of it); its digest keys their units
NO_DATA = Corpus(train=torch.zeros(0, dtype=torch.uint8), val=torch.zeros(0, dtype=torch.uint8), source="none", sha256="0" * 64)


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(ablate, "train", fake)
    monkeypatch.setattr(ablate, "load_corpus", lambda *a, **k: NO_DATA)  # the fake trains on no data
    return fake


def test_best_lr_is_the_lowest_mean_val_loss_and_seeds_are_aggregated(fake_train):
    ab = parse_ablation({**TUNED, "tune": {**TUNED["tune"], "target": 3.5}})
    result = run_ablation(ab, task=TaskConfig(steps=4), progress=False)
    adamw, soap = result.variants
    assert len(fake_train.calls) == 18 and result.ran == 18 and result.reused == 0
    assert adamw.lrs == soap.lrs == (1e-3, 2e-3, 4e-3)
    # adamw: 4e-3 has the lowest loss on two seeds but one diverged, so it scores +inf; 2e-3 wins (3.1 < 3.2)
    assert adamw.status == "ok" and adamw.best_lr == 2e-3 and adamw.edge is None
    row = adamw.row()
    assert row["val_loss"] == pytest.approx(3.1)  # (2.9 + 3.0 + 3.4) / 3
    assert row["val_loss_std"] == pytest.approx(math.sqrt(0.07))  # ((.2² + .1² + .3²) / 2) ** .5
    assert (row["val_loss_min"], row["val_loss_max"], row["seeds"]) == (2.9, 3.4, 3)
    assert row["lr_edge"] == "" and "1 of 9 runs diverged" in row["note"]
    # time to 3.5: seeds 0 and 1 at step 2 (3.4, 3.5), seed 2 at step 4 (3.4); ms per step 10, 20, 30
    assert row["target"] == 3.5 and row["target_reached"] == "3/3"
    assert row["steps_to_target"] == pytest.approx(8 / 3)
    assert row["seconds_to_target"] == pytest.approx((0.020 + 0.040 + 0.120) / 3)
    assert row["median_opt_ms"] == pytest.approx(10.0) and row["optimizer_state_bytes"] == 1000
    # soap: the largest lr wins (3.6 < 3.9 < 4.0): flagged; only seed 0 reaches 3.5 (at step 4)
    assert soap.best_lr == 4e-3 and soap.edge == "max"
    row = soap.row()
    assert row["val_loss"] == pytest.approx(3.6) and row["val_loss_std"] == pytest.approx(0.1)
    assert row["target_reached"] == "1/3" and row["steps_to_target"] is None and row["seconds_to_target"] is None
    assert "best lr at grid edge (max)" in row["note"] and "target reached by 1/3 seeds" in row["note"]
    table = ablate.format_table(result)
    assert "not reached" in table and "3.1000 ± 0.2646 (n=3)" in table


def test_default_target_is_the_worst_final_loss_of_the_chosen_runs(fake_train):
    result = run_ablation(parse_ablation(TUNED), task=TaskConfig(steps=4), progress=False)
    assert result.target == 3.7 and not result.target_given  # soap's worst seed at its best lr
    for v in result.variants:
        assert v.row()["target_reached"] == "3/3"
    # soap reaches 3.7 at step 4 on seeds 0-2 (step 2 gives 4.0, 4.1, 4.2): 4 steps of 10, 20, 30 ms
    assert result.variants[1].row()["seconds_to_target"] == pytest.approx((0.04 + 0.08 + 0.12) / 3)


def test_edge_flag_at_the_smallest_lr_and_not_for_a_one_point_grid(fake_train):
    low = {("adamw", 0.5e-3, s): 2.0 for s in (0, 1, 2)}
    FAKE_VAL.update(low)
    try:
        ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}],
                             "tune": {"lr_mult": [0.5, 1, 2]}})
        (v,) = run_ablation(ab, task=TaskConfig(steps=4, seed=1), progress=False).variants
        assert [u.seed for u in v.units] == [1, 1, 1]  # no seeds: the task's seed
        assert v.best_lr == 0.5e-3 and v.edge == "min" and "best lr at grid edge (min)" in v.note()
        one = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}]})
        (v,) = run_ablation(one, task=TaskConfig(steps=4), progress=False).variants
        assert v.lrs == (1e-3,) and v.best_lr == 1e-3 and v.edge is None and v.row()["val_loss_std"] is None
    finally:
        for key in low:
            del FAKE_VAL[key]


def test_the_grid_sets_lr_and_scales_the_fallback_lr_alike():
    task = TaskConfig()
    muon = kronopt.resolve("muon")
    assert muon.fallback is not None
    mult = plan_units(ablate.Variant(name="m", spec="muon"), ablate.Tune(lr_mult=(0.5, 4.0)), task)
    assert [u.config.lr for u in mult] == pytest.approx([0.5 * muon.lr, 4 * muon.lr])
    assert [u.config.fallback.lr for u in mult] == pytest.approx([0.5 * muon.fallback.lr, 4 * muon.fallback.lr])
    absolute = plan_units(ablate.Variant(name="m", spec="muon", overrides={"lr": 2e-3}),
                          ablate.Tune(lr=(1e-2,), seeds=(3, 4)), task)
    # lr 2e-3 → 1e-2 is a factor 5, and the fallback follows it
    assert [(u.lr, u.seed, u.task.seed) for u in absolute] == [(1e-2, 3, 3), (1e-2, 4, 4)]
    assert absolute[0].config.fallback.lr == pytest.approx(5 * muon.fallback.lr)
    assert absolute[0].key != absolute[1].key  # the seed is part of the key
    (plain,) = plan_units(ablate.Variant(name="a", spec="adamw"), ablate.Tune(lr_mult=(2.0,)), task)
    assert plain.config.fallback is None and "fallback.lr" not in plain.overrides
    assert plain.config == kronopt.resolve("adamw", lr=2 * kronopt.resolve("adamw").lr)


def _rows(result):
    return [v.row() for v in result.variants], [u.row() for u in result.units()], result.units()


def test_an_interrupted_ablation_resumes_without_recomputing(monkeypatch, tmp_path):
    monkeypatch.setattr(ablate, "load_corpus", lambda *a, **k: NO_DATA)
    ab, task = parse_ablation(TUNED), TaskConfig(steps=4)
    monkeypatch.setattr(ablate, "train", FakeTrain())
    uninterrupted = _rows(run_ablation(ab, task=task, out_dir=tmp_path / "ref", progress=False))

    first = FakeTrain(interrupt_at=3)
    monkeypatch.setattr(ablate, "train", first)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    units = tmp_path / "out" / "units"
    assert len(list(units.glob("*.json"))) == 2 and not list(units.glob(".*"))  # two done, no temporary file

    second = FakeTrain()
    monkeypatch.setattr(ablate, "train", second)
    resumed = run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert len(second.calls) == 16 and not set(first.calls[:2]) & set(second.calls)
    assert second.calls[0] == first.calls[2]  # the interrupted unit runs again
    assert (resumed.ran, resumed.reused) == (16, 2)
    assert _rows(resumed) == uninterrupted

    third = FakeTrain()
    monkeypatch.setattr(ablate, "train", third)
    again = run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert third.calls == [] and again.reused == 18 and _rows(again) == uninterrupted
    fresh = run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False, fresh=True)
    assert len(third.calls) == 18 and _rows(fresh) == uninterrupted


def test_a_corrupt_or_foreign_unit_file_is_recomputed(fake_train, tmp_path):
    ab, task = parse_ablation(TUNED), TaskConfig(steps=4)
    before = _rows(run_ablation(ab, task=task, out_dir=tmp_path, progress=False))
    files = sorted((tmp_path / "units").glob("*.json"))
    assert len(files) == 18
    files[0].write_text(files[0].read_text()[:100])  # cut mid-write
    doc = json.loads(files[1].read_text())
    doc["key"] = "another"  # valid JSON, but another unit's
    files[1].write_text(json.dumps(doc))
    doc = json.loads(files[2].read_text())
    del doc["result"]["evals"]
    files[2].write_text(json.dumps(doc))
    doc = json.loads(files[3].read_text())
    doc["result"]["val_loss"] = "low"
    files[3].write_text(json.dumps(doc))
    doc = json.loads(files[4].read_text())
    doc["result"]["status"] = "failed"  # a failed run is never cached: it may pass next time
    files[4].write_text(json.dumps(doc))
    fake_train.calls.clear()
    after = run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    assert len(fake_train.calls) == 5 and (after.ran, after.reused) == (5, 13)
    assert _rows(after) == before
    assert json.loads(files[0].read_text())["key"] == files[0].stem  # rewritten whole


def test_two_key_sweep_is_the_product_with_readable_names():
    ab = parse_ablation(tomllib.loads("""
        [ablation]
        base = "soap"
        set = { weight_decay = 0.0 }
        [sweep]
        keys = ["factors.type", "split.rank"]
        values = [["ema", "kl"], [8, 16]]
    """))
    got = {v.name: (v.spec, v.overrides) for v in ab.variants}
    assert got == {
        "factors.type=ema, split.rank=8": ("soap", {"weight_decay": 0.0, "factors.type": "ema", "split.rank": 8}),
        "factors.type=ema, split.rank=16": ("soap", {"weight_decay": 0.0, "factors.type": "ema", "split.rank": 16}),
        "factors.type=kl, split.rank=8": ("soap", {"weight_decay": 0.0, "factors.type": "kl", "split.rank": 8}),
        "factors.type=kl, split.rank=16": ("soap", {"weight_decay": 0.0, "factors.type": "kl", "split.rank": 16}),
    }
    assert list(got)[1] == "factors.type=ema, split.rank=16"  # the last key varies fastest
    presets = parse_ablation({"sweep": {"keys": ["preset", "lr"], "values": [["adamw", "muon"], [1e-3]]}})
    assert [(v.name, v.spec, v.overrides) for v in presets.variants] == [
        ("preset=adamw, lr=0.001", "adamw", {"lr": 1e-3}), ("preset=muon, lr=0.001", "muon", {"lr": 1e-3})]


def test_time_to_target_from_a_hand_built_history():
    history = [{"step": s, "step_ms": 10.0 * s} for s in range(1, 7)]  # 10, 20, …, 60 ms
    evals = [{"step": 2, "val_loss": 5.0}, {"step": 4, "val_loss": None}, {"step": 6, "val_loss": 3.0}]
    assert time_to_target(history, evals, 5.0) == (2, pytest.approx(0.030))
    assert time_to_target(history, evals, 4.0) == (6, pytest.approx(0.210))  # step 4's non-finite loss is skipped
    assert time_to_target(history, evals, 6.0) == (2, pytest.approx(0.030))
    assert time_to_target(history, evals, 2.9) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"task": {"steps": 0},
          "tune": {"lr": [1e-3, 0, 1e-3], "lr_mult": [], "seeds": [0, 1, 1], "target": -1, "budget": 3},
          "sweep": {"keys": ["factors.type", "factors.type"], "values": [["ema"], ["kl"]]}},
         [("task.steps", "≥ 1"), ("tune.budget", "unknown key"), ("tune", "not both"),
          ("tune.lr[1]", "finite number > 0, got 0"), ("tune.lr_mult", "non-empty list"),
          ("tune.seeds", "lists 1 more than once"), ("tune.target", "loss > 0, got -1"),
          ("sweep.keys", "'factors.type' more than once")]),
        ({"tune": {"lr": "1e-3", "lr_mult": [2, True], "seeds": [0, -1, 1.5]}, "sweep": {"key": "preset", "values": []}},
         [("tune", "not both"), ("tune.lr", "non-empty list of learning rates, got '1e-3'"),
          ("tune.lr_mult[1]", "got True"), ("tune.seeds[1]", "integer in [0, 9223372036854775807], got -1"), ("tune.seeds[2]", "got 1.5"),
          ("sweep.values", "non-empty list")]),
        ({"tune": {"lr_mult": [1, 1.0, math.inf]}, "sweep": {"keys": ["factors.type", "split.rank"],
                                                              "values": [["ema", "kl"]]}},
         [("tune.lr_mult[2]", "got inf"), ("sweep.values", "must be a list of 2 lists")]),
        ({"tune": {"lr_mult": [1, 1.0]}, "sweep": {"keys": ["preset", "lr"], "values": [["soap", 3, "soap"], []]}},
         [("tune.lr_mult", "lists 1.0 more than once"), ("sweep.values[0]", "presets must be strings, got 3"),
          ("sweep.values[0]", "lists soap more than once"), ("sweep.values[1]", "non-empty list")]),
        ({"ablation": {"base": "soap"}, "tune": {"lr": [1e-3]}, "sweep": {"key": "lr", "values": [1e-3]}},
         [("sweep", "'lr' is tuned by [tune]")]),
        ({"ablation": {"base": "soap"}, "sweep": {"key": "lr", "keys": ["lr"], "values": [1e-3]}},
         [("sweep", "key (one axis) or keys (several axes), not both")]),
        ({"tune": [1], "sweep": {"keys": "preset", "values": [["soap"]]}},
         [("tune", "must be a table"), ("sweep.keys", "non-empty list of dotted config keys")]),
    ],
)
def test_file_errors_are_all_reported_with_their_paths(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_ablation(raw)
    assert [p for p, _ in info.value.errors] == [p for p, _ in expected]
    for (_, message), (_, fragment) in zip(info.value.errors, expected):
        assert fragment in message


def test_cli_reports_every_file_error_before_training(fake_train, tmp_path, capsys):
    path = tmp_path / "ab.toml"
    path.write_text('[tune]\nlr = [1e-3]\nlr_mult = [0, 2]\nseeds = [1, 1]\n'
                    '[sweep]\nkeys = ["preset", "factors.type"]\nvalues = [["soap"]]\n')
    assert cli.main(["ablate", str(path), "--out", str(tmp_path / "out"), "--no-progress", "--no-plot"]) == 2
    err = capsys.readouterr().err
    for fragment in ("not both", "tune.lr_mult[0]", "tune.seeds", "sweep.values"):
        assert fragment in err
    assert fake_train.calls == [] and not (tmp_path / "out").exists()


def test_tuned_ablation_end_to_end_and_rerun_reuses_every_unit(tmp_path, capsys):
    path = tmp_path / "ab.toml"
    path.write_text(TINY_TASK + """
        [ablation]
        name = "tiny"
        [tune]
        lr_mult = [0.5, 2]
        seeds = [0, 1]
        [sweep]
        key = "preset"
        values = ["adamw", "muon"]
    """)
    out = tmp_path / "out"
    assert cli.main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "units:   8 trained, 0 reused" in capsys.readouterr().out
    assert (out / "lr.png").read_bytes()[:4] == b"\x89PNG"
    grid = list(csv.DictReader((out / "grid.csv").open()))
    assert len(grid) == 8 and len(list((out / "units").glob("*.json"))) == 8
    summary = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    for name, default in (("adamw", kronopt.resolve("adamw")), ("muon", kronopt.resolve("muon"))):
        rows = [r for r in grid if r["variant"] == name]
        assert sorted({float(r["lr"]) for r in rows}) == pytest.approx([0.5 * default.lr, 2 * default.lr])
        means = {}
        for lr in {r["lr"] for r in rows}:
            losses = [float(r["val_loss"]) for r in rows if r["lr"] == lr]
            assert len(losses) == 2
            means[float(lr)] = sum(losses) / 2
        best = min(means, key=means.get)
        assert float(summary[name]["best_lr"]) == pytest.approx(best)
        assert float(summary[name]["val_loss"]) == pytest.approx(means[best])
        assert summary[name]["lr_edge"] == ("min" if best == min(means) else "max")
    muon_fb = {json.loads(f.read_text())["config"]["lr"]: json.loads(f.read_text())["config"]["fallback"]["lr"]
               for f in (out / "units").glob("*.json") if "fallback" in json.loads(f.read_text())["config"]}
    fb = kronopt.resolve("muon").fallback.lr
    assert sorted(muon_fb.values()) == pytest.approx([0.5 * fb, 2 * fb])
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["grid"]) == 8 and len(doc["results"]) == 2
    worst = max(float(r["val_loss"]) for r in grid
                if float(r["lr"]) == float(summary[r["variant"]]["best_lr"]))  # the default target
    assert {k: v for k, v in doc["tune"].items() if k != "target"} == {
        "lr": None, "lr_mult": [0.5, 2.0], "seeds": [0, 1], "target_source": "default"}
    assert doc["tune"]["target"] == pytest.approx(worst)
    before = (out / "results.csv").read_text()
    assert cli.main(["ablate", str(path), "--out", str(out), "--no-progress", "--no-plot"]) == 0
    assert "units:   0 trained, 8 reused" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == before


def test_a_unit_that_raises_is_a_failed_run_and_is_not_cached(fake_train, monkeypatch, tmp_path):
    def flaky(task, spec, **kwargs):
        if spec == "adamw" and kwargs["overrides"]["lr"] == 2e-3 and task.seed == 1:
            fake_train.calls.append((spec, 2e-3, 1))
            raise RuntimeError("out of memory")
        return fake_train(task, spec, **kwargs)

    monkeypatch.setattr(ablate, "train", flaky)
    ab, task = parse_ablation(TUNED), TaskConfig(steps=4)
    adamw, _ = run_ablation(ab, task=task, out_dir=tmp_path, progress=False).variants
    failed = [u for u in adamw.units if u.status == "failed"]
    assert [(u.lr, u.seed, u.reason) for u in failed] == [(2e-3, 1, "RuntimeError: out of memory")]
    assert adamw.best_lr == 1e-3  # 2e-3 lost a seed (+inf), 4e-3 too: 1e-3 (mean 3.2) is the only complete lr
    assert len(list((tmp_path / "units").glob("*.json"))) == 17
    monkeypatch.setattr(ablate, "train", fake_train)
    fake_train.calls.clear()
    adamw, _ = run_ablation(ab, task=task, out_dir=tmp_path, progress=False).variants
    assert fake_train.calls == [("adamw", 2e-3, 1)] and adamw.best_lr == 2e-3
