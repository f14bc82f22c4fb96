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


# --- 8. --model of a missing path says so ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nonexist55_dir/", "nonexist55_dir/sub/", "a/b/c55", "nets55.py", "weights55.json"])
def test_a_missing_path_given_to_model_is_said_to_be_missing(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=f"no file or folder '{spec}'"):
        bench.model_params(spec)
