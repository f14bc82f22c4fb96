"""Memory and object lifetime, held to torch.optim's: what an optimizer holds, and when it lets go.

A torch.optim optimizer holds its parameters' state and nothing else between steps, and deleting it frees
that state at once, by reference counting (no cycle that waits for Python's cycle collector). These tests
delete optimizers with the collector switched off and look at what is still alive (weak references, and
the bytes of the live tensors' storages, which tracemalloc does not see), after the paths that make or
replace state: a bucket split (parameters without a gradient for a step), ``add_param_group``, failed
``eigh`` refreshes, ``state_dict``/``load_state_dict`` round trips, ``inspect()``, ``zero_grad(set_to_none=False)``
and ``[storage]`` in bfloat16. Everything is counted, not timed: deterministic.
"""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as optimizer_module

PRESETS = ["soap", "dykaf", "kl_shampoo", "pro_kl_shampoo", "muon", "adamw", "shampoo"]
# two same-shape matrices (a bucket that splits), a transposed one, a vector and a 3-D tensor
SHAPES = [(6, 4), (6, 4), (4, 6), (5,), (2, 3, 2)]


@contextlib.contextmanager
def _collector_off():
    """Python's cycle collector off inside (what is freed there is freed by reference counting alone)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _live_bytes() -> int:
    """Bytes of every live tensor's storage, each storage once."""
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type != "meta":
            try:
                s = o.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a fake or functional tensor an earlier torch.compile left (no data of its own)
                continue
    return sum(seen.values())


def _bytes_freed_by_deleting(box: list) -> int:
    """Bytes of tensor storage freed when the only reference to the optimizer in ``box`` goes (collector off)."""
    with _collector_off():
        before = _live_bytes()
        box.clear()
        return before - _live_bytes()


def _grads(params, gen, *, missing=()):
    for i, p in enumerate(params):
        p.grad = None if i in missing else torch.randn(p.shape, generator=gen)


def _always_fail(A):
    raise RuntimeError(f"simulated eigh failure in {A.dtype}")


def _state_refs(opt) -> list:
    """Weak references to every state tensor: the buckets' stacks and what ``state[p]`` shows."""
    refs = []
    for bucket in opt._buckets:
        if bucket.state is not None:
            compose.map_tensors(bucket.state, lambda t: refs.append(weakref.ref(t)) or t)
    refs += [weakref.ref(v) for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    return refs


def _exercise(preset, monkeypatch, **overrides):
    """An optimizer taken through every path that makes or replaces state; returns it in a box (the only
    reference), weak references to its state tensors and to the last step's gradients, and to itself."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    added = [torch.nn.Parameter(torch.randn(8, 6, generator=gen))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unnamed parameters: the route's warning
        opt = kronopt.build(params, preset, **{"refresh.every": 2, "nonfinite": "skip", **overrides})
        opt.add_param_group({"params": added, "lr": 1e-3})
    every = params + added
    for k in range(6):
        _grads(every, gen, missing=(0,) if k in (2, 3) else ())  # a bucket split at step 2
        if k == 4:
            with monkeypatch.context() as patch:
                patch.setattr(linalg, "_eigh", _always_fail)  # a refresh whose eigh fails (kept basis, counted)
                opt.step()
        else:
            opt.step()
        if k == 3:
            opt.load_state_dict(opt.state_dict())
            opt.inspect()
    opt.zero_grad(set_to_none=False)
    grad_refs = [weakref.ref(p.grad) for p in every if p.grad is not None]
    for p in every:
        p.grad = None
    return [opt], _state_refs(opt), grad_refs, weakref.ref(opt), every


@pytest.mark.parametrize("preset", PRESETS)
def test_deleting_the_optimizer_frees_all_its_state_by_reference_counting(preset, monkeypatch):
    # torch.optim: `del opt` frees the state at once; a reference cycle would keep it until a collection
    box, state, grads, opt_ref, params = _exercise(preset, monkeypatch)
    assert state and grads
    with _collector_off():
        assert [r() is None for r in grads] == [True] * len(grads), "a gradient outlived the step that read it"
        box.clear()
        assert opt_ref() is None, "the optimizer is kept alive by a reference cycle"
        alive = [tuple(r().shape) for r in state if r() is not None]
        assert alive == [], f"state tensors alive after `del optimizer`: {alive}"
        assert all(p.grad is None for p in params)


def test_deleting_an_optimizer_with_bfloat16_storage_frees_all_its_state(monkeypatch):
    storage = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
    box, state, _, opt_ref, _ = _exercise("soap", monkeypatch, **storage)
    with _collector_off():
        box.clear()
        assert opt_ref() is None
        assert [tuple(r().shape) for r in state if r() is not None] == []


@pytest.mark.parametrize("preset", ["soap", "adamw"])
def test_state_dict_round_trips_do_not_grow_memory(preset):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = kronopt.build(params, preset, **{"refresh.every": 2})

    def rounds(n):
        for _ in range(n):
            _grads(params, gen)
            opt.step()
            opt.load_state_dict(opt.state_dict())
        with _collector_off():
            return _live_bytes(), sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    first = rounds(3)
    assert rounds(12) == first


# -- what the optimizer holds beyond its state -----------------------------------------------------------


def _held_after_steps(make, shapes, *, steps=3, missing_from=None):
    """Bytes an optimizer holds after ``steps`` steps (what deleting it frees); parameters without a gradient from
    step ``missing_from`` on: every third one (a bucket split)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    box = [make(params)]
    for k in range(steps):
        split = missing_from is not None and k >= missing_from
        _grads(params, gen, missing=range(0, len(params), 3) if split else ())
        box[0].step()
    for p in params:
        p.grad = None
    state_bytes = box[0].state_bytes() if hasattr(box[0], "state_bytes") else None
    return _bytes_freed_by_deleting(box), state_bytes


ADAM_SHAPES = [(64, 48)] * 3 + [(48, 64), (96, 40), (50,)]


def test_plain_adamw_holds_no_more_memory_than_torch_adamw():
    # torch.optim.AdamW holds exp_avg, exp_avg_sq and a 0-d step per parameter; kronopt's adamw (the same
    # arithmetic: torch's fused kernel on a CPU) the same two moments in stacks, plus a counter per block
    theirs, _ = _held_after_steps(lambda ps: torch.optim.AdamW(ps), ADAM_SHAPES)
    ours, state_bytes = _held_after_steps(lambda ps: kronopt.build(ps, "adamw"), ADAM_SHAPES)
    n = sum(torch.Size(s).numel() for s in ADAM_SHAPES)
    assert theirs >= 2 * 4 * n  # the independent figure: two float32 moments
    assert ours <= state_bytes + 1024, (ours, state_bytes)
    assert ours <= theirs * 1.02 + 1024, (ours, theirs)


@pytest.mark.parametrize("preset", ["muon", "kl_shampoo"])
def test_a_fallback_holds_no_memory_beyond_its_state(preset):
    # a large vector goes to the AdamW fallback; nothing but the state stacks should stay between steps
    shapes = [(32, 24), (32, 24), (4096,)]
    held, state_bytes = _held_after_steps(lambda ps: kronopt.build(ps, preset), shapes)
    assert state_bytes >= 2 * 4 * 4096  # the fallback's two moments at least
    assert held <= state_bytes + 1024, (held, state_bytes)


def test_stacked_adamw_keeps_nothing_of_a_bucket_that_split(monkeypatch):
    monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12)  # AdamW on the stacks, as on a GPU
    shapes = [(64, 48)] * 6

    def make(ps):
        return kronopt.build(ps, "adamw")

    whole, _ = _held_after_steps(make, shapes, steps=4)
    split, _ = _held_after_steps(make, shapes, steps=4, missing_from=2)  # 6 blocks → 4 + 2 at step 2
    assert whole >= 2 * 4 * 6 * 64 * 48  # the two float32 moments at least
    # the same blocks, the same state: a split must not leave the unsplit bucket's scratch behind
    assert split <= whole + 1024, (split, whole)


# -- caches: bounded, and never handing an entry to a new object ----------------------------------------


def _group_params(gen):
    base = [torch.nn.Parameter(torch.randn(6, 4, generator=gen))]
    new = [torch.nn.Parameter(torch.randn(4, 3, 2, generator=gen)) for _ in range(2)]  # 3-D: blocks (4, 6)
    odd = torch.nn.Parameter(torch.randn(5, 7, generator=gen))
    return base, new, odd


def test_a_refused_add_param_group_leaves_no_config_for_the_next_group(monkeypatch):
    cfg = {"refresh.every": 2, "refresh.stagger": True}  # two phases: the two 3-D blocks in different buckets
    gen = torch.Generator().manual_seed(0)
    base, new, _ = _group_params(gen)
    clean = kronopt.build(base, "soap", **cfg)
    clean.add_param_group({"params": new, "inner.betas": [0.9, 0.99]})

    gen = torch.Generator().manual_seed(0)
    base2, new2, odd2 = _group_params(gen)
    opt = kronopt.build(base2, "soap", **cfg)
    real = compose.init_state

    def out_of_memory_on_the_5x7_block(c, layout, **kw):  # e.g. a GPU running out while the new state is made
        if layout.m == 5:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(c, layout, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(compose, "init_state", out_of_memory_on_the_5x7_block)
        with pytest.raises(torch.OutOfMemoryError):
            opt.add_param_group({"params": new2 + [odd2], "inner.betas": [0.5, 0.6]})
    opt.add_param_group({"params": new2, "inner.betas": [0.9, 0.99]})  # the same group as `clean`'s

    for k in range(4):
        for ps in (base + new, base2 + new2):
            g = torch.Generator().manual_seed(100 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
        clean.step()
        opt.step()
    for a, b in zip(base + new, base2 + new2):
        assert torch.equal(a, b), tuple(a.shape)


def test_a_sweep_over_many_widths_keeps_module_caches_bounded():
    def sweep(widths):
        for n in widths:
            p = torch.nn.Parameter(torch.ones(2, n))
            opt = kronopt.build([p], "soap")
            p.grad = torch.full_like(p, 0.01)
            opt.step()
            del opt, p
        with _collector_off():
            return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    start = sweep([3])
    after_first = sweep(range(101, 101 + 2 * 32, 2))  # odd widths no other test is likely to have cached
    after_second = sweep(range(165, 165 + 2 * 100, 2))  # 100 new widths
    # the optimizers and their parameters are gone: what stays is the process's caches, which must not keep an
    # entry for every width ever seen (100 more optimizers of new widths: a cache bounded at 64 entries adds at
    # most 64 live tensors whatever it held before; one entry per width adds 100)
    assert after_second - after_first < 80, (start, after_first, after_second)


def test_routes_of_many_names_keep_the_compiled_patterns_bounded():
    """Each distinct ``route.fallback_names`` compiles its patterns once; a sweep over many of them keeps at most
    64 (the cache grew by one entry per route before)."""
    from kronopt import config

    for k in range(100):
        p = torch.nn.Parameter(torch.ones(4, 4))
        opt = kronopt.build([("blocks.0.weight", p)], "muon", **{"route.fallback_names": [f"embed_{k}", "head"]})
        del opt, p
    assert config._compiled.cache_info().currsize <= 64
