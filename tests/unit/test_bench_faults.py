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
