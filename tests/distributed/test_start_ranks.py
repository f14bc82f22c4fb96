"""The distributed tests' rank starter (``_workers.start_ranks``): one more start where a rank dies by a signal, none
where a rank raises, and a second death fails."""

import faulthandler
import multiprocessing
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

from . import _workers as w

pytestmark = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def _abort():
    faulthandler.disable()  # (pytest's handler would print the dying rank's stack)
    os.kill(os.getpid(), signal.SIGABRT)


def _dies_once(rank, marker):
    if rank == 1 and not Path(marker).exists():
        Path(marker).touch()
        _abort()
    Path(f"{marker}-{rank}").touch()


def _dies_always(rank):
    if rank == 1:
        _abort()


def _raises(rank, marker):
    Path(f"{marker}-{rank}-{os.getpid()}").touch()
    raise ValueError("a job's own error")


def test_a_rank_killed_by_a_signal_once_starts_the_world_again_with_a_warning(tmp_path):
    marker = str(tmp_path / "died")
    with pytest.warns(UserWarning, match="died by a signal"):
        w.start_ranks(_dies_once, lambda: (marker,), 2, start_method="fork")
    assert Path(f"{marker}-0").exists() and Path(f"{marker}-1").exists()  # the second start ran both ranks through


def test_a_rank_killed_twice_fails():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
            w.start_ranks(_dies_always, lambda: (), 2, start_method="fork")


def test_an_error_raised_in_a_rank_fails_at_once(tmp_path):
    marker = str(tmp_path / "raised")
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="a job's own error"):
        w.start_ranks(_raises, lambda: (marker,), 2, start_method="fork")
    # started once, no second try: no rank started twice (the first to raise had written its mark; the other may
    # have been stopped before it wrote its own)
    started = [len(list(tmp_path.glob(f"raised-{r}-*"))) for r in (0, 1)]
    assert max(started) == 1 and sum(started) >= 1, started
