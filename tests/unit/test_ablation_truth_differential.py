"""``kronopt ablate`` must not tell its user something false: its numbers recomputed from the raw runs it saves,
and the places where the output names one run and holds another.

Recomputed independently (tiny real runs, no fakes): every column of ``results.csv`` and the printed
``mean ± std (n)`` from each unit's own run directory (``summary.json``, ``metrics.jsonl``, ``config.toml``);
the first training loss, which depends only on the initial weights and the first batch, equal across
different optimizers at one seed and different across seeds.

The bugs found here, each fixed, each test failing on the code before its fix:

* a unit read from the cache leaves its run directory holding another run (an earlier task or config);
* two variant names that sanitize to one directory (``"a b"``/``"a_b"``) share a run directory, and a
  variant named ``..`` writes its runs outside ``--out``;
* ``device = "auto"`` (every shipped file) is keyed as the text ``auto``, so a unit trained on the CPU is
  reused on a machine where the same command trains on CUDA;
* an ``lr_mult`` grid around a learning rate of 0 gives several units the same ``lr``: the summary merges
  the grid points into one point of several "seeds";
* a variant run at one lr was headed "best lr" in the printed table, as if its lr had been searched.
"""

import csv
import json
import math
import statistics
import tomllib
from pathlib import Path

import pytest
import torch

import kronopt
from kronopt.app import ablate, cli
from kronopt.app.ablate import parse_ablation, run_ablation
from kronopt.app.train import RunResult, TaskConfig
from kronopt.config import ConfigError
from tests.unit.test_ablate import NO_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=1, width=16, heads=2, context=16, batch=2, steps=4, warmup=1, eval_every=2, eval_batches=1,
            threads=1, device="cpu")


def _toml_task(task: dict) -> str:
    return "[task]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in task.items()) + "\n"


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


# -- every reported number recomputed from the runs' own files -------------------------------------------------------


def test_results_recompute_from_the_run_directories_and_variants_share_init_and_batches(tmp_path, capsys):
    """Two different optimizers × an lr grid of 2 × 2 seeds, real runs. From each unit's run directory alone
    (not grid.csv, not the cache): the best lr (lowest mean final val loss over the seeds, ties to the smaller
    lr), the mean, sample std, min and max of the val loss there, the mean training loss, the mean of the
    median step and optimizer times, the largest state bytes, the default target (the worst best-lr seed of
    all variants) and the mean steps and seconds to it; the printed ``mean ± std (n=2)``. Also: the first
    training loss is the same for adamw and soap at one seed (same weights, same first batch) and differs
    between the seeds. Fails on: a mean over the wrong units, a population std, a target from another lr,
    seconds counting evaluation time, a seed that does not reach the model's init or the batches."""
    path = tmp_path / "ab.toml"
    path.write_text(_toml_task(TINY) + """
[ablation]
name = "truth"
[tune]
lr_mult = [0.5, 2]
seeds = [0, 1]
[sweep]
key = "preset"
values = ["adamw", "soap"]
""")
    out = tmp_path / "out"
    assert cli.main(["ablate", str(path), "--out", str(out), "--no-progress", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    results = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}

    runs: dict[str, dict[float, dict[int, dict]]] = {}
    for name in ("adamw", "soap"):
        for run_dir in sorted((out / name).iterdir()):
            cfg = kronopt.loads((run_dir / "config.toml").read_text())
            task = tomllib.loads((run_dir / "task.toml").read_text())["task"]
            history, evals = _metrics(run_dir)
            runs.setdefault(name, {}).setdefault(cfg.lr, {})[task["seed"]] = {
                "summary": json.loads((run_dir / "summary.json").read_text()), "history": history, "evals": evals}
        assert sorted(runs[name]) == pytest.approx([0.5 * kronopt.resolve(name).lr, 2 * kronopt.resolve(name).lr])

    best = {}
    for name, by_lr in runs.items():
        means = {lr: sum(s["summary"]["val_loss"] for s in seeds.values()) / 2 for lr, seeds in by_lr.items()}
        best[name] = min(sorted(means), key=lambda lr: means[lr])
    target = max(s["summary"]["val_loss"] for name in runs for s in runs[name][best[name]].values())
    for name, row in results.items():
        seeds = runs[name][best[name]]
        vals = [seeds[s]["summary"]["val_loss"] for s in (0, 1)]
        mean = (vals[0] + vals[1]) / 2
        std = math.sqrt(((vals[0] - mean) ** 2 + (vals[1] - mean) ** 2) / (2 - 1))
        assert float(row["best_lr"]) == best[name]
        assert float(row["val_loss"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["val_loss_std"]) == pytest.approx(std, rel=1e-9)
        assert (float(row["val_loss_min"]), float(row["val_loss_max"])) == (min(vals), max(vals))
        assert float(row["train_loss"]) == pytest.approx(
            sum(seeds[s]["summary"]["train_loss"] for s in (0, 1)) / 2, rel=1e-12)
        for key in ("median_step_ms", "median_opt_ms"):
            assert float(row[key]) == pytest.approx(sum(seeds[s]["summary"][key] for s in (0, 1)) / 2, rel=1e-12)
        assert int(row["optimizer_state_bytes"]) == max(seeds[s]["summary"]["optimizer_state_bytes"] for s in (0, 1))
        assert (int(row["seeds"]), int(row["grid_points"]), row["status"]) == (2, 2, "ok")
        assert float(row["target"]) == target and row["target_reached"] == "2/2"
        hits = []
        for s in (0, 1):
            step = next(e["step"] for e in seeds[s]["evals"] if e["val_loss"] <= target)
            hits.append((step, math.fsum(r["step_ms"] for r in seeds[s]["history"] if r["step"] <= step) / 1e3))
        assert float(row["steps_to_target"]) == pytest.approx(sum(h[0] for h in hits) / 2)
        assert float(row["seconds_to_target"]) == pytest.approx(sum(h[1] for h in hits) / 2, rel=1e-9)
        assert f"{mean:.4f} ± {std:.4f} (n=2)" in next(line for line in printed.splitlines() if line.startswith(name))

    first = {(name, lr, s): seeds[s]["history"][0]["loss"]
             for name in runs for lr, seeds in runs[name].items() for s in seeds}
    for s in (0, 1):
        assert len({v for (_, _, seed), v in first.items() if seed == s}) == 1, first  # 4 runs, one loss
    assert first[("adamw", best["adamw"], 0)] != first[("adamw", best["adamw"], 1)]


# -- a cached unit's run directory ---------------------------------------------------------------------------------


def test_a_unit_read_from_the_cache_has_its_own_run_directory(tmp_path):
    """docs/ablations.md: ``<variant>/lr<lr>-seed<seed>/`` is "that unit's run directory, as written by kronopt
    train", and "Each unit's run directory holds its exact config.toml". Run the ablation at 4 steps, then a
    quick 3-step check into the same --out (it reruns and replaces the run directory), then 4 steps again:
    the table is the 4-step one, and so must the run directory be (it held the 3-step run's task.toml and
    metrics before the fix: a cache hit never looked at it; now a unit whose directory holds another run is
    trained again)."""
    ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}]})
    task = TaskConfig(**TINY)
    first = run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    run_ablation(ab, task=TaskConfig(**{**TINY, "steps": 3}), out_dir=tmp_path, progress=False)
    again = run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    assert again.ran + again.reused == 1  # the cached unit, or trained again where its run directory held another run
    (unit,) = again.units()
    assert [r["loss"] for r in unit.history] == [r["loss"] for r in first.units()[0].history]
    run_dir = tmp_path / "a" / f"lr{unit.lr:.6g}-seed0"
    assert tomllib.loads((run_dir / "task.toml").read_text())["task"]["steps"] == 4
    history, evals = _metrics(run_dir)
    assert [r["loss"] for r in history] == [r["loss"] for r in unit.history]
    assert [e["val_loss"] for e in evals] == [e["val_loss"] for e in unit.evals]
    assert kronopt.loads((run_dir / "config.toml").read_text()) == kronopt.resolve("adamw")


# -- run directories named after variants ---------------------------------------------------------------------------

SHORT = {**TINY, "steps": 2, "eval_every": 0}


def test_two_variants_never_share_a_run_directory(tmp_path):
    """Two variants whose names differ only in a character the directory name replaces. Either the file is
    refused up front (a ConfigError naming the clash), or each variant's run lands in a directory of its own
    holding its own config. Fails (today): one directory, holding the second variant's config."""
    raw = {"ablation": {"base": "adamw"}, "variant": [{"name": "a b", "set": {"weight_decay": 0.0}},
                                                      {"name": "a_b", "set": {"weight_decay": 0.5}}]}
    try:
        ab = parse_ablation(raw)
    except ConfigError:
        return  # refused before anything runs: no false directory
    run_ablation(ab, task=TaskConfig(**SHORT), out_dir=tmp_path, progress=False)
    found = sorted(kronopt.loads(p.read_text()).weight_decay for p in tmp_path.rglob("config.toml"))
    assert found == [0.0, 0.5]


def test_a_variant_named_dot_dot_writes_inside_the_output_directory(tmp_path):
    """Every file an ablation writes is under ``--out`` (docs/ablations.md, "The output directory"). Fails
    (today): the run of the variant ``..`` lands in the parent of ``--out``."""
    try:
        ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": ".."}]})
    except ConfigError:
        return
    out = tmp_path / "out"
    run_ablation(ab, task=TaskConfig(**SHORT), out_dir=out, progress=False)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert outside == []


# -- the cache key and the device a unit really ran on --------------------------------------------------------------


def _fake_run(calls):
    def train(task, spec, *, overrides=None, out_dir=None, progress=True, plot=True, desc="", corpus=None):
        cfg = kronopt.resolve(spec, **dict(overrides or {}))
        calls.append((spec, cfg.lr, None if cfg.fallback is None else cfg.fallback.lr, task.seed, task.device))
        val = 3.0 + cfg.lr + (0.0 if cfg.fallback is None else cfg.fallback.lr)  # depends on both lrs
        history = tuple({"step": s, "loss": 4.0, "lr": cfg.lr, "step_ms": 1.0, "opt_ms": 0.5} for s in (1, 2))
        return RunResult(task=task, config=cfg, spec=str(spec), device="cuda:0" if torch.cuda.is_available() else "cpu",
                         status="ok", reason=None, steps_done=2, train_loss=4.0, val_loss=val, median_opt_ms=0.5,
                         median_step_ms=1.0, state_bytes=100, peak_memory_bytes=None, peak_memory_kind="unavailable",
                         history=history, evals=({"step": 2, "val_loss": val},))
    return train


def test_device_auto_is_keyed_by_the_device_it_resolves_to(tmp_path, monkeypatch):
    """docs/ablations.md: the key "does cover every task setting, --threads and --device included", and
    ``--device auto`` (the default, and every shipped file's) "uses CUDA when torch can see a GPU". The same
    command with an output directory carried to (or a GPU appearing on) a CUDA machine must train there, not
    report the CPU run's losses and times as that machine's. Simulated: the run on 'CPU', then
    ``torch.cuda.is_available`` true. Fails (today): the second call reuses the CPU unit."""
    calls: list = []
    monkeypatch.setattr(ablate, "train", _fake_run(calls))
    monkeypatch.setattr(ablate, "load_corpus", lambda *a, **k: NO_DATA)
    ab = parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}]})
    task = TaskConfig(**{**TINY, "device": "auto"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    assert cpu.units()[0].device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    assert (gpu.ran, gpu.reused) == (1, 0)
    assert gpu.units()[0].device.startswith("cuda")


# -- a grid around a learning rate of 0 ------------------------------------------------------------------------------


def test_an_lr_mult_grid_around_lr_zero_is_not_reported_as_extra_seeds(tmp_path, monkeypatch):
    """Muon with ``lr = 0`` (freeze the matrices; docs/ablations.md discusses a default lr of 0) and
    ``lr_mult = [0.5, 2]``, one seed: the two units differ (fallback.lr 0.5× and 2×) but share ``lr = 0``.
    The row must not claim 2 seeds at 1 grid point with a mean over two different fallback lrs (or the variant
    is refused with a reason). Fails (today): ``seeds = 2``, ``grid_points = 1``, ``val_loss`` the mean of
    both grid points, the table's ``(n=2)``; the two runs also share one run directory."""
    calls: list = []
    monkeypatch.setattr(ablate, "train", _fake_run(calls))
    monkeypatch.setattr(ablate, "load_corpus", lambda *a, **k: NO_DATA)
    ab = parse_ablation({"ablation": {"base": "muon"}, "variant": [{"name": "m", "set": {"lr": 0.0}}],
                         "tune": {"lr_mult": [0.5, 2], "seeds": [0]}})
    (v,) = run_ablation(ab, task=TaskConfig(**TINY), out_dir=tmp_path, progress=False).variants
    if v.status == "failed" and not v.units:
        return  # refused with its reason
    fb = kronopt.resolve("muon").fallback.lr
    assert sorted(c[2] for c in calls) == pytest.approx([0.5 * fb, 2 * fb])
    row = v.row()
    assert row["seeds"] == 1 and row["grid_points"] == 2
    assert row["val_loss"] == pytest.approx(3.0 + 0.5 * fb)  # the better grid point, not the mean of both


def test_the_table_heads_an_untuned_lr_as_fixed_and_a_grid_search_as_best():
    """A variant run at one lr (no [tune] grid, as the shipped stage ablations) was not tuned: its column must
    not read "best lr", which would tell the user each variant had its lr searched."""
    fixed = run_ablation(parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}]}),
                         task=TaskConfig(**SHORT), progress=False)
    grid = run_ablation(parse_ablation({"ablation": {"base": "adamw"}, "variant": [{"name": "a"}],
                                        "tune": {"lr_mult": [0.5, 1.0]}}), task=TaskConfig(**SHORT), progress=False)
    assert "lr (fixed)" in ablate.format_table(fixed).splitlines()[0]
    assert "best lr" not in ablate.format_table(fixed).splitlines()[0]
    assert "best lr" in ablate.format_table(grid).splitlines()[0]
