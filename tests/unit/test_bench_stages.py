"""``kronopt bench --stages``: each kronopt optimizer's step split by stage slot (``kronopt.app.stage_times``).

The clock is checked on a clock of our own, whose readings the stand-in stages set (each slot's share,
nesting, exceptions, the device's waits, everything put back, members that are no functions left alone),
then through the bench: a stage made slow by a known sleep shows in its own slot and nowhere else, per step
and in every group's config, the split adds up to the clocked step, the CPU's fast paths count their
arithmetic in their slots, peers are not split, and the command line's table, checks, record and comparison.
"""

import functools
import json
import re
import time

import attrs
import pytest
import torch

import kronopt
from kronopt import compose, post
from kronopt.app import bench, cli, stage_times
from kronopt.inner_rules.adam import AdamInner
from kronopt.registry import INNER_RULES

TINY = ["--shapes", "8x4,8x4,4", "--steps", "2", "--warmup", "1", "--threads", "1"]


class _Ticks:
    """A clock that moves only when told to (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks(monkeypatch):
    clock = _Ticks()
    monkeypatch.setattr(stage_times.time, "perf_counter", clock)
    return clock


def _stand_ins(ticks):
    class Factors:
        def update(self):
            ticks.now += 3.0

    class Inner:
        def direction(self):
            ticks.now += 5.0
            self.moment()

        def moment(self):
            ticks.now += 2.0

        @staticmethod
        def orthogonalize():
            ticks.now += 4.0

    class Split:
        def complement(self, inner):
            ticks.now += 1.0
            inner.moment()  # the inner rule's time, inside the split's call
            ticks.now += 1.0

    class Failing:
        def refresh(self):
            ticks.now += 6.0
            raise ValueError("no basis")

    return Factors(), Inner(), Split(), Failing()


def test_each_slot_takes_its_own_time_less_the_wrapped_calls_inside_it(ticks):
    factors, inner, split, failing = _stand_ins(ticks)
    clock = stage_times.StageClock()
    with stage_times.StageClock.installed([("factors", factors), ("inner", inner), ("split", split), ("basis", failing)]):
        factors.update()  # not running: nothing counted
        with clock.running():
            factors.update()
            inner.direction()
            split.complement(inner)
            type(inner).orthogonalize()
            with pytest.raises(ValueError, match="no basis"):
                failing.refresh()
            ticks.now += 10.0  # outside every stage: kronopt's own
            factors.update()
    assert clock.totals == {"factors": 6.0, "basis": 6.0, "inner": 5.0 + 2.0 + 2.0 + 4.0, "split": 2.0, "post": 0.0}
    split_ms = stage_times.split_ms(clock, step_seconds=clock_total(clock) + 10.0, steps=2)
    assert split_ms["kronopt"] == pytest.approx(10.0 / 2 * 1e3)
    assert split_ms["step_ms"] == pytest.approx(37.0 / 2 * 1e3)
    assert split_ms["inner"] == pytest.approx(13.0 / 2 * 1e3)


def clock_total(clock):
    return sum(clock.totals.values())


def test_everything_is_put_back_even_by_an_exception(ticks):
    factors, inner, split, _ = _stand_ins(ticks)
    before = {name: vars(type(inner))[name] for name in ("direction", "moment", "orthogonalize")}
    functions = {(m, n): vars(m)[n] for m, n, _ in stage_times.SLOT_FUNCTIONS}
    with pytest.raises(KeyError):
        with stage_times.StageClock.installed([("inner", inner), ("inner", inner), ("split", split)]):
            assert vars(type(inner))["direction"] is not before["direction"]
            assert isinstance(vars(type(inner))["orthogonalize"], staticmethod)
            raise KeyError("out")
    assert {name: vars(type(inner))[name] for name in before} == before
    assert {(m, n): vars(m)[n] for m, n, _ in stage_times.SLOT_FUNCTIONS} == functions
    assert compose.run_deferred_ is functions[(compose, "run_deferred_")]
    assert post.apply_together_ is functions[(post, "apply_together_")]


def test_an_inherited_method_is_wrapped_once_where_it_is_defined(ticks):
    class Base:
        def update(self):
            ticks.now += 1.0

    class Child(Base):
        pass

    clock = stage_times.StageClock()
    with stage_times.StageClock.installed([("factors", Child()), ("factors", Base())]):
        assert "update" not in vars(Child)
        with clock.running():
            Child().update()
    assert clock.totals["factors"] == 1.0 and "update" not in vars(Child)


def test_the_device_is_waited_for_at_each_edge_and_one_clock_runs_at_a_time(ticks):
    waits = []
    factors, inner, _, _ = _stand_ins(ticks)
    clock = stage_times.StageClock(sync=lambda: waits.append(ticks.now))
    with stage_times.StageClock.installed([("factors", factors), ("inner", inner)]):
        with clock.running():
            inner.direction()  # enter, enter (moment), leave, leave
            with pytest.raises(RuntimeError, match="running already"):
                with stage_times.StageClock().running():
                    pass
    assert waits == [0.0, 5.0, 7.0, 7.0]


@attrs.frozen(kw_only=True)
class _SlowAdam(AdamInner):
    """Adam whose direction also sleeps ``SLEEP`` seconds: a known cost in the inner rule's slot."""

    def direction(self, state, G, ctx):
        time.sleep(SLEEP)
        return super().direction(state, G, ctx)


SLEEP = 0.02


@pytest.fixture
def slow_adam(tmp_path):
    restore = INNER_RULES.override("slow_adam_for_stages", _SlowAdam)
    path = tmp_path / "slow.toml"
    path.write_text((bench.Path(__file__).parents[2] / "configs" / "soap.toml").read_text().replace('type = "adam"', 'type = "slow_adam_for_stages"'))
    yield str(path)
    restore()


def test_a_stage_made_slow_shows_in_its_slot_alone_and_the_split_adds_up(slow_adam):
    original = vars(AdamInner)["direction"]
    # medians of 3 runs: a stall of the machine in one run moves no figure
    rows = bench.bench(
        ["soap", slow_adam, "adamw", "torch.AdamW"], [(8, 4)] * 3, steps=2, warmup=2, device="cpu", stage_steps=10, repeat=3
    )
    split = {r["optimizer"]: r["stages"] for r in rows}
    assert split["torch.AdamW"] is None  # a peer: not split
    slow, soap, adamw = split[slow_adam], split["soap"], split["adamw"]
    for s in (slow, soap, adamw):
        assert set(s) == {"step_ms", *stage_times.SLOTS, "kronopt"}
        # each run's split adds up exactly (split_ms); medians of the parts, nearly
        assert sum(s[k] for k in (*stage_times.SLOTS, "kronopt")) == pytest.approx(s["step_ms"], rel=0.1)
        assert all(v >= 0 for v in s.values())
    # one bucket, one direction a step: the sleep lands in the inner rule's slot, each step (10 rounds: a refresh
    # too), a mean per step (not the rounds' total)
    assert SLEEP * 1e3 <= slow["inner"] < 4 * SLEEP * 1e3
    assert slow["factors"] < SLEEP * 1e3 and slow["basis"] < SLEEP * 1e3 and slow["kronopt"] < SLEEP * 1e3
    assert soap["inner"] < SLEEP * 1e3  # the same Adam's direction, not slowed: the wrapper of the subclass alone sleeps
    assert soap["factors"] > 0 and soap["basis"] > 0 and soap["inner"] > 0
    # plain AdamW: no factors, no basis; its rule and write in the fast path count as inner
    assert adamw["factors"] == adamw["basis"] == 0 and adamw["inner"] > 0
    # the timed rows are the bench's as ever, and nothing stays wrapped
    assert all(r["mean_ms"] > 0 for r in rows)
    assert vars(AdamInner)["direction"] is original and vars(_SlowAdam)["direction"].__name__ == "direction"
    assert not hasattr(vars(_SlowAdam)["direction"], "__wrapped__")
    assert bench.bench(["soap"], [(8, 4)], steps=1, warmup=1, device="cpu")[0]["stages"] is None


def test_the_runs_medians_make_the_split_of_a_repeat(monkeypatch):
    made = iter([3.0, 1.0, 2.0])

    def split(runs, grads, rounds, sync):  # each run's split, as _split_by_stage leaves it
        for run in runs:
            if not run["peer"]:
                value = next(made)
                run["stages"] = {"step_ms": 10 * value, **dict.fromkeys(stage_times.SLOTS, value), "kronopt": value}

    monkeypatch.setattr(bench, "_split_by_stage", split)
    rows = bench.bench(["soap", "torch.AdamW"], [(8, 4)], steps=1, warmup=1, device="cpu", stage_steps=2, repeat=3)
    assert rows[0]["stages"] == {"step_ms": 20.0, **dict.fromkeys(stage_times.SLOTS, 2.0), "kronopt": 2.0}
    assert rows[1]["stages"] is None
    assert bench._median_stages([{"a": 1.0, "b": 5.0}, None, {"a": 3.0, "b": 4.0}, {"a": 2.0, "b": 9.0}]) == {"a": 2.0, "b": 5.0}
    assert bench._median_stages([None, None]) is None


def test_every_group_s_stages_are_split(slow_adam, tmp_path):
    """muon's 1-D parameters go to its fallback group, here a slow Adam: that group's stage is timed too."""
    path = tmp_path / "muon_slow_fallback.toml"
    text = (bench.Path(__file__).parents[2] / "configs" / "muon.toml").read_text()
    head, fallback = text.split("[fallback.inner]")
    path.write_text(head + "[fallback.inner]" + fallback.replace('type = "adam"', 'type = "slow_adam_for_stages"', 1))
    rows = bench.bench([str(path)], [(8, 4), (4,)], steps=1, warmup=1, device="cpu", stage_steps=3, repeat=3)
    assert SLEEP * 1e3 <= rows[0]["stages"]["inner"] and rows[0]["stages"]["kronopt"] < SLEEP * 1e3


#: operators that do a stage's arithmetic (products, decompositions, the moments' and momentum's updates, the fused
#: AdamW kernel): none may run outside every timed call, or its time would read as kronopt's own
_ARITHMETIC = {
    "bmm", "mm", "addmm", "baddbmm", "matmul", "lerp", "_fused_adamw", "geqrf", "linalg_householder_product",
    "_linalg_eigh", "linalg_qr", "_linalg_svd", "addcmul", "sqrt",
}


@pytest.mark.parametrize("preset", ["soap", "muon", "adamw", "dykaf", "kl_shampoo", "pro_kl_shampoo"])
@pytest.mark.parametrize("shapes", [[(128, 256), (128, 256), (256,)], [(8, 4), (12, 6), (4,)]], ids=["fast", "small"])
def test_no_stage_arithmetic_runs_outside_the_timed_calls(preset, shapes):
    """Every operator a step runs, by whether a timed call was open: the CPU's fast paths (plain Muon's look-ahead
    and momentum, plain AdamW's fused kernel, small buckets stepped together) keep their arithmetic inside their
    slots' calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], preset)
    clock = stage_times.StageClock()
    outside: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__.removesuffix("_")
            if not clock._open and name in _ARITHMETIC:
                outside.append(name)
            return func(*args, **(kwargs or {}))

    with stage_times.StageClock.installed(stage_times.stages_of(opt)):
        for k in range(12):  # a refresh of the presets among them
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k))
            with clock.running(), Watch():
                opt.step()
    assert not outside, sorted(set(outside))
    assert clock.totals["inner"] > 0


def test_a_member_that_is_no_function_is_left_alone(ticks):
    """An option named like a slot method (an attrs field), a ``singledispatchmethod`` and a ``partialmethod``:
    wrapping them would read the option as a method, or fail; they keep their values and work."""

    @attrs.frozen
    class Ortho:
        orthogonalize: bool = False  # an option of the stage's own, not the plain Muon method

        @functools.singledispatchmethod
        def direction(self, x):
            return ("any", x)

        def _moment(self, scale):
            ticks.now += 1.0
            return scale

        moment = functools.partialmethod(_moment, 2.0)

    stage = Ortho()
    clock = stage_times.StageClock()
    with stage_times.StageClock.installed([("inner", stage)]), clock.running():
        assert stage.orthogonalize is False
        assert stage.direction(3) == ("any", 3)
        assert stage.moment() == 2.0
    assert clock.totals["inner"] == 0.0  # not timed: their time is kronopt's own


def test_the_table_through_the_cli(capsys):
    assert cli.main(["bench", "soap", "adamw", "torch.AdamW", *TINY, "--stages", "3"]) == 0
    out = capsys.readouterr().out
    table = out.split("where the step goes (--stages: 3 more rounds")[1]
    header = next(line for line in table.splitlines() if line.startswith("optimizer"))
    assert header.split() == ["optimizer", "step", "ms", "factors", "basis", "inner", "split", "post", "kronopt"]
    assert re.search(r"^soap\s+\d+\.\d{3}(\s+\d+\.\d{3} \(\s*\d+ %\)){6}$", table, flags=re.M)
    lines = table.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    assert len(lines[rule - 1]) == len(lines[rule]) == len(lines[rule + 1])  # the rows line up with the header
    assert not re.search(r"^torch\.AdamW", table, flags=re.M)
    assert cli.main(["bench", "soap", *TINY]) == 0
    assert "where the step goes" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stages", "-1"], "--stages"),
        (["--stages", "x"], "--stages"),
        (["--stages", "2", "--world", "1"], "--stages: applies to the one-process table; cannot be combined with --world"),
    ],
)
def test_stages_arguments_are_checked(extra, message, capsys):
    assert cli.main(["bench", "soap", *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_record_holds_the_split_and_the_comparison_shows_it(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli.main(["bench", "soap", "torch.AdamW", *TINY, "--stages", "2", "--json", str(a)]) == 0
    assert cli.main(["bench", "soap", "dykaf", *TINY, "--json", str(b)]) == 0
    capsys.readouterr()
    data = json.loads(a.read_text())
    assert data["settings"]["stage_steps"] == 2
    rows = {r["optimizer"]: r for r in data["results"]["rows"]}
    assert rows["torch.AdamW"]["stages"] is None and rows["soap"]["stages"]["factors"] > 0
    found = bench.compare_records(bench.read_record(a), bench.read_record(b))
    states = {r["optimizer"]: (r["a_state"], r["b_state"]) for r in found["stages"]}
    assert states == {"soap": (None, "absent"), "torch.AdamW": ("none", "absent"), "dykaf": ("unrun", "absent")}
    assert cli.main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out.split("where the step goes (--stages)")[1]
    assert re.search(r"^soap\s+A(\s+\d+\.\d{3}){7}$", out, flags=re.M)
    assert re.search(r"^\s+B  not asked$", out, flags=re.M)
    assert re.search(r"^torch\.AdamW\s+A  not split", out, flags=re.M)
    # neither record asked: no stages section; a record from before --stages ran without it, as one with 0
    assert bench.compare_records(bench.read_record(b), bench.read_record(b))["stages"] == []
    older = json.loads(b.read_text())
    del older["settings"]["stage_steps"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    found = bench.compare_records(bench.read_record(tmp_path / "older.json"), bench.read_record(b))
    assert "settings.stage_steps" not in found["differences"] and found["stages"] == []
    assert bench.compare_records(bench.read_record(tmp_path / "older.json"), bench.read_record(a))["differences"][
        "settings.stage_steps"
    ] == (0, 2)
    # an edited split is refused with the row's name
    data["results"]["rows"][0]["stages"]["inner"] = "fast"
    a.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"--stages split of 'soap'"):
        bench.read_record(a)
