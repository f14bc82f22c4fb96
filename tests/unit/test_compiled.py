"""``compile = true``: compiled and eager steps agree, nothing recompiles per step, a failing compiler falls back."""

import warnings

import pytest
import torch

import kronopt
from kronopt import ConfigError, compiled

STEPS = 5
CASES = {"soap": {"weight_decay": 0.1}, "muon": {"inner.ns_dtype": "float32", "weight_decay": 0.1}}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _train(preset: str, overrides: dict, *, compile_: bool) -> tuple[list[torch.Tensor], list[int]]:
    """``STEPS`` steps of a one-bucket model under a decaying lr; the parameters and the graph count after each step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 8, generator=gen)) for _ in range(2)]
    opt = kronopt.build(params, preset, compile=compile_, **overrides)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))  # lr changes every step
    graphs = []
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
        graphs.append(_graphs())
    return [p.detach() for p in params], graphs


@pytest.fixture(scope="module")
def runs():
    """Eager and compiled runs of each case, shared by the assertions (compiling costs seconds on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn: fail instead
        return {name: (_train(name, ov, compile_=False), _train(name, ov, compile_=True)) for name, ov in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(CASES))
def test_compiled_steps_equal_eager_steps_to_rounding(runs, preset):
    (eager, eager_graphs), (fast, fast_graphs) = runs[preset]
    for a, b in zip(eager, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert eager_graphs[-1] == eager_graphs[0]  # eager compiles nothing
    assert fast_graphs[-1] > eager_graphs[-1]  # the twins ran compiled
    # the first steps compile (soap's first call only observes); then neither the step count nor lr recompiles
    assert fast_graphs[2:] == [fast_graphs[2]] * (STEPS - 2), fast_graphs


def test_a_failing_compiler_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    twin = compiled.Compiled(lambda x: x * 2, "the test function")
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the test function failed \(RuntimeError: no C\+\+ compiler found\)"):
        assert twin(torch.ones(2)).tolist() == [2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert twin(torch.ones(2)).tolist() == [2.0, 2.0]  # no second warning
    assert twin.failed


def test_twins_are_used_only_inside_a_compile_scope():
    assert compiled.variant("newton_schulz") is None
    with compiled.scope(True):
        assert compiled.variant("newton_schulz") is not None
        with compiled.scope(False):
            assert compiled.variant("newton_schulz") is None
        assert compiled.active()
    assert not compiled.active()


def test_compile_key_is_validated_and_per_group():
    with pytest.raises(ConfigError, match="compile: must be true or false"):
        kronopt.resolve("soap", compile="yes")
    assert kronopt.resolve("soap").compile is False
    cfg = kronopt.resolve("muon", compile=True, **{"fallback.compile": True})
    assert kronopt.loads(kronopt.dumps(cfg)) == cfg
    p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    opt = kronopt.build([{"params": [p]}, {"params": [q], "compile": True}], "soap")
    assert [c.compile for c in opt._group_cfgs] == [False, True]
