"""A step leaves no reference cycles behind: what it frees is freed when it returns.

An object caught in a reference cycle outlives its last use until Python's cycle collector runs, and
so does every tensor it holds. A step's new state tensors (as large as the state, once per step) held
so would pile up over several steps (the collector runs every few hundred container allocations, and
less often for what survives one of its passes): before this test, the state write's nested, self-calling
walk kept a whole step's new state alive that way, 12–29 MiB a step on the four layers of the
benchmark's table, 290 MiB more resident memory for soap over 60 steps. So no step may leave garbage
that only the cycle collector can free: the collector is held off during each step, and a collection
right after it must find nothing.
"""

import contextlib
import gc
import types

import pytest
import torch

import kronopt
from kronopt import linalg

# a small-bucket set (stepped together on a CPU), a vector and a 3-D tensor; TILED adds a block whose 520
# side takes the tiled symmetric products (a CPU's, whatever the verdicts: tested once)
SHAPES = [(6, 4), (6, 4), (4, 6), (12, 20), (5,), (2, 3, 2)]
TILED = [(520, 24)]


def _ours(obj) -> bool:
    """Whether a piece of garbage is kronopt's making: a function, class or instance of kronopt's code, or a
    plain tensor. Torch's own machinery may leave garbage in the same window (a collection over every
    generation also finds, say, what an earlier test's compilation left to die when a cache let go of it)."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        return True
    module = obj.__module__ if isinstance(obj, types.FunctionType | type) else type(obj).__module__
    return isinstance(module, str) and module.split(".")[0] == "kronopt"


def _names(garbage, *, only_ours: bool = True) -> list[str]:
    return sorted({getattr(o, "__qualname__", type(o).__name__) for o in garbage if not only_ours or _ours(o)})


@contextlib.contextmanager
def _collector_saving():
    """The cycle collector off inside, what a collection finds kept in ``gc.garbage`` (``DEBUG_SAVEALL``);
    the garbage made before is freed first, and the collector's settings restored after."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def _garbage_of_each_step(opt, params, gen, steps, *, bad_step):
    """For each step, the names of what of kronopt's making only the cycle collector could free after it
    (empty: none), then the same over every generation after the last step."""
    found = []
    with _collector_saving():
        for k in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if k == bad_step:
                params[0].grad[0, 0] = float("nan")
            opt.step()
            gc.collect(0)  # the step's objects are all young: the collector was off since the last one
            found.append(_names(gc.garbage))
            gc.garbage.clear()
        # and once over every generation: a cycle among objects one step made and a later step dropped
        # (a record rebuilt every step, the gradient flags) was promoted out of generation 0 meanwhile
        gc.collect()
        found.append(_names(gc.garbage))
    return found


@pytest.mark.parametrize("host_verdicts", [True, False], ids=["host_verdicts", "device_paths"])
@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_a_step_leaves_no_reference_cycles(preset, host_verdicts, monkeypatch):
    # host verdicts off: the device-agnostic paths a GPU takes (masked writes, the scaled projector step)
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host_verdicts)
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES + TILED if host_verdicts else SHAPES
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = kronopt.build(params, preset, nonfinite="skip", **{"refresh.every": 2})
    # first calls, plain steps, refreshes and a step with a non-finite gradient (a block not written)
    found = _garbage_of_each_step(opt, params, gen, 6, bad_step=4)
    assert found == [[]] * 7, f"garbage left to the cycle collector, by step: {found}"


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_a_step_with_narrower_state_storage_leaves_no_reference_cycles(preset):
    # the storage wrapper casts the state up for the pipeline and down for the write
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    storage = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
    opt = kronopt.build(params, preset, nonfinite="skip", **{"refresh.every": 2, **storage})
    found = _garbage_of_each_step(opt, params, gen, 5, bad_step=3)
    assert found == [[]] * 6, f"garbage left to the cycle collector, by step: {found}"


def test_a_compile_scope_leaves_no_reference_cycles():
    # compile = true enters the scope for every bucket at every step (no compilation needed to test it)
    from kronopt import compiled

    with compiled.scope(True):  # imports dynamo once, outside the window
        pass
    with _collector_saving():
        for _ in range(3):
            with compiled.scope(True), compiled.scope(False), compiled.scope(True):
                pass
        gc.collect()
        found = _names(gc.garbage, only_ours=False)  # dynamo's config patch is torch's class, made by the scope
    assert found == [], f"garbage left to the cycle collector: {found}"


def test_nested_compile_scopes_raise_the_recompile_limit_once_and_restore_it():
    import torch._dynamo

    from kronopt import compiled

    config = torch._dynamo.config
    before = config.recompile_limit
    with config.patch(recompile_limit=8):
        seen = []
        with compiled.scope(True):
            seen.append(config.recompile_limit)
            with compiled.scope(False), compiled.scope(True):
                seen.append(config.recompile_limit)
            seen.append(config.recompile_limit)
        seen.append(config.recompile_limit)
        with compiled.scope(True):  # the same patch entered again, after the first scope closed
            seen.append(config.recompile_limit)
        seen.append(config.recompile_limit)
    assert seen == [compiled.RECOMPILE_LIMIT] * 3 + [8, compiled.RECOMPILE_LIMIT, 8]
    assert config.recompile_limit == before
