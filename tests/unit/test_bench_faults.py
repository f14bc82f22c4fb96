"""``kronopt bench``'s ``faults MiB``: the memory each timed step took fresh from the operating system.

Stand-in optimizers whose steps touch a known number of fresh pages (an anonymous mapping made and
unmapped inside the step, so every page faults in again each time) and none at all are timed side
by side; the counts must land on those sizes. Then the column through the command line, the median
over runs, and a platform without ``getrusage``.
"""

import mmap
import re

import pytest

from kronopt.app import bench, cli
from tests.torch_compat import needs_gloo

MIB = 2**20
TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]

counts_faults = pytest.mark.skipif(bench.resource is None, reason="no getrusage: the platform counts no page faults")


class _Touches:
    """A step that writes one byte in each page of ``mib`` MiB mapped afresh (huge pages refused where the
    kernel offers them, so each base page faults by itself), or does nothing for ``mib = 0``."""

    def __init__(self, mib: int) -> None:
        self.size = mib * MIB

    def step(self) -> None:
        if not self.size:
            return
        with mmap.mmap(-1, self.size) as region:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                region.madvise(mmap.MADV_NOHUGEPAGE)
            for offset in range(0, self.size, mmap.PAGESIZE):
                region[offset] = 1


def _makers(**sizes: int) -> dict:
    return {name: (lambda mib=mib: (_Touches(mib), lambda: 0)) for name, mib in sizes.items()}


@counts_faults
def test_a_step_is_charged_the_fresh_pages_it_touches_and_no_other_steps():
    """Fails on faults counted around the wrong step (the neighbour's 8 MiB charged to the idle one), summed
    instead of averaged over the timed steps, the warm-up's counted, or counted in pages instead of bytes."""
    rows = bench.bench(["idle", "eight", "two"], [(4, 4)], steps=3, warmup=2, device="cpu",
                       makers=_makers(idle=0, eight=8, two=2))
    faults = {r["optimizer"]: r["fault_bytes"] for r in rows}
    assert 8 * MIB <= faults["eight"] <= 8.5 * MIB
    assert 2 * MIB <= faults["two"] <= 2.5 * MIB
    assert faults["idle"] < 0.25 * MIB


@counts_faults
def test_several_runs_give_the_median():
    rows = bench.bench(["two"], [(4, 4)], steps=2, warmup=0, device="cpu", repeat=3, makers=_makers(two=2))
    assert 2 * MIB <= rows[0]["fault_bytes"] <= 2.5 * MIB


@counts_faults
def test_the_faults_column_through_the_cli(capsys):
    assert cli.main(["bench", "adamw", "soap", *TINY]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("optimizer"))
    assert header.split()[-2:] == ["faults", "MiB"]
    assert re.search(r"^soap .* \d+\.\d\d$", out, flags=re.M)


def test_a_platform_without_getrusage_reports_no_faults(monkeypatch, capsys):
    monkeypatch.setattr(bench, "resource", None)
    rows = bench.bench(["two"], [(4, 4)], steps=2, warmup=0, device="cpu", repeat=2, makers=_makers(two=2))
    assert rows[0]["fault_bytes"] is None and rows[0]["mean_ms"] is not None
    assert cli.main(["bench", "adamw", *TINY]) == 0
    assert "faults" not in capsys.readouterr().out



@counts_faults
@pytest.mark.distributed
@needs_gloo
def test_world_ranks_charge_each_step_the_fresh_pages_it_touches(monkeypatch):
    """``--world``'s rows count faults as the one-process table does, on each rank (world size 1 in this process,
    2 in forked ranks, which inherit the stand-ins): fails on faults not counted in the ranks, counted around
    the wrong step, summed instead of averaged, or summed over the ranks instead of the rank that took most."""
    sizes = {"idle": 0, "eight": 8, "two": 2}
    monkeypatch.setattr(bench, "_make", lambda name, params, names=None: (_Touches(sizes[name]), lambda: 0))
    monkeypatch.setattr(bench, "START_METHOD", "fork")  # one thread per rank: forking is safe, and starts faster
    rows = bench.bench_world(list(sizes), [(4, 4)], worlds=[1, 2], steps=3, warmup=1, threads=1, repeat=2)
    for world in (1, 2):
        faults = {r["optimizer"]: r["fault_bytes"] for r in rows if r["world"] == world}
        assert 8 * MIB <= faults["eight"] <= 8.5 * MIB, (world, faults)
        assert 2 * MIB <= faults["two"] <= 2.5 * MIB, (world, faults)
        assert faults["idle"] < 0.25 * MIB, (world, faults)


def test_world_rows_take_the_rank_that_faulted_most_and_the_median_over_runs(monkeypatch, capsys):
    """Hand-made ranks: the row's figure is the largest rank's (not their sum or the first rank's), the median over
    the runs, and the table prints it; where a rank's platform counts none, the row has none."""
    per_run = [(1.0, 3.0), (5.0, 2.0), (4.0, 4.5)]  # MiB faulted per step on ranks 0 and 1, run by run: max 3, 5, 4.5

    def world(size, job):
        pair = per_run[job["repeat_index"]]
        return [[{"times": [1e-3], "state_bytes": 0, "gather_bytes": 0, "fault_bytes": None if pair[r] is None else pair[r] * MIB, "failed": None,
                  "dropped": False}] for r in range(size)]

    monkeypatch.setattr(bench, "_world", world)
    (row,) = bench.bench_world(["adamw"], [(4, 4)], worlds=[2], steps=1, warmup=0, repeat=3)
    assert row["fault_bytes"] == 4.5 * MIB
    assert cli.main(["bench", "adamw", *TINY, "--world", "2", "--repeat", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-2:] == ["faults", "MiB"] and lines[3].split()[-1] == "4.50"
    per_run = [(1.0, None)] * 3
    (row,) = bench.bench_world(["adamw"], [(4, 4)], worlds=[2], steps=1, warmup=0, repeat=3)
    assert row["fault_bytes"] is None
