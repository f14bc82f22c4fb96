"""What a step and the inspection helpers cost under the options a user picks, counted against the batched case.

docs/architecture.md and DESIGN.md ("Scale") promise one batched call per stage and bucket and no host
synchronisation in the hot path. ``test_batching_audit.py`` counts that for the presets and its own list of
options; this file takes what it leaves out, by the same counters (operators in a ``TorchDispatchMode``, host
reads on the device-agnostic path), never by time:

* **More options.** ``[storage]`` per kind, the eigenvalue rule's ε placements, DyKAF's starts, Muon's
  schedules, SGD, KL-SOAP, the low-rank presets in bfloat16, ``shapes.*`` on vectors and 4-D weights,
  ``route.vectors``, ``compile``: nothing may grow with the number of same-shape blocks, and no host read.
* **compile = true.** One call of each compiled twin per bucket and step whatever the bucket's size, and no
  graph compiled after the first steps (stagger and grafting on: they add buckets and a twin).
* **Nothing grows with steps.** Over 200 steps (a learning rate that changes every step, NaN gradients under
  ``"warn"``, parameters without gradients, stagger with bfloat16 storage), every container the optimizer
  reaches and every tensor it holds has the same size at step 200 as at step 20; module caches stay bounded.
* **The inspection helpers.** ``state_bytes()`` allocates nothing; ``state_dict()`` one copy of the state (its
  tensors are documented as cloned); ``inspect()``: "detached copies of one block" (kronopt/inspection.py),
  each stored block copied once (it was copied twice, for the side views and for the records: fixed).
"""

import collections
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kronopt
from kronopt import compiled, linalg, post

from .test_batching_audit import PER_GRADIENT, _growth, _host_reads, _is_view, _op_counts, _refreshing

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:the route sends")]

_BF16 = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}

#: options that test_batching_audit.OPTION_CASES does not take, with their block shape
MORE_OPTIONS = [
    ("soap", {"storage.factors": "bfloat16"}, (6, 4)),
    ("soap", {"storage.basis": "bfloat16"}, (6, 4)),
    ("soap", {"storage.moments": "bfloat16", "post.grafting": "adam", "post.graft_betas": [0.9, 0.99]}, (6, 4)),
    ("kl_soap", _BF16, (6, 4)),
    ("pro_soap", _BF16, (6, 4)),
    ("pro_dykaf", _BF16, (6, 4)),
    ("shampoo", {"inner.eps_placement": "outside", "inner.momentum_basis": "eigen"}, (6, 4)),
    ("shampoo", {"inner.eps_placement": "product", "inner.bias_correction": False}, (6, 4)),
    ("kl_shampoo", {"basis.sort": False, "factors.clamping": False}, (6, 4)),
    ("pro_kl_shampoo", {"split.rank": 2, "split.complement_scale": "identity", "split.ns_dtype": "float32"}, (6, 4)),
    ("dykaf", {"factors.init": "kron_reference"}, (6, 4)),
    ("dykaf", {"factors.init": "sum", "storage.factors": "bfloat16"}, (6, 4)),
    ("muon", {"inner.coefficients": "cans", "inner.ns_dtype": "float64", "inner.scale": "spectral", "storage.moments": "bfloat16"}, (6, 4)),
    ("muon", {"route.vectors": "pipeline"}, (12,)),
    ("adamw", {"inner.type": "sgd", "inner.momentum": 0.9, "inner.nesterov": True}, (6, 4)),
    ("soap", {"shapes.precondition_1d": True, **_BF16}, (12,)),
    ("kl_shampoo", {"shapes.precondition_1d": True, "route.vectors": "pipeline"}, (12,)),
    ("soap", {"shapes.merge_dims": True, "shapes.max_dim": 8}, (4, 3, 2, 2)),
]


@pytest.mark.parametrize(("preset", "options", "shape"), MORE_OPTIONS, ids=[f"{p}-{'-'.join(o)}" for p, o, _ in MORE_OPTIONS])
def test_operator_calls_do_not_grow_with_blocks_under_more_options(preset, options, shape):
    """1 and 8 blocks of one shape on the device-agnostic path, plain steps and refreshes: the same operators but
    for the per-gradient reads the docs name. Would catch: a narrowed stack rounded block by block, a start or an
    ε placement computed per block, a vector's rotated side or a merged 4-D weight stepped in a loop."""
    overrides = _refreshing(preset, **options)
    _op_counts(preset, 8, overrides, device_agnostic=True, steps=3, shape=shape)  # the process's constants made first
    runs = {k: _op_counts(preset, k, overrides, device_agnostic=True, steps=5, shape=shape) for k in (1, 8)}
    assert _growth(runs, PER_GRADIENT) == []
    # the pipeline ran (a matrix preset multiplies every step after its first), not an empty step
    if preset != "adamw":
        assert all(c["bmm.default"] + c["baddbmm.default"] + c["mm.default"] for c in runs[8][1:])


def test_a_merged_block_of_one_column_batches_past_the_size_thresholds():
    """``shapes.merge_dims`` at the default ``max_dim`` turns a ``(4, 3, 2, 2)`` weight into one ``(48, 1)`` block.
    The finiteness test of a stack switches form at a size (``linalg._FINITE_AT_ONCE_MAX`` entries in all: side
    by side and one ``amax`` below it, weighted row sums above), which 1, 2 and 8 such blocks straddle: a constant
    switch, not a loop. Past it, 8 and 24 blocks differ only by the per-gradient reads."""
    overrides = _refreshing("soap", **{"shapes.merge_dims": True})
    _op_counts("soap", 8, overrides, device_agnostic=True, steps=3, shape=(4, 3, 2, 2))  # the process's constants
    runs = {k: _op_counts("soap", k, overrides, device_agnostic=True, steps=5, shape=(4, 3, 2, 2)) for k in (8, 24)}
    assert _growth(runs, PER_GRADIENT) == []


HOST_OPTIONS = [
    ("soap", {"storage.basis": "bfloat16", "post.grafting": "adam", "refresh.at_first_call": False, "refresh.offset": 1}),
    ("shampoo", {"inner.eps_placement": "product", "inner.momentum_basis": "eigen"}),
    ("kl_soap", _BF16),
    ("pro_soap", {"refresh.stagger": True, **_BF16}),
    ("dykaf", {"factors.init": "kron_reference", "factors.beta": "beta2"}),
    ("dykaf_rank1", {"inner.bias_correction": False, "storage.moments": "bfloat16"}),
    ("muon", {"route.vectors": "pipeline", "shapes.precondition_1d": True, "inner.coefficients": "custom",
              "inner.custom_coefficients": [[3.4445, -4.775, 2.0315]], "inner.custom_beyond": "cycle"}),
    ("muon", {"fallback.storage.moments": "bfloat16", "fallback.inner.type": "sgd", "fallback.inner.momentum": 0.9}),
    ("adamw", {"inner.type": "sgd", "inner.momentum": 0.9, "inner.nesterov": True, "matmul_precision": "inherit"}),
    ("kl_shampoo", {"refresh.stagger": True, "distributed.shard_work": False, "basis.type": "eigh"}),
]


@pytest.mark.parametrize(("preset", "options"), HOST_OPTIONS, ids=[f"{p}-{'-'.join(o)}" for p, o in HOST_OPTIONS])
def test_no_host_read_on_the_device_path_with_more_options(preset, options):
    """Six steps of six shapes (refreshes every 2, a NaN gradient at step 3, reports in flight) read nothing on the
    host but a bucket's first-call write mask. Would catch: ``bool()`` of a tensor in an option's branch, a
    boolean-mask index, a tensor made from a Python list in a step."""
    assert _host_reads(preset, _refreshing(preset, nonfinite="skip") | options) == []


# -- compile = true ----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _twin_calls_and_graphs(preset: str, k: int, overrides: dict, steps: int) -> tuple[list[dict], list[int]]:
    """Per step, the calls of each compiled twin (by name) and dynamo's count of graphs compiled so far."""
    from torch._dynamo.utils import counters

    calls: collections.Counter[str] = collections.Counter()
    real = compiled.Compiled.__call__

    def spy(self, *args, **kwargs):
        calls[self.name] += 1
        return real(self, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)) for _ in range(k)]
    per_step, graphs = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled.Compiled, "__call__", spy)
        opt = kronopt.build(params, preset, compile=True, **overrides)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(6, 4, generator=gen)
            calls.clear()
            opt.step()
            per_step.append(dict(calls))
            graphs.append(counters["stats"]["unique_graphs"])
    return per_step, graphs


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("soap", {"refresh.every": 2, "refresh.stagger": True, "post.grafting": "adam"}), ("muon", {})],
    ids=["soap-stagger-grafting", "muon"],
)
def test_compiled_twins_run_once_a_bucket_and_nothing_recompiles(preset, overrides, fresh_dynamo):
    """``compile = true`` (docs/configs.md: "the step count and ``lr`` enter as 0-d tensors, so neither a new step
    nor a scheduler recompiles"): 2 and 6 blocks over 2 stagger phases (2 buckets either way) call each twin as
    often, step by step; after the first steps no graph is added. Would catch: a twin called per block, or a
    graph guarded on the step count, the phase's schedule or the graft's bias correction."""
    small, graphs_small = _twin_calls_and_graphs(preset, 2, overrides, steps=4)
    large, graphs_large = _twin_calls_and_graphs(preset, 6, overrides, steps=10)
    assert small[1:] == large[1:4]
    assert all(large[1:]) and large[2:] == [large[2]] * len(large[2:])
    assert graphs_large[2:] == [graphs_large[2]] * len(graphs_large[2:]), graphs_large


# -- nothing grows with steps ------------------------------------------------------------------------------


def _containers(root) -> tuple[dict[str, int], int, int]:
    """Every container reachable from ``root`` (attributes, slots, dict values, items; not through tensors,
    classes, modules or functions) by path, with its length summed over the path (keys that are ``id``s are
    one path), and the count and bytes of the distinct tensor storages reached."""
    seen: set[int] = set()
    sizes: dict[str, int] = {}
    storages: dict[int, int] = {}
    stack = [(root, "opt")]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr() or id(storage)] = storage.nbytes()
            continue
        atoms = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, type, type(sys))
        if isinstance(obj, atoms) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        if isinstance(obj, (dict, list, tuple, set, frozenset, collections.deque)):
            sizes[path] = sizes.get(path, 0) + len(obj)
        if isinstance(obj, dict):
            for key, value in obj.items():
                name = key if isinstance(key, (str, int)) else type(key).__name__
                name = "#" if isinstance(name, int) and abs(name) > 10**6 else name  # an id() key
                stack.append((value, f"{path}[{name!r}]"))
                if not isinstance(key, (str, int, torch.Tensor)):
                    stack.append((key, f"{path}.key"))
        elif isinstance(obj, (list, tuple, collections.deque, set, frozenset)):
            stack.extend((value, f"{path}[]") for value in obj)
        elif callable(obj) and not isinstance(obj, torch.nn.Module):
            continue
        else:
            if hasattr(obj, "__dict__"):
                stack.append((vars(obj), f"{path}.__dict__"))
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        stack.append((getattr(obj, slot), f"{path}.{slot}"))
    return sizes, len(storages), sum(storages.values())


def _schedule(step, opt, params):
    for group in opt.param_groups:  # a new learning rate every step (cosine-like, never repeating within 97)
        group["lr"] = 1e-3 * (1 + step % 97) / 97


def _nan_every_seventh(step, opt, params):
    if step % 7 == 0:
        params[0].grad[0, 0] = float("nan")


def _one_without_gradient(step, opt, params):
    if step % 5 == 0:
        params[step % 3].grad = None


GROWTH_CASES = [
    ("soap", {"refresh.every": 3}, _schedule),
    ("adamw", {}, _schedule),
    ("soap", {"refresh.every": 3, "nonfinite": "warn", "max_skipped_steps": 50}, _nan_every_seventh),
    ("kl_shampoo", {"refresh.every": 3, "nonfinite": "warn", "nonfinite_scope": "block"}, _nan_every_seventh),
    ("muon", {}, _one_without_gradient),
    ("pro_kl_shampoo", {"refresh.every": 3, "refresh.stagger": True, **_BF16}, None),
]


_GROWTH_IDS = [f"{p}-{getattr(e, '__name__', 'plain')}" for p, _, e in GROWTH_CASES]


@pytest.mark.parametrize(("preset", "overrides", "event"), GROWTH_CASES, ids=_GROWTH_IDS)
def test_nothing_the_optimizer_holds_grows_from_step_20_to_step_200(preset, overrides, event):
    """Containers by path (lists, dicts, sets the optimizer reaches: its caches, pending reports, views, buckets),
    tensors held (count and bytes) and the module caches (``post._FACTORS``: bounded at 64) at step 20 and step
    200 of a run whose learning rate, finiteness or gradients change. A correct optimizer holds its state and
    bounded caches, so step 200 equals step 20. Would catch: a report, verdict or factor cache appended to every
    step and never drained, a split that keeps splitting."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6, 4), (6, 4), (8, 5), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = kronopt.build(params, preset, **overrides)
    snapshots = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 201):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 0.1
            if event is not None:
                event(step, opt, params)
            opt.step()
            if step in (20, 200):
                snapshots[step] = _containers(opt)
                assert len(post._FACTORS) <= 64
                assert len(linalg._FINITE_WEIGHTS) <= 64
    (sizes_20, count_20, bytes_20), (sizes_200, count_200, bytes_200) = snapshots[20], snapshots[200]
    grown = {path: (sizes_20.get(path), n) for path, n in sizes_200.items() if n != sizes_20.get(path)}
    assert grown == {}
    assert (count_200, bytes_200) == (count_20, bytes_20)
    assert all(torch.isfinite(p).all() for p in params)


# -- the inspection helpers --------------------------------------------------------------------------------


class _Allocated(TorchDispatchMode):
    """Bytes of every new tensor storage (not a view, not written in place or ``out=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (_is_view(func) or func._schema.is_mutable):
            self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _trained(preset: str, **overrides) -> kronopt.KronOptimizer:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 24, generator=gen)) for _ in range(3)]
    opt = kronopt.build(params, preset, **_refreshing(preset, **overrides))
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def _allocated(fn) -> int:
    with _Allocated() as seen:
        fn()
    return seen.bytes


@pytest.mark.parametrize(("preset", "overrides"), [("soap", {}), ("soap", _BF16), ("pro_kl_shampoo", {}), ("muon", {})])
def test_state_bytes_allocates_nothing_and_state_dict_copies_the_state_once(preset, overrides):
    """``state_bytes()`` counts the stacks (no tensor made); ``state_dict()`` clones each parameter's entry
    (docs/architecture.md, "Persistence": "a copy of ``state[p]``, tensors cloned"): exactly the stored bytes,
    bfloat16 stacks as stored, each saved tensor holding its block alone (a view would save its whole stack).
    Would catch: a state dict that upcasts, copies a stack per block or twice, or saves views of the stacks."""
    opt = _trained(preset, **overrides)
    stored = opt.state_bytes()
    assert stored > 0
    assert _allocated(opt.state_bytes) == 0
    saved: dict = {}
    spent = _allocated(lambda: saved.update(opt.state_dict()))
    # beside the stacks: each parameter's 0-d count of skipped gradients and the skipped-steps counter, cloned too
    counters = sum(e["nonfinite"].element_size() for e in saved["state"].values()) + saved["kronopt"]["skipped_steps"].element_size()
    assert spent == stored + counters
    tensors = [v for e in saved["state"].values() for k, v in e.items() if isinstance(v, torch.Tensor) and k != "nonfinite"]
    assert sum(t.untyped_storage().nbytes() for t in tensors) == stored  # each saved tensor its own block, no stack


@pytest.mark.parametrize(("preset", "overrides"), [("soap", {}), ("soap", _BF16), ("adamw", {})])
def test_inspect_copies_each_stored_block_once(preset, overrides):
    """Every tensor of a soap or adamw ``ParamView`` is block ``i`` of a stored stack (factors ``L``/``R``, bases
    ``Q``, eigenvalue estimates ``lam``, Adam's moments: ``records`` holds all of them, the sides and
    ``second_moment`` repeat some): a copy of each stored block, once, is ``state_bytes()`` bytes. The views
    must still hold the stored values (checked against ``state[p]``)."""
    opt = _trained(preset, **overrides)
    stored = opt.state_bytes()
    views: dict = {}
    spent = _allocated(lambda: views.update(opt.inspect()))
    # the views are the stored blocks (what a fix must keep)
    p = opt.param_groups[0]["params"][0]
    view = next(v for name, v in views.items() if name.startswith("param_groups[0].params[0] "))
    for key, value in opt.state[p].items():
        slot, _, field = key.partition(".")
        if isinstance(value, torch.Tensor) and field in view.records.get(slot, {}):
            assert torch.equal(view.records[slot][field], value)
    if "basis.Q_L" in opt.state[p]:
        assert torch.equal(view.left.basis, opt.state[p]["basis.Q_L"])
    if view.second_moment is not None:
        assert torch.equal(view.second_moment, opt.state[p]["inner.exp_avg_sq"])
    assert spent <= stored
