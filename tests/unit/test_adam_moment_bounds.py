"""Plain AdamW's moment bounds carried across steps on a CPU (``optimizer._MomentBounds``).

A block's in-place update is proven finite from bounds on its moments; after a step the bounds come from the last
step's and the gradient's, not from reading the moments again. Every test runs on large blocks (each judged at its
turn), on small ones (their moments read together by ``foreach`` reductions, fewer than 64 a step: from 64 on
their verdicts are made on tensors and their moments read every step, test_adam_small_bounds.py) and on both
in one step.
Checked: the bounds hold the moments (every step, gradients of changing scale, subnormal moments that stop
decaying), the moments are read once and then no more, every result is the same bits as with the moments read each
step (also with gradients at the safety test's thresholds, where blocks go through the checked scratch path and
back), and anything that writes the moments otherwise (an edit of ``state[p]``, a load, a copy of the optimizer, a
skipped step) makes the next step read them again, so a huge moment put there by hand is still refused before it
reaches a parameter; an ``eps`` that the state's dtype rounds to 0 proves nothing.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronopt
from kronopt import optimizer as kopt

SHAPES = [(256, 128), (256, 128), (128, 256)]  # set by the fixture below
SIDE = 130  # the side of test_the_same_bits_with_gradients_at_the_thresholds' blocks, set by the fixture below

# blocks past the size whose bounds are read together with others' (kopt._ADAM_BOUNDS_TOGETHER_MAX), small blocks,
# and both in one step (a large bucket between small ones)
SETS = {
    "large": ([(256, 128), (256, 128), (128, 256)], 130),
    "small": ([(32, 16), (32, 16), (16, 32)], 30),
    "small and large": ([(32, 16), (256, 128), (16, 32), (32, 16)], 30),
}


@pytest.fixture(autouse=True, params=list(SETS))
def _blocks(request, monkeypatch):
    shapes, side = SETS[request.param]
    monkeypatch.setattr(__import__(__name__, fromlist=["SHAPES"]), "SHAPES", shapes)
    monkeypatch.setattr(__import__(__name__, fromlist=["SIDE"]), "SIDE", side)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]


def _grads(k, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(*s, generator=gen) * scale for s in SHAPES]


def _build(params, **overrides):
    return kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], "adamw", **overrides)


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


@pytest.fixture
def never_carried(monkeypatch):
    """The moments read at every step, as before the bounds were carried."""
    def off():
        monkeypatch.setattr(kopt._MomentBounds, "valid", staticmethod(lambda known, bucket: None))
    return off


def _moment_reads(opt):
    """Counts the reductions that read any bucket's moments (``aminmax``/``amax`` on their storage)."""
    stacks = {b.state.inner.exp_avg.untyped_storage().data_ptr() for b in opt._buckets}
    stacks |= {b.state.inner.exp_avg_sq.untyped_storage().data_ptr() for b in opt._buckets}
    reads = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            if name in ("aminmax", "amax", "max", "_foreach_max") and any(
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in stacks for t in flat
            ):
                reads.append(name)
            return func(*args, **(kwargs or {}))

    return Watch(), reads


def test_the_bounds_hold_the_moments_at_every_step():
    params = _params()
    opt = _build(params)
    scales = [1.0, 1e3, 1e-3, 1.0, 1e6, 0.0, 1e-6] * 4
    largest = 0.0  # the largest gradient entry so far: a convex combination of them bounds every moment
    for k, scale in enumerate(scales):
        grads = _grads(k, scale)
        largest = max(largest, *(g.abs().max().item() for g in grads))
        _step(opt, params, grads)
        for bucket in opt._buckets:
            known = opt._carried_bounds().get(bucket)
            assert known is not None
            m, v = bucket.state.inner.exp_avg, bucket.state.inner.exp_avg_sq
            for i in range(m.shape[0]):
                assert m[i].abs().max().item() <= known.m[i] <= largest * (1 + 1e-4)
                assert v[i].max().item() <= known.v[i] <= largest**2 * (1 + 1e-4)


def test_the_moments_are_read_once_then_carried(never_carried):
    params = _params()
    opt = _build(params)
    mode, reads = _moment_reads(opt)
    with mode:
        _step(opt, params, _grads(0))
    first = len(reads)
    assert first > 0  # the first step reads them
    with mode:
        for k in range(1, 6):
            _step(opt, params, _grads(k))
    assert len(reads) == first  # and no later step does
    never_carried()
    with mode:
        _step(opt, params, _grads(6))
    assert len(reads) > first  # with the bounds off, every step reads them


def test_the_same_bits_as_reading_the_moments_every_step(never_carried):
    a, b = _params(), _params()
    opt_a = _build(a)
    steps = [(_grads(k, s), None) for k, s in enumerate([1.0, 1e4, 1e-4, 1.0] * 3)]
    for grads, _ in steps:
        _step(opt_a, a, grads)
    never_carried()
    opt_b = _build(b)
    for grads, _ in steps:
        _step(opt_b, b, grads)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert torch.equal(sa["inner.exp_avg"], sb["inner.exp_avg"])
        assert torch.equal(sa["inner.exp_avg_sq"], sb["inner.exp_avg_sq"])


def test_a_huge_moment_put_in_by_hand_is_read_and_refused():
    """An edit of ``state[p]`` moves the stack's version: the next step reads the moments, the fused in-place
    write is refused, the block's direction overflows and is skipped; the parameter stays as it was."""
    params = _params()
    opt = _build(params, nonfinite="skip")
    for k in range(3):
        _step(opt, params, _grads(k))
    before = params[0].detach().clone()
    opt.state[params[0]]["inner.exp_avg"].fill_(3e38)  # finite, but not its bias-corrected direction
    _step(opt, params, _grads(3))
    assert torch.isfinite(params[0]).all() and torch.equal(params[0], before)
    assert opt.nonfinite_counts()["w0"] == 1
    assert torch.isfinite(params[1]).all()


def test_a_load_and_a_copy_start_from_the_moments_they_hold(never_carried):
    params = _params()
    opt = _build(params)
    for k in range(3):
        _step(opt, params, _grads(k))
    saved = copy.deepcopy(opt.state_dict())
    for k in range(3, 6):
        _step(opt, params, _grads(k, 1e5))  # the bounds grow with these
    big = [p.detach().clone() for p in params]
    # a load of the earlier moments into the same optimizer, a deep copy of it, and a fresh optimizer loading them:
    # each steps as one that reads its moments every step
    opt.load_state_dict(saved)
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    mode, reads = _moment_reads(opt)
    with mode:
        _step(opt, params, _grads(6))
    assert reads  # the loaded moments are read
    _step(twin, twin_params, _grads(6))
    never_carried()
    ref_params = [torch.nn.Parameter(b.clone()) for b in big]
    ref = _build(ref_params)
    ref.load_state_dict(saved)
    _step(ref, ref_params, _grads(6))
    for p, t, r in zip(params, twin_params, ref_params):
        assert torch.equal(p, r) and torch.equal(t, r)


def test_a_skipped_step_leaves_nothing_to_carry(never_carried):
    """Under ``nonfinite_scope = "step"`` a NaN anywhere skips every write: the bounds are dropped, the next step
    reads the moments, and the run is the same bits as reading them every step."""
    def run(params, opt):
        for k in range(5):
            grads = _grads(k)
            if k == 2:
                grads[1][0, 0] = float("nan")
            _step(opt, params, grads)
            assert (not opt._carried_bounds()) == (k == 2)
        return params

    pa = _params()
    run(pa, _build(pa, nonfinite_scope="step", nonfinite="skip"))
    never_carried()
    pb = _params()
    run(pb, _build(pb, nonfinite_scope="step", nonfinite="skip"))
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def test_a_copy_made_after_an_edit_reads_its_moments(never_carried):
    """A copy's tensors start their version counters again: the bounds are not copied, so a copy made after an
    in-place edit of the moments (which the original would read) reads them too and refuses the poisoned block."""
    import pickle

    params = _params()
    opt = _build(params, nonfinite="skip")
    for k in range(3):
        _step(opt, params, _grads(k))
    opt.state[params[0]]["inner.exp_avg"].fill_(3e38)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for twin in copies:
        assert not twin._carried_bounds()
        twin_params = twin.param_groups[0]["params"]
        before = twin_params[0].detach().clone()
        _step(twin, twin_params, _grads(3))
        assert torch.equal(twin_params[0], before) and twin.nonfinite_counts()["w0"] == 1
        assert all(torch.isfinite(p).all() for p in twin_params)


def test_the_bounds_hold_subnormal_moments_that_stop_decaying():
    """Rounding among subnormal numbers is absolute: under zero gradients a float32 moment of a few units of the
    smallest subnormal stops decaying (0.9 m rounds back to m) while a purely relative bound would keep falling."""
    params = _params()
    opt = _build(params)
    _step(opt, params, _grads(0))
    for state in opt.state.values():  # counted writes: read at the next step, then carried
        state["inner.exp_avg"].fill_(2e-44)
        state["inner.exp_avg_sq"].fill_(2e-44)
    zeros = [torch.zeros(s) for s in SHAPES]
    for _ in range(40):
        _step(opt, params, zeros)
    for bucket in opt._buckets:
        known = opt._carried_bounds()[bucket]
        m, v = bucket.state.inner.exp_avg, bucket.state.inner.exp_avg_sq
        assert m.abs().max().item() > 0  # stuck above zero
        for i in range(m.shape[0]):
            assert m[i].abs().max().item() <= known.m[i] and v[i].max().item() <= known.v[i]


_THRESHOLD_CONFIGS = [
    {}, {"inner.betas": (0.5, 0.6)}, {"inner.betas": (0.99, 0.9999)}, {"inner.eps_placement": "before_correction"},
    {"inner.bias_correction": False}, {"inner.eps": 1e-20},
]


@pytest.mark.parametrize("case", range(len(_THRESHOLD_CONFIGS)), ids=["default", "low-betas", "high-betas", "eps-before", "no-correction", "tiny-eps"])
def test_the_same_bits_with_gradients_at_the_thresholds(case, never_carried):
    """Gradients of scales around the safety test's thresholds (``a / eps / c1`` near a quarter of float32's
    largest number, ``g`` near its root): blocks go through the checked scratch path, are written or skipped, and
    come back; carried bounds that prove nothing are replaced by the read ones, so every verdict and bit is the
    same as reading the moments every step. (It fails where a block the scratch path wrote keeps its old bounds,
    or where a carried bound that proves nothing is taken for a verdict.)"""
    import random

    overrides = _THRESHOLD_CONFIGS[case]

    def run(seed):
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(SIDE, SIDE, generator=gen)) for _ in range(3)]
        opt = kronopt.build([(f"w{i}", p) for i, p in enumerate(params)], "adamw", nonfinite="skip", **overrides)
        for _ in range(30):
            for p in params:
                scale = rng.choice([1.0, 1e29, 3e29, 8e29, 2e30, 9e18, 9.3e18, 5e18, 1e-3, 0.0])
                g = torch.randn(p.shape, generator=gen) * scale
                p.grad = g.abs() if rng.random() < 0.3 else g
            opt.step()
        return [p.detach().clone() for p in params] + [
            t.clone() for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]

    seeds = [seed * 31 + case for seed in range(4)]
    carried = [run(seed) for seed in seeds]
    never_carried()
    for seed, got in zip(seeds, carried):
        for x, y in zip(got, run(seed)):
            assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan()), seed


def test_an_eps_the_state_rounds_to_zero_proves_nothing():
    """``eps = 1e-60`` is 0 in float32, where the kernels add it: with a second moment that underflows the
    direction is not finite, so no block may be proven safe by it and written in place."""
    params = _params()
    opt = _build(params, nonfinite="skip", **{"inner.eps": 1e-60})
    before = [p.detach().clone() for p in params]
    _step(opt, params, [g * 1e-30 for g in _grads(0)])
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        assert torch.equal(p, b)
    assert sum(opt.nonfinite_counts().values()) == len(params)
