"""Helpers shared by the tests of the CPU's calls made together against the pipeline (``compose.rotated_adams``,
``compose.eigen_steps``): a bucket stepped by the pipeline, records compared bit for bit, deferred factor writes
compared once run."""

import attrs
import torch

from kronopt import compose


def pipeline_state(cfg, layout, steps, gen, dtype=torch.float32, scale=1.0):
    """A bucket's state after ``steps`` calls of the pipeline on random gradients (times ``scale``), and the next
    gradient."""
    state = compose.init_state(cfg, layout, dtype=dtype, device=torch.device("cpu"))
    shape = (layout.batch, layout.m, layout.n)
    for _ in range(steps):
        _, state = compose.step(cfg, layout, state, scale * torch.randn(shape, generator=gen, dtype=dtype))
    return state, scale * torch.randn(shape, generator=gen, dtype=dtype)


def assert_records_equal(a, b, path="state"):
    """Two records (or tensors) equal bit for bit, field by field, signs of zeros included, NaN where the other has NaN
    (``path`` names the field in a failure)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()), path
        if nan.any():
            a, b = a.masked_fill(nan, 0.0), b.masked_fill(nan, 0.0)
        assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b)), path
        return
    if a is None or isinstance(a, (int, float, bool, str)):
        assert a == b, path
        return
    assert type(a) is type(b), path
    for field in attrs.fields(type(a)):
        assert_records_equal(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}")


def assert_same_deferred(defer, defer_ref):
    """The same deferred factor updates: into the same stacks, with the same values once run (each run on the
    stack as it was, which is then put back)."""
    assert len(defer) == len(defer_ref)
    assert all(a.target is b.target for a, b in zip(defer, defer_ref))
    for d, d_ref in zip(defer, defer_ref):
        ok = torch.ones(d.target.shape[0], dtype=torch.bool)
        kept = d.target.clone()
        compose.run_deferred_([d_ref], ok)
        made = d.target.clone()
        d.target.copy_(kept)
        compose.run_deferred_([d], ok)
        assert torch.equal(made, d.target)
        d.target.copy_(kept)


def train_two_groups(monkeypatch, preset, shapes, *, switch, function, together, overrides=None, steps=24, poison=True,
                     patches=None, seed=8):
    """``steps`` steps of ``preset`` on parameters of ``shapes`` in two param groups (the second of other rates),
    with the optimizer's ``switch`` (its module-level flag of a path made together) set to ``together`` and each call
    of ``compose``'s ``function`` counted; ``poison``: at step 13 a NaN gradient entry (parameter 2) and a finite
    1e30 one (parameter 5) whose square overflows; ``patches(patch)`` installs more patches for the run; ``seed`` draws
    the parameters and gradients. Returns the
    parameters, the state by parameter, the skip counts and the number of calls each run of ``function`` made."""
    import math

    import kronopt
    from kronopt import optimizer as optimizer_module

    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    taken = []
    with monkeypatch.context() as patch:
        patch.setattr(optimizer_module, switch, together)
        real = getattr(compose, function)
        patch.setattr(compose, function, lambda calls, **kw: taken.append(len(calls)) or real(calls, **kw))
        if patches is not None:
            patches(patch)
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        groups = [{"params": named[:5]}, {"params": named[5:], "lr": 0.003, "weight_decay": 0.1}]
        opt = kronopt.build(groups, preset, nonfinite="skip", nonfinite_scope="block", **(overrides or {}))
        for step in range(steps):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            if poison and step == 13:
                grads[2][1, 1] = math.nan
                grads[5][0, 0] = 1e30
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    state = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
    }
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), taken


def slots_seen(monkeypatch, opt, params, function, steps):
    """Which stage slot was open (``kronopt bench --stages``' clock) at each operator the dispatcher saw over ``steps``
    steps of ``opt`` after its first (untimed) one, by operator name, and the number of calls each run of
    ``compose``'s ``function`` made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kronopt.app import stage_times

    clock = stage_times.StageClock()
    seen: dict[str, set] = {}
    taken = []
    real = getattr(compose, function)
    monkeypatch.setattr(compose, function, lambda calls, **kw: taken.append(len(calls)) or real(calls, **kw))

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.setdefault(func.overloadpacket.__name__, set()).add(clock._open[-1] if clock._open else None)
            return func(*args, **(kwargs or {}))

    with stage_times.StageClock.installed(stage_times.stages_of(opt)):
        for k in range(steps + 1):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k))
            if k == 0:
                opt.step()
                continue
            with clock.running(), Watch():
                opt.step()
    return seen, taken


def made_together_as_the_pipeline(together, due, configs, layouts, calls_before, float64, seed, scale=1.0):
    """A bucket of each config (``configs``: ``{label: (preset, overrides)}``) on each layout (``j``, ``k`` their
    positions), in float64 where ``float64(j, k)``, after ``calls_before(cfg, j, k)`` calls of the pipeline (gradients
    times ``scale``), each call taken by ``due(cfg, layout, state, dtype)``; that next call of them all made by one call
    of ``together`` against each bucket's ``compose.step``, bit for bit, deferred factor updates included. Returns
    ``[(call, new state)]``, each call ``(cfg, layout, state, G, defer)``."""
    import kronopt

    gen = torch.Generator().manual_seed(seed)
    calls, expected = [], []
    for k, (name, overrides) in enumerate(configs.values()):
        cfg = kronopt.resolve(name, **overrides).bound()
        for j, layout in enumerate(layouts):
            dtype = torch.float64 if float64(j, k) else torch.float32
            state, G = pipeline_state(cfg, layout, calls_before(cfg, j, k), gen, dtype, scale)
            assert due(cfg, layout, state, dtype)
            defer_ref = []
            expected.append((*compose.step(cfg, layout, state, G.clone(), defer=defer_ref), defer_ref))
            calls.append((cfg, layout, state, G, []))
    got = together(calls)
    for (D, new), (D_ref, new_ref, defer_ref), call in zip(got, expected, calls):
        assert_records_equal(D, D_ref, "D")
        assert_records_equal(new, new_ref)
        assert_same_deferred(call[4], defer_ref)
    return [(call, new) for call, (_, new) in zip(calls, got)]


def drawn_calls_as_the_pipeline(together, due, drawn, seed):
    """Drawn calls ``(preset, overrides, layout, update, float64)``, each bucket stepped by the pipeline until its next
    call is update ``update`` (in float64 where drawn so) and that call taken by ``due``, made in one call of
    ``together`` against each bucket's ``compose.step``, bit for bit (NaN where the pipeline's has NaN)."""
    import kronopt

    gen = torch.Generator().manual_seed(seed)
    calls, expected = [], []
    for preset, overrides, layout, update, wide in drawn:
        cfg = kronopt.resolve(preset, **overrides).bound()
        dtype = torch.float64 if wide else torch.float32
        state, G = pipeline_state(cfg, layout, update - 1 + cfg.skip_first_call, gen, dtype)
        assert due(cfg, layout, state, dtype)
        expected.append(compose.step(cfg, layout, state, G.clone()))
        calls.append((cfg, layout, state, G, None))
    for (D, new), (D_ref, new_ref) in zip(together(calls), expected):
        assert_records_equal(D, D_ref, "D")
        assert_records_equal(new, new_ref)


def assert_same_training(fast, slow):
    """Two runs of :func:`train_two_groups` (the path made together, then not) equal bit for bit: parameters (signs of
    zeros included), every state entry, the skip counts."""
    for i, (a, b) in enumerate(zip(fast[0], slow[0])):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()), i
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys()
        for key, value in fast[1][i].items():
            other = slow[1][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)
    assert fast[2] == slow[2]
