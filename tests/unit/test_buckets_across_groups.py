"""Buckets shared by param groups whose configs differ in ``lr`` and ``weight_decay`` alone (a learning rate per
layer, a decay-free group): the blocks of one shape stack in one bucket whatever their groups, and each is written
with its own group's rates.

Every expected value comes from outside the sharing: each group stepped in an optimizer of its own (float64, where
the processor's batched kernels round within 1e-12 of the single ones; block sides multiples of 4), torch's AdamW and
Muon with the same groups, or the same run with a bucket per group (``_BUCKETS_ACROSS_GROUPS`` off).
"""

import pickle

import attrs
import pytest
import torch

import kronopt
from kronopt import optimizer as optimizer_module
from kronopt.optimizer import _Bucket
from tests.unit.test_bucket_join import _kw, _quiet  # noqa: F401 (the warnings kept quiet, the refresh period)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LAYERS = 4
#: one layer's parameters: matrices of three shapes (two of one) and a vector (the fallback's, where a preset has one)
SHAPES = {"q": (8, 12), "k": (8, 12), "o": (12, 8), "w": (8, 8), "norm": (8,)}
STEPS = 7



def _rates(k, lr=2e-2):
    """Layer ``k``'s rates: a learning rate decayed by layer from ``lr``, weight decay on every other layer."""
    return {"lr": lr * 0.6**k, "weight_decay": 0.1 if k % 2 else 0.0}


def _layers(seed=0, dtype=F64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [
        [(f"layers.{k}.{n}", torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))) for n, s in shapes.items()]
        for k in range(LAYERS)
    ]


def _grads(layers, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for _, p in layer] for layer in layers]


def _feed(layers, grads):
    for layer, gs in zip(layers, grads):
        for (_, p), g in zip(layer, gs):
            p.grad = g.clone()


def _per_layer(preset, layers, **kw):
    return kronopt.build([{"params": layer, **_rates(k)} for k, layer in enumerate(layers)], preset, **_kw(preset), **kw)


def _each_alone(preset, layers, **kw):
    return [kronopt.build([{"params": layer, **_rates(k)}], preset, **_kw(preset), **kw) for k, layer in enumerate(layers)]


def _step_all(opts, layers, seed):
    grads = _grads(layers, seed)
    _feed(layers, grads)
    for opt in opts:
        opt.step()


def _assert_same(layers, others, msg, rtol=1e-12, atol=1e-14):
    for layer, other in zip(layers, others):
        for (name, p), (_, q) in zip(layer, other):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"{msg}: {name}")


@pytest.mark.parametrize("preset", list(kronopt.PRESETS))
def test_per_layer_groups_share_buckets_and_step_as_each_layer_alone(preset):
    """Four layers in four groups of their own rates: as many buckets as one group of them all would make, each
    holding every layer's blocks of its shape, and every parameter stepped as its layer stepped alone. Catches:
    a bucket per group (four times the buckets), one group's rates written to another's blocks (the layers' lrs
    differ by 0.6 each: far beyond 1e-12), and a run of a group's blocks written at another's place."""
    layers, alone_layers = _layers(), _layers()
    opt = _per_layer(preset, layers)
    one = kronopt.build([pair for layer in _layers() for pair in layer], preset, **_kw(preset))
    rows = opt.bucket_summary()
    assert len(rows) == len(one.bucket_summary())
    main = [i for i, g in enumerate(opt.param_groups) if g["pipeline"] == "main"]
    for row in rows:
        assert len(row["groups"]) == LAYERS and row["group"] == row["groups"][0]
        assert all(opt.param_groups[g]["pipeline"] == row["pipeline"] for g in row["groups"])
        if row["pipeline"] == "main":
            assert list(row["groups"]) == main
    alone = _each_alone(preset, alone_layers)
    for t in range(STEPS):
        _step_all([opt], layers, 100 + t)
        _step_all(alone, alone_layers, 100 + t)
        _assert_same(layers, alone_layers, f"{preset} step {t}")


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_per_layer_groups_equal_torch_adamw_with_a_schedule(monkeypatch, fused):
    """The adamw preset over per-layer groups (one shared bucket per shape; on a CPU each block through torch's fused
    kernel or the block-by-block form) against torch's AdamW with the same groups and a per-group schedule, float64.
    Catches: a block written with another group's lr or decay, a fused call keyed without the group's rates."""
    monkeypatch.setattr(optimizer_module, "_FUSED_ADAMW", fused)
    shapes = {"a": (8, 12), "b": (40, 40), "c": (12,)}
    layers, theirs = _layers(1, shapes=shapes), _layers(1, shapes=shapes)
    ours = kronopt.build([{"params": layer, **_rates(k)} for k, layer in enumerate(layers)], "adamw")
    ref = torch.optim.AdamW([{"params": [p for _, p in layer], **_rates(k)} for k, layer in enumerate(theirs)])
    assert all(len(r["groups"]) == LAYERS for r in ours.bucket_summary())
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, ref)]
    for t in range(8):
        _step_all([ours], layers, 200 + t)
        _step_all([ref], theirs, 200 + t)
        for s in schedules:
            s.step()
    _assert_same(layers, theirs, f"adamw fused={fused}")


@pytest.mark.parametrize("plain", [True, False])
def test_muon_per_layer_groups_equal_torch_muon(monkeypatch, plain):
    """The muon preset over per-layer groups of matrices (a CPU's plain Muon form, each group's rates per run of its
    blocks, or the small buckets' general path) against torch's Muon with the same groups (float32, bfloat16
    iteration: its tolerance of the preset's own comparison). Catches: one group's lr or decay written to another
    group's blocks."""
    if plain:  # small blocks are stepped together on the general path: none here
        monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
    shapes = {"a": (16, 8), "b": (8, 16), "c": (16, 8)}
    layers, theirs = _layers(2, torch.float32, shapes), _layers(2, torch.float32, shapes)
    # torch's default lr: the bfloat16 iteration's rounding, which the two round apart, grows with the step
    ours = kronopt.build([{"params": layer, **_rates(k, 1e-3)} for k, layer in enumerate(layers)], "muon")
    ref = torch.optim.Muon([{"params": [p for _, p in layer], **_rates(k, 1e-3)} for k, layer in enumerate(theirs)])
    assert all(len(r["groups"]) == LAYERS for r in ours.bucket_summary())
    stepped = []
    real = optimizer_module.KronOptimizer._step_plain_muon
    ours._step_plain_muon = lambda bucket, ok, cfg: (stepped.append(r := real(ours, bucket, ok, cfg)), r)[1]
    for t in range(20):
        _step_all([ours], layers, 300 + t)
        _step_all([ref], theirs, 300 + t)
    assert all(stepped) and len(stepped) == (20 * 2 if plain else 0)  # the plain form stepped both buckets, or none
    _assert_same(layers, theirs, "muon", rtol=2e-5, atol=2e-5)


def test_groups_of_other_configs_keep_buckets_of_their_own():
    """A group with another ε and one with another refresh period beside two that differ in their rates alone:
    only those two share buckets. Catches: buckets shared whatever the configs."""
    layers = _layers()
    opt = kronopt.build(
        [
            {"params": layers[0], **_rates(0)},
            {"params": layers[1], **_rates(1)},
            {"params": layers[2], "inner.eps": 1e-6},
            {"params": layers[3], "refresh.every": 5},
        ],
        "soap",
    )
    assert {r["groups"] for r in opt.bucket_summary()} == {(0, 1), (2,), (3,)}


def test_an_edited_schedule_parts_a_shared_bucket_and_steps_as_each_layer_alone():
    """One group's refresh period edited between steps (a schedulable key): the buckets it shared are cut, each part
    with its rows of the state, and every layer steps on as it would alone with the same edit. Catches: a bucket
    that keeps stepping the edited group with the others' schedule (its refreshes at the old period), and a cut
    that hands rows of state to the wrong part."""
    layers, alone_layers = _layers(3), _layers(3)
    opt = _per_layer("soap", layers)
    alone = _each_alone("soap", alone_layers)
    for t in range(4):
        _step_all([opt], layers, 400 + t)
        _step_all(alone, alone_layers, 400 + t)
    opt.param_groups[1]["refresh.every"] = 2
    alone[1].param_groups[0]["refresh.every"] = 2
    for t in range(4, 10):
        _step_all([opt], layers, 400 + t)
        _step_all(alone, alone_layers, 400 + t)
        _assert_same(layers, alone_layers, f"step {t}")
    groups = {r["groups"] for r in opt.bucket_summary()}
    assert (1,) in groups and all(1 not in g or g == (1,) for g in groups)
    assert (0, 2, 3) in groups
    refreshes = [opt.state[p]["basis.refreshes"] for _, p in layers[1]]
    assert refreshes == [alone[1].state[p]["basis.refreshes"] for _, p in alone_layers[1]]


@pytest.mark.parametrize("preset", ["soap", "adamw"])
def test_a_checkpoint_of_shared_buckets_resumes_as_the_uninterrupted_run(preset):
    """A state dict of shared buckets, loaded into a fresh optimizer: it goes on as the uninterrupted run (the same
    bits). Catches: a load that cuts the shared buckets by group, or restacks their blocks in another order."""
    layers, resumed = _layers(4), _layers(4)
    opt = _per_layer(preset, layers)
    for t in range(4):
        _step_all([opt], layers, 500 + t)
    with torch.no_grad():
        for layer, other in zip(layers, resumed):
            for (_, p), (_, q) in zip(layer, other):
                q.copy_(p)
    fresh = _per_layer(preset, resumed)
    fresh.load_state_dict(opt.state_dict())
    assert [r["groups"] for r in fresh.bucket_summary()] == [r["groups"] for r in opt.bucket_summary()]
    for t in range(4, 8):
        _step_all([opt], layers, 500 + t)
        _step_all([fresh], resumed, 500 + t)
        _assert_same(layers, resumed, f"{preset} step {t}", rtol=0, atol=0)


def test_a_checkpoint_of_a_bucket_per_group_loads_and_its_buckets_join(monkeypatch):
    """A state dict saved with a bucket per group (as kronopt saved them before groups shared buckets) loads into
    an optimizer that shares them: each saved bucket comes back as a part, the parts of one shape join at the next
    step (their counters agree), and every layer steps on as in the run that kept a bucket per group. Catches: a load
    that refuses the other bucket layout, or parts joined with their rows out of place."""
    layers, resumed = _layers(5), _layers(5)
    monkeypatch.setattr(optimizer_module, "_BUCKETS_ACROSS_GROUPS", False)
    apart = _per_layer("soap", layers)
    assert all(len(r["groups"]) == 1 for r in apart.bucket_summary())
    for t in range(4):
        _step_all([apart], layers, 600 + t)
    saved = apart.state_dict()
    monkeypatch.setattr(optimizer_module, "_BUCKETS_ACROSS_GROUPS", True)
    with torch.no_grad():
        for layer, other in zip(layers, resumed):
            for (_, p), (_, q) in zip(layer, other):
                q.copy_(p)
    shared = _per_layer("soap", resumed)
    shared.load_state_dict(saved)
    assert len(shared.bucket_summary()) == len(apart.bucket_summary())
    for t in range(4, 8):
        _step_all([apart], layers, 600 + t)
        _step_all([shared], resumed, 600 + t)
        _assert_same(layers, resumed, f"step {t}")
    assert all(len(r["groups"]) == LAYERS for r in shared.bucket_summary())


def test_reports_and_views_name_each_block_of_a_shared_bucket():
    """A non-finite gradient in the third layer's block of a shared bucket (``nonfinite_scope = "block"``): the
    warning and the counts name that parameter, and ``inspect`` lists every parameter by its own name. Catches:
    names looked up in the bucket's first group (another layer's parameter named, or none)."""
    layers = _layers(6)
    opt = _per_layer("soap", layers, nonfinite_scope="block")
    _step_all([opt], layers, 700)
    grads = _grads(layers, 701)
    grads[2][1][0, 0] = float("nan")  # layers.2.k
    _feed(layers, grads)
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"layers\.2\.k"):
        opt.flush_warnings()
    counts = opt.nonfinite_counts()
    assert counts["layers.2.k"] == 1 and sum(counts.values()) == 1
    assert set(opt.inspect()) == {name for layer in layers for name, _ in layer}


def test_a_group_added_later_steps_with_its_own_rates():
    """``add_param_group`` of a layer whose config differs in its rates alone, after steps: its blocks start in
    buckets of their own (the others' hold state) and every layer steps as it would alone. Catches: a new group's
    blocks put into a stepped bucket, or stepped with the bucket's first group's rates."""
    layers, alone_layers = _layers(7), _layers(7)
    opt = _per_layer("soap", layers[:3])
    alone = _each_alone("soap", alone_layers)
    for t in range(3):
        _step_all([opt], layers[:3], 800 + t)
        _step_all(alone[:3], alone_layers[:3], 800 + t)
    opt.add_param_group({"params": layers[3], **_rates(3)})
    for t in range(3, 7):
        _step_all([opt], layers, 800 + t)
        _step_all(alone[:3], alone_layers[:3], 800 + t)
        _feed(alone_layers[3:], _grads(alone_layers, 800 + t)[3:])
        alone[3].step()
        _assert_same(layers, alone_layers, f"step {t}")


def test_an_optimizer_pickled_before_buckets_held_several_groups_steps_on(monkeypatch):
    """An optimizer pickled by a kronopt whose buckets had no ``groups`` (each one group's): unpickled, its buckets
    read as one group's each and it steps on as the original. Catches: an unpickled bucket without the attribute
    (``AttributeError`` at the first step)."""
    layers = _layers(8)
    monkeypatch.setattr(optimizer_module, "_BUCKETS_ACROSS_GROUPS", False)
    opt = _per_layer("soap", layers)
    _step_all([opt], layers, 900)
    real = _Bucket.__getstate__
    monkeypatch.setattr(_Bucket, "__getstate__", lambda self: {k: v for k, v in real(self).items() if k not in ("groups", "_runs")})
    model, copy = pickle.loads(pickle.dumps((layers, opt)))
    monkeypatch.undo()
    assert all(b.groups is None for b in copy._buckets)
    for t in range(1, 4):
        _step_all([opt], layers, 900 + t)
        _step_all([copy], model, 900 + t)
        _assert_same(layers, model, f"step {t}", rtol=0, atol=0)


def _matrices(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 8, generator=gen, dtype=F64)) for _ in range(count)]


def _feed_matrices(params, seed, present=None):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=F64)
        p.grad = g if present is None or i in present else None


def _two_groups(params, cap):
    """One block in a first group, four in a second of other rates: one class, cut by the cap."""
    return kronopt.build(
        [{"params": params[:1], "lr": 1e-2, "weight_decay": 0.0}, {"params": params[1:], "lr": 3e-1, "weight_decay": 0.1}],
        "soap", **{"refresh.every": 3, "bucket_cap_mib": cap},
    )


def test_a_checkpoint_of_split_and_joined_parts_loads_under_a_cap_with_each_blocks_own_rates():
    """A cap of three blocks cuts the shared class [g0, g1, g1, g1, g1] into [g0, g1] and [g1, g1, g1]; two steps
    with gradients for blocks 1 and 2 alone split both and join their present parts ([g1, g1], one bucket of the
    second group). Saved and loaded into the same optimizer, that saved bucket spans both cap cuts, and the load
    joins its pieces. Expected: the uninterrupted run. Catches: the joined piece stepping with the first cut's group
    (0) while its blocks are all group 1's (group 1's blocks written with group 0's rates, 1.07 away)."""
    probe = _two_groups(_matrices(5), 0)
    bucket = probe._buckets[0]
    block = optimizer_module._block_state_bytes(probe._group_cfgs[0], attrs.evolve(bucket.layout, batch=1), bucket.state_dtype)
    cap = 3.5 * block / 2**20
    params = _matrices(5)
    opt = _two_groups(params, cap)
    _feed_matrices(params, 0)
    opt.step()
    _feed_matrices(params, 1, {1, 2})
    opt.step()
    _feed_matrices(params, 2, {1, 2})
    opt.step()
    resumed = _matrices(5)
    with torch.no_grad():
        for p, q in zip(params, resumed):
            q.copy_(p)
    fresh = _two_groups(resumed, cap)
    fresh.load_state_dict(opt.state_dict())
    for b in fresh._buckets:  # the group a bucket of one group's blocks steps with is that group
        assert b.groups is not None or all(any(p is q for q in fresh.param_groups[b.group]["params"]) for p in b.params)
    for t in range(3, 6):
        _feed_matrices(params, t)
        opt.step()
        _feed_matrices(resumed, t)
        fresh.step()
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


class _ForwardingOptimizer:
    """As tests/unit/test_framework_integration_differential.py models Lightning's and Fabric's wrappers: every
    method but ``step`` runs with the wrapper as ``self``, attributes it lacks forwarded to the optimizer."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Fabric" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})

    def step(self, closure=None):
        return self._optimizer.step()

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def test_a_group_added_through_a_forwarding_wrapper_steps_on_after_a_split():
    """``add_param_group`` through a wrapper (the case :meth:`_groups_in_buckets` supports), after a split: the
    optimizer steps on as the same run without the wrapper. Catches: the groups' classes cached on the optimizer
    before the add (the wrapper's ``__dict__`` takes the new ones), which the next join pass indexes with the new
    group (``IndexError``)."""
    runs = []
    for wrap in (False, True):
        a, b = _matrices(2, 0), _matrices(2, 1)
        opt = kronopt.build([{"params": a, "lr": 1e-2}], "soap", **{"refresh.every": 3})
        _feed_matrices(a, 0, {0})  # a split: the optimizer looks for parts to join from now on
        opt.step()
        (_ForwardingOptimizer(opt) if wrap else opt).add_param_group({"params": b, "lr": 3e-2})
        for t in range(1, 4):
            _feed_matrices(a + b, t)
            opt.step()
        runs.append([p.detach().clone() for p in a + b])
    for p, q in zip(*runs):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_an_optimizer_pickled_before_shared_buckets_joins_no_blocks_of_other_configs(monkeypatch):
    """An optimizer pickled by a kronopt with a bucket per group (no ``groups``, no ``_group_classes``) whose buckets
    hold a ``join_base`` keyed by group index: unpickled, it steps on as the same unpickled run that keeps a bucket
    per group. Catches: the old join keys kept (group 1's key, 1, equals the class of group 3, of another
    ``inner.eps``: group 3's split part joined group 1's bucket and stepped with its config)."""
    def build(ps):
        return kronopt.build(
            [{"params": ps[0], "lr": 1e-2}, {"params": ps[1], "lr": 2e-2}, {"params": ps[2], "lr": 1e-2},
             {"params": ps[3], "lr": 1e-2, "inner.eps": 1e-1}],
            "soap", **{"refresh.every": 3},
        )

    def feed(ps, t, skip=()):
        gen = torch.Generator().manual_seed(100 + t)
        for k, group in enumerate(ps):
            for i, p in enumerate(group):
                g = torch.randn(p.shape, generator=gen, dtype=F64)
                p.grad = None if (k, i) in skip else g

    gen = torch.Generator().manual_seed(0)
    params = [[torch.nn.Parameter(torch.randn(8, 8, generator=gen, dtype=F64)) for _ in range(2)] for _ in range(4)]
    monkeypatch.setattr(optimizer_module, "_BUCKETS_ACROSS_GROUPS", False)  # as kronopt kept a bucket per group
    opt = build(params)
    feed(params, 1)
    opt.step()
    feed(params, 2, {(0, 1)})  # a split
    opt.step()
    feed(params, 3)  # a join pass: every bucket's join_base set, by group index
    opt.step()
    opt.__dict__.pop("_group_classes", None)
    real = _Bucket.__getstate__
    monkeypatch.setattr(_Bucket, "__getstate__", lambda self: {k: v for k, v in real(self).items() if k not in ("groups", "_runs")})
    blob = pickle.dumps((params, opt))
    monkeypatch.setattr(_Bucket, "__getstate__", real)
    runs = []
    for shared in (False, True):
        monkeypatch.setattr(optimizer_module, "_BUCKETS_ACROSS_GROUPS", shared)
        ps, copy = pickle.loads(blob)
        feed(ps, 4, {(3, 1)})  # group 3 split: its parts' join_base made anew
        copy.step()
        for t in (5, 6):
            feed(ps, t)
            copy.step()
        runs.append([p.detach().clone() for group in ps for p in group])
    for p, q in zip(*runs):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_the_groups_rates_cost_the_write_no_call_of_their_own(monkeypatch):
    """Four layers of four learning rates (weight decay on two of them): a step writes every written block in one
    set of ``foreach`` calls per kind of write (with a decay factor or without), each block with its own group's
    factors, where a set per learning rate made four; the same bits as the blocks written group by group."""
    from kronopt import post as post_module

    calls = []
    real_apply_all = post_module.Post._apply_all_
    monkeypatch.setattr(post_module.Post, "_apply_all_", lambda self, *a: calls.append(len(a[0])) or real_apply_all(self, *a))
    real_plainly = post_module._apply_plainly_
    by_group = lambda work: [real_plainly([w]) for w in work]  # noqa: E731 (a set of calls per group's run, as before)
    together, apart = _layers(), _layers()
    opt, alone = _per_layer("soap", together), _per_layer("soap", apart)
    for step in range(STEPS):
        calls.clear()
        _step_all([opt], together, seed=step)
        if step:  # (soap's first call writes nothing) a layer's five parameters, two layers with a decay, two without
            assert sorted(calls) == [10, 10], calls
        monkeypatch.setattr(post_module, "_apply_plainly_", by_group)
        _step_all([alone], apart, seed=step)
        monkeypatch.setattr(post_module, "_apply_plainly_", real_plainly)
    _assert_same(together, apart, "one write set against one per group", rtol=0, atol=0)
