"""``kronopt bench`` against other libraries: peer names, the interleaved run, ``--scaling``, state bytes.

torch.AdamW and torch.Muon are always there; pytorch-optimizer and heavyball are
optional (``kronopt[peers]``), so their runs are skipped without them and their
absence is simulated by making their import fail.
"""

import gc
import re
import sys
from pathlib import Path

import pytest
import torch

from kronopt.app import bench, cli, peers
from kronopt.optimizer import KronOptimizer
from tests.torch_compat import needs_gloo

TINY = ["--shapes", "8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def _rows(out: str) -> dict[str, list[str]]:
    """The main table's rows by optimizer name (the lines after the dashes, up to a blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) == {"-"}) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


# -- names ---------------------------------------------------------------------------------------------------


def test_every_peer_is_named_package_dot_class_and_recognised():
    for name, peer in peers.PEERS.items():
        assert name == f"{peer.package}.{name.partition('.')[2]}" and peers.is_peer_name(name)
        assert peer.settings and peer.matches
    assert not peers.is_peer_name("soap") and not peers.is_peer_name("configs/soap.toml")
    assert not peers.is_peer_name("heavyball.toml") and peers.is_peer_name("heavyball.Nope")


@pytest.mark.parametrize("name", ["heavyball.Nope", "pytorch_optimizer.soap", "torch.adamw"])
def test_unknown_peer_name_exits_2_naming_it(name, capsys):
    assert cli.main(["bench", name, *TINY]) == 2
    err = capsys.readouterr().err
    package = name.partition(".")[0]
    assert f"{name}: not a known {package} optimizer" in err and "Traceback" not in err
    assert all(n in err for n, p in peers.PEERS.items() if p.package == package)  # the known ones are listed


@pytest.mark.parametrize("package", ["heavyball", "pytorch_optimizer"])
def test_a_peer_not_installed_is_a_line_not_an_error(package, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ModuleNotFoundError
    named = [n for n, p in peers.PEERS.items() if p.package == package]
    assert cli.main(["bench", *named, "torch.AdamW", *TINY]) == 0
    out = capsys.readouterr().out
    for name in named:
        assert f"{name}: not installed (pip install 'kronopt[peers]')" in out
    assert set(_rows(out)) == {"torch.AdamW"}


def test_only_missing_peers_report_and_exit_0(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "heavyball", None)
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("nothing to time"))
    assert cli.main(["bench", "heavyball.SOAP", *TINY]) == 0
    assert capsys.readouterr().out == "heavyball.SOAP: not installed (pip install 'kronopt[peers]')\n"


def test_a_peer_whose_dependency_is_missing_is_reported(monkeypatch):
    def broken(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'opt_einsum'", name="opt_einsum")

    monkeypatch.setattr(peers.importlib, "import_module", broken)
    reason = peers.unavailable("heavyball.SOAP")
    assert reason.startswith("cannot be imported (ModuleNotFoundError") and "opt_einsum" in reason


def test_a_class_the_installed_version_lacks_is_reported(monkeypatch):
    monkeypatch.setitem(peers.PEERS, "torch.Nope", peers.Peer(
        name="torch.Nope", package="torch", distribution="torch", attribute="optim.Nope", settings="-", matches="-",
        construct=lambda module, params: None,
    ))
    assert peers.unavailable("torch.Nope").startswith(f"the installed torch {torch.__version__} has no optim.Nope")


# -- the interleaved run ----------------------------------------------------------------------------------------


def test_interleaved_run_includes_torch_peers(capsys):
    assert cli.main(["bench", "torch.Muon", "torch.AdamW", "muon", *TINY]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["torch.Muon", "torch.AdamW", "muon"]
    assert float(rows["torch.Muon"][3]) == pytest.approx(1.0)  # × the first one named


def test_round_robin_each_step_same_gradients(monkeypatch):
    """Each round steps every optimizer once, in an order of its own, and their parameters see the same gradients."""
    order, seen = [], {}
    real_make = bench._make

    def spy(name, params, param_names=None):
        opt, size = real_make(name, params, param_names)

        class Spy:
            def step(self):
                order.append(name)
                seen.setdefault(name, []).append([p.grad.clone() for p in params])
                opt.step()

        return Spy(), size

    monkeypatch.setattr(bench, "_make", spy)
    names = ["torch.AdamW", "torch.Muon", "adamw"]
    rows = bench.bench(names, [(6, 4), (4,)], steps=5, warmup=1, device="cpu")
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 6 and all(sorted(r) == sorted(names) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    for name in ("torch.Muon", "adamw"):
        for a, b in zip(seen[name], seen["torch.AdamW"]):
            for ga, gb in zip(a, b):
                torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert [r["optimizer"] for r in rows] == ["torch.AdamW", "torch.Muon", "adamw"]
    assert all(r["mean_ms"] > 0 and r["median_ms"] > 0 for r in rows)


def test_each_optimizer_steps_after_each_other_one_over_the_rounds():
    """A step's time depends on what the step before it left in the caches and the allocator: over a run's
    rounds every optimizer follows every other one, and a round's order is the same wherever the same seed
    draws it (every rank of a --world run)."""
    names = ["a", "b", "c", "d"]
    follows = set()
    for k in range(40):
        order = bench._round_order(names, k, seed=0)
        assert sorted(order) == names and order == bench._round_order(names, k, seed=0)
        follows.update(zip(order, order[1:]))
    assert follows == {(x, y) for x in names for y in names if x != y}
    # each run of a --repeat draws orders of its own, so that its runs do not share one draw's imbalance
    assert any(bench._round_order(names, k, 0, 0) != bench._round_order(names, k, 0, 1) for k in range(4))


def test_mean_includes_slow_steps_and_median_does_not(monkeypatch):
    """The mean counts every timed step (refreshes included); the median is the typical one."""
    ticks = iter([0.0, 0.001, 0.0, 0.001, 0.0, 0.010])  # three timed steps: 1 ms, 1 ms, 10 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    [row] = bench.bench(["torch.AdamW"], [(3,)], steps=3, warmup=0, device="cpu")
    assert row["mean_ms"] == pytest.approx(4.0) and row["median_ms"] == pytest.approx(1.0)


@pytest.mark.parametrize("package", ["pytorch_optimizer", "heavyball"])
def test_interleaved_run_with_optional_peers(package, capsys):
    pytest.importorskip(package)
    named = [n for n, p in peers.PEERS.items() if p.package == package]
    assert cli.main(["bench", "adamw", *named, "--shapes", "8x4,4x4,4", "--steps", "2", "--warmup", "1"]) == 0
    assert list(_rows(capsys.readouterr().out)) == ["adamw", *named]
    rows = bench.bench(named, [(8, 4), (4,)], steps=1, warmup=0, device="cpu")
    for row in rows:  # each holds at least a first moment of every parameter
        assert row["mean_ms"] > 0 and row["state_bytes"] >= (32 + 4) * 4, row


def test_heavyball_runs_eager_and_the_switch_is_restored():
    utils = pytest.importorskip("heavyball.utils")
    before = utils.compile_mode
    with peers.eager():
        assert utils.compile_mode is None
    assert utils.compile_mode == before


# -- --scaling ------------------------------------------------------------------------------------------------


def _scaling_rows(out: str) -> tuple[list[str], list[list[str]]]:
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("scaling:"))
    names = lines[at + 1].split()[1:]
    rows = []
    for line in lines[at + 3:]:
        if not line.strip():  # the matmul-alone table follows after a blank line
            break
        rows.append(line.split())
    return names, rows


def test_scaling_has_one_row_per_width_and_ratios_match_the_times(capsys):
    assert cli.main(["bench", "torch.AdamW", "torch.Muon", "adamw", "--d", "4", "--layers", "1", "--steps", "3",
                     "--warmup", "1", "--threads", "1", "--scaling", "4,8,12"]) == 0
    names, rows = _scaling_rows(capsys.readouterr().out)
    assert names == ["torch.AdamW", "torch.Muon", "adamw"]
    assert [int(r[0]) for r in rows] == [4, 8, 12]
    for r in rows:
        cells = r[1:]
        times = [float(t) for t in cells[0::2]]
        ratios = [float(re.fullmatch(r"\((.*)×\)", c).group(1)) for c in cells[1::2]]
        assert len(times) == 3 and ratios[0] == 1.0
        for t, ratio in zip(times, ratios):
            expected = t / times[0]  # from the printed times (4 significant digits), ratios printed to 0.01
            assert ratio == pytest.approx(expected, abs=0.005 + 2e-3 * expected)


def test_scaling_prints_the_matmul_alone_table_for_kronopt_optimizers_only(capsys):
    assert cli.main(["bench", "torch.AdamW", "soap", "adamw", "--d", "4", "--layers", "1", "--steps", "3",
                     "--warmup", "1", "--threads", "1", "--scaling", "8,16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("matmul alone:"))
    assert lines[at + 1].split() == ["d", "soap", "alone", "adamw", "alone"]  # no peer column
    rows = [line for line in lines[at + 3:] if line.strip()]
    assert [int(r.split()[0]) for r in rows] == [8, 16]
    for r in rows:
        soap, adamw = re.findall(r"(\S+) \(step (\S+)×\)|(-)", r.split(None, 1)[1])[:2]
        assert float(soap[0]) > 0 and float(soap[1]) > 0  # soap does products and QR/eigh
        assert adamw[2] == "-"  # adamw has no matrix work


def test_matmul_alone_replays_the_recorded_products(monkeypatch):
    """The replay runs exactly the heavy calls the steps made: soap at d = 8 over 10 steps
    (a refresh included) calls products and QR; the replay calls the same ops, as many times."""
    seen = []
    real = bench._replay_inputs

    def spy(calls, gen, made=None):
        seen.extend(op.overloadpacket.__name__ for op, _, _ in calls)
        return real(calls, gen, made)

    monkeypatch.setattr(bench, "_replay_inputs", spy)
    ms = bench.matmul_alone("soap", [(8, 8), (16, 8)], steps=10, warmup=2, device="cpu")
    assert ms > 0
    # the plain steps' rotations and Gram products, the refresh's power step and Q factor
    assert {"bmm", "baddbmm", "geqrf", "linalg_householder_product"} <= set(seen)
    # one QR refresh in the 12 recorded steps (the 10th update; the first call's is eigh),
    # two buckets (one per shape), two sides each
    assert seen.count("geqrf") == 1 * 2 * 2
    assert bench.matmul_alone("adamw", [(8, 8)], steps=3, warmup=1, device="cpu") == 0.0


def test_matmul_alone_records_the_in_place_products_too(monkeypatch):
    """dykaf's per-block weight scales the accumulator and adds the product into it (``baddbmm_``):
    the recorder keeps those calls, and leaves out the elementwise ones around them."""
    x, a = torch.randn(2, 4, 4), torch.randn(2, 4, 3)
    with bench._HeavyOps() as rec:
        (x * torch.rand(2, 1, 1)).baddbmm_(a, a.mT)
        torch.baddbmm(x, a, a.mT, beta=0.5)
        x.add_(1.0)
    assert [op.overloadpacket.__name__ for op, _, _ in rec.calls] == ["baddbmm_", "baddbmm"]
    replayed = []
    real = bench._replay_inputs

    def spy(calls, gen, made=None):
        mine = real(calls, gen, made)
        replayed.extend(mine)
        return mine

    monkeypatch.setattr(bench, "_replay_inputs", spy)
    # square blocks: the written accumulator has the operands' shape, yet is never one of them
    # (a shared one would replay x += α x x, up to inf and NaN in a few hundred calls)
    assert bench.matmul_alone("dykaf", [(8, 8)], steps=3, warmup=2, device="cpu") > 0
    in_place = [args for op, args, _ in replayed if op.overloadpacket.__name__ == "baddbmm_"]
    assert in_place
    for out, *operands in in_place:
        assert all(out is not x for x in operands)
    tensors = {id(a): a for _, args, kw in replayed for a in (*args, *kw.values()) if isinstance(a, torch.Tensor)}
    assert all(bool(t.isfinite().all()) for t in tensors.values())  # after the three replays


def _written_and_read(op, args, kwargs):
    """The tensors a call writes and the tensors it only reads, as its schema says."""
    written, read = [], []
    for i, a in enumerate(op._schema.arguments):
        x = args[i] if i < len(args) else kwargs.get(a.name)
        if isinstance(x, torch.Tensor):
            (written if a.alias_info is not None and a.alias_info.is_write else read).append(x)
    return written, read


def test_replay_writes_every_result_apart_from_the_operands(monkeypatch):
    """dykaf's tiled sandwich writes its products with ``out=`` (``bmm(A, S, out=P)``): in the replay
    each written tensor is one of its own, never an operand of its call (a shared one replays
    ``P = P S``, up to inf within a few refreshes), and the refresh's ``householder_product`` reads
    the reflectors and scalings of a real QR, so the Q it makes is orthogonal (random scalings
    multiply reflections that are not, and overflow on a large side). Small tiles and thresholds
    put the 16-sided factors on the tiled and split paths."""
    from kronopt import linalg

    monkeypatch.setattr(linalg, "_SPLIT_SANDWICH_MIN", 8)
    monkeypatch.setattr(linalg, "_GRAM_TILED_MIN", 8)
    monkeypatch.setattr(linalg, "_GRAM_TILE", 4)
    per_step = bench.record_matrix_work("dykaf", [(16, 6), (6, 16)], steps=12, device="cpu")
    recorded = [c for calls in per_step for c in calls]
    assert any("out" in kw for _, _, kw in recorded)  # products written with out=
    assert any(op.overloadpacket.__name__ == "linalg_householder_product" for op, _, _ in recorded)
    replay = bench._Replay(per_step)
    for _ in range(4 * len(per_step)):
        replay.step()
    replayed = [c for calls in replay._steps for c in calls]
    for op, args, kwargs in replayed:
        written, read = _written_and_read(op, args, kwargs)
        assert not any(w is r for w in written for r in read), op
        assert all(bool(t.isfinite().all()) for t in written + read), op
    for op, args, kwargs in replayed:
        if op.overloadpacket.__name__ == "linalg_householder_product":
            Q = torch.linalg.householder_product(*args[:2]).double()
            eye = torch.eye(Q.shape[-1], dtype=torch.float64).expand_as(Q)
            assert torch.allclose(Q.mT @ Q, eye, atol=1e-5)


def test_a_module_class_peer_is_built_with_its_defaults(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_peer_mod.py").write_text(
        "import torch\n"
        "class Opt(torch.optim.SGD):\n"
        "    def __init__(self, params):\n"
        "        super().__init__(params, lr=0.1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert peers.is_import_name("my_peer_mod:Opt") and not peers.is_import_name("soap")
    assert not peers.is_import_name("configs/soap.toml") and not peers.is_import_name("a:b c")
    assert peers.unavailable_imported("my_peer_mod:Opt") is None
    assert "no 'Nope'" in peers.unavailable_imported("my_peer_mod:Nope")
    assert "cannot be imported" in peers.unavailable_imported("no_such_module_xyz:Opt")
    assert cli.main(["bench", "my_peer_mod:Opt", "adamw", "no_such_module_xyz:Opt", "--d", "4", "--layers", "1",
                     "--steps", "2", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "no_such_module_xyz:Opt: cannot be imported" in out
    assert any(line.startswith("my_peer_mod:Opt ") for line in out.splitlines())


def test_recorded_matrix_work_is_per_step_and_refreshes_where_the_config_says():
    """soap refreshes on its first call (eigh) and every 10 updates after (QR): step k's list holds
    step k's calls, so a replay of step k pays for a refresh exactly where the optimizer does."""
    per_step = bench.record_matrix_work("soap", [(8, 8), (16, 8)], steps=22, device="cpu")
    assert len(per_step) == 22
    ops = [{op.overloadpacket.__name__ for op, _, _ in calls} for calls in per_step]
    assert [k for k, o in enumerate(ops) if "_linalg_eigh" in o] == [0]
    assert [k for k, o in enumerate(ops) if "geqrf" in o] == [10, 20]
    assert all("bmm" in o or "baddbmm" in o for o in ops[1:])  # every later step rotates and updates factors


def test_replay_step_k_runs_the_calls_recorded_from_step_k():
    """Given per-step lists of calls, the k-th ``step()`` runs list k (and wraps round past the end)."""
    ran = []
    per_step = [[(ran.append, (f"step {k} call {c}",), {}) for c in range(2)] for k in range(3)]
    replay = bench._Replay(per_step)
    for _ in range(4):
        replay.step()
    assert ran == [f"step {k} call {c}" for k in (0, 1, 2, 0) for c in range(2)]


def test_matmul_alone_is_the_mean_of_the_timed_replays(monkeypatch):
    """A fake clock that each replayed step advances by (its index + 1) ms: the warm-up steps' replays
    are left out and the rest averaged, (3 + 4 + 5) / 3 = 4 ms after 2 warm-up steps."""
    now = [0.0]
    real_step = bench._Replay.step

    def step(self):
        now[0] += (self._k + 1) * 1e-3
        real_step(self)

    monkeypatch.setattr(bench._Replay, "step", step)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    assert bench.matmul_alone("soap", [(8, 8)], steps=3, warmup=2, device="cpu") == pytest.approx(4.0)


def test_scaling_replays_the_matrix_work_interleaved_with_the_steps(monkeypatch):
    """Each round steps the optimizers and the replays in turn, and replay k runs step k's calls:
    the matrix work alone is timed under the same load, over the same steps, as the step."""
    log = []
    real_replay, real_opt = bench._Replay.step, KronOptimizer.step

    def replay_step(self):
        log.append(("replay", self._k, sorted({op.overloadpacket.__name__ for op, _, _ in self._steps[self._k]})))
        return real_replay(self)

    def opt_step(self, *a, **kw):
        log.append(("soap",))
        return real_opt(self, *a, **kw)

    monkeypatch.setattr(bench._Replay, "step", replay_step)
    monkeypatch.setattr(KronOptimizer, "step", opt_step)
    table = bench.scaling(["torch.AdamW", "soap"], [8], steps=10, warmup=2, device="cpu")
    assert log[:12] == [("soap",)] * 12  # the recording optimizer's steps come first, then the rounds
    rounds = [log[i : i + 2] for i in range(12, len(log), 2)]
    assert len(rounds) == 12 and all(sorted(e[0] for e in r) == ["replay", "soap"] for r in rounds)  # each in its turn
    replays = [next(e for e in r if e[0] == "replay") for r in rounds]
    assert [r[1] for r in replays] == list(range(12))
    assert [k for k, r in enumerate(replays) if "geqrf" in r[2]] == [10]
    assert [k for k, r in enumerate(replays) if "_linalg_eigh" in r[2]] == [0]
    (entry,) = table
    assert [r["optimizer"] for r in entry["rows"]] == ["torch.AdamW", "soap"]  # the replays are not rows
    assert set(entry["alone"]) == {"soap"} and entry["alone"]["soap"] > 0


def test_scaling_uses_a_one_layer_transformer_set(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "bench", lambda names, shapes, **kw: calls.append(list(bench.ParamSet.of(shapes).shapes)) or [])
    bench.scaling(["adamw"], [8, 16], steps=1, warmup=0, device="cpu")
    assert calls == [bench.transformer_shapes(8, 1), bench.transformer_shapes(16, 1)]


# -- --alone ---------------------------------------------------------------------------------------------------


def _matrix_work_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("matrix work alone:"))
    assert lines[at + 1].split() == ["optimizer", "alone", "mean", "ms", "step", "/", "alone"]
    rows = {}
    for line in lines[at + 3:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_alone_replays_each_kronopt_optimizers_matrix_work_and_divides_its_step_by_it(capsys):
    """One run: the printed ratio is the main table's mean step over the replay's printed mean (computed here
    from the two printed figures); a peer gets no row, an optimizer without products says so, and the
    replays are not rows of the main table."""
    assert cli.main(["bench", "torch.AdamW", "soap", "adamw", "--shapes", "16x8,8", "--steps", "4", "--warmup", "1",
                     "--threads", "1", "--alone"]) == 0
    out = capsys.readouterr().out
    table = _rows(out)
    assert set(table) == {"torch.AdamW", "soap", "adamw"} and len(table) == 3
    main = out[: out.index("matrix work alone:")]
    assert " alone" not in main.split("------", 1)[1]  # no replay row in the main table
    rows = _matrix_work_rows(out)
    assert set(rows) == {"soap", "adamw"}
    assert rows["adamw"][1:] == ["-", "no", "matrix", "work", "recorded"]
    alone, ratio, step = float(rows["soap"][1]), float(rows["soap"][2]), float(table["soap"][1])
    assert alone > 0
    # both times are printed to 0.001 ms and the ratio to 0.001: the printed figures bound the error
    assert ratio == pytest.approx(step / alone, abs=5e-4 + step / alone * (5e-4 / alone + 5e-4 / step))


def test_alone_ratios_are_each_runs_own_with_their_median_and_range():
    """Hand-made runs: soap's step over its replay is 10/4, 12/5 and 9/6 (2.5, 2.4, 1.5), so the median is 2.4 and
    the range 1.5–2.5, where the medians of the two means would give 10/5 = 2; the replay's own figure is the
    median of its means (5); an optimizer without a replay gets None."""

    def run(step_ms, alone_ms):  # medians unlike the means, so a figure read from the wrong one shows
        return [
            {"optimizer": n, "mean_ms": t, "median_ms": t / 2, "state_bytes": 0, "vs_first": t / 1.0}
            for n, t in (("torch.AdamW", 1.0), ("soap", step_ms), ("adamw", 1.0), ("soap alone", alone_ms))
        ]

    rows = bench.aggregate_runs([run(10.0, 4.0), run(12.0, 5.0), run(9.0, 6.0)])
    found = bench.matrix_work_ratios(rows, ["soap", "adamw"])
    assert found["adamw"] is None
    assert found["soap"]["ratio"] == pytest.approx(2.4) and found["soap"]["alone_ms"] == pytest.approx(5.0)
    assert found["soap"]["range"] == (pytest.approx(1.5), pytest.approx(2.5)) and found["soap"]["runs"] == 3


def test_alone_records_the_kronopt_optimizers_over_every_step_and_times_them_in_the_same_runs(monkeypatch):
    """The recording covers warm-up and timed steps, as many as the rounds (which replay runs which step's calls
    is :func:`replay_makers`' and :class:`_Replay`'s, pinned by the ``--scaling`` tests), and only kronopt
    optimizers with matrix work get a replay, which :func:`bench` steps in the same rounds (its ``makers``)
    and repeats."""
    recorded_steps, seen = [], {}
    real_record = bench.record_matrix_work

    def record(name, shapes, *, steps, device, seed=0, **kw):
        recorded_steps.append((name, steps))
        return real_record(name, shapes, steps=steps, device=device, seed=seed, **kw)

    def fake_bench(names, shapes, **kw):
        seen.update(names=list(names), makers=sorted(kw["makers"]), repeat=kw["repeat"])
        run = [{"optimizer": n, "mean_ms": 1.0, "median_ms": 1.0, "state_bytes": 0, "vs_first": 1.0} for n in names]
        return bench.aggregate_runs([run])

    monkeypatch.setattr(bench, "record_matrix_work", record)
    monkeypatch.setattr(bench, "bench", fake_bench)
    assert cli.main(["bench", "torch.AdamW", "soap", "adamw", *TINY, "--repeat", "2", "--alone"]) == 0
    assert recorded_steps == [("soap", 3), ("adamw", 3)]  # 2 timed + 1 warm-up, no peer
    assert seen == {"names": ["torch.AdamW", "soap", "adamw", "soap alone"], "makers": ["soap alone"], "repeat": 2}


def test_alone_cannot_be_combined_with_world(capsys):
    assert cli.main(["bench", "soap", *TINY, "--alone", "--world", "1"]) == 2
    assert "--alone: applies to the one-process table; cannot be combined with --world" in capsys.readouterr().err


def test_alone_with_repeat_prints_each_ratios_range_and_says_when_nothing_is_replayed(capsys):
    assert cli.main(["bench", "soap", *TINY, "--alone", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "matrix work alone:" in out and "median of 2 runs (lowest–highest)" in out.split("matrix work alone:")[1]
    assert re.fullmatch(r"\d+\.\d{3} \(\d+\.\d{3}–\d+\.\d{3}\)", " ".join(_matrix_work_rows(out)["soap"][2:]))
    assert cli.main(["bench", "torch.AdamW", *TINY, "--alone"]) == 0
    assert "matrix work alone: no kronopt optimizer named, nothing replayed" in capsys.readouterr().out


# -- state bytes -------------------------------------------------------------------------------------------------


def test_state_bytes_of_torch_adamw():
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    numel = 6 * 4 + 5
    # exp_avg and exp_avg_sq in float32, plus one float32 `step` tensor per parameter (torch's default, not capturable)
    assert peers.state_bytes(opt) == 2 * numel * 4 + 2 * 4


def test_state_bytes_walks_nested_state_once_per_tensor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))])
    shared = torch.zeros(3, dtype=torch.float64)
    opt.state["a"] = {0: {"Q": [torch.zeros(2, 2), shared]}, "again": shared, "n": 3, "s": (torch.zeros(1, dtype=torch.int8),)}
    assert peers.state_bytes(opt) == 2 * 2 * 4 + 3 * 8 + 1


def test_state_bytes_walks_a_container_that_holds_itself_once():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))])
    loop: dict = {"m": torch.zeros(4)}
    loop["self"] = loop
    loop["list"] = [loop, loop["m"]]
    opt.state["a"] = loop
    assert peers.state_bytes(opt) == 4 * 4


def test_torch_muon_state_counts_its_adamw_for_vectors(capsys):
    assert cli.main(["bench", "torch.Muon", "--shapes", "8x4,4", "--steps", "1", "--warmup", "0"]) == 0
    rows = _rows(capsys.readouterr().out)
    # Muon: one momentum buffer of 32; AdamW on the vector: two moments of 4 and a step
    assert float(rows["torch.Muon"][4]) == pytest.approx((32 * 4 + 2 * 4 * 4 + 4) / 2**20, abs=5e-3)


def test_readme_documents_every_peer_with_its_settings():
    """README.md's peer table is the registry's text (a changed setting must be documented)."""
    text = (Path(peers.__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for name, peer in peers.PEERS.items():
        assert f"| `{name}` | `{peer.matches}` | {peer.settings} |" in text, name


# -- --world ---------------------------------------------------------------------------------------------------



@pytest.mark.distributed
@needs_gloo
def test_world_bench_through_the_cli_divides_state_and_reports_the_gathers(monkeypatch, capsys):
    """One and two CPU ranks: SOAP's state per rank sums to one process's, torch.AdamW's is repeated; the
    gathers move world · max(blocks per rank) · m · n · 4 bytes per bucket, nothing in one process."""
    rows = []
    real = bench.bench_world
    monkeypatch.setattr(bench, "bench_world", lambda *a, **k: rows.extend(real(*a, **k)) or rows)
    monkeypatch.setattr(bench, "START_METHOD", "fork")  # one thread per rank: forking is safe, and starts faster
    args = ["bench", "soap", "torch.AdamW", "--shapes", "8x8,8x8,8", "--steps", "2", "--warmup", "1", "--world", "1,2", "--threads", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "CPU processes on gloo" in out and "threads per rank: 1 at world 1, 1 at world 2" in out
    by = {(r["world"], r["optimizer"]): r for r in rows}
    assert list(by) == [(1, "soap"), (1, "torch.AdamW"), (2, "soap"), (2, "torch.AdamW")]
    printed = [line.split()[:2] for line in out.splitlines()[3:] if line.strip()]
    assert printed == [["1", "soap"], ["1", "torch.AdamW"], ["2", "soap"], ["2", "torch.AdamW"]]

    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(8, 8), (8, 8), (8,)]]
    single = bench._make("soap", params)[0].state_bytes()
    assert by[(1, "soap")]["state_bytes_max"] == by[(1, "soap")]["state_bytes_sum"] == single
    assert by[(2, "soap")]["state_bytes_sum"] == single and by[(2, "soap")]["state_bytes_max"] < single
    adamw = by[(1, "torch.AdamW")]["state_bytes_sum"]
    assert by[(2, "torch.AdamW")]["state_bytes_sum"] == 2 * adamw and by[(2, "torch.AdamW")]["state_bytes_max"] == adamw
    assert by[(1, "soap")]["comm_bytes"] == 0 and by[(2, "torch.AdamW")]["comm_bytes"] == 0
    assert by[(2, "soap")]["comm_bytes"] == 2 * 1 * 8 * 8 * 4 + 2 * 1 * 8 * 4  # the (8, 8) bucket of two, the vector
    assert all(r["median_ms"] > 0 and r["mean_ms"] > 0 for r in rows)


def _fake_ranks(per_run):
    """A stand-in for ``bench._world``: run ``i`` (its job's ``repeat_index``) gives every rank the rows ``per_run[i](rank)``."""
    jobs = []

    def world(size, job):
        jobs.append(job)
        return [per_run[job["repeat_index"]](rank) for rank in range(size)]

    return world, jobs


def _rank_row(times_ms, state=0, gathered=0):
    return {"times": [t / 1e3 for t in times_ms], "state_bytes": state, "gather_bytes": gathered, "failed": None, "dropped": False}


def test_world_bench_repeats_each_world_size_and_takes_the_medians_of_the_runs(monkeypatch):
    """Three runs at world size 2, hand-made: a step's time is the slower rank's, a run's mean over its steps, and
    the figure the median over the runs (not the mean of all steps, nor the first run's); each run draws its own
    round orders (its index reaches the ranks), and the state and gathers come from the first run."""
    runs = [
        lambda r: [_rank_row([1, 3], state=10 + r, gathered=7), _rank_row([2, 2], state=5)],  # means 2.0 and 2.0
        lambda r: [_rank_row([4 + r, 4], state=99), _rank_row([1, 1], state=5)],  # slower rank: 5, 4: 4.5; and 1.0
        lambda r: [_rank_row([3, 3], state=99), _rank_row([9, 9 - 6 * r], state=5)],  # 3.0; and 9.0
    ]
    fake, jobs = _fake_ranks(runs)
    monkeypatch.setattr(bench, "_world", fake)
    rows = bench.bench_world(["soap", "adamw"], [(4, 4)], worlds=[2], steps=2, warmup=0, repeat=3)
    assert [job["repeat_index"] for job in jobs] == [0, 1, 2]
    soap, adamw = rows
    assert soap["run_means"] == [2.0, 4.5, 3.0] and soap["mean_ms"] == 3.0 and soap["median_ms"] == 3.0
    assert adamw["run_means"] == [2.0, 1.0, 9.0] and adamw["mean_ms"] == 2.0
    assert soap["runs"] == adamw["runs"] == 3 and soap["failed"] is None
    assert (soap["state_bytes_max"], soap["state_bytes_sum"], soap["comm_bytes"]) == (11, 21, 7)
    ratio = bench.ratios(rows, [("adamw", "soap")])[0]
    assert ratio["ratio"] == 1.0 and ratio["range"] == (2.0 / 9.0, 3.0)  # run by run: 2/2, 1/4.5, 9/3


def test_a_peer_that_fails_in_one_run_of_a_world_size_is_reported_failed_with_its_runs(monkeypatch):
    failed = {"step": 2, "error": "RuntimeError: boom"}
    runs = [
        lambda r: [_rank_row([1]), _rank_row([2])],
        lambda r: [_rank_row([1]), {"times": [], "state_bytes": 0, "gather_bytes": 0, "dropped": True, "failed": failed if r == 1 else None}],
    ]
    fake, _ = _fake_ranks(runs)
    monkeypatch.setattr(bench, "_world", fake)
    adamw, peer = bench.bench_world(["adamw", "some.Peer"], [(4, 4)], worlds=[2], steps=1, warmup=0, repeat=2)
    assert peer["failed"] == {**failed, "ranks": [1], "runs": 1} and peer["mean_ms"] is None and peer["comm_bytes"] is None
    assert adamw["failed"] is None and adamw["run_means"] == [1.0, 1.0]


def test_world_bench_repeat_and_ratios_through_the_cli(monkeypatch, capsys):
    """``--repeat`` and ``--ratio`` beside ``--world``: the header says how many runs, and each world size gets its
    ratios, each the median of the runs' own with their range."""
    runs = [lambda r, k=k: [_rank_row([2.0 * (1 + k)]), _rank_row([1.0 + k])] for k in range(3)]
    fake, jobs = _fake_ranks(runs)
    monkeypatch.setattr(bench, "_world", fake)
    args = ["bench", "adamw", "torch.AdamW", *TINY, "--world", "1,2", "--repeat", "3", "--ratio", "adamw/torch.AdamW"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "medians of 3 runs" in out.splitlines()[0]
    assert [job["repeat_index"] for job in jobs] == [0, 1, 2, 0, 1, 2]
    for world in (1, 2):
        heading = f"ratios of the mean step time at world {world}, each run's own: median of 3 runs (lowest–highest)"
        assert heading in out
    # the runs' ratios: 2/1, 4/2, 6/3
    assert out.count("adamw / torch.AdamW  2.000 (2.000–2.000)") == 2, out


def test_world_bench_arguments_are_checked(capsys):
    assert cli.main(["bench", "soap", *TINY, "--world", "0,2", "--scaling", "8"]) == 2
    err = capsys.readouterr().err
    assert "--world: must be ≥ 1, got 0" in err and "--world: cannot be combined with --scaling" in err
    with pytest.raises(ValueError, match="world sizes ≥ 1"):
        bench.bench_world(["soap"], [(4, 4)], worlds=[], steps=1, warmup=0)


# -- --repeat: several runs, their medians and the ratio's spread -------------------------------------------


def test_aggregate_runs_takes_medians_and_the_ratios_range():
    """Hand-made runs: each figure is the median over the runs, the ratio is each run's own (a busier run slows
    every optimizer in it alike), and its range is the lowest and highest of those."""

    def run(a_ms, b_ms):
        return [
            {"optimizer": "a", "mean_ms": a_ms, "median_ms": a_ms / 2, "state_bytes": 10, "vs_first": 1.0},
            {"optimizer": "b", "mean_ms": b_ms, "median_ms": b_ms / 2, "state_bytes": 20, "vs_first": b_ms / a_ms},
        ]

    rows = bench.aggregate_runs([run(10.0, 8.0), run(20.0, 18.0), run(10.0, 10.0)])
    a, b = rows
    assert a["mean_ms"] == 10.0 and a["vs_first"] == 1.0 and a["vs_first_range"] == (1.0, 1.0) and a["runs"] == 3
    assert b["mean_ms"] == 10.0 and b["median_ms"] == 5.0 and b["state_bytes"] == 20
    assert b["vs_first"] == pytest.approx(0.9) and b["vs_first_range"] == (pytest.approx(0.8), pytest.approx(1.0))
    with pytest.raises(ValueError):
        bench.aggregate_runs([])


def test_repeat_makes_the_whole_run_again_and_reports_the_spread(capsys):
    rows = bench.bench(["torch.AdamW", "adamw"], [(8, 4), (4,)], steps=2, warmup=1, device="cpu", repeat=3)
    assert [r["runs"] for r in rows] == [3, 3]
    lo, hi = rows[1]["vs_first_range"]
    assert lo <= rows[1]["vs_first"] <= hi and rows[0]["vs_first_range"] == (1.0, 1.0)
    with pytest.raises(ValueError, match="repeat ≥ 1"):
        bench.bench(["adamw"], [(4, 3)], steps=1, warmup=0, device="cpu", repeat=0)
    assert cli.main(["bench", "torch.AdamW", "adamw", *TINY, "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "medians of 2 runs" in out and "× range" in out
    assert re.fullmatch(r"\d+\.\d\d–\d+\.\d\d", _rows(out)["adamw"][-1])
    assert cli.main(["bench", "adamw", *TINY]) == 0
    assert "× range" not in capsys.readouterr().out  # one run: no spread column


def test_repeat_arguments_are_checked(capsys):
    assert cli.main(["bench", "adamw", *TINY, "--repeat", "0"]) == 2
    assert "--repeat: must be ≥ 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeat ≥ 1"):
        bench.bench_world(["adamw"], [(4, 4)], worlds=[1], steps=1, warmup=0, repeat=0)


# -- --ratio ---------------------------------------------------------------------------------------------------


def test_ratios_are_each_runs_own_with_their_median_and_range():
    """Hand-made runs: the ratio of two optimizers neither of which is first is taken run by run (3/4, 9/10, 8/8 here),
    not from the medians of their means (which would give 8/8 = 1)."""

    def run(a_ms, b_ms, c_ms):
        return [
            {"optimizer": n, "mean_ms": t, "median_ms": t, "state_bytes": 0, "vs_first": t / a_ms}
            for n, t in (("a", a_ms), ("b", b_ms), ("c", c_ms))
        ]

    rows = bench.aggregate_runs([run(1.0, 3.0, 4.0), run(1.0, 9.0, 10.0), run(1.0, 8.0, 8.0)])
    [bc, cb] = bench.ratios(rows, [("b", "c"), ("c", "b")])
    assert bc["pair"] == ("b", "c") and bc["runs"] == 3
    assert bc["ratio"] == pytest.approx(0.9) and bc["range"] == (pytest.approx(0.75), pytest.approx(1.0))
    assert cb["ratio"] == pytest.approx(10 / 9) and cb["range"] == (pytest.approx(1.0), pytest.approx(4 / 3))
    with pytest.raises(KeyError):
        bench.ratios(rows, [("a", "nope")])


def test_ratio_through_the_cli_matches_the_tables_ratio_to_the_first(capsys):
    """One run: the printed ratio to the first optimizer is the table's own × column, computed apart."""
    assert cli.main(["bench", "torch.AdamW", "adamw", *TINY, "--ratio", "adamw/torch.AdamW", "--ratio", "torch.AdamW/adamw"]) == 0
    out = capsys.readouterr().out
    table_ratio = float(_rows(out)["adamw"][3])
    lines = dict(re.findall(r"^(\S+ / \S+)\s+(\S+)$", out, flags=re.M))
    assert float(lines["adamw / torch.AdamW"]) == pytest.approx(table_ratio, abs=0.006)
    assert float(lines["adamw / torch.AdamW"]) * float(lines["torch.AdamW / adamw"]) == pytest.approx(1.0, abs=0.002)
    assert cli.main(["bench", "torch.AdamW", "adamw", *TINY, "--repeat", "2", "--ratio", "adamw/torch.AdamW"]) == 0
    out = capsys.readouterr().out
    assert "median of 2 runs (lowest–highest)" in out
    assert re.search(r"^adamw / torch\.AdamW\s+\d+\.\d{3} \(\d+\.\d{3}–\d+\.\d{3}\)$", out, flags=re.M)


def test_ratio_of_a_toml_path_splits_at_the_right_slash(tmp_path, capsys):
    path = tmp_path / "my" / "adamw.toml"
    path.parent.mkdir()
    path.write_text((Path(__file__).parents[2] / "configs" / "adamw.toml").read_text())
    assert cli.main(["bench", str(path), "adamw", *TINY, "--ratio", f"{path}/adamw"]) == 0
    assert re.search(rf"^{re.escape(str(path))} / adamw\s+\d+\.\d{{3}}$", capsys.readouterr().out, flags=re.M)


def test_ratio_with_a_peer_not_installed_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "heavyball", None)
    assert cli.main(["bench", "adamw", "heavyball.SOAP", *TINY, "--ratio", "adamw/heavyball.SOAP"]) == 0
    assert "adamw / heavyball.SOAP  not measured (heavyball.SOAP not timed here)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "adamw/soap"], "--ratio: 'adamw/soap' is not A/B with A and B among the optimizers named"),
        (["--ratio", "adamw"], "--ratio: 'adamw' is not A/B"),
    ],
)
def test_ratio_arguments_are_checked(extra, message, capsys):
    assert cli.main(["bench", "adamw", *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


# -- --retain-freed-memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "glibc, took, note",
    [(True, True, "; freed memory retained (glibc, kronopt.malloc)"), (False, False, "not glibc, nothing changed"),
     (True, False, "glibc refused the setting")],
)
def test_retain_freed_memory_is_set_first_and_named_in_the_header(glibc, took, note, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench.malloc, "retain_freed_memory", lambda: calls.append("set") or took)
    monkeypatch.setattr(bench.malloc, "_glibc", lambda: object() if glibc else None)
    real = bench.bench
    monkeypatch.setattr(bench, "bench", lambda *a, **k: calls.append("bench") or real(*a, **k))
    assert cli.main(["bench", "adamw", *TINY, "--retain-freed-memory"]) == 0
    assert calls == ["set", "bench"]
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith(note), header


def test_retain_freed_memory_reaches_the_world_ranks_through_the_cli(monkeypatch, capsys):
    jobs = []
    monkeypatch.setattr(bench.malloc, "retain_freed_memory", lambda: True)
    monkeypatch.setattr(bench, "_world", lambda world, job: jobs.append(job) or [[{"times": [1e-3], "state_bytes": 0, "gather_bytes": 0}]] * world)
    assert cli.main(["bench", "adamw", *TINY, "--world", "1,2", "--retain-freed-memory"]) == 0
    assert [job["retain_freed_memory"] for job in jobs] == [True, True]
    assert capsys.readouterr().out.splitlines()[0].endswith("freed memory retained (glibc, kronopt.malloc)")


def test_without_the_flag_nothing_is_set(monkeypatch, capsys):
    monkeypatch.setattr(bench.malloc, "retain_freed_memory", lambda: pytest.fail("set without --retain-freed-memory"))
    assert cli.main(["bench", "adamw", *TINY]) == 0
    assert "retain" not in capsys.readouterr().out


def test_world_ranks_retain_freed_memory_when_asked(monkeypatch, tmp_path):
    jobs = []
    monkeypatch.setattr(bench, "_world", lambda world, job: jobs.append(job) or [[{"times": [1e-3], "state_bytes": 0, "gather_bytes": 0}]] * world)
    bench.bench_world(["adamw"], [(4, 4)], worlds=[2], steps=1, warmup=0, retain_freed_memory=True)
    bench.bench_world(["adamw"], [(4, 4)], worlds=[2], steps=1, warmup=0)
    assert [job["retain_freed_memory"] for job in jobs] == [True, False]

    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(bench.malloc, "retain_freed_memory", lambda: calls.append("set"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("group"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(bench, "_rank_rows", lambda job, barrier: [])
    bench._world_rank(0, 2, str(tmp_path), {**jobs[0], "threads": torch.get_num_threads()})
    bench._world_rank(0, 2, str(tmp_path), {**jobs[1], "threads": torch.get_num_threads()})
    assert calls == ["set", "group", "group"]


# -- the load average in the header ------------------------------------------------------------------------


@pytest.mark.parametrize("world", [False, True])
def test_the_header_gives_the_load_average_at_the_start_and_the_end(world, monkeypatch, capsys):
    loads = iter([(0.52, 0.4, 0.3), (1.96, 0.9, 0.5)])
    monkeypatch.setattr(bench.os, "getloadavg", lambda: next(loads))
    assert cli.main(["bench", "adamw", *TINY, *(["--world", "1"] if world else [])]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "; load average 0.5 at the start, 2.0 at the end" in header, header


def test_the_header_says_nothing_of_the_load_where_the_os_gives_none(monkeypatch, capsys):
    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(bench.os, "getloadavg", unavailable)
    assert cli.main(["bench", "adamw", *TINY]) == 0
    assert "load average" not in capsys.readouterr().out


class _FreezeProbe:
    """A stand-in whose steps record how many objects the collector holds frozen (and raise at step ``raise_at``)."""

    def __init__(self, raise_at=None):
        self.frozen = []
        self.raise_at = raise_at

    def step(self):
        self.frozen.append(gc.get_freeze_count())
        if len(self.frozen) == self.raise_at:
            raise RuntimeError("probe")


def test_the_timed_steps_run_with_the_process_objects_frozen_and_the_bench_thaws_them():
    """A full collection scans every object of the process (torch's, the peers', every optimizer's state) and lands
    in whichever timed step triggers it: the timed rounds run with the objects made before them frozen, and the
    heap is thawed after, also when a step raises; a heap the caller froze is left as it was."""
    probe = _FreezeProbe()
    assert gc.get_freeze_count() == 0
    bench.bench(["probe"], [(8, 4)], steps=3, warmup=2, device="cpu", makers={"probe": lambda: (probe, lambda: 0)})
    warm, timed = probe.frozen[:2], probe.frozen[2:]
    assert warm == [0, 0] and len(timed) == 3 and min(timed) > 0
    assert gc.get_freeze_count() == 0
    raising = _FreezeProbe(raise_at=3)
    with pytest.raises(RuntimeError, match="probe"):
        bench.bench(["probe"], [(8, 4)], steps=3, warmup=1, device="cpu", makers={"probe": lambda: (raising, lambda: 0)})
    assert raising.frozen[-1] > 0 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        mine = _FreezeProbe()
        bench.bench(["probe"], [(8, 4)], steps=2, warmup=1, device="cpu", makers={"probe": lambda: (mine, lambda: 0)})
        # neither thawed (the count would fall to about 0) nor frozen again (it would grow): an object frozen by the
        # caller may still die by its references during the steps (a full suite's leftovers), a count of its own
        after = gc.get_freeze_count()
        assert len(mine.frozen) == 3 and all(before // 2 < count <= before for count in [*mine.frozen, after])
    finally:
        gc.unfreeze()
