"""``kronopt bench --memory``: the most tensor memory one step holds at once (``TransientMemory``).

The counter is checked against byte counts known beforehand (new tensors, views, in-place results,
frees), then through the bench: a preset's step holds memory, a bucket cap lowers it, and the
column and the argument checks of the command line.
"""

import re

import pytest
import torch

from kronopt.app import bench, cli

TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]
MIB = 2**20


def test_the_counter_holds_the_most_bytes_alive_at_once():
    with bench.TransientMemory() as counter:
        a = torch.empty(MIB, dtype=torch.uint8).fill_(1)  # 1 MiB, filled in place: counted once
        b = torch.ones(2 * MIB, dtype=torch.uint8)  # 3 MiB alive
        view = b[: MIB]  # a view: nothing new
        view.add_(1)  # in place: nothing new
        del a, b, view  # 0 alive
        c = torch.zeros(MIB // 2, dtype=torch.uint8)  # 0.5 MiB
    assert counter.peak == 3 * MIB
    assert counter.live == MIB // 2
    del c
    assert counter.live == 0


def test_a_tensor_made_from_python_data_is_counted():
    with bench.TransientMemory() as counter:
        made = torch.tensor([1.0] * 1000, dtype=torch.float64)
    assert counter.peak == 8 * 1000 and counter.live == 8 * 1000
    del made


def test_a_tensor_set_to_an_existing_storage_counts_nothing():
    existing = torch.ones(1000, dtype=torch.float64)
    with bench.TransientMemory() as counter:
        alias = torch.empty(0, dtype=torch.float64)
        alias.set_(existing.untyped_storage())
    assert counter.peak == 0 and alias.untyped_storage().data_ptr() == existing.untyped_storage().data_ptr()


def test_a_tensor_kept_past_the_mode_is_counted_until_it_is_freed():
    kept = []
    with bench.TransientMemory() as counter:
        kept.append(torch.ones(1000, dtype=torch.float64))
        torch.ones(3000, dtype=torch.float64)  # freed at once
    assert counter.peak == 8 * 4000
    assert counter.live == 8 * 1000


def test_bench_counts_each_steps_memory_and_a_bucket_cap_lowers_it(tmp_path):
    capped = tmp_path / "soap_capped.toml"
    capped.write_text("bucket_cap_mib = 0.000001\n" + (bench.Path(__file__).parents[2] / "configs" / "soap.toml").read_text())
    shapes = [(64, 32)] * 8
    rows = bench.bench(["soap", str(capped), "torch.AdamW"], shapes, steps=1, warmup=1, device="cpu", memory_steps=4)
    step = {r["optimizer"]: r["step_bytes"] for r in rows}
    assert step["torch.AdamW"] > 0  # a peer is counted too (its temporaries)
    # soap holds at least its new moments and factors of the 8 blocks at once; capped, one block's at a time
    assert step["soap"] > 4 * step[str(capped)]
    plain = bench.bench(["soap"], shapes, steps=1, warmup=1, device="cpu")
    assert plain[0]["step_bytes"] is None


def test_the_memory_column_through_the_cli(capsys):
    assert cli.main(["bench", "soap", "adamw", *TINY, "--memory", "3"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("optimizer"))
    assert "step MiB" in header
    assert re.search(r"^soap .* \d+\.\d\d\s+\d+\.\d\d$", out, flags=re.M)
    assert cli.main(["bench", "soap", *TINY]) == 0
    assert "step MiB" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--memory", "-1"], "--memory"),
        (["--memory", "x"], "--memory"),
        (["--memory", "2", "--world", "1"], "--memory: applies to the one-process table; cannot be combined with --world"),
    ],
)
def test_memory_arguments_are_checked(extra, message, capsys):
    assert cli.main(["bench", "soap", *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


class _FailsLate(torch.optim.SGD):
    """An optimizer that raises at its fourth step: inside ``--memory``'s rounds after three timed steps."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("late")
        return super().step(closure)


def test_a_peer_that_raises_in_the_memory_rounds_keeps_its_times(monkeypatch, tmp_path):
    module = tmp_path / "late_peer.py"
    module.write_text("from tests.unit.test_bench_memory import _FailsLate as Late\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = bench.bench(["late_peer:Late", "adamw"], [(8, 4)], steps=2, warmup=1, device="cpu", memory_steps=3)
    late, adamw = rows
    assert late["failed"] is None and late["mean_ms"] is not None and late["step_bytes"] is None
    assert adamw["vs_first"] is not None and adamw["step_bytes"] is not None


def test_a_step_counts_the_scratch_kronopt_keeps_across_steps():
    """kronopt's muon on a CPU keeps its look-ahead stack ``(b m n)`` and a block's direction ``(m n)``, both
    float32, from one step to the next (with its iteration's buffers): they are made by the first step, not by
    the steps ``--memory`` counts, yet each of those steps holds them. Without them the plain path's steps
    make almost nothing new (the momentum moves in place), so the column read near zero."""
    b, m, n = 4, 256, 128  # blocks past the size a CPU steps together with other small buckets
    floor = (b * m * n + m * n) * 4  # the look-ahead stack and the direction alone, in float32
    params = [torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(k))) for k in range(b)]
    opt = bench._make("muon", params)[0]
    assert opt.scratch_bytes() == 0  # nothing kept before a step
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(m, n)
        opt.step()
    assert opt.scratch_bytes() >= floor
    rows = bench.bench(["muon", "torch.Muon"], [(m, n)] * b, steps=1, warmup=1, device="cpu", memory_steps=2)
    step = {r["optimizer"]: r["step_bytes"] for r in rows}
    # the kept scratch once (its own is this optimizer's, built alike), beside the plain path's few new bytes
    assert floor <= step["muon"] < opt.scratch_bytes() + floor
    assert step["torch.Muon"] < floor  # a peer keeps nothing of the kind: its temporaries alone
