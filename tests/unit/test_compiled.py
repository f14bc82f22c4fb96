"""``compile = true``: compiled and eager steps agree, nothing recompiles per step, a failing compiler falls back."""

import re
import warnings

import pytest
import torch

import kronopt
from kronopt import ConfigError, compiled
from tests.torch_compat import no_compiler

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
            raise no_compiler()

        return run

    monkeypatch.setattr(torch, "compile", broken)
    twin = compiled.Compiled(lambda x: x * 2, "the test function")
    with pytest.warns(RuntimeWarning, match=re.escape(f"torch.compile of the test function failed (InductorError: {no_compiler()})")):
        assert twin(torch.ones(2)).tolist() == [2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert twin(torch.ones(2)).tolist() == [2.0, 2.0]  # no second warning
    assert twin.failed


def test_a_real_missing_compiler_falls_back():
    """Inductor itself, pointed at a C++ compiler that does not exist: the error it raises is one the twin takes."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    twin = compiled.Compiled(lambda x: (x * 2).sin(), "the test function")
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
            with pytest.warns(RuntimeWarning, match=r"torch.compile of the test function failed \(InductorError"):
                torch.testing.assert_close(twin(torch.ones(3)), torch.full((3,), 2.0).sin())
    finally:
        torch._dynamo.reset()
    assert twin.failed


def test_a_platform_that_refuses_torch_compile_falls_back(monkeypatch):
    def refused(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", refused)
    twin = compiled.Compiled(lambda x: x + 1, "the test function")
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: torch.compile is not supported on this platform\)"):
        assert twin(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert twin.failed


def test_an_error_of_the_compiled_run_is_raised_and_compilation_stays_on(monkeypatch):
    """An out-of-memory while the compiled graph runs is the step's own error: raised as it came, not rerun
    eagerly (the graph may have written part of its results) and not taken for a compiler's failure."""
    calls = []

    def compiled_but_out_of_memory(fn, **kwargs):
        def run(*args, **kw):
            calls.append(args)
            raise torch.OutOfMemoryError("out of memory")

        return run

    monkeypatch.setattr(torch, "compile", compiled_but_out_of_memory)
    eager = []
    twin = compiled.Compiled(lambda x: eager.append(x) or x, "the test function")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(torch.OutOfMemoryError):
                twin(torch.ones(2))
    assert not twin.failed and len(calls) == 2 and eager == []


@pytest.mark.parametrize("order", ["before", "after"])
def test_the_parameter_write_compiles_as_one_graph(order):
    """A compiler error taken for a fallback must come before the twin wrote anything: for the one twin that writes
    in place (the parameters), so long as dynamo compiles it whole. A graph break would let a first graph write
    and a later one fail to compile, and the eager rerun would then write twice."""
    import torch._dynamo

    params = [torch.zeros(2, 3), torch.zeros(6)]
    D, ok = torch.ones(2, 2, 3), torch.tensor([True, False])
    lr, lr_wd = torch.tensor(0.1), torch.tensor(0.01)
    torch._dynamo.reset()
    report = torch._dynamo.explain(compiled._apply)(params, D, ok, lr, lr_wd, order, True)
    assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
    moved = -0.1 if order == "before" else -0.1 * (1 - 0.01)  # the decay of a zero weight, or of the moved one
    torch.testing.assert_close(params[0], torch.full((2, 3), moved))  # it ran, on the ok block only
    assert params[1].tolist() == [0.0] * 6


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


@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1), torch.tensor([0.1])], ids=["number", "0-d", "one-entry"])
def test_the_compiled_write_takes_a_learning_rate_held_in_a_tensor(lr):
    """A scheduler may hold ``lr`` in a tensor on the device (a CPU one is read as its number before): the compiled
    write took only numbers (``torch.full((), tensor([lr]))`` raises). The same write as with the number."""
    post = kronopt.resolve("adamw").post
    D = torch.ones(2, 2, 3)
    ok = torch.tensor([True, False])
    params = [torch.zeros(2, 3), torch.zeros(6)]
    with compiled.scope(True):
        compiled.variant("post_apply")(post, params, D, lr=lr, weight_decay=0.01, ok=ok)
    torch.testing.assert_close(params[0], torch.full((2, 3), -0.1))  # decay of a zero weight, then the step
    assert params[1].tolist() == [0.0] * 6


@pytest.mark.parametrize("preset", ["adamw", "soap", "muon", "kl_shampoo"])
def test_torch_compile_of_the_step_runs_it_eagerly_with_the_same_result(preset):
    """``torch.compile(optimizer.step)``, torch.optim's recipe for compiling an optimizer: dynamo cannot trace
    kronopt's step (soap's and muon's raised inside dynamo), so the step leaves the graph and runs eagerly;
    a closure is still called once, with gradients on, and its loss returned. The weights equal the eager run's."""
    def run(compiled_step):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        opt = kronopt.build(net.named_parameters(), preset, **{"refresh.every": 2} if preset != "adamw" else {})
        step = torch.compile(opt.step, backend="eager") if compiled_step else opt.step
        losses = []

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        for _ in range(5):
            losses.append(float(step(closure)))
        return [p.detach().clone() for p in net.parameters()], losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes on the frames it leaves
        got, got_losses = run(True)
    want, want_losses = run(False)
    assert got_losses == want_losses
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_compiled_second_moment_stays_finite_where_the_eager_one_does():
    """A float32 gradient of 3e19: (1 − β₂) G² = 4.5e37 is finite, G² = 9e38 is not. Inductor's ``addcmul`` formed
    G² first, so the compiled step took the block for non-finite and skipped it where the eager step took it."""
    from kronopt import linalg

    m, v = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    G = torch.tensor([3e19, -3e19, 2.0, 0.0]).view(1, 2, 2)
    exact = 0.95 * v.double() + 0.05 * G.double() ** 2  # in float64, where G² is finite
    eager = linalg.adam_moments(m, v, G, (0.9, 0.95))
    with compiled.scope(True):
        fast = compiled.variant("adam_moments")(m, v, G, (0.9, 0.95))
    for moments in (eager, fast):
        torch.testing.assert_close(moments[1].double(), exact, rtol=1e-6, atol=0)
        torch.testing.assert_close(moments[0], 0.1 * G)


def test_a_fullgraph_compile_of_the_step_says_why_it_cannot_trace_it():
    """``torch.compile(opt.step, fullgraph=True)`` allows no graph break, so it cannot take the step eagerly as the
    default does: the error must name kronopt's reason and the ``compile = true`` route. It named
    ``importlib.import_module`` and told the user to file an issue with PyTorch (the step marked its eager
    function from inside the traced frame). The default compile still runs the step, as
    ``test_torch_compile_of_the_step_runs_it_eagerly_with_the_same_result`` pins."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = kronopt.build([p], "soap")
    p.grad = torch.randn(4, 3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="compile = true") as caught:
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    assert "import_module" not in str(caught.value)
    torch._dynamo.reset()
