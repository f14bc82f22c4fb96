"""Differential checks of the applications (``kronopt train``/``ablate``/``spectrum``/``fisher``).

Each test recomputes what an application prints or saves by an independent route (a
hand-written training loop, a float64 dense Fisher and its SVD, ``eigvalsh`` of a
hand-kept EMA, a hand count of the state bytes, the real ``KronOptimizer`` against the
Hessian lab's own pipeline) and compares. ``kronopt train`` has no checkpoint flag: its
resume is checked as a library user would do it (``state_dict`` at step k, a fresh
model and optimizer, the same batches from step k+1), and ``kronopt ablate``'s resume is
its unit cache. The bugs this hunt found, each pinned here: the unit cache taking files whose rows had the
wrong types, the Hessian lab running pro_soap with both sides full under its name, ``--beta 0`` and a
seed past the generators crashing, ``kronopt spectrum`` recording nothing when ``--steps`` < ``--every``,
two default run directories of one second, and the mixture stream depending on the last checkpoint.
"""

import csv
import io
import json
import math
import statistics
from datetime import datetime

import pytest
import torch

import kronopt
import kronopt.app.ablate as ablate_mod
import kronopt.app.train as train_mod
from kronopt import compose
from kronopt.app import cli
from kronopt.app import fisher as F
from kronopt.app import spectrum
from kronopt.app.task import TinyGPT, load_corpus
from kronopt.app.train import TaskConfig, train

F64 = torch.float64
TINY = dict(layers=1, width=16, heads=2, context=16, batch=2, steps=6, warmup=2, eval_every=3, eval_batches=1,
            threads=1, device="cpu")
TINY_FLAGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2", "--steps", "6",
              "--warmup", "2", "--eval-every", "3", "--eval-batches", "1", "--threads", "1", "--device", "cpu",
              "--no-progress", "--no-plot"]
#: a preset with refreshes between checkpoints, and one with a routed AdamW fallback
PRESETS = [("soap", {"refresh.every": 3, "lr": 3e-3}), ("muon", {"fallback.lr": 2e-3})]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, context=TINY["context"])


def _factor(step0: int, steps: int, warmup: int) -> float:
    """The documented schedule written out again: linear warm-up, then cosine decay (0-based step)."""
    warm = min(warmup, steps - 1)
    if step0 < warm:
        return (step0 + 1) / (warm + 1)
    return 0.5 * (1 + math.cos(math.pi * (step0 - warm) / max(1, steps - warm)))


def _model(task: TaskConfig) -> TinyGPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        return TinyGPT(layers=task.layers, width=task.width, heads=task.heads, context=task.context)


def _final_weights(box):
    return lambda step, opt, model: box.update(step=step, weights={k: v.clone() for k, v in model.state_dict().items()})


# -- kronopt train: an independent loop, a resume, the evaluations, the saved numbers ----------------


def _loop(model, opt, base, corpus, task, gen, steps):
    """The hand-written training loop over ``steps``: the schedule's lr set on every group, a batch, a step.
    Returns the losses and the first group's learning rates."""
    losses, lrs = [], []
    for s in steps:
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * _factor(s, task.steps, task.warmup)
        lrs.append(opt.param_groups[0]["lr"])
        x, y = corpus.batch("train", task.batch, task.context, gen)
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, lrs


@pytest.mark.parametrize(("preset", "overrides"), PRESETS)
def test_train_equals_an_independent_loop_and_resumes_bit_for_bit(preset, overrides, corpus):
    """``train()`` equals a hand-written loop (seeded init, batches of Generator(seed), warm-up + cosine on
    every group), and a run interrupted after step 4 (between SOAP's refreshes at 1 and 7; Muon's fallback
    state in it) and resumed from ``state_dict()`` on a fresh model and optimizer, with the batches from step
    5 on, continues bit for bit: same losses, same final weights.

    Fails on: batches drawn from another stream or another split, a schedule that misses the fallback group,
    a lost refresh counter or fallback moment in the optimizer's state dict, a resume that replays data."""
    task = TaskConfig(**TINY)
    k = 4
    box, saved = {}, {}

    def on_step(step, opt, model):
        _final_weights(box)(step, opt, model)
        if step == k:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            saved["bytes"] = buf.getvalue()

    run = train(task, preset, overrides=overrides, on_step=on_step, progress=False, plot=False, corpus=corpus)
    assert run.status == "ok" and box["step"] == task.steps

    # the same run, written out by hand
    model = _model(task)
    opt = kronopt.build(model.named_parameters(), preset, **overrides)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(task.seed)
    losses, lrs = _loop(model, opt, base, corpus, task, gen, range(task.steps))
    assert losses == [r["loss"] for r in run.history]
    assert lrs == pytest.approx([r["lr"] for r in run.history], rel=1e-12)
    for name, w in model.state_dict().items():
        assert torch.equal(w, box["weights"][name]), name

    # interrupted after step k, resumed on a fresh model and optimizer
    state = torch.load(io.BytesIO(saved["bytes"]), weights_only=True)
    model = TinyGPT(layers=task.layers, width=task.width, heads=task.heads, context=task.context)
    model.load_state_dict(state["model"])
    opt = kronopt.build(model.named_parameters(), preset, **overrides)
    opt.load_state_dict(state["opt"])
    gen = torch.Generator().manual_seed(task.seed)
    for _ in range(k):
        corpus.batch("train", task.batch, task.context, gen)
    resumed, _ = _loop(model, opt, base, corpus, task, gen, range(k, task.steps))
    assert resumed == [r["loss"] for r in run.history[k:]]
    for name, w in model.state_dict().items():
        assert torch.equal(w, box["weights"][name]), name

    # resuming under another config is refused (another routing) or warned about (another setting)
    other = kronopt.build(TinyGPT(layers=1, width=16, heads=2, context=16).named_parameters(),
                          "muon" if preset == "soap" else "soap")
    with pytest.raises(ValueError, match="param groups do not match|does not fit"):
        other.load_state_dict(state["opt"])
    changed = kronopt.build(TinyGPT(layers=1, width=16, heads=2, context=16).named_parameters(), preset,
                            **{**overrides, "lr": 0.5})
    with pytest.warns(UserWarning, match="different config"):
        changed.load_state_dict(state["opt"])


def test_every_evaluation_is_the_val_loss_of_the_model_on_the_same_val_batches(corpus):
    """With ``eval_every = 1`` and the weights put back to one snapshot after every step, every evaluation
    sees the same model, so every ``val_loss`` must be the same number, and equal to a cross-entropy
    recomputed here on the validation windows (the task's eval generator, seeded ``1_000_003`` for every seed).

    Fails on: evaluation batches redrawn at each evaluation, drawn from the training split, an
    evaluation in the wrong mode or averaged wrongly."""
    task = TaskConfig(**{**TINY, "eval_every": 1, "eval_batches": 2, "seed": 3})
    snap = {}

    def freeze(step, opt, model):
        if step == 1:
            snap.update({k: v.clone() for k, v in model.state_dict().items()})
        else:
            model.load_state_dict(snap)

    run = train(task, "adamw", on_step=freeze, progress=False, plot=False, corpus=corpus)
    vals = [e["val_loss"] for e in run.evals]
    assert [e["step"] for e in run.evals] == list(range(1, task.steps + 1))
    assert len(set(vals)) == 1 and run.val_loss == vals[0]

    model = TinyGPT(layers=1, width=16, heads=2, context=16)
    model.load_state_dict(snap)
    gen = torch.Generator().manual_seed(1_000_003)
    total = 0.0
    with torch.no_grad():
        for _ in range(task.eval_batches):
            starts = torch.randint(0, corpus.val.numel() - task.context, (task.batch,), generator=gen)
            windows = torch.stack([corpus.val[s:s + task.context + 1] for s in starts.tolist()]).long()
            logits = model(windows[:, :-1])
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1)).item()
    assert vals[0] == pytest.approx(total / task.eval_batches, rel=1e-6)


def _soap_state_bytes(width: int) -> int:
    """SOAP's state counted by hand for TinyGPT(1 layer): per m×n matrix L, R, Q_L, Q_R, their eigenvalue
    estimates, Adam's two moments (float32) and the basis's int64 failure counter; Adam on the 3 gains."""
    w = width
    mats = [(256, w), (w, w), (3 * w, w), (w, w), (4 * w, w), (w, 4 * w), (256, w)]
    return sum((2 * m * m + 2 * n * n + m + n + 2 * m * n) * 4 + 8 for m, n in mats) + 3 * (2 * w * 4 + 8)


def _muon_state_bytes(width: int) -> int:
    """Muon's state by hand: a momentum buffer per block matrix; AdamW's two moments on the embeddings, the
    head and the gains (its fallback); each bucket's int64 failure counter per block."""
    w = width
    main = [(3 * w, w), (w, w), (4 * w, w), (w, 4 * w)]
    fallback = [256 * w, w * w, 256 * w, w, w, w]
    return sum(m * n * 4 + 8 for m, n in main) + sum(2 * k * 4 + 8 for k in fallback)


def test_cli_train_saves_and_prints_numbers_that_recompute(tmp_path, capsys):
    """``kronopt train`` with ``--set``: summary.json's train loss (mean of the last 10 steps) and medians
    recompute from metrics.jsonl; the optimizer state bytes equal a hand count of SOAP's tensors; the
    printed line shows the same numbers; config.toml carries the override and reruns to the same losses.

    Fails on: a summary from other rows than the metrics file, a state count that double-counts the
    per-parameter views or misses a stack, an override lost on the way to the optimizer."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "soap", "--set", "refresh.every=3", *TINY_FLAGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in steps] == list(range(1, 7)) and [e["step"] for e in evals] == [3, 6]
    assert summary["train_loss"] == statistics.fmean(r["loss"] for r in steps[-10:])
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["median_opt_ms"] == statistics.median(r["opt_ms"] for r in steps)
    assert summary["median_step_ms"] == statistics.median(r["step_ms"] for r in steps)
    assert all(0 < r["opt_ms"] <= r["step_ms"] for r in steps)
    assert summary["optimizer_state_bytes"] == _soap_state_bytes(16)
    assert f"train loss {summary['train_loss']:.4f}   val loss {summary['val_loss']:.4f}" in printed
    assert f"optimizer state {_soap_state_bytes(16) / 2**20:.1f} MiB" in printed
    assert f"{summary['median_step_ms']:.1f} per step, {summary['median_opt_ms']:.1f} per optimizer step" in printed
    assert kronopt.resolve(str(out / "config.toml")).refresh.every == 3
    again = tmp_path / "again"
    assert cli.main(["train", str(out / "config.toml"), *TINY_FLAGS, "--out", str(again)]) == 0
    rerun = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss", r.get("val_loss")) for r in rerun] == [r.get("loss", r.get("val_loss")) for r in rows]


# -- kronopt ablate: resuming from the unit cache ----------------------------------------------------

ABLATION = {
    "ablation": {"name": "diff", "base": "soap"},
    "task": {k: v for k, v in TINY.items()},
    "variant": [{"name": "soap3", "set": {"refresh.every": 3}}, {"name": "muon", "preset": "muon"}],
}


def _numbers(result):
    return {(u.variant, u.lr, u.seed): (u.status, u.steps, u.train_loss, u.val_loss, u.state_bytes,
                                        [r["loss"] for r in u.history], [tuple(e.items()) for e in u.evals])
            for u in result.units()}


def test_ablate_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """An ablation killed during its second unit (KeyboardInterrupt) and run again trains only that unit,
    reads the first from the cache, and ends with the numbers of an uninterrupted run, loss by loss; a
    changed task reruns everything; steps and seconds to target recompute from the units' metrics files.

    Fails on: a cache key that misses the task, a cached history that drops or reorders steps, a resumed
    unit that sees other batches, a time to target that counts evaluation time or the wrong steps."""
    ab = ablate_mod.parse_ablation(ABLATION)
    task = TaskConfig(**ABLATION["task"])
    whole = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "whole", progress=False)
    assert (whole.ran, whole.reused) == (2, 0)

    real_train, calls = ablate_mod.train, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ablate_mod, "train", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(ablate_mod, "train", real_train)
    assert len(list((tmp_path / "cut" / "units").glob("*.json"))) == 1
    resumed = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "cut", progress=False)
    assert (resumed.ran, resumed.reused) == (1, 1)
    assert _numbers(resumed) == _numbers(whole)

    longer = ablate_mod.run_ablation(ab, task=attrs_evolve(task, steps=5), out_dir=tmp_path / "cut", progress=False)
    assert (longer.ran, longer.reused) == (2, 0)

    ablate_mod.write_results(whole, tmp_path / "whole", ablation=ab, task=task, plot=False)
    doc = json.loads((tmp_path / "whole" / "results.json").read_text())
    target = doc["tune"]["target"]
    assert target == max(r["val_loss"] for r in doc["results"])
    for row in doc["results"]:
        metrics = [json.loads(line) for line in
                   (tmp_path / "whole" / row["variant"] / f"lr{row['best_lr']:.6g}-seed0" / "metrics.jsonl")
                   .read_text().splitlines()]
        first = next(r["step"] for r in metrics if "val_loss" in r and r["val_loss"] <= target)
        assert row["steps_to_target"] == first
        assert row["seconds_to_target"] == pytest.approx(
            math.fsum(r["step_ms"] for r in metrics if "loss" in r and r["step"] <= first) / 1e3, rel=1e-12)
        want = _soap_state_bytes(16) if row["variant"] == "soap3" else _muon_state_bytes(16)
        assert row["optimizer_state_bytes"] == want


def attrs_evolve(task, **changes):
    import attrs

    return attrs.evolve(task, **changes)


def _corrupt(kind, result):
    if kind == "val_loss_text":
        result["evals"][0]["val_loss"] = str(result["evals"][0]["val_loss"])
    elif kind == "history_without_loss":
        del result["history"][0]["loss"]
    elif kind == "reason_not_text":
        result.update(status="diverged", reason=5, val_loss=None)


@pytest.mark.parametrize("kind", ["val_loss_text", "history_without_loss", "reason_not_text"])
def test_a_unit_file_with_a_field_of_the_wrong_type_is_ignored(kind, tmp_path):
    """docs/ablations.md: a unit file that "lacks a field, has a field of the wrong type … is ignored and the
    unit runs again". Fails (today) because read_unit checks the top-level numbers only."""
    ab = ablate_mod.parse_ablation({**ABLATION, "variant": ABLATION["variant"][1:]})
    task = TaskConfig(**ABLATION["task"])
    ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path, progress=False)
    (unit,) = ablate_mod.plan_units(ab.variants[0], ab.tune, task)
    path = tmp_path / "units" / f"{unit.key}.json"
    doc = json.loads(path.read_text())
    _corrupt(kind, doc["result"])
    path.write_text(json.dumps(doc))
    assert ablate_mod.read_unit(path, unit) is None


# -- kronopt spectrum against eigvalsh of a hand-kept EMA ---------------------------------------------


def test_cli_spectrum_of_a_saved_state_equals_float64_eigh_of_the_factors(tmp_path, capsys):
    """Shampoo (EMA factors, eigh basis refreshed every step) on gradients fed by hand: the printed d, max,
    min and tail AM/GM of each factor, read back from a saved state by ``kronopt spectrum --state``, equal
    those of ``eigvalsh`` of the EMA of GGᵀ / GᵀG kept here in float64; the step is the steps taken.

    Fails on: spectra of a stale basis, left and right swapped, eigenvalues unsorted before the head is cut,
    a tail ratio over the wrong values, a saved state read with the wrong block layout."""
    W = torch.nn.Parameter(torch.zeros(7, 5))
    V = torch.nn.Parameter(torch.zeros(5, 5))
    opt = kronopt.build([("blocks.0.w", W), ("blocks.0.v", V)], "shampoo", **{"refresh.every": 1})
    gen = torch.Generator().manual_seed(5)
    ema = {name: [torch.zeros(m, m, dtype=F64), torch.zeros(n, n, dtype=F64)] for name, (m, n) in
           {"blocks.0.w": (7, 5), "blocks.0.v": (5, 5)}.items()}
    for _ in range(9):
        for name, p in (("blocks.0.w", W), ("blocks.0.v", V)):
            G = torch.randn(p.shape, generator=gen) * torch.linspace(0.2, 3.0, p.shape[1])
            p.grad = G.clone()
            Gd = G.double()
            ema[name][0] = 0.95 * ema[name][0] + 0.05 * Gd @ Gd.T
            ema[name][1] = 0.95 * ema[name][1] + 0.05 * Gd.T @ Gd
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    assert cli.main(["spectrum", "--state", str(tmp_path / "state.pt"), "--head", "2", "--no-plot"]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        *label, step, d, rank, hi, lo, ratio = line.split()
        printed[" ".join(label)] = (int(step), int(d), int(rank), float(hi), float(lo), float(ratio))
    assert len(printed) == 4
    for name, (L, R) in ema.items():
        for side, Fac in (("left", L), ("right", R)):
            lam = torch.linalg.eigvalsh(Fac).flip(0)
            tail = lam[2:]
            ratio = float(tail.mean() / tail.log().mean().exp())
            step, d, rank, hi, lo, got = printed[f"{name} ({side})"]
            assert (step, d, rank) == (9, Fac.shape[0], Fac.shape[0])  # nine gradients: every factor full rank
            assert hi == pytest.approx(float(lam[0]), rel=2e-3) and lo == pytest.approx(float(lam[-1]), rel=2e-3)
            assert got == pytest.approx(ratio, abs=2e-4)


def test_spectrum_with_fewer_steps_than_every_is_refused_or_recorded(capsys):
    """``--steps`` below the default ``--every``: either an argument error naming ``--every`` (exit 2) or
    the spectra at the last step (exit 0). Fails on the misleading exit 1."""
    code = cli.main(["spectrum", "kl_shampoo", "--builtin", "--steps", "3", "--no-plot"])
    captured = capsys.readouterr()
    assert (code == 2 and "--every" in captured.err) or (code == 0 and "(left)" in captured.out)


# -- kronopt fisher against a dense float64 Fisher ------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(3, 4), (33, 2)])  # the dense SVD path and the power-iteration path
def test_cli_fisher_table_equals_a_dense_float64_recomputation(m, n, tmp_path):
    """fisher.csv's e, e_s, e_nkp, gap, gap_s equal their definitions computed densely here: F = Σ wᵢ vec Gᵢ
    vec Gᵢᵀ (w the EMA weights), K* from the SVD of the rearranged F, L ⊗ R from the estimator after T
    gradients (EMA ones also checked against the closed form); real is always 8×16.

    Fails on: a checkpoint read off by one step, EMA weights of another β, the NKP from the power
    iteration not converged, a scalar rescaling on the wrong side."""
    out = tmp_path / "fisher"
    argv = ["fisher", "--source", "iid,anisotropic,real", "--steps", "2,5", "--m", str(m), "--n", str(n), "--beta",
            "0.9", "--seed", "3", "--estimators", "ema,projector_splitting", "--no-hessian", "--no-plot", "--out",
            str(out)]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((out / "fisher.csv").open()))
    assert len(rows) == 3 * 2 * 2
    beta = 0.9
    for r in rows:
        src, est, T = r["source"], r["estimator"], int(r["T"])
        mm, nn = (8, 16) if src == "real" else (m, n)
        stream = torch.stack(F.gradient_stream(src, mm, nn, 5, seed=3))
        grads = stream[:T]
        w = torch.tensor([(1 - beta) * beta ** (T - i) for i in range(1, T + 1)], dtype=F64)
        g = grads.reshape(T, -1)
        Fd = (g.T * w) @ g
        L, R = F.track(est, list(stream), beta=beta)[T - 1]
        if est == "ema":
            torch.testing.assert_close(L, sum(wi * G @ G.T for wi, G in zip(w, grads)), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(R, sum(wi * G.T @ G for wi, G in zip(w, grads)), rtol=1e-12, atol=1e-14)
        K = torch.kron(L, R)
        U, S, Vh = torch.linalg.svd(Fd.reshape(mm, nn, mm, nn).permute(0, 2, 1, 3).reshape(mm * mm, nn * nn))
        Ks = S[0] * torch.kron(U[:, 0].reshape(mm, mm), Vh[0].reshape(nn, nn))
        c, cs = float((Fd * K).sum() / (K * K).sum()), float((Ks * K).sum() / (K * K).sum())
        want = {"e": (Fd - K).norm() / Fd.norm(), "e_s": (Fd - c * K).norm() / Fd.norm(),
                "e_nkp": (Fd - Ks).norm() / Fd.norm(), "gap": (K - Ks).norm() / Ks.norm(),
                "gap_s": (cs * K - Ks).norm() / Ks.norm()}
        for key, value in want.items():
            assert float(r[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-6), (src, est, T, key)


@pytest.mark.parametrize("source", [
    "iid", "anisotropic", "real",
    "mixture",
])
def test_a_checkpoint_does_not_depend_on_the_later_checkpoints(source):
    """The row at T = 2 is the same whether the stream goes on to T = 4 or stops at 2 (the stream is one
    sequence; a later checkpoint only reads further along it).

    Fails on: a source whose first gradients depend on the stream's length."""
    short = F.run_lab(sources=[source], estimators=["ema"], checkpoints=(2,), m=3, n=3, curve_points=2)
    long = F.run_lab(sources=[source], estimators=["ema"], checkpoints=(2, 4), m=3, n=3, curve_points=2)
    assert short["rows"][0] == next(r for r in long["rows"] if r["T"] == 2)


def _lab_updates(spec: str, lr: float) -> list[torch.Tensor]:
    """The weight changes ``hessian_experiment`` applies, spied on ``compose.step``."""
    got, real_step = [], compose.step

    def spy(*args, **kwargs):
        D, state = real_step(*args, **kwargs)
        got.append(torch.zeros(8, 16, dtype=F64) if D is None else -lr * D[0].clone())
        return D, state

    compose.step = spy
    try:
        F.hessian_experiment([spec], rows=300, epochs=2, lrs=[lr])
    finally:
        compose.step = real_step
    return got


def _optimizer_updates(spec: str, lr: float) -> list[torch.Tensor]:
    """The same experiment with the real optimizer: ``kronopt.build`` on the 8 × 16 float64 weight."""
    rows, classes, batch = 300, 8, 100
    X, y = F.byte_dataset(rows, classes=classes)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(rows, generator=gen)
    train_rows = order[: int(0.7 * rows)]
    bound = math.sqrt(6.0 / (classes + F.FEATURES))
    W = torch.nn.Parameter((torch.rand(classes, F.FEATURES, generator=gen, dtype=F64) * 2 - 1) * bound)
    name, options = F.parse_estimator(spec)
    opt = kronopt.build([("W", W)], name, **F.hessian_settings(lr, options))
    out = []
    for idx in [train_rows[i:i + batch] for _ in range(2) for i in range(0, len(train_rows), batch)]:
        with torch.no_grad():
            P = torch.softmax(X[idx] @ W.mT, dim=-1)
            P[torch.arange(len(idx)), y[idx]] -= 1.0
            W.grad = P.mT @ X[idx] / len(idx)
        before = W.detach().clone()
        opt.step()
        out.append(W.detach() - before)
    return out


@pytest.mark.parametrize("spec", ["soap", "dykaf"])
def test_hessian_experiment_steps_as_the_optimizer_it_names(spec):
    """Each weight change of the Hessian lab equals the one ``kronopt.build(..., spec)`` makes from the same
    gradients (same data, init, batches and settings).

    Fails on: the lab driving the pipeline with another layout, other settings or another lr."""
    lab, real = _lab_updates(spec, 0.01), _optimizer_updates(spec, 0.01)
    assert len(lab) == len(real) == 6
    for a, b in zip(lab, real):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_hessian_lab_refuses_an_optimizer_with_a_restricted_side(tmp_path, capsys):
    """The lab compares full factors ``L ⊗ R`` with the Hessian: pro_soap restricts the 16-long side to rank 4, so
    it is refused up front (exit 2, naming it) where the lab once ran a both-sides-full pipeline under its name."""
    code = cli.main(["fisher", "--source", "", "--hessian-optimizers", "pro_soap", "--no-plot", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 2 and "pro_soap" in err and "restricted" in err
    assert not (tmp_path / "f").exists()


# -- bad arguments: exit 2 and a message, never a traceback; no silent clobbering ----------------------------


def test_fisher_beta_zero_is_refused_or_runs(tmp_path, capsys):
    """``--beta`` is documented in [0, 1): 0 must either run or be refused with exit 2 naming ``--beta``."""
    code = cli.main(["fisher", "--source", "iid", "--steps", "2", "--m", "2", "--n", "2", "--estimators",
                     "ema,projector_splitting", "--beta", "0", "--no-hessian", "--no-plot", "--out", str(tmp_path / "f")])
    assert code == 0 or (code == 2 and "--beta" in capsys.readouterr().err)


def test_train_seed_beyond_the_generator_is_refused(tmp_path, capsys):
    """A seed no torch generator takes (beyond 2**63 - 1, the largest `torch.Generator.manual_seed` keeps) is an argument error."""
    code = cli.main(["train", *TINY_FLAGS, "--seed", str(2**64 - 1), "--out", str(tmp_path / "r")])
    assert code == 2 and "--seed" in capsys.readouterr().err


def test_two_default_run_directories_never_coincide(tmp_path, monkeypatch):
    """Two runs with the default ``--out`` in the same second get two directories (or the second is refused)."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2025, 1, 2, 3, 4, 5)

    monkeypatch.setattr(train_mod, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = cli.main(["train", *TINY_FLAGS, "--set", "lr=1e-3"])
    second = cli.main(["train", *TINY_FLAGS, "--set", "lr=2e-3"])
    assert first == 0
    assert second == 2 or len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize(("argv", "words"), [
    (["fisher", "--hessian-optimizers", "kl_shampoo", "--source", ""], ["--hessian-optimizers kl_shampoo", "inner.betas"]),
    (["fisher", "--beta", "1", "--no-hessian"], ["--beta", "must be < 1"]),
    (["spectrum", "--state", "{adam}"], ["--state", "not a kronopt optimizer state dict"]),
    (["train", "--out", "{file}"], ["--out", "exists and is not a directory"]),
    (["ablate", "{ablation}", "--out", "{file}"], ["--out", "exists and is not a directory"]),
    (["ablate", "{ablation}", "--only", "nope", "--steps", "0"], ["--only", "'nope'", "--steps", "must be ≥ 1"]),
])
def test_bad_arguments_exit_2_naming_them(argv, words, tmp_path, capsys, monkeypatch):
    """Exit code 2, every problem named, no traceback, and nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    adam.step()
    torch.save(adam.state_dict(), tmp_path / "adam.pt")
    (tmp_path / "ab.toml").write_text('[ablation]\nbase = "adamw"\n[[variant]]\nname = "a"\n')
    paths = {"adam": str(tmp_path / "adam.pt"), "file": str(tmp_path / "file"), "ablation": str(tmp_path / "ab.toml")}
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main([a.format(**paths) for a in argv] + ["--no-plot"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
