"""Corrupted or edited optimizer state, stepped with the CPU's fast paths on and off: the same bits, and no
NaN or Inf on a parameter.

On a CPU the optimizer skips tests where a proof says a result must be finite (factor updates deferred to the
state write, rotated Adam moments updated in place, plain AdamW written in place from carried moment bounds)
and takes shortcuts on verdicts read on the host (plain copies instead of masked writes, the small buckets
together, plain Muon block by block). Each is documented to give the bits of the path it replaces. The proofs
read the state, and a state loaded from a checkpoint or edited through ``opt.state[p][key]`` (views of the
stacks: an edit moves their version counter) may hold anything, so every such state is a chance for a proof
to pass what the slow path would have refused, or for a shortcut to treat a stack as the slow path does not.

The hunt: for each preset, 4 steps with seeded gradients, ``state_dict()``, one entry of one floating state
tensor of one parameter set to NaN, ±inf, 1e38 or -1e30 (a second moment below 0, a factor that is not
PSD), off or on the diagonal, loaded into a new optimizer and stepped 4 more times with the same seeded
gradients, once with every fast path on (as shipped) and once with each switch below off. Every parameter
must be finite after every step, and the two runs must agree bit for bit: the parameters after each step and
every entry of ``state[p]`` (NaN where NaN; ``assert_close`` compares values, so the sign of a zero is not
compared). The keys are read from the state
dict itself; every key of the tiled bucket's first block (0), of the densely deferred block (2), of the small
block (3) and of the vector (4) is taken, each with the next (value, position) of the ten in turn (two for
blocks 0 and 2, where the proofs run), so that the matrix stays small and deterministic. A few keys are also
edited in place between steps, no checkpoint in between.

Switches turned off in the slow run (module, name, value), each a CPU-only path documented as the same bits:

* ``optimizer._DEFER_FACTOR_UPDATES = False``: factor updates made in the step, tested, copied
  (``linalg.gram_update_finite``/``gram_update_bound``, the KSL step's norms in ``linalg.projector_split_ksl``)
* ``optimizer._ROTATED_MOMENTS_IN_PLACE = False``: new rotated Adam moments, tested, copied
  (``KronOptimizer._in_place_proof``, ``compose.rotated_adam_is_safe``, carried ``_MomentBounds``)
* ``optimizer._MOMENTUM_IN_PLACE = False``: a new ``eigenvalue`` rule momentum, tested, copied
  (``KronOptimizer._momentum_proof``, ``compose.eigen_momentum_is_safe``, carried ``_MomentumBounds``)
* ``optimizer._ROTATED_ADAMS_TOGETHER = False``: each small bucket's rotated Adam call in its own pipeline
* ``optimizer._EIGEN_STEPS_TOGETHER = False``: each small bucket's ``eigenvalue``-rule call in its own pipeline
  (KL-Shampoo's, Shampoo's: ``compose.eigen_steps``)
* ``optimizer._SMALL_TOGETHER_MAX = 0``: each small bucket stepped in its own turn
* ``optimizer._PLAIN_MUON_CPU = False``: plain Muon on the stacks (``compose.momentum_block_is_safe``)
* ``optimizer._BLOCKWISE_MIN = 10**12``: plain AdamW on the stacks, every block tested (no
  ``compose.adam_block_is_safe`` proof, no carried ``_MomentBounds``, no ``_Bucket.nonnegative_v``)
* ``optimizer._CPU_KEEPS_SCRATCH = False``: fresh scratch tensors each step
* ``linalg._CPU_HOST_VERDICTS = False``: no verdict read on the host (masked writes instead of plain
  copies, ``select_blocks``' ``torch.where``, no deferral, the device-agnostic path a GPU takes)

``optimizer._FUSED_ADAMW`` is off in both runs of the bit-for-bit comparison: torch's fused kernel rounds its own
way (docs/architecture.md); its proof is the blockwise path's, compared bit for bit here, and the fused kernel
itself is held to finiteness, the same skipped blocks and NaN entries, and rounding, in its own test below.
Tiled, split and oneDNN product forms are left on in both runs: they are not proofs, and they round by form.

Defects this found, each mended the same session (2026-12-07) and reduced to a minimal reproduction below:

* a masked state write (``compose.masked_write_``) was a blend ``old·(1−w) + new·w`` on the device path and on a
  CPU bucket with a block refused, which kept a loaded or edited NaN or infinity in a written block (``0 · inf``
  is NaN): shampoo's block then skipped the steps after its refresh too; now a copy a written block on a CPU,
  ``torch.where`` elsewhere;
* ``inner_rules/eigenvalue.py:_resplit`` kept the subspace momentum only where the basis came back as the very
  tensor (the CPU's path with every block's restricted refresh failed), so elsewhere a refresh that failed and
  kept its subspace split the momentum again against it, moving it by rounding; now per block;
* a factor stack loaded column-major took a deferred update written in place, whose products round by the
  stack's layout, where the update made in the step went into a new row-major tensor; now only a row-major stack
  takes the deferral.
"""

import copy
import functools
import math

import pytest
import torch

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as kopt

PRESETS = ["soap", "dykaf", "kl_shampoo", "adamw", "shampoo", "muon", "pro_kl_shampoo"]
# a bucket of two blocks whose long side takes tiles (the tiled deferral), a block whose two sides are dense and
# deferred (from linalg._DEFER_DENSE_MIN) and whose 30 000 moment entries take the in-place path (from
# optimizer._IN_PLACE_MIN), a small block (the small buckets together), a vector (AdamW: the fallback's, or 1-D)
SHAPES = [(520, 24), (520, 24), (200, 150), (40, 40), (64,)]
SETTINGS = {"refresh.every": 3, "nonfinite": "skip"}  # a refresh in the 4 steps after the load; no warnings
VALUES = [math.nan, math.inf, -math.inf, 1e38, -1e30]
FIRST, AFTER = 4, 4  # steps before the checkpoint, steps after it
DEFERRED = ("soap", "dykaf", "kl_shampoo")  # the presets whose factor updates are deferred to the write

#: both runs: torch's fused AdamW kernel rounds otherwise (its own test below)
BOTH = [(kopt, "_FUSED_ADAMW", False)]
#: the slow run: every fast path of the CPU off (module docstring)
SLOW = [
    (kopt, "_DEFER_FACTOR_UPDATES", False),
    (kopt, "_ROTATED_MOMENTS_IN_PLACE", False),
    (kopt, "_MOMENTUM_IN_PLACE", False),
    (kopt, "_ROTATED_ADAMS_TOGETHER", False),
    (kopt, "_EIGEN_STEPS_TOGETHER", False),
    (kopt, "_SMALL_TOGETHER_MAX", 0),
    (kopt, "_PLAIN_MUON_CPU", False),
    (kopt, "_BLOCKWISE_MIN", 10**12),
    (kopt, "_CPU_KEEPS_SCRATCH", False),
    (linalg, "_CPU_HOST_VERDICTS", False),
]

def _grads(k):
    gen = torch.Generator().manual_seed(100 + k)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _build(preset, params):
    return kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], preset, **SETTINGS)


def _step(opt, params, k):
    for p, g in zip(params, _grads(k)):
        p.grad = g
    opt.step()


def _fresh_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


@functools.lru_cache(maxsize=None)
def _saved(preset):
    """The parameters and the state dict after ``FIRST`` steps (with the fast paths on: both runs of a comparison
    load the same checkpoint, so the steps before it need not be made twice). Never handed out: copied."""
    params = _fresh_params()
    opt = _build(preset, params)
    for k in range(FIRST):
        _step(opt, params, k)
    return tuple(p.detach().clone() for p in params), opt.state_dict()


def _floating_keys(preset, i):
    """The floating state tensors of parameter ``i``, as the state dict names them."""
    entry = _saved(preset)[1]["state"][i]
    return sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.is_floating_point())


def _position(shape, where):
    """An entry of a tensor of ``shape``: off its diagonal (``"off"``) or on it (``"diag"``); a vector's 5th entry,
    a scalar's only one."""
    if len(shape) == 0:
        return ()
    if len(shape) == 1:
        return (min(5, shape[0] - 1),)
    r, c = shape
    if where == "diag" or c == 1:
        k = min(2, r - 1, c - 1)
        return (k, k) if where == "diag" else (min(3, r - 1), 0)
    return (min(3, r - 1), min(7, c - 1))


def _matrix():
    """Every floating key of parameters 0 (the tiled bucket's first block), 2 (dense deferral, moments in place),
    3 (small block) and 4 (vector) of every preset, each with the next of the ten (value, position) pairs in turn:
    two pairs for a key of parameters 0 and 2, where the proofs run, one for the others."""
    cases, n = [], 0
    for preset in PRESETS:
        for i in (0, 2, 3, 4):
            for key in _floating_keys(preset, i):
                for _ in range(2 if i in (0, 2) else 1):
                    value, where = VALUES[n % len(VALUES)], ("off", "diag")[(n // len(VALUES)) % 2]
                    n += 1
                    cases.append(pytest.param(preset, i, key, value, where, id=f"{preset}-{i}-{key}-{value}-{where}"))
    return cases


def _resume(preset, fast, change=None, *, edit=None):
    """``AFTER`` steps after the checkpoint of ``_saved(preset)``, ``change`` applied to its per-parameter state
    (``edit``: no checkpoint, a new optimizer stepped ``FIRST + 1`` times, the last a step that carries bounds
    past itself, and ``edit(optimizer, params)`` made in place), with the fast paths on (``fast``) or off.
    Returns the parameters after each step, the optimizer and its parameters."""
    with pytest.MonkeyPatch.context() as patch:
        for module, name, value in BOTH + ([] if fast else SLOW):
            patch.setattr(module, name, value)
        if edit is None:
            start, saved = _saved(preset)
            params = [torch.nn.Parameter(t.clone()) for t in start]
            opt = _build(preset, params)
            saved = copy.deepcopy(saved)
            if change is not None:
                change(saved["state"])
            opt.load_state_dict(saved)
        else:
            params = _fresh_params()
            opt = _build(preset, params)
            for k in range(FIRST + 1):
                _step(opt, params, k)
            with torch.no_grad():
                edit(opt, params)
        history = []
        start = FIRST if edit is None else FIRST + 1
        for k in range(start, start + AFTER):
            _step(opt, params, k)
            history.append([p.detach().clone() for p in params])
    return history, opt, params


def _assert_finite(history, label):
    for s, values in enumerate(history):
        for i, p in enumerate(values):
            assert torch.isfinite(p).all(), f"{label}: parameter {i} not finite after step {FIRST + s + 1}"


def _assert_same(fast, slow):
    """The parameters after every step and every entry of every ``state[p]``, bit for bit (NaN where NaN)."""
    (h_fast, o_fast, p_fast), (h_slow, o_slow, p_slow) = fast, slow
    for s, (a, b) in enumerate(zip(h_fast, h_slow)):
        for i, (x, y) in enumerate(zip(a, b)):
            where = f"parameter {i} after step {FIRST + s + 1}"
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, where=where: f"{where}: {m}")
    for i, (p, q) in enumerate(zip(p_fast, p_slow)):
        a, b = o_fast.state[p], o_slow.state[q]
        assert a.keys() == b.keys(), i
        for key, x in a.items():
            if isinstance(x, torch.Tensor):
                where = f"state[{i}][{key!r}]"
                torch.testing.assert_close(x, b[key], rtol=0, atol=0, equal_nan=True, msg=lambda m, where=where: f"{where}: {m}")
            else:
                assert x == b[key], (i, key)


def _set(i, key, value, where):
    def change(state):
        t = state[i][key]
        t[_position(tuple(t.shape), where)] = value
    return change


@pytest.mark.parametrize(("preset", "i", "key", "value", "where"), _matrix())
def test_a_corrupted_checkpoint_steps_alike_with_the_fast_paths_on_and_off(preset, i, key, value, where):
    change = _set(i, key, value, where)
    fast, slow = _resume(preset, True, change), _resume(preset, False, change)
    _assert_finite(fast[0], "fast paths on")
    _assert_finite(slow[0], "fast paths off")
    _assert_same(fast, slow)


#: edits of ``opt.state[p][key]`` in place between steps, no checkpoint: what the step before carried past itself
#: (``"entries"``: linalg._ENTRY_BOUNDS on the factor's stack; ``"moments"``: the bucket's _MomentBounds; checked
#: in the fast run) must be dropped by the version counter's move, and the edited stack read again
EDITS = [
    ("soap", 2, "factors.R", math.nan, "off", "entries"),  # dense deferral
    ("soap", 0, "factors.L", math.inf, "off", "entries"),  # tiled deferral
    ("soap", 2, "inner.exp_avg_sq", -1e30, "off", "moments"),  # moments in place, v ≥ 0
    ("soap", 2, "inner.exp_avg", 1e38, "diag", "moments"),
    ("soap", 2, "basis.Q_R", 1e38, "off", None),  # moments in place: _basis_bounds
    ("dykaf", 0, "factors.L", math.nan, "off", None),  # the KSL step's norms
    ("kl_shampoo", 2, "factors.L", -math.inf, "diag", "entries"),
    ("adamw", 2, "inner.exp_avg_sq", -1e30, "diag", "moments"),  # a large block's
    ("adamw", 0, "inner.exp_avg_sq", -1e30, "off", None),  # the small blocks' _Bucket.nonnegative_v
    ("adamw", 2, "inner.exp_avg", 1e38, "off", "moments"),
    ("muon", 2, "inner.momentum_buffer", math.inf, "off", None),  # plain Muon's momentum bound
    ("muon", 4, "inner.exp_avg_sq", -1e30, "off", None),  # the fallback AdamW's
    ("shampoo", 2, "basis.Q_L", math.nan, "off", None),  # the masked write of the refresh's new basis
    ("pro_kl_shampoo", 2, "factors.R", math.nan, "off", None),
    ("pro_kl_shampoo", 2, "factors.sub_L", 1e38, "off", None),  # a refresh that fails and keeps its subspace
]


@pytest.mark.parametrize(
    ("preset", "i", "key", "value", "where", "carried"),
    [
        pytest.param(*case, id="-".join(map(str, case[:4])))
        for case in EDITS
    ],
)
def test_an_entry_edited_in_place_steps_alike_with_the_fast_paths_on_and_off(preset, i, key, value, where, carried):
    kept = []

    def edit(opt, params):
        t = opt.state[params[i]][key]
        if carried == "entries":
            kept.append(linalg._ENTRY_BOUNDS.get(t._base) is not None)
        elif carried == "moments":
            kept.append(any(q is params[i] for bucket in opt._carried_bounds() for q in bucket.params))
        t[_position(tuple(t.shape), where)] = value

    fast = _resume(preset, True, edit=edit)
    assert all(kept), f"the fast run's step before the edit carried no {carried} bound: the edit tests nothing of it"
    slow = _resume(preset, False, edit=edit)
    _assert_finite(fast[0], "fast paths on")
    _assert_finite(slow[0], "fast paths off")
    _assert_same(fast, slow)


@pytest.mark.parametrize(
    ("preset", "i", "key", "value"),
    [
        ("adamw", 2, "inner.exp_avg_sq", -1e30),
        ("adamw", 0, "inner.exp_avg", math.inf),
        ("adamw", 3, "inner.exp_avg", 1e38),
        ("kl_shampoo", 4, "inner.exp_avg_sq", math.nan),
        ("muon", 4, "inner.exp_avg", -1e30),
    ],
)
def test_torch_fused_adamw_kernel_after_a_corrupted_checkpoint(preset, i, key, value):
    """Shipped as is (the fused kernel on): finite parameters, the blocks skipped and the NaN entries of the slow
    run's, its values to rounding (the fused kernel orders its operations its own way: docs/architecture.md)."""
    change = _set(i, key, value, "off")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kopt, "_FUSED_ADAMW", True)
        history, opt, params = _resume_shipped(preset, change)
    _assert_finite(history, "shipped")
    _, o_slow, p_slow = slow = _resume(preset, False, change)
    for a, b in zip(history, slow[0]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for j, (p, q) in enumerate(zip(params, p_slow)):
        for k, x in opt.state[p].items():
            if isinstance(x, torch.Tensor):
                y = o_slow.state[q][k]
                assert torch.equal(x.isnan(), y.isnan()), (j, k)
                where = f"state[{j}][{k!r}]"
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, where=where: f"{where}: {m}")
    assert opt.nonfinite_counts() == o_slow.nonfinite_counts()


def _resume_shipped(preset, change):
    """:func:`_resume` with nothing patched (the caller's patches stand)."""
    start, saved = _saved(preset)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    opt = _build(preset, params)
    saved = copy.deepcopy(saved)
    change(saved["state"])
    opt.load_state_dict(saved)
    history = []
    for k in range(FIRST, FIRST + AFTER):
        _step(opt, params, k)
        history.append([p.detach().clone() for p in params])
    return history, opt, params


@pytest.mark.parametrize(
    "preset",
PRESETS)
def test_a_checkpoint_of_column_major_tensors_steps_alike_with_the_fast_paths_on_and_off(preset):
    """An edited checkpoint whose values are intact: every 2-D floating tensor laid column-major (a symmetric
    factor saved as its transpose, say). The load keeps that layout."""

    def change(state):
        for entry in state.values():
            for key, t in list(entry.items()):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2:
                    entry[key] = t.mT.contiguous().mT

    fast, slow = _resume(preset, True, change), _resume(preset, False, change)
    _assert_finite(fast[0], "fast paths on")
    _assert_same(fast, slow)


def test_the_compared_fast_paths_are_taken():
    """The fast run reaches each proven path it is compared for (on a clean checkpoint: the matrix corrupts one
    block, the others keep them): deferred factor updates, moments in place, AdamW blocks in place, plain Muon."""
    hits = set()

    def count(patch, owner, name, label, taken=lambda result, *args: True):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            result = real(*args, **kwargs)
            if taken(result, *args):
                hits.add(label)
            return result

        patch.setattr(owner, name, counted)

    seen = {}
    for preset in PRESETS:
        hits.clear()
        with pytest.MonkeyPatch.context() as patch:
            count(patch, linalg, "DeferredWrite", "deferred")
            count(patch, linalg, "adam_moments_each_", "moments in place")
            # an AdamW block proven finite and updated in place: its new moments are written over its moments
            count(patch, compose, "adam_block", "adamw in place", lambda result, cfg, t, m, v, g, out: out[0] is m)
            count(patch, kopt.KronOptimizer, "_step_plain_muon", "plain muon", lambda result, *args: result)
            _resume(preset, True)
        seen[preset] = set(hits)
    for preset in DEFERRED:
        assert "deferred" in seen[preset], seen
    for preset in ("soap", "dykaf"):
        assert "moments in place" in seen[preset], seen
    for preset in ("adamw", "kl_shampoo", "muon", "pro_kl_shampoo"):
        assert "adamw in place" in seen[preset], seen
    assert "plain muon" in seen["muon"], seen


# -- minimal reproductions of the defects found ---------------------------------------------------------------


@pytest.mark.parametrize("host", [True, False])  # a copy a written block (the CPU's), torch.where (a device's)
def test_masked_write_gives_a_written_block_its_new_value_whatever_its_old_one_held(host, monkeypatch):
    """``masked_write_`` on a stack with a NaN (as loaded) in the block it writes, the other block kept: the written
    block takes the new value (the 0/1 blend this was kept the NaN: ``0 · NaN`` is NaN)."""
    monkeypatch.setattr(linalg, "_CPU_HOST_VERDICTS", host)
    old = torch.zeros(2, 64, 64)  # 4096 entries a block: not the small blocks' torch.where
    old[0, 3, 7] = math.nan
    new = torch.ones(2, 64, 64)
    compose.masked_write_(old, new, torch.tensor([True, False]))
    assert torch.equal(old[0], new[0])
    assert torch.equal(old[1], torch.zeros(64, 64))


def _small_run(shapes, preset, change, steps, patches=()):
    """``steps`` steps of ``preset`` on parameters of ``shapes`` after a checkpoint taken at step 4 and changed."""
    with pytest.MonkeyPatch.context() as patch:
        for module, name, value in patches:
            patch.setattr(module, name, value)
        out = []
        for load in (False, True):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            opt = kronopt.build([(f"blocks.{i}.weight", p) for i, p in enumerate(params)], preset, **SETTINGS)
            if load:
                start, saved = out.pop()
                with torch.no_grad():
                    for p, t in zip(params, start):
                        p.copy_(t)
                change(saved["state"])
                opt.load_state_dict(saved)
                ks = range(4, 4 + steps)
            else:
                ks = range(4)
            for k in ks:
                gen = torch.Generator().manual_seed(100 + k)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            out.append(([p.detach().clone() for p in params], opt.state_dict()))
    return out[0]


def _assert_same_small(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for i, entry in a[1]["state"].items():
        for key, x in entry.items():
            if isinstance(x, torch.Tensor):
                where = f"state[{i}][{key!r}]"
                y = b[1]["state"][i][key]
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m, where=where: f"{where}: {m}")


def test_shampoo_basis_loaded_with_nan_steps_alike_on_the_device_path():
    """One 72 × 8 block, shampoo, a NaN in its left basis: the step skips the block until the refresh (step 6)
    makes a new basis by ``eigh``, which the write must give the block whole on the device path as the CPU's plain
    copy does (the blend this was kept the NaN and skipped the block at steps 7 and 8 as well)."""

    def change(state):
        state[0]["basis.Q_L"][3, 7] = math.nan

    _assert_same_small(
        _small_run([(72, 8)], "shampoo", change, 4),
        _small_run([(72, 8)], "shampoo", change, 4, [(linalg, "_CPU_HOST_VERDICTS", False)]),
    )


def test_a_block_with_a_nan_loaded_in_its_basis_steps_as_beside_a_clean_neighbour():
    """On the CPU, no switch: two 72 × 8 blocks in one shampoo bucket, a NaN in the first's basis. Whether the
    second block is skipped (a NaN in its momentum) must not change the first's steps (it did while the refresh
    step's write was then the blend, not the plain copy)."""

    def first(state):
        state[0]["basis.Q_L"][3, 7] = math.nan

    def both(state):
        first(state)
        state[1]["inner.momentum_buffer"][3, 7] = math.nan

    clean = _small_run([(72, 8), (72, 8)], "shampoo", first, 4)
    beside = _small_run([(72, 8), (72, 8)], "shampoo", both, 4)
    torch.testing.assert_close(clean[0][0], beside[0][0], rtol=0, atol=0)
    torch.testing.assert_close(clean[1]["state"][0]["basis.Q_L"], beside[1]["state"][0]["basis.Q_L"], rtol=0, atol=0)


def test_pro_kl_shampoo_failed_refresh_keeps_the_momentum_on_the_device_path():
    """One 64 × 32 block, pro_kl_shampoo, 1e38 in its subspace factor: the refresh fails on the block and keeps its
    basis; the momentum must stay as it is either way."""

    def change(state):
        state[0]["factors.sub_L"][3, 7] = 1e38

    _assert_same_small(
        _small_run([(64, 32)], "pro_kl_shampoo", change, 4),
        _small_run([(64, 32)], "pro_kl_shampoo", change, 4, [(linalg, "_CPU_HOST_VERDICTS", False)]),
    )


def test_a_column_major_factor_takes_the_same_deferred_update():
    """One 520 × 8 block, soap, its left factor loaded as its transpose (the same values, column-major): one step
    with the update deferred must give the factor the update made in the step gives it."""

    def change(state):
        state[0]["factors.L"] = state[0]["factors.L"].mT

    _assert_same_small(
        _small_run([(520, 8)], "soap", change, 1),
        _small_run([(520, 8)], "soap", change, 1, [(kopt, "_DEFER_FACTOR_UPDATES", False)]),
    )
