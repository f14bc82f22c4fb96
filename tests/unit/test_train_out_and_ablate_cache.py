"""``kronopt train --out`` over an earlier run's directory, and the ablation cache keyed by the data's bytes.

A run directory must hold one run: ``kronopt train --out DIR`` refuses a ``DIR`` that holds an earlier
run's files, before any work, unless ``--overwrite`` is given; then exactly the files a run writes are
removed first, and nothing else in ``DIR``. The ablation's unit cache must follow the contents of
``--data``, not its path: new bytes at the same path rerun the unit, the same bytes elsewhere reuse it,
and a unit file of the old path-keyed layout is never taken as a match.

Every run here is a one-layer model of width 16 on a few kilobytes of text, for a handful of steps.
"""

import hashlib
import json
import random
import shutil

import attrs
import pytest

import kronopt.app.ablate as ablate_mod
import kronopt.app.train as train_mod
from kronopt.app import cli
from kronopt.app.train import TaskConfig, task_to_dict, train
from kronopt.config import ConfigError, to_dict

from tests.unit.test_cli_errors import run as _run

TINY = dict(layers=1, width=16, heads=2, context=16, batch=2, steps=4, warmup=1, eval_every=2, eval_batches=1,
            threads=1, device="cpu")
TINY_FLAGS = ["--layers", "1", "--width", "16", "--heads", "2", "--context", "16", "--batch", "2",
              "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--device", "cpu",
              "--no-progress"]
#: every file a training run writes into its directory (``docs/ablations.md``, "Each run writes one directory")
RUN_FILES = {"config.toml", "task.toml", "metrics.jsonl", "summary.json", "loss.png"}
WORDS = ["kernel", "factor", "basis", "momentum", "shampoo", "eigen", "rotate", "adam", "decay", "step", "\n"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _text(seed: int, words: int = 700) -> str:
    """A few kilobytes of word salad; another seed gives other bytes (and other batches)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_text(0), encoding="utf-8")
    return path


class Reached(Exception):
    """The command got past its checks and called ``train``."""


def _forbidden(*args, **kwargs):
    raise Reached




def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _train_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- kronopt train --out: one run per directory --------------------------------------------------------


def test_cli_refuses_an_out_dir_holding_an_earlier_run_before_any_work(tmp_path, data, capsys, monkeypatch):
    """A second ``kronopt train --out DIR`` without ``--overwrite`` exits 2 naming ``DIR`` and the earlier
    run's files, and leaves them byte for byte as they were; ``train`` is never called.

    Fails on: a second run that writes into the directory (its ``--no-plot`` would keep the first run's
    ``loss.png`` beside its own metrics), a check made only after the data is read or the model built."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "adamw", *TINY_FLAGS, "--steps", "4", "--data", str(data),
                     "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES
    before = _snapshot(out)
    capsys.readouterr()

    monkeypatch.setattr(train_mod, "train", _forbidden)
    rc, text = _run(["train", "--preset", "adamw", *TINY_FLAGS, "--steps", "2", "--no-plot", "--data", str(data),
                     "--out", str(out)], capsys)
    assert rc == 2, text
    assert str(out) in text and "--out" in text and "--overwrite" in text and "Traceback" not in text
    for name in RUN_FILES:
        assert name in text, (name, text)
    assert _snapshot(out) == before


def test_cli_reports_the_earlier_run_with_the_other_bad_flags(tmp_path, capsys, monkeypatch):
    """The refusal is one of the argument problems listed together (exit 2), so a partial earlier run (a
    lone ``metrics.jsonl``) is named beside a bad ``--steps``."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    monkeypatch.setattr(train_mod, "train", _forbidden)
    rc, text = _run(["train", *TINY_FLAGS, "--steps", "0", "--no-plot", "--out", str(out)], capsys)
    assert rc == 2, text
    assert "2 errors" in text and "metrics.jsonl" in text and "--steps" in text
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


@pytest.mark.parametrize("state", ["missing", "empty", "user files only"])
def test_cli_accepts_a_missing_empty_or_unrelated_out_dir(state, tmp_path, capsys, monkeypatch):
    """Only a run's own files make a directory taken: a new, an empty, or a directory of the user's other
    files (even ones named like a run's, in a subdirectory) reaches the training."""
    out = tmp_path / "run"
    if state != "missing":
        out.mkdir()
    if state == "user files only":
        (out / "notes.txt").write_text("mine\n")
        (out / "older").mkdir()
        (out / "older" / "summary.json").write_text("{}\n")
        (out / "results.csv").write_text("variant\n")
    monkeypatch.setattr(train_mod, "train", _forbidden)
    with pytest.raises(Reached):
        cli.main(["train", *TINY_FLAGS, "--steps", "2", "--no-plot", "--out", str(out)])


def test_cli_overwrite_replaces_only_the_earlier_runs_files(tmp_path, data, capsys):
    """``--overwrite`` reruns into the same directory from its own ``config.toml``: the earlier run's
    ``loss.png`` (not written again under ``--no-plot``) is gone, the metrics and summary are this run's
    alone, and the user's files beside them, in a subdirectory, or with run-like names, are untouched.

    Fails on: files of the first run left behind, metrics appended to the earlier ones, a clean-up that
    removes the whole directory or matches names loosely, a config file removed before it was read."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "adamw", *TINY_FLAGS, "--steps", "4", "--data", str(data),
                     "--out", str(out)]) == 0
    user = {"notes.txt": b"keep me\n", "ckpt/model.pt": b"\x00weights", "my_summary.json": b"{}\n",
            "loss.png.orig": b"\x89PNG mine", "ckpt/metrics.jsonl": b"{}\n"}
    for name, content in user.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(content)
    first_config = (out / "config.toml").read_text()
    capsys.readouterr()

    assert cli.main(["train", str(out / "config.toml"), *TINY_FLAGS, "--steps", "3", "--no-plot",
                     "--data", str(data), "--out", str(out), "--overwrite"]) == 0
    files = _snapshot(out)
    assert set(files) == (RUN_FILES - {"loss.png"}) | set(user)
    assert all(files[name] == content for name, content in user.items())
    assert [r["step"] for r in _train_rows(out)] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "config.toml").read_text() == first_config
    assert "steps = 3" in (out / "task.toml").read_text()


def test_cli_overwrite_with_a_bad_argument_keeps_the_earlier_run(tmp_path, data, capsys):
    """A bad ``--set`` under ``--overwrite`` exits 2 before anything is removed."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "adamw", *TINY_FLAGS, "--steps", "2", "--no-plot", "--data", str(data),
                     "--out", str(out)]) == 0
    before = _snapshot(out)
    rc, text = _run(["train", "--preset", "adamw", "--set", "lr=fast", *TINY_FLAGS, "--no-plot", "--out", str(out),
                     "--overwrite"], capsys)
    assert rc == 2 and "lr" in text, text
    assert _snapshot(out) == before


def test_library_train_refuses_an_earlier_run_unless_told_to_overwrite(tmp_path, data):
    """``train(out_dir=DIR)`` over an earlier run raises :class:`ConfigError` naming ``DIR`` before its first
    step; ``overwrite=True`` replaces that run and keeps the user's files."""
    out = tmp_path / "run"
    task = TaskConfig(**{**TINY, "data": str(data)})
    train(task, "adamw", out_dir=out, progress=False, plot=False)
    before = _snapshot(out)
    steps = []
    with pytest.raises(ConfigError, match="summary.json") as info:
        train(attrs.evolve(task, steps=2), "adamw", out_dir=out, progress=False, plot=False,
              on_step=lambda step, opt, model: steps.append(step))
    assert str(out) in str(info.value)
    assert steps == [] and _snapshot(out) == before

    (out / "notes.txt").write_text("mine\n")
    result = train(attrs.evolve(task, steps=2), "adamw", out_dir=out, progress=False, plot=False, overwrite=True)
    assert result.steps_done == 2 and [r["step"] for r in _train_rows(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine\n"


# -- the ablation cache: keyed by the data's bytes -------------------------------------------------------

ABLATION = {"ablation": {"name": "data", "base": "adamw"}, "variant": [{"name": "a", "set": {"lr": 3e-3}}]}


def _numbers(result):
    return [(u.status, u.steps, u.train_loss, u.val_loss, [r["loss"] for r in u.history]) for u in result.units()]


def test_new_bytes_at_the_same_path_rerun_the_unit(tmp_path, data):
    """Replacing the data file's contents (same path, same size class) reruns the unit, into its existing run
    directory, with the numbers of a fresh ablation on the new bytes.

    Fails on: a key built from the path (the stale row is reused), a retrain refused because its run
    directory holds the earlier run."""
    ab = ablate_mod.parse_ablation(ABLATION)
    task = TaskConfig(**{**TINY, "data": str(data)})
    first = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert (first.ran, first.reused) == (1, 0) and first.variants[0].status == "ok"

    data.write_text(_text(1), encoding="utf-8")
    second = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert (second.ran, second.reused) == (1, 0) and second.variants[0].status == "ok"
    assert _numbers(second) != _numbers(first)
    fresh = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "fresh", progress=False)
    assert _numbers(second) == _numbers(fresh)
    (run_dir,) = [p for p in (tmp_path / "out" / "a").iterdir()]
    assert [r["loss"] for r in _train_rows(run_dir)] == [r["loss"] for r in second.units()[0].history]

    again = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert (again.ran, again.reused) == (0, 1) and _numbers(again) == _numbers(second)


def test_the_same_bytes_rewritten_or_at_another_path_reuse_the_unit(tmp_path, data):
    """The key follows the bytes alone: the file rewritten with the same contents, or copied elsewhere and
    named by its new path, reuses the cached unit."""
    ab = ablate_mod.parse_ablation(ABLATION)
    task = TaskConfig(**{**TINY, "data": str(data)})
    first = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    data.write_bytes(data.read_bytes())
    moved = tmp_path / "elsewhere" / "renamed.txt"
    moved.parent.mkdir()
    shutil.copyfile(data, moved)
    for path in (data, moved):
        again = ablate_mod.run_ablation(ab, task=attrs.evolve(task, data=str(path)), out_dir=tmp_path / "out",
                                        progress=False)
        assert (again.ran, again.reused) == (0, 1) and _numbers(again) == _numbers(first)


def _v1_key(config, task):
    """The unit key of the first cache layout, written out again: the task's ``data`` path, not its bytes."""
    doc = {"format": 1, "config": to_dict(config), "task": task_to_dict(task)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def test_a_unit_cached_under_the_old_path_key_is_not_reused(tmp_path, data):
    """A well-formed unit file of the path-keyed layout (format 1), at the very name that layout gives the
    unit, is ignored: the unit trains and its numbers replace the planted ones. Nothing raises.

    Fails on: a format or key that still matches the old layout, so the planted loss of 0.125 comes back."""
    ab = ablate_mod.parse_ablation(ABLATION)
    task = TaskConfig(**{**TINY, "data": str(data)})
    (unit,) = ablate_mod.plan_units(ab.variants[0], ab.tune, task)
    old = _v1_key(unit.config, unit.task)
    planted = {"status": "ok", "reason": None, "steps": 1, "train_loss": 0.125, "val_loss": 0.125,
               "median_step_ms": 1.0, "median_opt_ms": 0.5, "state_bytes": 8, "peak_memory_bytes": None,
               "device": "cpu", "history": [{"step": 1, "loss": 0.125, "step_ms": 1.0, "opt_ms": 0.5}],
               "evals": [{"step": 1, "val_loss": 0.125}]}
    units = tmp_path / "out" / "units"
    units.mkdir(parents=True)
    (units / f"{old}.json").write_text(json.dumps({"format": 1, "key": old, "config": to_dict(unit.config),
                                                   "task": task_to_dict(unit.task), "result": planted}))
    result = ablate_mod.run_ablation(ab, task=task, out_dir=tmp_path / "out", progress=False)
    assert (result.ran, result.reused) == (1, 0)
    (trained,) = result.units()
    assert trained.status == "ok" and trained.steps == TINY["steps"] and trained.val_loss != 0.125


def test_a_large_file_is_hashed_in_chunks_to_its_sha256(tmp_path, monkeypatch):
    """The data digest of a file is the SHA-256 of its bytes, whatever the chunk size (here 7 bytes, so the
    last chunk is short), and a single changed byte changes it."""
    raw = random.Random(3).randbytes(10_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    monkeypatch.setattr(ablate_mod, "HASH_CHUNK_BYTES", 7)
    assert ablate_mod.data_sha256(str(path)) == hashlib.sha256(raw).hexdigest()
    path.write_bytes(raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:])
    assert ablate_mod.data_sha256(str(path)) != hashlib.sha256(raw).hexdigest()


def test_the_default_corpus_digest_follows_the_stdlib_files(tmp_path, monkeypatch):
    """Without ``--data`` the digest covers the standard-library files the corpus is read from: their bytes
    and which split each is in, so a changed file or a changed split gives another key."""
    a, b, c = (tmp_path / f"{name}.py" for name in "abc")
    for i, f in enumerate((a, b, c)):
        f.write_text(_text(10 + i, 50))
    split = {"value": ([a, b], [c])}
    monkeypatch.setattr(ablate_mod, "stdlib_files", lambda: split["value"])
    first = ablate_mod.data_sha256(None)
    assert ablate_mod.data_sha256(None) == first
    split["value"] = ([a], [b, c])
    assert ablate_mod.data_sha256(None) != first
    split["value"] = ([a, b], [c])
    b.write_text(_text(99, 50))
    assert ablate_mod.data_sha256(None) != first


def test_a_corpus_carries_the_digest_the_ablation_keys_by(tmp_path, data, monkeypatch):
    """:attr:`Corpus.sha256` is the digest of the bytes it was read from, by the same scheme as
    :func:`data_sha256` (the file's SHA-256; for the standard library its files' digests per split), so a unit
    keyed by a corpus' digest finds the units keyed by the data's, and the other way round."""
    from kronopt.app.task import load_corpus

    assert load_corpus(data, context=8).sha256 == ablate_mod.data_sha256(str(data)) == hashlib.sha256(data.read_bytes()).hexdigest()
    a, b, c = (tmp_path / f"{name}.py" for name in "abc")
    for i, f in enumerate((a, b, c)):
        f.write_text(_text(20 + i, 60))
    monkeypatch.setattr(ablate_mod, "stdlib_files", lambda: ([a, b], [c]))
    monkeypatch.setattr("kronopt.app.task.data.stdlib_files", lambda: ([a, b], [c]))
    corpus = load_corpus(None, context=8)
    expected = hashlib.sha256(b"kronopt stdlib corpus\n" + b"train 2\n" + hashlib.sha256(a.read_bytes()).digest()
                              + hashlib.sha256(b.read_bytes()).digest() + b"val 1\n" + hashlib.sha256(c.read_bytes()).digest())
    assert corpus.sha256 == ablate_mod.data_sha256(None) == expected.hexdigest()


def test_a_data_file_edited_while_the_ablation_runs_is_neither_trained_on_nor_keyed_by(tmp_path, data, monkeypatch):
    """The data is read once, before any unit, and the units are keyed by the digest of exactly those bytes:
    a file edited after the ablation started (here while its units are planned) changes nothing of the run.

    Fails on: the data hashed at the start and read at the first unit to train (the code before), where the
    edited bytes were trained on under the old bytes' key, so a later run on either file reused a wrong unit."""
    before = data.read_bytes()
    plan = ablate_mod.plan_units
    trained_on = []

    def edit_then_plan(*args, **kwargs):
        data.write_text(_text(5), encoding="utf-8")
        return plan(*args, **kwargs)

    def spy(*args, corpus, **kwargs):
        trained_on.append(bytes(corpus.train.numpy()) + bytes(corpus.val.numpy()))
        return train(*args, corpus=corpus, **kwargs)

    monkeypatch.setattr(ablate_mod, "plan_units", edit_then_plan)
    monkeypatch.setattr(ablate_mod, "train", spy)
    ab = ablate_mod.parse_ablation(ABLATION)
    result = ablate_mod.run_ablation(ab, task=TaskConfig(**{**TINY, "data": str(data)}), out_dir=tmp_path / "out", progress=False)
    assert result.ran == 1 and trained_on == [before]
    (unit,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "units").iterdir()]
    assert unit["data_sha256"] == hashlib.sha256(before).hexdigest()
