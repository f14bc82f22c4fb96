"""Mends to ``kronopt bench`` a fuzz found (session 55): ``--world`` without an upper bound, ``--json`` over the
run's own inputs, ``--compare`` leaving out the ratios a record asked for and could not measure, a peer's
``sys.exit()`` ending the bench, a ``--world`` run of missing peers only writing a one-process record, hand-edited
records crashing ``--compare``, ``--alone``'s "no figure" for an optimizer a record never ran, and ``--model
missing_dir/`` said to be no ``module:factory``. Each test failed on the code before its mend."""

import json
import os

import pytest

from kronopt.app import bench, cli

TINY = ["--d", "16", "--layers", "1", "--steps", "3", "--warmup", "1", "--threads", "1"]


def _said(capsys) -> str:
    out = capsys.readouterr()
    return out.out + out.err


# --- 4. a peer's sys.exit() is its failure ---------------------------------------------------------------------------


@pytest.fixture
def exiting_peers(tmp_path, monkeypatch):
    (tmp_path / "exits55_step.py").write_text(
        "import torch\n"
        "class Exits(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        super().__init__(params, lr=1e-3)\n"
        "    def step(self, closure=None):\n"
        "        raise SystemExit(3)\n"
        "class ExitsBuilt(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        raise SystemExit('no')\n"
    )
    (tmp_path / "exits55_import.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("world", [False, True], ids=["one process", "world 1"])
def test_a_peer_that_exits_at_a_step_or_when_built_is_reported_failed_and_the_run_goes_on(exiting_peers, capsys, world):
    names = ["exits55_step:Exits", "exits55_step:ExitsBuilt", "adamw"]
    assert cli.main(["bench", *names, *TINY, *(["--world", "1"] if world else [])]) == 0
    said = _said(capsys)
    assert "failed at step 1: SystemExit: 3" in said and "failed when built: SystemExit: no" in said
    timed = [line.split() for line in said.splitlines() if "adamw" in line.split()]
    assert timed and all("failed" not in row for row in timed)  # the run went on and timed adamw


def test_a_peer_whose_import_exits_is_reported_missing(exiting_peers, capsys):
    assert cli.main(["bench", "exits55_import:X", "adamw", *TINY]) == 0
    said = _said(capsys)
    assert "exits55_import:X: cannot be imported" in said and "sys.exit(4)" in said


def test_keyboard_interrupt_of_a_peer_still_ends_the_bench(tmp_path, monkeypatch):
    (tmp_path / "stops55.py").write_text(
        "import torch\n"
        "class Stops(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        super().__init__(params, lr=1e-3)\n"
        "    def step(self, closure=None):\n"
        "        raise KeyboardInterrupt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "stops55:Stops", *TINY])


# --- 8. --model of a missing path says so ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nonexist55_dir/", "nonexist55_dir/sub/", "a/b/c55", "nets55.py", "weights55.json"])
def test_a_missing_path_given_to_model_is_said_to_be_missing(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=f"no file or folder '{spec}'"):
        bench.model_params(spec)
