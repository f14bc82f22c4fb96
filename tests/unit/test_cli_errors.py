"""Command line: every bad argument exits with code 2 and a message naming it; no file runs code.

Each subcommand runs in-process (``kronopt.app.cli.main``). The functions that do the
work (training, benchmarking, the Fisher lab, spectrum runs) are replaced by
:func:`_forbidden`, so a bad argument that slipped through validation fails the
test instead of starting a run.
"""

import ast
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kronopt
import kronopt.app._args
import kronopt.app.ablate
import kronopt.app.fisher
import kronopt.app.spectrum
import kronopt.app.train
from kronopt.app import bench, cli


class Reached(Exception):
    """The command got past its checks and started working."""


def _forbidden(*args, **kwargs):
    raise Reached


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Replace every heavy function by one that raises :class:`Reached`; run in an empty directory."""
    for module, name in [
        (bench, "bench"),
        (kronopt.app.train, "train"),
        (kronopt.app.ablate, "train"),
        (kronopt.app.ablate, "run_ablation"),
        (kronopt.app.fisher, "run_lab"),
        (kronopt.app.fisher, "hessian_experiment"),
        (kronopt.app.spectrum, "training_run"),
        (kronopt.app.spectrum, "builtin_run"),
    ]:
        monkeypatch.setattr(module, name, _forbidden)
    threads = torch.get_num_threads()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    assert torch.get_num_threads() == threads, "a command left torch's thread count changed"


@pytest.fixture
def files(tmp_path):
    """Paths the table refers to by name."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file.txt").write_text("not a directory\n")
    (tmp_path / "bad.toml").write_text("this is = = not toml\n")
    (tmp_path / "ablation.toml").write_text(
        '[ablation]\nname = "t"\nbase = "adamw"\n[task]\nsteps = 2\n'
        '[[variant]]\nname = "one"\n[[variant]]\nname = "two"\nset = { lr = 1e-2 }\n'
    )
    return {
        "dir": str(tmp_path / "a_dir"),
        "file": str(tmp_path / "a_file.txt"),
        "missing": str(tmp_path / "no_such_file.toml"),
        "bad_toml": str(tmp_path / "bad.toml"),
        "ablation": str(tmp_path / "ablation.toml"),
        "out": str(tmp_path / "out"),
    }


def _fill(argv, files):
    return [a.format(**files) for a in argv]


def run(argv, capsys):
    """``(exit code, stderr + stdout)``; argparse's own exit counts as its code."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


# (argv, words every one of which the message must contain: the flags, the bad value)
CASES = [
    # train
    (["train", "--steps", "abc"], ["--steps", "'abc'"]),
    (["train", "--steps", "0"], ["--steps", "got 0"]),
    (["train", "--layers", "-2", "--batch", "x", "--eval-every", "-1"], ["--layers", "--batch", "--eval-every", "3 errors"]),
    (["train", "--data", "{missing}"], ["--data", "no such file"]),
    (["train", "--data", "{dir}"], ["--data", "is a directory"]),
    (["train", "--out", "{file}"], ["--out", "not a directory"]),
    (["train", "--device", "nope"], ["--device", "'nope'"]),
    (["train", "--preset", "nope"], ["unknown preset 'nope'"]),
    (["train", "{dir}"], ["cannot read config file", "a_dir"]),
    (["train", "--set", "novalue", "--steps", "0"], ["--set", "--steps"]),
    (["train", "--width", "x", "--heads", "4"], ["--width", "'x'"]),
    # ablate
    (["ablate", "{missing}"], ["cannot read ablation file '{missing}'"]),
    (["ablate", "{dir}"], ["cannot read ablation file '{dir}'", "Is a directory"]),
    (["ablate", "{bad_toml}"], ["bad.toml", "not valid TOML"]),
    (["ablate", "{ablation}", "--only", "nope"], ["--only", "'nope'"]),
    (["ablate", "{ablation}", "--out", "{file}"], ["--out"]),
    (["ablate", "{ablation}", "--steps", "0", "--seed", "x"], ["--steps", "--seed"]),
    # bench
    (["bench", "soap", "--shapes", "12xq", "--steps", "0"], ["--shapes: '12xq' is not a shape like 768x768", "--steps: must be ≥ 1, got 0"]),
    (["bench", "soap", "--shapes", "0x5"], ["--shapes", "'0x5'"]),
    (["bench", "--shapes", ","], ["--shapes", "at least one"]),
    (["bench", "--steps", "abc", "--warmup", "-1"], ["--steps", "--warmup"]),
    (["bench", "--d", "0", "--layers", "x"], ["--d", "--layers"]),
    (["bench", "--threads", "-1", "--seed", "-1"], ["--threads", "--seed"]),
    (["bench", "--device", "nope"], ["--device"]),
    (["bench", "nosuchpreset"], ["nosuchpreset"]),
    (["bench", "{dir}"], ["a_dir"]),
    (["bench", "torch.Muon", "--shapes", "4"], ["torch.Muon", "2-D"]),
    (["bench", "heavyball.Nope", "torch.adamw"], ["heavyball.Nope: not a known heavyball optimizer", "torch.adamw"]),
    (["bench", "--scaling", "0,x"], ["--scaling: must be ≥ 1, got 0", "'x'"]),
    (["bench", "--scaling", ","], ["--scaling", "at least one"]),
    # an empty entry between commas is refused, not dropped (a typo ran with one entry fewer than meant)
    (["bench", "soap", "--shapes", "8x4,,4"], ["--shapes: has an empty entry between its commas: '8x4,,4'"]),
    (["bench", "--scaling", "8,16,"], ["--scaling: has an empty entry between its commas: '8,16,'"]),
    (["fisher", "--source", "lab,", "--steps", "1,,2"], ["--source: has an empty entry", "--steps: has an empty entry"]),
    (["fisher", "--estimators", "ema,,projector_splitting", "--hessian-optimizers", "soap,"],
     ["--estimators: has an empty entry", "--hessian-optimizers: has an empty entry"]),
    # fisher
    (["fisher", "--steps", "abc"], ["--steps", "'abc'"]),
    (["fisher", "--steps", "0", "--out", "{out}"], ["--steps", "got 0"]),
    (["fisher", "--steps", ""], ["--steps", "at least one"]),
    (["fisher", "--source", "foo"], ["--source", "'foo'"]),
    (["fisher", "--source", "", "--no-hessian"], ["--source", "nothing to run"]),
    (["fisher", "--m", "0", "--n", "x", "--beta", "1"], ["--m", "--n", "--beta"]),
    (["fisher", "--beta", "nan"], ["--beta"]),
    (["fisher", "--hessian-lrs", "", "--hessian-rows", "0"], ["--hessian-lrs", "--hessian-rows"]),
    (["fisher", "--hessian-lrs", "-1", "--hessian-classes", "1", "--hessian-epochs", "0"],
     ["--hessian-lrs", "--hessian-classes", "--hessian-epochs"]),
    (["fisher", "--estimators", "nope,ema:beta=2"], ["--estimators", "'nope'", "beta"]),
    (["fisher", "--hessian-optimizers", "nope,adamw"], ["--hessian-optimizers nope", "--hessian-optimizers adamw"]),
    (["fisher", "--out", "{file}", "--threads", "-1", "--seed", "x"], ["--out", "--threads", "--seed"]),
    # spectrum
    (["spectrum", "--state", "{missing}"], ["--state", "no such file"]),
    (["spectrum", "--state", "{dir}"], ["--state", "is a directory"]),
    (["spectrum", "--state", "{file}"], ["--state", "a_file.txt", "not a file written by torch.save"]),
    (["spectrum", "--steps", "0", "--every", "x", "--head", "0"], ["--steps", "--every", "--head"]),
    (["spectrum", "--head", "inf", "--layers", "("], ["--head", "--layers"]),
    (["spectrum", "--out", "{file}"], ["--out"]),
    (["spectrum", "nopreset"], ["nopreset"]),
    (["spectrum", "--set", "novalue"], ["--set"]),
    # show
    (["show", "nope"], ["unknown preset 'nope'"]),
    (["show", "{dir}"], ["a_dir"]),
    (["show", "{missing}"], ["no_such_file.toml"]),
    (["show", "soap", "--set", "x"], ["--set", "'x'"]),
    (["show"], ["config"]),  # argparse: the positional is missing
    # stages
    (["stages", "--bogus"], ["--bogus"]),
    (["stages", "--markdown=yes"], ["--markdown"]),
    # argparse's own errors name the flag too
    (["bench", "--steps"], ["--steps"]),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(c[0]) or "(empty)" for c in CASES])
def test_bad_arguments_exit_2_naming_each_problem(argv, words, files, no_work, capsys):
    rc, text = run(_fill(argv, files), capsys)
    assert rc == 2, text
    for word in words:
        assert word.format(**files) in text, (word, text)
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--steps", "3", "--no-plot", "--no-progress"],
        ["ablate", "{ablation}", "--only", "two", "--steps", "3", "--no-plot"],
        ["bench", "soap", "torch.Muon", "--shapes", "8x4,4", "--steps", "2"],
        ["bench", "torch.AdamW", "--scaling", "8,16"],
        ["fisher", "--out", "{out}", "--no-plot"],
        ["spectrum", "--no-plot"],
    ],
)
def test_good_arguments_reach_the_work(argv, files, no_work, capsys):
    """The checks accept the defaults and good values (else the table above proves nothing)."""
    with pytest.raises(Reached):
        cli.main(_fill(argv, files))


def test_unreadable_files_are_named(files, no_work, monkeypatch, capsys):
    # root reads any file, so chmod cannot make one unreadable here: the reads themselves are denied
    real_open, real_read_text = open, Path.read_text

    def denied(path):
        return str(path).endswith(("a_file.txt", "ablation.toml"))

    def deny_open(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def deny_read_text(self, *args, **kwargs):
        if denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(kronopt.app._args, "open", deny_open, raising=False)
    monkeypatch.setattr(Path, "read_text", deny_read_text)
    for argv, flag in [
        (["train", "--data", "{file}"], "--data"),
        (["spectrum", "--state", "{file}"], "--state"),
        (["ablate", "{ablation}"], "cannot read ablation file"),
        (["show", "{file}"], "cannot read config file"),
    ]:
        rc, text = run(_fill(argv, files), capsys)
        assert rc == 2 and flag in text and "Permission denied" in text and "Traceback" not in text, text


# -- random text in every numeric and list flag -----------------------------------------------------------

NUMERIC_FLAGS = [
    *(("train", f) for f in ("--layers", "--width", "--heads", "--context", "--batch", "--steps", "--warmup",
                             "--eval-every", "--eval-batches", "--seed", "--threads")),
    *(("ablate", f) for f in ("--steps", "--seed", "--width")),
    *(("bench", f) for f in ("--d", "--layers", "--shapes", "--steps", "--warmup", "--threads", "--seed",
                              "--scaling")),
    *(("fisher", f) for f in ("--steps", "--source", "--estimators", "--m", "--n", "--beta", "--seed",
                              "--hessian-lrs", "--hessian-rows", "--hessian-classes", "--hessian-epochs", "--threads")),
    *(("spectrum", f) for f in ("--steps", "--every", "--head")),
]
BASE_ARGS = {
    "train": ["--no-plot", "--no-progress"],
    "ablate": ["{ablation}", "--no-plot"],
    "bench": ["adamw"],
    "fisher": ["--out", "{out}", "--no-plot"],
    "spectrum": ["--no-plot"],
}
TEXT = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"-?[0-9]{0,5}(\.[0-9]{0,3})?(e-?[0-9]{1,3})?", fullmatch=True),
    st.lists(st.sampled_from(["0", "-1", "3", "2.5", "nan", "inf", "", "8x4", "0x5", "iid", "ema", "x"]), max_size=4)
    .map(",".join),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(flag=st.sampled_from(NUMERIC_FLAGS), text=TEXT)
def test_random_text_in_a_flag_parses_or_exits_2_naming_it(flag, text, files, no_work, capsys):
    command, name = flag
    argv = [command, *_fill(BASE_ARGS[command], files), f"{name}={text}"]
    try:
        rc, out = run(argv, capsys)
    except Reached:
        return  # accepted; the work would start
    assert rc == 2, out
    assert name in out and "Traceback" not in out, out


# -- state files never run code ------------------------------------------------------------------------------


def _touch(path):
    Path(path).write_text("code ran while loading a state file\n")


class SideEffect:
    """Unpickling this object calls :func:`_touch` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


#: every command that reads a state file, with where the file goes
STATE_READERS = [["spectrum", "--state", "{state}", "--no-plot"]]


@pytest.mark.parametrize("argv", STATE_READERS, ids=lambda a: a[0])
def test_a_pickled_object_is_refused_and_never_runs(argv, tmp_path, no_work, capsys):
    marker = tmp_path / "MARKER"
    state = tmp_path / "evil.pt"
    torch.save({"kronopt": {"buckets": [], "payload": SideEffect(marker)}, "param_groups": []}, state)
    # the payload is live: a plain torch.load would run it
    probe = tmp_path / "PROBE"
    torch.save(SideEffect(probe), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    rc, text = run([a.format(state=state) for a in argv], capsys)
    assert rc == 2 and "--state" in text and str(state) in text and "Traceback" not in text, text
    assert "was not loaded" in text
    assert not marker.exists(), "loading the state file ran code"


def test_torch_load_is_only_called_with_weights_only():
    """Every ``torch.load`` call in the package passes ``weights_only=True`` (read from the syntax tree)."""
    root = Path(kronopt.__file__).parent
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load", "load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((str(path.relative_to(root)), ast.unparse(node.func), safe))
    torch_loads = [c for c in calls if c[1] != "load"]
    assert torch_loads == [("app/_args.py", "torch.load", True)], calls


def _stepped_state(preset):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = kronopt.build(model.named_parameters(), preset)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen)).square().sum().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_every_preset_state_loads_weights_only(preset, tmp_path):
    """A KronOptimizer state dict holds only tensors and plain data, so the safe loader reads it back exactly."""
    opt = _stepped_state(preset)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = kronopt.app._args.load_torch_file(tmp_path / "opt.pt")
    before = opt.state_dict()
    assert loaded.keys() == before.keys()
    assert loaded["kronopt"]["config"] == before["kronopt"]["config"]
    assert loaded["state"].keys() == before["state"].keys() and before["state"]
    for index, entry in before["state"].items():
        assert loaded["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(loaded["state"][index][key], value, rtol=0, atol=0)
            else:
                assert loaded["state"][index][key] == value


def test_spectrum_reads_a_real_state_file(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = _stepped_state("kl_shampoo")
    finally:
        torch.set_num_threads(before)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    rc, text = run(["spectrum", "--state", str(tmp_path / "opt.pt"), "--no-plot"], capsys)
    assert rc == 0, text
    assert re.search(r"^0\.weight \(left\)\s+3\s+5\s", text, re.M), text
