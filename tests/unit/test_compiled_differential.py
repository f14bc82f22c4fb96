"""``compile = true`` against ``compile = false``, differentially: the same steps must agree to float rounding.

Each test runs the same gradients through an eager and a compiled optimizer (or a compiled one
and a known answer) and names the bug it would catch. Every compiled run here uses blocks of
the same few shapes (``8 × 12``, two per bucket; one ``6 × 10`` bucket), so the graphs compiled by
one test are found again by the next one (compilation costs seconds on a CPU).

The tolerances reflect rounding only: float32 steps agree to ``rtol=1e-5, atol=1e-6``, float64 steps
to ``1e-12``; Newton–Schulz in bfloat16 (Muon's default ``ns_dtype``) is compared with a tolerance
of a bfloat16 rounding of the update.
"""

import contextlib
import warnings

import pytest
import torch

import kronopt
from kronopt import compiled
from tests.torch_compat import no_compiler

STEPS = 4
SHAPE = (8, 12)
#: every float32 comparison: only rounding differs between eager and compiled kernels
F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-12}
#: Newton–Schulz in float32 wherever a preset runs it, so that float32 tolerances apply
NS32 = {
    "muon": {"inner.ns_dtype": "float32"},
    "pro_kl_shampoo": {"split.ns_dtype": "float32"},
    "pro_soap": {"split.ns_dtype": "float32"},
    "pro_dykaf": {"split.ns_dtype": "float32"},
}


@pytest.fixture(autouse=True)
def _no_compile_failure():
    """A compilation that fails warns (RuntimeWarning) and silently runs eagerly: that would hide what
    these tests compare, so it fails them instead (the fallback tests below opt out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message="the route sends embeddings/heads")
        yield


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _params(dtype=torch.float32, shapes=(SHAPE, SHAPE), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes], gen


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def _state(opt, params):
    """Every floating tensor of the optimizer state, per parameter, copied."""
    return [
        {k: v.detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        for p in params
    ]


def _run(preset, compile_, *, dtype=torch.float32, steps=STEPS, sched=True, overrides=None, each=None):
    """``steps`` steps of two ``8 × 12`` blocks (one bucket) under a decaying lr (``sched``); ``each(k, opt,
    params)`` runs after the gradients of step ``k`` are set. Returns the parameters, the state, and the
    graph count after each step."""
    params, gen = _params(dtype)
    opt = kronopt.build(params, preset, compile=compile_, **(overrides or {}))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k)) if sched else None
    graphs = []
    for k in range(steps):
        _grads(params, gen)
        if each is not None:
            each(k, opt, params)
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        graphs.append(_graphs())
    return [p.detach().clone() for p in params], _state(opt, params), graphs


def _assert_close(fast, slow, **tol):
    for a, b in zip(fast, slow):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            torch.testing.assert_close(a, b, **tol)


# -- every preset, compiled against eager --------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(kronopt.PRESETS))
def test_every_preset_compiled_steps_equal_eager_steps(preset):
    """Guards: a twin that departs from its eager function in any preset (bias correction taken from a
    stale step, ε placed on the wrong side of the correction, the decay written in the wrong order or
    with the wrong factor, a learning rate frozen into the graph as a constant), and a twin that
    recompiles every step (the step count or the scheduler's lr guarded on as a Python number)."""
    ov = {"weight_decay": 0.05, **NS32.get(preset, {})}
    eager_p, eager_s, eager_g = _run(preset, False, overrides=ov)
    fast_p, fast_s, fast_g = _run(preset, True, overrides=ov)
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(fast_s, eager_s, **F32)
    assert eager_g == [eager_g[0]] * STEPS  # eager compiles nothing
    # the first two calls may compile (a skipped first call only observes); from then on nothing does
    assert fast_g[1:] == [fast_g[1]] * (STEPS - 1), fast_g


@pytest.mark.parametrize("preset", ["soap", "shampoo"])
def test_float64_compiled_steps_equal_eager_steps_to_float64_rounding(preset):
    """Guards: a twin that computes a float64 bucket's step in float32 somewhere (a 0-d lr, decay or
    bias-correction tensor made in float32, the moments or Newton–Schulz narrowed): that shows as
    differences of about 1e-8, far above float64 rounding. (SOAP: the Adam moments, the ratio with ε
    before the correction, the write with decay after; Shampoo: grafting's ratio with ε after it.)"""
    ov = {"weight_decay": 0.05}
    eager_p, eager_s, _ = _run(preset, False, dtype=torch.float64, overrides=ov)
    fast_p, fast_s, _ = _run(preset, True, dtype=torch.float64, overrides=ov)
    for p in fast_p:
        assert p.dtype == torch.float64
    _assert_close(fast_p, eager_p, **F64)
    _assert_close(fast_s, eager_s, **F64)


def test_muon_with_bfloat16_newton_schulz_agrees_to_bfloat16_rounding():
    """Muon's default ``ns_dtype`` is bfloat16: the compiled iteration rounds differently (Inductor fuses
    some bfloat16 round trips), so the two runs agree only to a bfloat16 rounding of each update
    (about ``lr · 2⁻⁸`` per step, far below the update itself). Guards: a compiled iteration that is
    wrong (wrong coefficients, norm, transposition), which moves the parameters by about the update."""
    lr = kronopt.PRESETS["muon"].lr
    eager_p, _, _ = _run("muon", False, sched=False)
    fast_p, _, _ = _run("muon", True, sched=False)
    start, _ = _params()
    for a, b, p0 in zip(fast_p, eager_p, start):
        moved = float((b - p0.detach()).abs().max())
        assert moved > 5 * lr * 0.1  # the steps did move the parameters
        torch.testing.assert_close(a, b, rtol=0, atol=STEPS * lr * 2**-4)


# -- non-finite gradients: a skipped step is skipped by the compiled write too -------------------------


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("preset", ["soap", "muon"])
def test_a_nonfinite_gradient_leaves_params_and_state_untouched_when_compiled(preset, bad, scope):
    """Guards: the compiled write ignoring ``ok`` (the skipped block stepped with NaN, or decayed although
    skipped), zeroing the wrong block, or ``nonfinite_scope = "step"`` not masking the finite block;
    and the compiled run then drifting from the eager one."""
    ov = {"weight_decay": 0.05, "nonfinite": "skip", "nonfinite_scope": scope, **NS32.get(preset, {})}
    seen = {}

    def poison(k, opt, params):
        if k == 2:
            params[1].grad[3, 4] = bad
            seen["before"] = ([p.detach().clone() for p in params], _state(opt, params))
            seen["opt"], seen["params"] = opt, params

    fast_p, fast_s, _ = _run(preset, True, overrides=ov, each=poison)
    eager_p, eager_s, _ = _run(preset, False, overrides=ov, each=poison)
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(fast_s, eager_s, **F32)
    assert all(bool(torch.isfinite(p).all()) for p in fast_p)

    # the compiled step at the bad gradient, replayed to look at it alone
    params, gen = _params()
    opt = kronopt.build(params, preset, compile=True, **ov)
    for k in range(3):
        _grads(params, gen)
        if k == 2:
            params[1].grad[3, 4] = bad
            before_p, before_s = [p.detach().clone() for p in params], _state(opt, params)
        opt.step()
    after_p, after_s = [p.detach().clone() for p in params], _state(opt, params)
    assert torch.equal(after_p[1], before_p[1])  # the bad block: not stepped, not decayed
    for k, v in before_s[1].items():
        assert torch.equal(after_s[1][k], v), k
    if scope == "step":  # one bad block skips the whole step
        assert torch.equal(after_p[0], before_p[0])
        for k, v in before_s[0].items():
            assert torch.equal(after_s[0][k], v), k
    else:
        assert not torch.equal(after_p[0], before_p[0])


# -- learning rate and weight decay that change between steps ------------------------------------------


def test_a_tensor_lr_and_a_changing_weight_decay_are_used_without_recompiling():
    """Guards: the compiled write keeping the first step's lr or weight decay (a value baked into the
    graph), or recompiling for each new value; a 0-d tensor lr taking another path than a float one."""

    def schedule(as_tensor):
        def each(k, opt, params):
            lr, wd = 0.01 / (k + 1), (0.02, 0.3, 0.1, 0.05)[k]
            for g in opt.param_groups:
                g["lr"] = torch.tensor(lr) if as_tensor else lr
                g["weight_decay"] = wd

        return each

    eager_p, _, _ = _run("soap", False, sched=False, overrides={"weight_decay": 0.05}, each=schedule(False))
    fast_p, _, graphs = _run("soap", True, sched=False, overrides={"weight_decay": 0.05}, each=schedule(True))
    float_p, _, _ = _run("soap", True, sched=False, overrides={"weight_decay": 0.05}, each=schedule(False))
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(float_p, eager_p, **F32)
    assert graphs[1:] == [graphs[1]] * (STEPS - 1), graphs


def test_lr_zero_leaves_the_parameters_unchanged_with_weight_decay_on():
    """A known answer: with ``lr = 0`` the compiled write changes nothing (``W ← W(1 − 0) − 0·D``).
    Guards: a write that takes its lr from somewhere else than the group (a cached factor)."""
    params, gen = _params()
    opt = kronopt.build(params, "soap", compile=True, weight_decay=0.05)
    for k in range(STEPS):
        _grads(params, gen)
        if k == 2:
            for g in opt.param_groups:
                g["lr"] = 0.0
            before = [p.detach().clone() for p in params]
        opt.step()
        if k == 2:
            for p, b in zip(params, before):
                assert torch.equal(p.detach(), b)


# -- resume, groups, buckets, storage ------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["soap", "muon"])
def test_a_compiled_run_resumed_from_state_dict_equals_the_uninterrupted_eager_run(preset):
    """Guards: a compiled optimizer built fresh from a state dict that restarts the step count the twins
    see (bias correction), or that compiles again for new parameter objects of the same shapes."""
    ov = {"weight_decay": 0.05, **NS32.get(preset, {})}
    eager_p, eager_s, _ = _run(preset, False, steps=6, sched=False, overrides=ov)

    params, gen = _params()
    opt = kronopt.build(params, preset, compile=True, **ov)
    for _ in range(3):
        _grads(params, gen)
        opt.step()
    saved = opt.state_dict()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = kronopt.build(fresh, preset, compile=True, **ov)
    opt2.load_state_dict(saved)
    graphs = _graphs()
    for _ in range(3):
        _grads(fresh, gen)
        opt2.step()
    assert _graphs() == graphs  # same shapes, same constants: the graphs of the first optimizer serve
    _assert_close([p.detach() for p in fresh], eager_p, **F32)
    _assert_close(_state(opt2, fresh), eager_s, **F32)


def test_a_group_added_mid_training_with_another_shape_is_compiled_and_agrees():
    """Guards: a group added by ``add_param_group`` that loses ``compile`` or steps with the first group's
    lr, and a second bucket shape that breaks the first bucket's graphs (several buckets at once)."""
    preset, ov = "soap", {}

    def run(compile_):
        params, gen = _params(shapes=(SHAPE, SHAPE, (6, 10)))
        opt = kronopt.build(params[:2], preset, compile=compile_, **ov)
        for k in range(STEPS):
            if k == 1:
                opt.add_param_group({"params": [params[2]], "lr": 0.005, "weight_decay": 0.2})
            _grads(params, gen)
            if k < 1:
                params[2].grad = None
            opt.step()
        return opt, [p.detach().clone() for p in params], _state(opt, params)

    opt_e, eager_p, eager_s = run(False)
    opt_c, fast_p, fast_s = run(True)
    assert [c.compile for c in opt_c._group_cfgs] == [True, True]
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(fast_s, eager_s, **F32)


def test_a_compiled_group_next_to_an_eager_group_leaves_the_eager_one_bit_for_bit():
    """Guards: the compiled scope leaking from one bucket's turn into the next (an eager group then runs
    the twins, which round differently), and the compiled group stepping with the other's settings."""

    def run(second_compiled):
        params, gen = _params(shapes=(SHAPE, SHAPE, SHAPE, SHAPE))
        groups = [{"params": params[:2]}, {"params": params[2:], "compile": second_compiled, "lr": 0.004}]
        opt = kronopt.build(groups, "soap", weight_decay=0.05)
        for _ in range(STEPS):
            _grads(params, gen)
            opt.step()
        return [p.detach().clone() for p in params], _state(opt, params)

    eager_p, eager_s = run(False)
    mixed_p, mixed_s = run(True)
    for a, b in zip(mixed_p[:2], eager_p[:2]):
        assert torch.equal(a, b)
    for a, b in zip(mixed_s[:2], eager_s[:2]):
        for k in b:
            assert torch.equal(a[k], b[k]), k
    _assert_close(mixed_p[2:], eager_p[2:], **F32)
    _assert_close(mixed_s[2:], eager_s[2:], **F32)


@pytest.mark.parametrize("preset", ["adamw", "soap", "shampoo"])
def test_bfloat16_storage_with_compile_agrees_and_keeps_its_dtypes(preset):
    """Guards: the twins handed the stored bfloat16 moments instead of their float32 upcast (a narrower
    step), or writing float32 state back where bfloat16 storage was asked for."""
    ov = {"weight_decay": 0.05, "storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
    eager_p, eager_s, _ = _run(preset, False, overrides=ov)
    fast_p, fast_s, _ = _run(preset, True, overrides=ov)
    for block in fast_s:
        for k, v in block.items():
            assert v.dtype == torch.bfloat16, k
    # a new moment rounds to bfloat16 at the write, so a last-bit difference can flip one rounding
    _assert_close(fast_p, eager_p, rtol=1e-4, atol=1e-5)
    _assert_close(fast_s, eager_s, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "enable_grad"])
def test_step_under_any_autograd_mode_agrees_when_compiled(mode):
    """Guards: a compiled write that fails or falls back under ``torch.inference_mode`` (inference tensors
    as graph inputs, in-place writes into normal parameters) or under ``enable_grad`` around step."""
    ctx = getattr(torch, mode)

    def run(compile_):
        params, gen = _params()
        opt = kronopt.build(params, "soap", compile=compile_, weight_decay=0.05)
        for _ in range(3):
            _grads(params, gen)
            with ctx():
                opt.step()
        return [p.detach().clone() for p in params], _state(opt, params)

    eager_p, eager_s = run(False)
    fast_p, fast_s = run(True)
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(fast_s, eager_s, **F32)


# -- the scope: nesting and the recompile-limit patch --------------------------------------------------


def test_nested_scopes_restore_each_level_and_the_recompile_limit():
    """Guards: an inner ``scope`` that resets the outer one's state on exit (twins off for the rest of
    the outer block, or left on after it), a recompile-limit patch that leaks out of the scope or is
    undone by an inner scope, and a scope that an exception leaves open."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=5):  # a known value: an earlier leak cannot hide one here
        _nested_scopes(torch._dynamo.config.recompile_limit)


def _nested_scopes(outside: int) -> None:
    import torch._dynamo

    assert not compiled.active()
    with compiled.scope(True):
        assert compiled.active()
        assert torch._dynamo.config.recompile_limit == max(compiled.RECOMPILE_LIMIT, outside)
        with compiled.scope(True):
            assert compiled.active()
            with compiled.scope(False):
                assert not compiled.active() and compiled.variant("adam_moments") is None
                assert torch._dynamo.config.recompile_limit == max(compiled.RECOMPILE_LIMIT, outside)
            assert compiled.active()
        assert compiled.active()
        assert torch._dynamo.config.recompile_limit == max(compiled.RECOMPILE_LIMIT, outside)
    assert not compiled.active()
    assert torch._dynamo.config.recompile_limit == outside
    with compiled.scope(False):
        with compiled.scope(True):
            assert compiled.active()
        assert not compiled.active()
    with pytest.raises(KeyError):
        with compiled.scope(True):
            raise KeyError("inside")
    assert not compiled.active()
    assert torch._dynamo.config.recompile_limit == outside


def test_the_recompile_limit_is_restored_after_a_step_and_a_higher_one_is_kept():
    """Guards: the limit patch leaking out of ``step()`` (dynamo's limit left at 64 for the user's own
    compiled code), and the scope lowering a limit the user set higher than ``RECOMPILE_LIMIT``."""
    import torch._dynamo

    params, gen = _params()
    opt = kronopt.build(params, "soap", compile=True, weight_decay=0.05)
    with torch._dynamo.config.patch(recompile_limit=5):  # a known value: an earlier leak cannot hide one here
        for _ in range(2):
            _grads(params, gen)
            opt.step()
            assert torch._dynamo.config.recompile_limit == 5
    with torch._dynamo.config.patch(recompile_limit=compiled.RECOMPILE_LIMIT + 36):  # (monkeypatch would break the config)
        with compiled.scope(True):
            assert torch._dynamo.config.recompile_limit == compiled.RECOMPILE_LIMIT + 36
        assert torch._dynamo.config.recompile_limit == compiled.RECOMPILE_LIMIT + 36


# -- where compilation is not usable: one warning per function, then eager steps -----------------------


@contextlib.contextmanager
def _fresh_twins(monkeypatch):
    """Twins built anew for the test (their ``failed`` flags are the process's) and dropped after it."""
    monkeypatch.setattr(compiled, "_TWINS", {})
    yield


@pytest.mark.parametrize("preset", ["soap", "muon"])
def test_a_failing_compiler_warns_once_per_function_and_steps_eagerly(monkeypatch, preset):
    """The documented fallback (no C++ compiler for inductor, an unsupported platform): the first call of
    each twin warns once with the reason, and from then on the step is the eager one."""

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise no_compiler()

        return run

    ov = {"weight_decay": 0.05, **NS32.get(preset, {})}
    eager_p, eager_s, _ = _run(preset, False, overrides=ov)
    with _fresh_twins(monkeypatch):
        monkeypatch.setattr(torch, "compile", broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast_p, fast_s, _ = _run(preset, True, overrides=ov)
    ours = [str(w.message) for w in caught if "kronopt: torch.compile of" in str(w.message)]
    names = [m.split("torch.compile of ")[1].split(" failed")[0] for m in ours]
    assert len(names) == len(set(names)) and names, ours  # one warning per function
    _assert_close(fast_p, eager_p, **F32)
    _assert_close(fast_s, eager_s, **F32)


@pytest.fixture
def _dynamo_reset():
    """``torch._dynamo.reset()`` before and after: before, so that no graph compiled by an earlier test
    answers in place of the eager run under test (a disabled dynamo still runs the graphs it holds);
    after, because a recompile limit hit marks a function's code for dynamo for the rest of the process
    (later tests would no longer compile it). The tests using it come last: what they drop is compiled again."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["limit", "disabled"])
def test_where_dynamo_runs_a_twin_eagerly_the_step_takes_the_eager_values(monkeypatch, _dynamo_reset, case):
    """Past ``RECOMPILE_LIMIT`` graphs of one function (``limit``; in real use more bucket shapes, dtypes or
    betas than that in one process), or with dynamo disabled (``disabled``: ``TORCH_COMPILE_DISABLE=1``, how
    torch users switch every ``torch.compile`` off to debug), dynamo runs the compiled function's Python
    eagerly: the step must then take the eager values (a known answer for one Adam moment update from
    zero; the eager optimizer's steps), not recurse."""
    import torch._dynamo

    with _fresh_twins(monkeypatch), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback's warning is not what is asked here
        if case == "limit":
            monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", 0)
            m, v, g = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
            with torch._dynamo.config.patch(recompile_limit=0), compiled.scope(True):
                new_m, new_v = kronopt.linalg.adam_moments(m, v, g, (0.9, 0.99))
            torch.testing.assert_close(new_m, torch.full((1, 2, 3), 0.1))
            torch.testing.assert_close(new_v, torch.full((1, 2, 3), 0.01))
            return
        for preset in ("adamw", "muon"):
            ov = NS32.get(preset, {})
            eager_p, eager_s, _ = _run(preset, False, steps=2, overrides=ov)
            with torch._dynamo.config.patch(disable=True):
                fast_p, fast_s, _ = _run(preset, True, steps=2, overrides=ov)
            _assert_close(fast_p, eager_p, **F32)
            _assert_close(fast_s, eager_s, **F32)
