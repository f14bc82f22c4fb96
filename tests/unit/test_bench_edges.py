"""``kronopt bench`` at its edges: timings checked against a fake clock, gradients and parameters
checked against what every optimizer was handed, state bytes against hand counts, and the
arguments (devices, names, shapes) that must be refused or reported instead of crashing.

The timing tests time stand-in optimizers named ``module:Class`` (written to a temporary
module, :data:`FAKES`) whose ``step()`` advances a fake clock by a known number of
milliseconds, so every printed figure has an exact expected value. pytorch-optimizer and
heavyball are optional: the tests that need them skip without them.

Among them, the bugs this hunt found: one gradient tensor handed to every optimizer (a peer changing
its own changed the others'), heavyball.Muon on vectors only, devices the bench cannot time
(``meta``, ``mps``, a CUDA ordinal the machine lacks), a ``module:Class`` that is no optimizer, a TOML
file named ``cfg:v2.toml`` taken for an import, and an unknown name's message naming no peer.
"""

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kronopt.app import bench, cli

FAKES = textwrap.dedent(
    '''
    """Stand-in optimizers for test_bench_edges: each step advances NOW by its cost (ms) and logs what it saw."""
    import torch

    NOW = [0.0]
    LOG = []


    class _Fake(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.k = 0

        def cost(self, k):
            return 1.0

        @torch.no_grad()
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            LOG.append({
                "opt": type(self).__name__, "k": self.k, "threads": torch.get_num_threads(),
                "grads": [p.grad.clone() for p in params], "params": [p.detach().clone() for p in params],
            })
            NOW[0] += self.cost(self.k) * 1e-3
            self.k += 1


    class Fast(_Fake):
        pass


    class Fast2(_Fake):
        pass


    class Slow(_Fake):
        """50 ms for each of its first two steps (set-up), 13 ms at steps 4 and 9 (its refreshes), 3 ms otherwise.
        Its state: one buffer per parameter held under two keys (counted once), and a float64 (3,) tensor."""

        def cost(self, k):
            return 50.0 if k < 2 else 13.0 if k in (4, 9) else 3.0

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if not self.state[p]:
                        buf = torch.zeros_like(p)
                        self.state[p] = {"buf": buf, "again": buf, "nested": [torch.zeros(3, dtype=torch.float64)], "n": 1}
            super().step()


    class Mutating(_Fake):
        """Changes the gradients it is handed in place, as pytorch_optimizer.Muon does (its Nesterov lerp)."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step()
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.add_(1.0)
    '''
)


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """The stand-ins' module, importable as ``bench_edge_fakes``; the bench's clock is its ``NOW``."""
    (tmp_path / "bench_edge_fakes.py").write_text(FAKES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bench_edge_fakes", raising=False)
    import bench_edge_fakes

    yield bench_edge_fakes
    sys.modules.pop("bench_edge_fakes", None)


@pytest.fixture
def fake_clock(fakes, monkeypatch):
    monkeypatch.setattr(bench.time, "perf_counter", lambda: fakes.NOW[0])
    return fakes


def _table(out: str) -> dict[str, list[str]]:
    """The main table's rows by optimizer name (after the first line of dashes, up to a blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) == {"-"}) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()[1:]
    return rows


def _ratio_lines(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S+ / \S+)\s+(\S.*)$", out, flags=re.M))


F, F2, S, M = "bench_edge_fakes:Fast", "bench_edge_fakes:Fast2", "bench_edge_fakes:Slow", "bench_edge_fakes:Mutating"
TINY = ["--shapes", "6x4,4", "--threads", "1"]


# -- the figures, against a fake clock ------------------------------------------------------------------------


def test_mean_counts_the_refreshes_median_skips_them_and_warmup_is_left_out(fake_clock, capsys):
    """Slow's timed steps (k = 2..11 after 2 warm-up) cost 3, 3, 13, 3, 3, 3, 3, 13, 3, 3 ms: mean 5, median 3.
    Fails if the warm-up steps (50 ms) are timed, a timed step is dropped or one too many counted (an off-by-one
    at either end), the mean is taken without the refreshes, the median is the mean, or a step's time is
    charged to the wrong optimizer of the round (Fast costs 1 ms flat)."""
    assert cli.main(["bench", F, S, *TINY, "--steps", "10", "--warmup", "2",
                     "--ratio", f"{S}/{F}", "--ratio", f"{F}/{S}"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert list(rows) == [F, S]
    assert rows[F][:3] == ["1.000", "1.000", "1.00"]
    assert rows[S][:3] == ["5.000", "3.000", "5.00"]  # mean ms, median ms, × the first named
    ratios = _ratio_lines(out)
    assert ratios[f"{S} / {F}"] == "5.000" and ratios[f"{F} / {S}"] == "0.200"
    assert "10 timed steps after 2 warm-up" in out.splitlines()[0]


def test_repeat_makes_fresh_optimizers_each_run(fake_clock, capsys):
    """Slow's refreshes fall at its own steps 4 and 9 only: three runs with fresh optimizers give 5 ms each, while
    runs that reused the first run's optimizers (their step count going on) would give 3 ms from the second run
    on, and the median would be 3; the ratio's range over identical runs is a single value."""
    assert cli.main(["bench", F, S, *TINY, "--steps", "10", "--warmup", "2", "--repeat", "3",
                     "--ratio", f"{S}/{F}"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert rows[S][:3] == ["5.000", "3.000", "5.00"] and rows[S][-1] == "5.00–5.00"
    assert _ratio_lines(out)[f"{S} / {F}"] == "5.000 (5.000–5.000)"
    assert sum(1 for e in fake_clock.LOG if e["opt"] == "Slow") == 3 * 12
    assert [e["k"] for e in fake_clock.LOG if e["opt"] == "Slow"] == list(range(12)) * 3


def test_state_bytes_of_an_imported_optimizer_is_its_state_counted_by_hand(fakes):
    """Slow holds, per parameter, one float32 buffer under two keys and a float64 (3,) tensor in a list: the bench's
    figure is numel · 4 + 24 per parameter. Fails if a tensor held twice is counted twice, a nested list is not
    walked, the parameters or gradients are counted as state, or the figure is read before the first step."""
    [row] = bench.bench([S], [(6, 4), (4,)], steps=1, warmup=0, device="cpu")
    assert row["state_bytes"] == (24 + 4) * 4 + 2 * 3 * 8


# -- what every optimizer is handed ---------------------------------------------------------------------------


def test_every_optimizer_starts_from_the_same_parameters_and_gets_the_same_gradients(fakes):
    """Two stand-ins that change nothing see, round by round, the very same gradients, the same starting
    parameters, and a gradient that changes from one round to the next. Fails if each optimizer draws its own
    parameters or gradients (a generator advanced per optimizer), or one gradient is reused every step."""
    bench.bench([F, F2], [(5, 3), (3,), (2, 3, 2)], steps=3, warmup=1, device="cpu", seed=3)
    a = [e for e in fakes.LOG if e["opt"] == "Fast"]
    b = [e for e in fakes.LOG if e["opt"] == "Fast2"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for g, h in zip(x["grads"], y["grads"]):
            torch.testing.assert_close(g, h, rtol=0, atol=0)
    for p, q in zip(a[0]["params"], b[0]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not torch.equal(a[0]["grads"][0], a[1]["grads"][0])
    fakes.LOG.clear()
    bench.bench([F], [(5, 3)], steps=1, warmup=0, device="cpu", seed=4)
    assert not torch.equal(fakes.LOG[0]["params"][0], a[0]["params"][0])  # --seed reaches the parameters


def _in_named_order(monkeypatch):
    """Every round steps the optimizers in the order named (the bench shuffles each round's), so that the one named
    second steps between the other two in every round."""
    monkeypatch.setattr(bench, "_round_order", lambda runs, k, seed, repeat_index=0: list(runs))


def test_an_optimizer_that_changes_its_gradients_in_place_does_not_change_the_others(fakes, monkeypatch):
    """Mutating adds 1 to the gradients it is handed after its step (pytorch_optimizer.Muon changes its gradients
    in place): Fast2, stepped after it in each round, must still see the gradients Fast saw before it."""
    _in_named_order(monkeypatch)
    bench.bench([F, M, F2], [(5, 3), (3,)], steps=5, warmup=0, device="cpu")
    seen = {n: [e["grads"] for e in fakes.LOG if e["opt"] == n] for n in ("Fast", "Mutating", "Fast2")}
    for name in ("Mutating", "Fast2"):
        for before, got in zip(seen["Fast"], seen[name]):
            for g, h in zip(before, got):
                torch.testing.assert_close(h, g, rtol=0, atol=0)


def test_world_ranks_do_not_share_a_changed_gradient_either(fakes, monkeypatch):
    """World size 1 runs :func:`bench._rank_rows` in this process: Fast2, after Mutating, sees what Fast saw."""
    _in_named_order(monkeypatch)
    bench.bench_world([F, M, F2], [(5, 3), (3,)], worlds=[1], steps=3, warmup=0, threads=1)
    seen = {n: [e["grads"] for e in fakes.LOG if e["opt"] == n] for n in ("Fast", "Fast2")}
    assert len(seen["Fast"]) == len(seen["Fast2"]) == 3
    for before, got in zip(seen["Fast"], seen["Fast2"]):
        for g, h in zip(before, got):
            torch.testing.assert_close(h, g, rtol=0, atol=0)


def test_pytorch_optimizer_muon_does_not_change_the_gradients_of_the_others(monkeypatch):
    """The real peer: torch.AdamW, stepped after pytorch_optimizer.Muon, sees the gradients adamw saw before it."""
    pytest.importorskip("pytorch_optimizer")
    seen: dict[str, list] = {}
    real_make = bench._make

    def spy(name, params, param_names=None):
        opt, size = real_make(name, params, param_names)

        class Spy:
            def step(self):
                seen.setdefault(name, []).append([p.grad.clone() for p in params])
                opt.step()

        return Spy(), size

    monkeypatch.setattr(bench, "_make", spy)
    bench.bench(["adamw", "pytorch_optimizer.Muon", "torch.AdamW"], [(6, 4), (4,)], steps=5, warmup=0, device="cpu")
    for name in ("pytorch_optimizer.Muon", "torch.AdamW"):
        for before, got in zip(seen["adamw"], seen[name]):
            for g, h in zip(before, got):
                torch.testing.assert_close(h, g, rtol=0, atol=0)


# -- threads ---------------------------------------------------------------------------------------------------


def test_threads_hold_during_every_step_scaling_included_and_are_restored(fakes, capsys):
    """With --threads 1 every step (main table and --scaling) runs on one torch thread, and the thread count
    is put back afterwards. Fails if the flag is set after the run, only for the main table, or leaks."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["bench", F, "--shapes", "4x4", "--steps", "1", "--warmup", "0", "--threads", "1",
                         "--scaling", "4"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(fakes.LOG) == 2 and {e["threads"] for e in fakes.LOG} == {1}
    assert "1 threads" in capsys.readouterr().out.splitlines()[0]


# -- --scaling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", ["8", "16,4,8"])
def test_each_scaling_row_is_labelled_with_the_width_it_ran(widths, monkeypatch, capsys):
    """A fake bench whose mean is the width of the shapes it was handed (the qkv block (3d, d)): each printed row's
    time is its own d. Fails if rows are labelled with sorted widths but run in the given order (or the reverse),
    a width is dropped, or one width's shapes are reused for the others."""

    def fake_bench(names, shapes, **kw):
        d = float(bench.ParamSet.of(shapes).shapes[0][1])  # a list of shapes, or the main table's set
        run = [{"optimizer": n, "mean_ms": d, "median_ms": d, "state_bytes": 0, "vs_first": 1.0} for n in names]
        return bench.aggregate_runs([run])

    monkeypatch.setattr(bench, "bench", fake_bench)
    assert cli.main(["bench", "adamw", "--d", "2", "--layers", "1", "--steps", "1", "--warmup", "0",
                     "--scaling", widths]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("scaling:"))
    printed = []
    for line in lines[at + 3:]:
        if not line.strip():
            break
        d, cell = line.split()[:2]
        printed.append((int(d), float(cell)))
    assert sorted(printed) == sorted((int(w), float(w)) for w in widths.split(","))


# -- state bytes against hand counts ---------------------------------------------------------------------------


def _state_bytes(name, shapes):
    [row] = bench.bench([name], shapes, steps=1, warmup=1, device="cpu")
    return row["state_bytes"]


@pytest.mark.parametrize(
    ("name", "shapes", "low", "slack"),
    [
        # two float32 moments of 128; counters at most 16 bytes
        ("adamw", [(16, 8)], 2 * 128 * 4, 16),
        # moments 2 · 128, factors 16² + 8², bases 16² + 8², eigenvalues 16 + 8: 920 float32
        ("soap", [(16, 8)], (2 * 128 + 2 * (256 + 64) + 24) * 4, 16),
        # one float32 momentum of 128
        ("muon", [(16, 8)], 128 * 4, 16),
        # torch.Muon's momentum on the matrix (128), torch.AdamW's two moments on the rest (8 + 48) and one float32
        # step per parameter there: exact
        ("torch.Muon", [(16, 8), (8,), (4, 4, 3)], 128 * 4 + 2 * 56 * 4 + 2 * 4, 0),
        # a conv kernel: two moments and one float32 step, exact
        ("torch.AdamW", [(6, 3, 2, 2)], 2 * 72 * 4 + 4, 0),
    ],
)
def test_state_bytes_match_a_hand_count(name, shapes, low, slack):
    """The bench's state figure against the tensors each optimizer must hold. Fails if the parameters or the
    gradients are counted, kronopt's views in ``optimizer.state`` are counted beside the bucket stacks (twice the
    figure), torch.Muon's AdamW for the other parameters is left out, or the figure is read before the state exists."""
    assert low <= _state_bytes(name, shapes) <= low + slack


@pytest.mark.parametrize(("name", "package", "slack"), [("pytorch_optimizer.SOAP", "pytorch_optimizer", 0),
                                                        ("heavyball.SOAP", "heavyball", 16)])
def test_peer_soap_state_bytes_match_a_hand_count(name, package, slack):
    """Both peers' SOAP with precondition_1d off: on the (16, 8) matrix two moments of 128, the factors 16² + 8² and
    their bases 16² + 8²; on the vector two moments of 8; float32 (heavyball adds a step counter)."""
    pytest.importorskip(package)
    low = (2 * 128 + 2 * (256 + 64) + 2 * 8) * 4
    assert low <= _state_bytes(name, [(16, 8), (8,)]) <= low + slack


# -- shapes ----------------------------------------------------------------------------------------------------


def test_degenerate_and_higher_order_shapes_run_for_every_kind_of_optimizer(capsys):
    """1 × 1, a lone scalar-sized vector, 1 × n, n × 1, a 4-D conv kernel with unit sides and a 1 × 1 × 1 tensor,
    up to soap's first QR refresh (step 10): every optimizer gives a row with positive times."""
    names = ["soap", "shampoo", "muon", "kl_shampoo", "torch.Muon", "torch.AdamW"]
    assert cli.main(["bench", *names, "--shapes", "1x1,1,1x7,7x1,2x3x1x1,1x1x1", "--steps", "2", "--warmup", "9",
                     "--threads", "1"]) == 0
    rows = _table(capsys.readouterr().out)
    assert list(rows) == names
    assert all(float(r[0]) > 0 and float(r[1]) > 0 for r in rows.values())


def test_heavyball_muon_on_vectors_only_is_refused_or_timed_not_a_traceback(capsys):
    pytest.importorskip("heavyball")
    code = cli.main(["bench", "heavyball.Muon", "adamw", "--shapes", "8", "--steps", "1", "--warmup", "0"])
    captured = capsys.readouterr()
    if code == 2:
        assert "heavyball.Muon" in captured.err
    else:
        assert code == 0 and "heavyball.Muon" in _table(captured.out)


# -- names -----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="a file name cannot hold ':' on Windows")
def test_a_toml_file_with_a_colon_in_its_name_is_a_config(tmp_path, monkeypatch, capsys):
    config = (Path(__file__).parents[2] / "configs" / "adamw.toml").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg:v2.toml").write_text(config)
    assert cli.main(["bench", "cfg:v2.toml", *TINY, "--steps", "1", "--warmup", "0"]) == 0
    assert "cfg:v2.toml" in _table(capsys.readouterr().out)


def test_a_module_class_that_is_no_optimizer_is_reported_not_a_traceback(capsys):
    code = cli.main(["bench", "torch.nn:Linear", "adamw", *TINY, "--steps", "1", "--warmup", "0"])
    captured = capsys.readouterr()
    assert "torch.nn:Linear" in captured.out + captured.err and code in (0, 2)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("collections:OrderedDict", "no step method"),
        ("torch.optim:LBFGS", "its step() needs closure"),
        ("torch.optim.lr_scheduler:StepLR", "its constructor needs step_size"),
    ],
)
def test_a_class_the_bench_cannot_build_or_step_is_reported_with_the_reason(name, why, capsys):
    """A class that is built on the parameters alone and stepped with no argument is all the bench can time;
    one that needs more is reported as not measured, with what it lacks, and the others are timed
    (guards the reason: a traceback from the constructor or from ``step()``)."""
    assert cli.main(["bench", name, "adamw", *TINY, "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert why in out and "adamw" in _table(out)


def test_an_unknown_name_lists_the_peers_among_the_choices(capsys):
    assert cli.main(["bench", "AdamW", *TINY]) == 2
    err = capsys.readouterr().err
    assert "AdamW" in err and "soap" in err and "torch.AdamW" in err


# -- devices ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_that_cannot_run_the_bench_is_an_argument_error(device, monkeypatch, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail(f"--device {device} reached the run"))
    assert cli.main(["bench", "adamw", *TINY, "--device", device]) == 2
    assert "--device" in capsys.readouterr().err


def test_a_cuda_ordinal_the_machine_lacks_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("--device cuda:3 reached the run"))
    assert cli.main(["bench", "adamw", *TINY, "--device", "cuda:3"]) == 2
    assert "--device" in capsys.readouterr().err


def test_cuda_asked_for_without_cuda_is_an_argument_error(monkeypatch, capsys):
    """No CUDA: --device cuda is refused with exit 2 before any work (not a traceback from .to('cuda'))."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("--device cuda reached the run"))
    assert cli.main(["bench", "adamw", *TINY, "--device", "cuda"]) == 2
    assert "--device: 'cuda' asked for, but torch sees no CUDA device" in capsys.readouterr().err
