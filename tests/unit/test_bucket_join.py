"""Split buckets joined again (``KronOptimizer._join``): parts of a bucket that went apart when some blocks had no
gradient step as one bucket again once their counters agree, on a step that split nothing.

Every expected value comes from outside the join: each expert stepped in an optimizer of its own (float64, so the
processor's batched kernels round within 1e-12 of the single ones), or the same optimizer with joining turned off.
"""

import copy
import warnings

import attrs
import pytest
import torch

import kronopt
from kronopt import compose
from kronopt import optimizer as optimizer_module

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
PRESETS = list(kronopt.PRESETS)
E, SHAPE = 6, (6, 4)
#: (step, experts without a gradient): 0 then 1 go apart; both lag one call behind the others, so they join on the
#: next step that splits nothing; 2 and 3 then go apart together (one call behind, like 0 and 1, but the next step
#: splits off 4, so they wait a step), then 4 and last 5 (sitting out alone: nothing splits) fall one call behind
#: too, and every expert is in one bucket again
ABSENT = {2: {0}, 3: {1}, 9: {2, 3}, 10: {4}, 12: {5}}
STEPS = 16
#: the experts' buckets after each step (a set of frozensets), where the schedule decides them
EXPECTED = {
    2: {frozenset({1, 2, 3, 4, 5}), frozenset({0})},
    3: {frozenset({2, 3, 4, 5}), frozenset({0}), frozenset({1})},  # a step that splits joins nothing
    4: {frozenset({2, 3, 4, 5}), frozenset({0, 1})},
    9: {frozenset({0, 1}), frozenset({4, 5}), frozenset({2, 3})},
    10: {frozenset({0, 1}), frozenset({2, 3}), frozenset({4}), frozenset({5})},  # {0, 1} and {2, 3} agree: a split step
    11: {frozenset({0, 1, 2, 3, 4}), frozenset({5})},
    12: {frozenset({0, 1, 2, 3, 4}), frozenset({5})},  # 5 sat out alone: nothing split
    13: {frozenset(range(E))},
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _kw(preset):
    return {} if preset in ("adamw", "muon") else {"refresh.every": 3}


def _grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(SHAPE, generator=gen, dtype=F64) for _ in range(E)]
    rows = [[None if i in ABSENT.get(t, ()) else torch.randn(SHAPE, generator=gen, dtype=F64) for i in range(E)] for t in range(STEPS)]
    return init, rows


def _build(preset, params, groups=None, **kw):
    named = [(f"moe.experts.{i}.weight", p) for i, p in enumerate(params)]
    if groups is None:
        return kronopt.build(named, preset, **_kw(preset), **kw)
    return kronopt.build([{"params": [named[i] for i in g], **opts} for g, opts in groups], preset, **_kw(preset), **kw)


def _feed(params, row):
    for p, g in zip(params, row):
        p.grad = None if g is None else g.clone()


def _step_beside_alone(opt, params, alone, alone_params, row, msg):
    """One step of ``opt`` and of each expert's own optimizer on ``row``; each expert's parameters equal (float64,
    to 1e-12). Returns ``(i, alone optimizer, alone parameter)`` per expert for further checks."""
    _feed(params, row)
    opt.step()
    out = []
    for i, (a, p) in enumerate(zip(alone, alone_params)):
        _feed([p], [row[i]])
        a.step()
        torch.testing.assert_close(params[i], p, rtol=1e-12, atol=1e-14, msg=f"{msg} expert {i}")
        out.append((i, a, p))
    return out


def _step_pair(opt, params, other, other_params, row, msg):
    """One step of two optimizers on copies of the same experts; their parameters equal (float64, to 1e-12)."""
    _feed(params, row)
    _feed(other_params, row)
    opt.step()
    other.step()
    for i in range(E):
        torch.testing.assert_close(params[i], other_params[i], rtol=1e-12, atol=1e-14, msg=f"{msg} expert {i}")


def _structure(opt, params):
    where = {id(p): i for i, p in enumerate(params)}
    return {frozenset(where[id(p)] for p in b.params) for b in opt._buckets}


def _counters(opt, p):
    s = opt.state[p]
    return s.get("calls"), s.get("step"), s.get("basis.refreshes")


@pytest.mark.parametrize("preset", PRESETS)
def test_parts_whose_counters_agree_join_and_step_as_each_expert_alone(preset):
    """Catches: parts joined with other counters (a bias correction or refresh schedule off by a call), the
    joined stacks' rows in another order than the blocks (an expert stepped with another's state), ``state[p]``
    left pointing into a part's old stacks (a stale view that no longer moves), a join on a step that split a
    bucket, a load that loses the joined structure or the steps' bits."""
    init, rows = _grads()
    params = [torch.nn.Parameter(x.clone()) for x in init]
    alone_params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = _build(preset, params)
    alone = [_build(preset, [p]) for p in alone_params]
    saved, parts = None, 1
    for t, row in enumerate(rows):
        for i, a, p in _step_beside_alone(opt, params, alone, alone_params, row, f"{preset} step {t}"):
            assert _counters(opt, params[i]) == _counters(a, p), (preset, t, i)
            for key, value in opt.state[params[i]].items():  # the views are the stacks' rows
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    torch.testing.assert_close(value, a.state[p][key], rtol=1e-10, atol=1e-12, msg=f"{preset} {t} {i} {key}")
        if preset == "adamw":  # a CPU's plain AdamW buckets step block by block anyway: never joined
            assert len(_structure(opt, params)) >= parts, (t, "joined")
            parts = len(_structure(opt, params))
        elif t in EXPECTED:
            assert _structure(opt, params) == EXPECTED[t], (preset, t)
        if t == 5:
            saved = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params], _structure(opt, params)
    end, structure = [p.detach().clone() for p in params], _structure(opt, params)
    if preset != "adamw":
        assert structure == {frozenset(range(E))}, "the parts joined again"

    sd, weights, before = saved
    fresh = [torch.nn.Parameter(w.clone()) for w in weights]
    resumed = _build(preset, fresh)
    resumed.load_state_dict(sd)
    assert _structure(resumed, fresh) == before
    for row in rows[6:]:
        _feed(fresh, row)
        resumed.step()
    assert all(torch.equal(x.detach(), y) for x, y in zip(fresh, end)), preset
    assert _structure(resumed, fresh) == structure


def test_plain_adamw_buckets_join_where_they_step_as_stacks(monkeypatch):
    """Off a CPU (the device path, which the CPU takes with its block-by-block AdamW turned off) the plain AdamW
    buckets (the adamw preset, every preset's fallback) step as stacks and follow the same schedule; against
    ``torch.optim.AdamW``, which keeps a step count per parameter. Catches: a joined plain AdamW bucket whose
    bias correction takes one part's count for all, or a part's moments lost in the join."""
    monkeypatch.setattr(optimizer_module, "_BLOCKWISE_MIN", 10**12)  # AdamW on the stacks, as on a GPU
    init, rows = _grads(1)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    cfg = kronopt.PRESETS["adamw"]
    opt = _build("adamw", params)
    torch_opt = torch.optim.AdamW(
        ref, lr=cfg.lr, betas=cfg.inner.betas, eps=cfg.inner.eps, weight_decay=cfg.weight_decay, foreach=False
    )
    for t, row in enumerate(rows):
        _step_pair(opt, params, torch_opt, ref, row, f"step {t}")
        if t in EXPECTED:
            assert _structure(opt, params) == EXPECTED[t], t


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "muon"])
def test_parts_of_two_groups_of_other_rates_join_each_with_its_rates(preset):
    """Two param groups with other learning rates and weight decays, the same block shape and the same counters:
    their blocks share buckets, and parts of both join again, each expert stepped with its own group's rates.
    Catches: a join keyed by the group (parts of the two groups never joined: each step more buckets), and rates
    taken from the bucket's first group (one group's experts stepped with the other's lr: far beyond 1e-12)."""
    init, rows = _grads(2)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    alone_params = [torch.nn.Parameter(x.clone()) for x in init]
    rates = {0: {"lr": 1e-3, "weight_decay": 0.1}, 1: {"lr": 4e-3, "weight_decay": 0.0}}
    groups = [([0, 2, 4], rates[0]), ([1, 3, 5], rates[1])]
    opt = _build(preset, params, groups)
    alone = [_build(preset, [p], [([0], rates[i % 2])]) for i, p in enumerate(alone_params)]
    assert _structure(opt, params) == {frozenset(range(E))}  # one bucket of both groups
    for t, row in enumerate(rows):
        _step_beside_alone(opt, params, alone, alone_params, row, f"{preset} step {t}")
        if t in EXPECTED:  # parted and joined as one group's experts are
            assert _structure(opt, params) == EXPECTED[t], f"step {t}"


@pytest.mark.parametrize("preset", ["soap", "adamw"])
def test_parts_of_two_groups_of_other_configs_never_join(preset):
    """Two param groups whose configs differ beyond their rates (another ``inner.eps``), the same block shape and
    counters: their blocks never share a bucket. Catches: groups sharing buckets whatever their configs (one
    group's experts stepped with the other's ε)."""
    init, rows = _grads(2)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    alone_params = [torch.nn.Parameter(x.clone()) for x in init]
    opts = {0: {"lr": 1e-3}, 1: {"lr": 1e-3, "inner.eps": 1e-3}}
    groups = [([0, 2, 4], opts[0]), ([1, 3, 5], opts[1])]
    opt = _build(preset, params, groups)
    alone = [_build(preset, [p], [([0], opts[i % 2])]) for i, p in enumerate(alone_params)]
    for t, row in enumerate(rows):
        _step_beside_alone(opt, params, alone, alone_params, row, f"{preset} step {t}")
        assert all(len({i % 2 for i in part}) == 1 for part in _structure(opt, params))


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_parts_of_two_refresh_phases_never_join(preset):
    """Under ``refresh.stagger`` the blocks of one shape refresh in phases (one bucket each); parts of two phases
    with the same counters stay apart. Against the same optimizer with joining turned off, since an expert alone
    would refresh at another phase. Catches: a join keyed without the phase, which moves a block's refreshes to
    the first part's phase (a refresh two steps early or late moves the step far beyond rounding)."""
    init, rows = _grads(3)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    apart_params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = _build(preset, params, **{"refresh.stagger": True})
    apart = _build(preset, apart_params, **{"refresh.stagger": True})
    apart._join = lambda stepped: stepped
    for t, row in enumerate(rows):
        _step_pair(opt, params, apart, apart_params, row, f"{preset} step {t}")
    phase = {id(p): b.layout.phase for b in opt._buckets for p in b.params}
    assert len(set(phase.values())) == 3
    assert len(opt._buckets) < len(apart._buckets), "parts of one phase joined"


def test_cat_states_keeps_each_stack_layout_and_refuses_mixed_layouts():
    """The joined stacks keep the parts' memory layout (a column-major basis stays column-major: reductions round
    by it); parts whose layouts differ are not joined. Catches: a plain ``cat`` that makes a column-major stack
    row-major, or a join of stacks of two layouts."""
    gen = torch.Generator().manual_seed(4)
    cols = [torch.randn(k, 5, 5, generator=gen).mT for k in (2, 3)]  # column-major blocks
    joined = compose.cat_stacks(cols)
    assert joined.shape == (5, 5, 5) and joined[0].stride() == cols[0][0].stride()
    assert torch.equal(joined, torch.cat(cols))
    with pytest.raises(compose._LayoutsDiffer):
        compose.cat_stacks([cols[0], torch.randn(3, 5, 5, generator=gen)])

    @attrs.frozen
    class Inner:
        Q: torch.Tensor
        refreshes: int

    @attrs.frozen
    class Record:
        inner: Inner
        m: torch.Tensor
        v: torch.Tensor | None
        calls: int

    parts = [Record(Inner(q, 3), torch.full((len(q), 2), float(k)), None, 7) for k, q in enumerate(cols)]
    whole = compose.cat_states(parts)
    assert whole.calls == 7 and whole.inner.refreshes == 3 and whole.v is None
    assert torch.equal(whole.inner.Q, torch.cat(cols)) and whole.inner.Q[0].stride() == cols[0][0].stride()
    assert torch.equal(whole.m, torch.cat([p.m for p in parts]))
    mixed = [parts[0], Record(Inner(torch.randn(3, 5, 5, generator=gen), 3), parts[1].m, None, 7)]
    assert compose.cat_states(mixed) is None


def _row_products_round_alike() -> bool:
    """Whether this processor's ``bmm`` rounds a stack of row-vector products ``xᵀ Aᵀ`` (and the products the
    presets below make) block by block as it rounds each block alone: the premise of the test below."""
    gen = torch.Generator().manual_seed(5)
    for m, n in ((24, 24), (40, 12), (16, 24)):
        A, x = torch.randn(3, m, n, generator=gen), torch.randn(3, 1, n, generator=gen)
        if not torch.equal(torch.bmm(x, A.mT), torch.cat([torch.bmm(x[i : i + 1], A[i : i + 1].mT) for i in range(3)])):
            return False
    return True


@pytest.mark.skipif(not _row_products_round_alike(), reason="this processor's bmm rounds a row-vector stack by its size")
@pytest.mark.parametrize(
    "preset, options",
    [(p, {}) for p in ("soap", "dykaf", "dykaf_rank1", "kl_shampoo", "kl_soap", "muon")]
    + [("dykaf", {"factors.init_solver": "power"})],
    ids=["soap", "dykaf", "dykaf_rank1", "kl_shampoo", "kl_soap", "muon", "dykaf-power_start"],
)
@pytest.mark.parametrize("shape", [(24, 24), (40, 12)])
def test_a_bucket_steps_its_blocks_with_the_bits_they_take_alone(preset, options, shape):
    """float32, full-rank gradients (no degenerate eigenspace: docs/architecture.md), three blocks in one bucket
    against each alone, 12 steps with refreshes: every state tensor and parameter the same bits, so a join (or a
    split) changes no bit. Catches: a matrix-vector product made with the vector on the right (``bmm`` of
    ``(b m n) × (b n 1)``), which MKL rounds by the stack's size (KL's row statistic and the rank-one second
    moment did: 1e-7 of their size from the second call, and DyKAF's power-iteration start from the first)."""
    gen = torch.Generator().manual_seed(6)
    A = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for _ in range(3)]
    B = [torch.nn.Parameter(p.detach().clone()) for p in A]
    kw = {"refresh.every": 3, **options}
    one = kronopt.build([(f"e.{i}.weight", p) for i, p in enumerate(A)], preset, **kw)
    alone = [kronopt.build([(f"e.{i}.weight", p)], preset, **kw) for i, p in enumerate(B)]
    for t in range(12):
        grads = [torch.randn(shape, generator=gen) for _ in range(3)]
        _feed(A, grads)
        _feed(B, grads)
        one.step()
        for o in alone:
            o.step()
        for i in range(3):
            assert torch.equal(A[i], B[i]), (preset, t, i)
            for key, value in one.state[A[i]].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, alone[i].state[B[i]][key]), (preset, t, i, key)


def _stacks(opt, params):
    """Each bucket's blocks, as positions in ``params``, in the stack's order; the buckets in the optimizer's order."""
    where = {id(p): i for i, p in enumerate(params)}
    return [tuple(where[id(p)] for p in b.params) for b in opt._buckets]


@pytest.mark.parametrize(
    "blocks, absent, cap",
    [(4, [{0}, {3}, set()], 0.0), (5, [{0, 1}, {1, 2}, {0, 2, 3}, set()], 0.03)],
    ids=["no cap", "cap"],
)
def test_a_resumed_run_joins_its_parts_as_the_uninterrupted_run(blocks, absent, cap):
    """Parts split by missing gradients, saved before they join: the load rebuilds the buckets in their saved order,
    each stacking its blocks as saved, so the join packs (under a cap) and stacks them as the uninterrupted run
    does (docs/architecture.md). Rebuilt in parameter order, the load joined (3, 0) as (0, 3), and under the cap
    packed (0, 1) where the uninterrupted run packed (0, 2)."""
    kw = {"refresh.every": 3, **({"bucket_cap_mib": cap} if cap else {})}
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(16, 16, generator=gen, dtype=F64) for _ in range(blocks)]
    rows = [[None if i in gone else torch.randn(16, 16, generator=gen, dtype=F64) for i in range(blocks)] for gone in absent]

    def run(resume_before):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        opt = kronopt.build(params, "soap", **kw)
        for t, row in enumerate(rows):
            if t == resume_before:
                saved, before = copy.deepcopy(opt.state_dict()), _stacks(opt, params)
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = kronopt.build(params, "soap", **kw)
                opt.load_state_dict(saved)
                assert _stacks(opt, params) == before
            _feed(params, row)
            opt.step()
        return _stacks(opt, params), params

    (joined, a), (resumed, b) = run(None), run(len(rows) - 1)
    assert resumed == joined
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_bucket_joined_across_the_caps_cuts_is_rebuilt_as_saved():
    """Under a cap of two blocks, ``[a], [b, c]`` split by ``b``'s missing gradient join as ``[a, c], [b]``: a
    bucket across two of the cap's first cuts. The load cut the saved buckets out of the first cuts, so it came back
    as ``[a], [c], [b]`` (``state_dict()`` after the load then listed other buckets than the dict loaded, and a step
    that split some bucket stepped ``a`` and ``c`` in stacks of one where the uninterrupted run stacked them)."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 12, generator=gen, dtype=F64) for _ in range(3)] + [torch.randn(4, 8, generator=gen, dtype=F64) for _ in range(2)]
    absent = [set(), {1}, set(), {3}, set()]
    rows = [[None if i in gone else torch.randn(x.shape, generator=gen, dtype=F64) for i, x in enumerate(start)] for gone in absent]
    probe = kronopt.build([torch.nn.Parameter(start[0].clone())], "soap")
    bucket = probe._buckets[0]
    block = optimizer_module._block_state_bytes(probe._group_cfgs[0], bucket.layout, bucket.state_dtype)
    kw = {"refresh.every": 3, "bucket_cap_mib": 2.5 * block / 2**20}

    def run(resume_before):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        opt = kronopt.build(params, "soap", **kw)
        for t, row in enumerate(rows):
            if t == resume_before:
                assert _stacks(opt, params)[:2] == [(0, 2), (1,)]  # the join across the cuts (0,), (1, 2)
                saved, before = copy.deepcopy(opt.state_dict()), _stacks(opt, params)
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = kronopt.build(params, "soap", **kw)
                opt.load_state_dict(saved)
                assert _stacks(opt, params) == before
                again = opt.state_dict()
                assert {k: e["bucket"] for k, e in again["state"].items()} == {k: e["bucket"] for k, e in saved["state"].items()}
            _feed(params, row)
            opt.step()
            if t == resume_before:  # a step that split another bucket (3's): (0, 2) stays one stack
                assert _stacks(opt, params)[:2] == [(0, 2), (1,)]
        return _stacks(opt, params), params

    (joined, a), (resumed, b) = run(None), run(3)
    assert resumed == joined
    assert all(torch.equal(x, y) for x, y in zip(a, b))
