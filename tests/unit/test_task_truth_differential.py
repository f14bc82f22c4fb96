"""Differential checks of the embedded task (``kronopt.app.task``, ``kronopt.app.train``) that every published
comparison rests on: the windows a split yields, the loss recomputed by hand in float64, the causal mask,
the learning rate of every param group at every step against the documented schedule, what the timings
measure, the validation sample, refused data files, and bit-identical runs across processes.

The bugs this hunt found, each fixed (each test fails on the code before its fix):

* ``Corpus.batch`` never draws the last window of a split (``randint``'s exclusive bound is one short), so the
  split's last byte is never a target;
* the validation sample is redrawn for every seed (its generator is seeded with the task's seed), so the
  "seed spread" of an ablation mixes training noise with the noise of which validation windows were drawn;
* ``kronopt train`` without ``--out`` makes its run directory before the data's size is checked, so a refused
  ``--data`` file leaves an empty ``runs/train-…`` directory behind.
"""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

import kronopt
import kronopt.app.train as train_mod
from kronopt.app import cli
from kronopt.app.task import TinyGPT, load_corpus
from kronopt.app.task.data import Corpus
from kronopt.app.train import TaskConfig, train

F64 = torch.float64
TINY = dict(layers=1, width=16, heads=2, context=16, batch=2, steps=4, warmup=1, eval_every=0, eval_batches=1,
            threads=1, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, context=TINY["context"])


def _recording_build(monkeypatch, seen):
    """Make ``train`` build its optimizer with a step pre-hook that records every group's lr as the step sees it;
    ``seen[0]`` is the list of base lrs (before the scheduler touches them)."""
    build = kronopt.build

    def wrapped(*args, **kwargs):
        opt = build(*args, **kwargs)
        seen.append([g["lr"] for g in opt.param_groups])
        opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
        return opt

    monkeypatch.setattr(train_mod.kronopt, "build", wrapped)


# -- the windows of a split ---------------------------------------------------------------------------


def test_batch_windows_reach_every_start_and_the_last_byte():
    """A split of n bytes holds n - context windows of context + 1 bytes (starts 0 … n - context - 1). Drawn
    uniformly, 800 windows over 4 possible starts miss one with probability 4·(3/4)^800 ≈ 1e-100.

    Fails on: an off-by-one in the upper bound of the starts (today's code draws only 0 … n - context - 2)."""
    n, context = 20, 16
    data = torch.arange(100, 100 + n, dtype=torch.uint8)
    corpus = Corpus(train=data, val=data.clone(), source="arange")
    gen = torch.Generator().manual_seed(0)
    starts, targets = set(), set()
    for _ in range(100):
        x, y = corpus.batch("train", 8, context, gen)
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts.update((x[:, 0] - 100).tolist())
        targets.update(y.flatten().tolist())
    assert starts == set(range(n - context))
    assert 100 + n - 1 in targets


# -- the loss: float64 by hand, next-byte targets, causal ---------------------------------------------


def test_loss_is_the_next_byte_cross_entropy_recomputed_in_float64_and_causal(corpus):
    """``model.loss`` equals -mean log softmax(logits)[target] computed in float64 from the logits (log-sum-exp by
    hand), the targets are the corpus bytes one past each input (located in the split by matching the window),
    and changing the bytes after position t leaves the logits at positions ≤ t bit-identical.

    Fails on: targets not shifted by one, a loss reduced over the wrong axis or in the wrong units, attention
    that sees later bytes."""
    task = TaskConfig(**TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = TinyGPT(layers=1, width=16, heads=2, context=16)
    for p in model.parameters():  # larger weights so that every position's logits depend on its context
        p.data.mul_(20.0)
    x, y = corpus.batch("train", 3, task.context, torch.Generator().manual_seed(11))
    blob = corpus.train.numpy().tobytes()
    for row_x, row_y in zip(x, y):
        window, starts, s = bytes(row_x.tolist()), [], -1
        while (s := blob.find(window, s + 1)) >= 0:
            starts.append(s)
        assert starts and any(blob[s + 1:s + 1 + task.context] == bytes(row_y.tolist()) for s in starts)
    with torch.no_grad():
        logits = model(x).to(F64)
        lse = logits.max(-1, keepdim=True).values
        lse = lse.squeeze(-1) + (logits - lse).exp().sum(-1).log()
        picked = logits.gather(-1, y[..., None]).squeeze(-1)
        ref = (lse - picked).mean().item()
        assert model.loss(x, y).item() == pytest.approx(ref, rel=1e-6, abs=0)
        base = model(x)
        for t in range(task.context - 1):
            changed = x.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 97) % 256
            out = model(changed)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), t
            assert not torch.equal(out[:, t + 1:], base[:, t + 1:]), t


# -- the learning-rate schedule, every group, every step ---------------------------------------------


def _documented(step0: int, steps: int, warmup: int, schedule: str) -> float:
    """docs/ablations.md and TaskConfig: ``warmup`` linear warm-up steps (the (k+1)/(warmup+1) ramp), then
    cosine decay towards 0 at the end of the run, or a constant 1."""
    if step0 < warmup:
        return (step0 + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step0 - warmup) / (steps - warmup)))


@pytest.mark.parametrize(("schedule", "warmup", "steps"),
                         [("cosine", 2, 6), ("cosine", 0, 4), ("constant", 2, 5), ("constant", 0, 2), ("cosine", 0, 1)])
def test_every_groups_lr_at_every_step_follows_the_schedule(schedule, warmup, steps, corpus, monkeypatch):
    """Muon's two groups (the matrices, and the routed AdamW fallback with its own base lr) as the optimizer
    sees them at each of its steps, first and last included, against the formula written out here; the
    ``lr`` of ``metrics.jsonl`` (history) is the first group's.

    Fails on: a scheduler stepped before the first step or twice per step, a schedule that misses the
    fallback group, an lr logged from another step than the one it was used in."""
    seen: list[list[float]] = []
    _recording_build(monkeypatch, seen)
    task = TaskConfig(**{**TINY, "schedule": schedule, "warmup": warmup, "steps": steps})
    run = train(task, "muon", overrides={"fallback.lr": 2e-3}, progress=False, plot=False, corpus=corpus)
    base, used = seen[0], seen[1:]
    assert len(base) == 2 and base[0] != base[1] and len(used) == steps
    for k, lrs in enumerate(used):
        f = _documented(k, steps, warmup, schedule)
        assert lrs == pytest.approx([b * f for b in base], rel=1e-12, abs=0), k
        assert run.history[k]["lr"] == lrs[0]


@pytest.mark.parametrize("warmup", [5, 9])
def test_a_warmup_at_least_the_run_ramps_up_and_never_exceeds_the_base_lr(warmup, corpus, monkeypatch):
    """warmup ≥ steps: every step's lr rises strictly, the same factor on both groups, and none exceeds the base.

    Fails on: a cosine that starts decaying inside the warm-up, a factor above 1, a division by zero."""
    seen: list[list[float]] = []
    _recording_build(monkeypatch, seen)
    train(TaskConfig(**{**TINY, "warmup": warmup, "steps": 5}), "muon", progress=False, plot=False, corpus=corpus)
    base, used = seen[0], seen[1:]
    factors = [[lr / b for lr, b in zip(lrs, base)] for lrs in used]
    assert all(f[0] == pytest.approx(f[1], rel=1e-12) for f in factors)
    main = [f[0] for f in factors]
    assert all(0 < a < b for a, b in zip(main, main[1:])) and main[-1] <= 1.0 + 1e-12


# -- timings: what opt_ms and step_ms cover ----------------------------------------------------------


def test_opt_ms_is_the_optimizer_step_and_step_ms_excludes_the_callback(corpus, monkeypatch):
    """A 40 ms sleep in a step pre-hook must land in ``opt_ms`` (and ``step_ms``); a 300 ms sleep in ``on_step``
    must land in neither (step_ms is "batch, forward, backward, optimizer step, zero_grad"). The medians are
    the medians of the history's numbers.

    Fails on: opt_ms timed around the backward pass or not around the step, step_ms that counts the callback."""
    build = kronopt.build

    def slow(*args, **kwargs):
        opt = build(*args, **kwargs)
        opt.register_step_pre_hook(lambda o, a, k: time.sleep(0.04))
        return opt

    monkeypatch.setattr(train_mod.kronopt, "build", slow)
    run = train(TaskConfig(**{**TINY, "steps": 3}), "adamw", on_step=lambda s, o, m: time.sleep(0.3),
                progress=False, plot=False, corpus=corpus)
    for row in run.history:
        assert 40 <= row["opt_ms"] <= row["step_ms"]
        assert row["step_ms"] - row["opt_ms"] < 250
    assert run.median_opt_ms == sorted(r["opt_ms"] for r in run.history)[1]
    assert run.median_step_ms == sorted(r["step_ms"] for r in run.history)[1]


# -- the validation sample ---------------------------------------------------------------------------


def test_the_validation_sample_is_the_same_for_every_seed(corpus):
    """Two runs with seeds 0 and 1 whose weights are set to one snapshot after their single step evaluate the same
    model; on one fixed validation set their ``val_loss`` is the same number. (The split is fixed "between runs"
    (docs/ablations.md) and the seed "seeds the model's initial weights and the order of the batches"
    (TaskConfig); docs/results.md reads the spread over seeds as the seeds' scatter of the final loss.)

    Fails on: a validation sample that follows the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        snap = TinyGPT(layers=1, width=16, heads=2, context=16).state_dict()

    def freeze(step, opt, model):
        model.load_state_dict(snap)

    vals = [train(TaskConfig(**{**TINY, "steps": 1, "seed": seed, "eval_batches": 2}), "adamw", on_step=freeze,
                  progress=False, plot=False, corpus=corpus).val_loss for seed in (0, 1)]
    assert vals[0] == vals[1]


# -- --data files ------------------------------------------------------------------------------------


def test_a_refused_data_file_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    """``kronopt train --data EMPTY`` exits 2 naming the file's split, and (as for every other refused argument,
    all checked before the default directory is made) writes nothing.

    Fails on: a run directory created before the data is known to be usable."""
    data = tmp_path / "empty.txt"
    data.write_bytes(b"")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code = cli.main(["train", "adamw", "--data", str(data), "--context", "16", "--device", "cpu", "--threads", "1",
                     "--no-progress", "--no-plot"])
    assert code == 2 and "the train split of" in capsys.readouterr().err
    assert list(work.rglob("*")) == []


def test_a_file_of_arbitrary_bytes_is_split_by_position_and_trains(tmp_path):
    """Non-UTF-8 bytes (every value 0…255, 0x80–0xff alone) are taken as they are; the splits are the file's first
    and last bytes with nothing in both; the smallest usable file is the first with ⌊n/10⌋ > context + 1.

    Fails on: a decode step, a split that overlaps or drops bytes, a size check off by one."""
    raw = bytes(range(128, 256)) * 2 + bytes(range(256))
    path = tmp_path / "bin.dat"
    path.write_bytes(raw)
    c = load_corpus(path, context=16)
    cut = len(raw) - len(raw) // 10
    assert bytes(c.train.tolist()) == raw[:cut] and bytes(c.val.tolist()) == raw[cut:]
    run = train(TaskConfig(**{**TINY, "data": str(path), "steps": 2}), "adamw", progress=False, plot=False)
    assert run.status == "ok" and math.isfinite(run.val_loss)
    path.write_bytes(raw[:179])  # val 17 bytes = context + 1: refused
    with pytest.raises(kronopt.ConfigError, match="val split .* has 17 bytes"):
        load_corpus(path, context=16)
    path.write_bytes(raw[:180])  # val 18 bytes
    assert load_corpus(path, context=16).val.numel() == 18


# -- determinism -------------------------------------------------------------------------------------

_CHILD = """
import json, torch
from kronopt.app.train import TaskConfig, train
torch.manual_seed(999)
run = train(TaskConfig(**json.loads({task!r})), "soap", overrides={{"refresh.every": 2}}, progress=False, plot=False)
print(json.dumps([[r["loss"].hex() for r in run.history], run.val_loss.hex()]))
"""


def test_the_same_seed_is_bit_identical_across_processes_and_caller_rng(corpus):
    """A run in this process (after the global RNG was seeded with something else) and one in a fresh process
    give bit-identical losses and val_loss; the caller's global RNG state and thread count are left as they were.

    Fails on: weights or batches drawn from the global RNG, state that leaks between runs in one process."""
    task = {**TINY, "steps": 3}
    torch.manual_seed(31337)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    run = train(TaskConfig(**task), "soap", overrides={"refresh.every": 2}, progress=False, plot=False, corpus=corpus)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads
    here = [[r["loss"].hex() for r in run.history], run.val_loss.hex()]
    child = subprocess.run([sys.executable, "-c", _CHILD.format(task=json.dumps(task))], capture_output=True,
                           text=True, timeout=120, check=True)
    assert json.loads(child.stdout.strip().splitlines()[-1]) == here
