"""The small preconditioned buckets of a CPU stepped together (``KronOptimizer._step_small_buckets``) against
each bucket stepped in its turn (``_step_bucket``), bit for bit.

The turn-by-turn form is forced by setting ``_SMALL_TOGETHER_MAX`` to 0; both optimizers see the same
gradients: a NaN block, an infinite single block, a finite block whose statistics overflow float32, a
parameter without a gradient every other step, and two parameter groups of their own learning rate and
weight decay.
"""

import math
import warnings

import attrs
import pytest
import torch

import kronopt
from kronopt import compose, linalg
from kronopt import optimizer as optimizer_module
from kronopt import post as post_module

# two three-block buckets (one per group), one-block buckets, a tall and a wide shape, a bias, a float64 block
# beside a float32 one of the same group and learning rate, and a group of the default learning rate with its
# own weight decay
SHAPES = [(6, 5), (6, 5), (6, 5), (7, 3), (3, 9), (6, 5), (6, 5), (6, 5), (9,), (5, 4), (5, 4), (4, 7)]
GROUP_OF = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 2, 2]
DTYPE_OF = [torch.float32] * 9 + [torch.float64, torch.float32, torch.float32]


def _grads(step, gen):
    grads = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(SHAPES, DTYPE_OF)]
    if step == 3:
        grads[1][2, 3] = math.nan  # one block of a three-block bucket
    if step == 4:
        grads[3][0, 0] = math.inf  # a one-block bucket
        grads[6][1, 1] = -math.inf
    if step == 6:  # finite, but their squares overflow float32 in the factors and moments: three buckets at once,
        grads[3][0, 0] = 1e22  # none of them the first one stepped
        grads[5][2, 2] = 1e30
        grads[11][1, 1] = 1e22
    if step == 8:
        grads[2][4, 4] = 1e22  # the first bucket stepped
    return grads


def _run(monkeypatch, preset, *, together, scope="block", nonfinite="skip", calls=None, overrides=None, grads=_grads):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=d)) for s, d in zip(SHAPES, DTYPE_OF)]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    with monkeypatch.context() as patch:
        if not together:
            patch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
        if calls is not None:
            real = optimizer_module.KronOptimizer._step_small_buckets

            def counted(self, work, step_ok):
                calls.append(len(work))
                return real(self, work, step_ok)

            patch.setattr(optimizer_module.KronOptimizer, "_step_small_buckets", counted)
        groups = [
            {"params": [p for p, g in zip(named, GROUP_OF) if g == 0]},
            {"params": [p for p, g in zip(named, GROUP_OF) if g == 1], "lr": 0.02, "weight_decay": 0.3},
            {"params": [p for p, g in zip(named, GROUP_OF) if g == 2], "weight_decay": 0.5},
        ]
        opt = kronopt.build(groups, preset, nonfinite=nonfinite, nonfinite_scope=scope, **(overrides or {}))
        gen = torch.Generator().manual_seed(2)
        seen = []
        for step in range(14):  # past a refresh (every 10) and the first call
            for i, (p, g) in enumerate(zip(params, grads(step, gen))):
                p.grad = None if (i == 4 and step % 2) else g  # p4 skips odd steps: a bucket split in turn
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            seen.extend(str(w.message) for w in caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.flush_warnings()  # reports of the last step
        seen.extend(str(w.message) for w in caught)
    state = {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
    }
    return [p.detach().clone() for p in params], state, opt.nonfinite_counts(), seen


def _same(fast, slow):
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
    assert fast[1].keys() == slow[1].keys()
    for i in fast[1]:
        assert fast[1][i].keys() == slow[1][i].keys(), i
        for key, value in fast[1][i].items():
            other = slow[1][i][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (i, key)
                if value.is_floating_point():
                    assert torch.isfinite(value).all(), (i, key)
            else:
                assert value == other, (i, key)
    assert fast[2] == slow[2]
    assert fast[3] == slow[3]  # the same warnings, in the same order


@pytest.mark.parametrize("preset", ["soap", "dykaf", "kl_shampoo", "shampoo", "muon", "pro_soap"])
@pytest.mark.parametrize(("scope", "nonfinite"), [("block", "skip"), ("step", "skip"), ("block", "warn"), ("step", "warn")])
def test_together_matches_each_in_turn_bit_for_bit(monkeypatch, preset, scope, nonfinite):
    calls = []
    fast = _run(monkeypatch, preset, together=True, scope=scope, nonfinite=nonfinite, calls=calls)
    slow = _run(monkeypatch, preset, together=False, scope=scope, nonfinite=nonfinite)
    assert calls and max(calls) >= 4  # the buckets of a step went through the together path
    _same(fast, slow)
    counts = fast[2]
    if scope == "block":  # p1: NaN; p3, p6: inf; overflows at steps 6 and 8 (in preset-dependent ways)
        assert counts["p1"] == 1 and counts["p3"] >= 1 and counts["p6"] == 1 and counts["p0"] == 0
    if nonfinite == "warn":  # each report names the blocks skipped for their own values, never p0
        assert any(" in: p1; " in w for w in fast[3]) and not any("p0" in w for w in fast[3])


def _zero_rows(step, gen):
    """Gradients whose first rows are zero: zero eigenvalues, so with ε = 0 a direction of 0/0 in those rows."""
    grads = _grads(step, gen)
    for g in grads:
        if g.ndim == 2:
            g[: g.shape[0] // 2] = 0
    return grads


@pytest.mark.parametrize("preset", ["kl_shampoo", "shampoo"])
def test_a_non_finite_direction_with_a_finite_state_is_caught_together_as_in_turn(monkeypatch, preset):
    """The direction is among the tensors tested: with ``inner.eps = 0`` and zero rows it holds NaN while the
    state stays finite, and no parameter may take it."""
    overrides = {"inner.eps": 0.0}
    fast = _run(monkeypatch, preset, together=True, overrides=overrides, grads=_zero_rows)
    slow = _run(monkeypatch, preset, together=False, overrides=overrides, grads=_zero_rows)
    _same(fast, slow)
    assert sum(fast[2].values()) > 0  # some blocks were skipped for their direction


def test_a_bucket_whose_new_state_overflows_keeps_its_old_state_and_the_others_step(monkeypatch):
    """The one-read test finds the bucket with a non-finite tensor; only that bucket is then judged block by
    block: its other blocks still step, the block that overflowed keeps its weights and state exactly."""
    params = [torch.nn.Parameter(torch.randn(4, 6)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(5, 3))]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "soap")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad[0, 0] = 1e30  # finite; its square overflows float32
    opt.step()
    w, st = before[1]
    assert torch.equal(params[1], w)
    for k, v in st.items():
        if k not in ("step", "calls", "nonfinite"):
            assert torch.equal(opt.state[params[1]][k], v), k
    for i in (0, 2, 3):
        assert not torch.equal(params[i], before[i][0])
    assert opt.nonfinite_counts() == {"p0": 0, "p1": 1, "p2": 0, "p3": 0}


@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_non_finite_gradient_outside_the_small_buckets(monkeypatch, scope):
    """The small buckets' shortcut for a step with every verdict True reads the step's own flag: under
    ``nonfinite_scope = "step"`` a NaN in a large bucket's gradient (stepped in its own turn) keeps every small
    bucket's weights and state too, with nothing counted against them; under ``"block"`` they step, with
    nothing counted either. A shortcut that read only the small buckets' own flags fails the first."""
    params = {"big": torch.nn.Parameter(torch.randn(130, 130))}  # past 1 << 14 entries: its own turn
    params |= {f"s{i}": torch.nn.Parameter(torch.randn(4 + i, 6)) for i in range(3)}
    opt = kronopt.build(list(params.items()), "soap", nonfinite="warn", nonfinite_scope=scope)
    taken = []
    real = optimizer_module.KronOptimizer._step_small_buckets
    monkeypatch.setattr(optimizer_module.KronOptimizer, "_step_small_buckets", lambda self, work, step_ok: (
        taken.extend(b.layout.m for b, _ in work), real(self, work, step_ok))[1])
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn(p.shape)
        opt.step()
    assert sorted(set(taken)) == [4, 5, 6]
    small = [p for name, p in params.items() if name != "big"]
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}) for p in small]
    for p in params.values():
        p.grad = torch.randn(p.shape)
    params["big"].grad[3, 4] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.flush_warnings()
    for p, (w, state) in zip(small, before):
        assert torch.equal(p, w) == (scope == "step")
        assert torch.equal(opt.state[p]["inner.exp_avg"], state["inner.exp_avg"]) == (scope == "step")
        if scope == "step":
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items() if k not in ("step", "calls", "nonfinite"))
    assert opt.nonfinite_counts() == {"big": 1, "s0": 0, "s1": 0, "s2": 0}
    assert [str(w.message).split(" in: ")[1].split(";")[0] for w in caught] == ["big"]


@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_run_is_clean_exactly_when_every_verdict_is_true(monkeypatch, scope):
    """``_finish(clean=True)`` skips what all-True masks come to, so it must see only such masks: on the
    steps with a NaN, an infinity or an overflow (``_grads``) no run is clean, on the others every one is
    (every bucket of this set goes through the small buckets' path)."""
    seen = []
    real = optimizer_module.KronOptimizer._finish

    def spy(self, judged, step_ok, *, clean=False):
        flags = [bool(ok.all()) for _, ok in judged] + ([] if step_ok is None else [bool(step_ok)])
        seen.append((clean, all(flags)))
        return real(self, judged, step_ok, clean=clean)

    monkeypatch.setattr(optimizer_module.KronOptimizer, "_finish", spy)
    _run(monkeypatch, "soap", together=True, scope=scope)
    assert any(clean for clean, _ in seen) and not all(clean for clean, _ in seen)
    assert all(clean == every for clean, every in seen)


def test_large_and_compiled_buckets_keep_their_own_turn(monkeypatch):
    """Blocks past the entry or side bound, and a group with ``compile = true``, are not taken."""
    params = {
        "small": torch.nn.Parameter(torch.randn(8, 8)),
        "wide": torch.nn.Parameter(torch.randn(2, 600)),  # 1200 entries, a side past 512
        "big": torch.nn.Parameter(torch.randn(130, 130)),  # 16900 entries, past 1 << 14
    }
    opt = kronopt.build(list(params.items()), "soap")
    taken = []
    real = optimizer_module.KronOptimizer._step_small_buckets

    def spy(self, work, step_ok):
        taken.extend(b.layout for b, _ in work)
        return real(self, work, step_ok)

    monkeypatch.setattr(optimizer_module.KronOptimizer, "_step_small_buckets", spy)
    for p in params.values():
        p.grad = torch.randn(p.shape)
    opt.step()
    assert [(lay.m, lay.n) for lay in taken] == [(8, 8)]
    small = next(b for b in opt._buckets if (b.layout.m, b.layout.n) == (8, 8))
    assert opt._small_cpu(small) is not None
    monkeypatch.setattr(opt, "_group_cfgs", [attrs.evolve(c, compile=True) for c in opt._group_cfgs])
    assert opt._small_cpu(small) is None  # compiled twins run in the bucket's own turn, inside its scope


def test_finite_each_against_isfinite_on_the_mixed_tensors_of_a_step():
    """The test of the changed tensors (``linalg.finite_each``, read once on the host) over mixed dtypes,
    an empty tensor and values at float32's edge."""
    tensors = [
        torch.randn(3, 4),
        torch.tensor([1.0, math.nan]),
        torch.tensor([[-math.inf, 0.0]], dtype=torch.float64),
        torch.empty(0, 3),
        torch.randn(2, 2, dtype=torch.float64),
        torch.tensor([math.inf], dtype=torch.bfloat16),
        torch.tensor([3.0e38, -3.0e38]),  # finite at the edge of float32
    ]
    expected = [bool(torch.isfinite(t).all()) for t in tensors]
    assert linalg.finite_each(tensors).tolist() == expected == [True, False, False, True, True, False, True]


def test_write_leaves_plain_copies_to_the_caller():
    """With ``copies`` and every block ok on a CPU, ``write_`` appends its ``(stack, new)`` pairs and writes
    nothing; the caller's copy then gives what the write itself gives."""
    params = [torch.nn.Parameter(torch.randn(4, 6)) for _ in range(2)]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "soap")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    bucket = opt._buckets[0]
    stacks = bucket.state
    G = torch.randn(2, 4, 6)
    D, new = compose.step(opt._bucket_config(bucket), bucket.layout, stacks, G)
    kept_values = [t.clone() for t, _ in compose._tensor_pairs(stacks, stacks)]
    copies = []
    ok = torch.ones(2, dtype=torch.bool)
    compose.write_(stacks, new, ok, copies=copies)
    assert copies and all(o is not n for o, n in copies)
    for t, before in zip((t for t, _ in compose._tensor_pairs(stacks, stacks)), kept_values):
        assert torch.equal(t, before)  # nothing written yet
    torch._foreach_copy_([o for o, _ in copies], [n for _, n in copies])
    for o, n in copies:
        assert torch.equal(o, n)


def test_apply_together_equals_apply_in_turn():
    """Two lr/decay settings, both decay orders, and a bucket with a skipped block (taken in turn)."""

    def setup():
        g = torch.Generator().manual_seed(5)
        params = [[torch.randn(3, 4, generator=g) for _ in range(2)] for _ in range(4)]
        D = [torch.randn(2, 3, 4, generator=g) for _ in range(4)]
        return params, D

    posts = [post_module.Post(), post_module.Post(weight_decay_order="after"), post_module.Post(), post_module.Post()]
    settings = [(0.1, 0.01), (0.1, 0.01), (0.05, 0.0), (0.1, 0.01)]
    oks = [torch.tensor([True, True])] * 3 + [torch.tensor([True, False])]
    p1, D1 = setup()
    post_module.apply_together_([(po, ps, d, lr, wd, ok) for po, ps, d, (lr, wd), ok in zip(posts, p1, D1, settings, oks)])
    p2, D2 = setup()
    for po, ps, d, (lr, wd), ok in zip(posts, p2, D2, settings, oks):
        po.apply_(ps, d, lr=lr, weight_decay=wd, ok=ok)
    for a, b in zip(p1, p2):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_small_buckets_go_in_runs_within_the_budget(monkeypatch):
    """Runs in order, each within the budget of ``m n + m² + n²`` entries per block; a bucket past it alone."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 4), (4, 4), (5, 3), (6, 6), (2, 7)]]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "soap")
    work = [(b, opt._bucket_config(b)) for b in opt._buckets]
    size = {id(b): b.layout.batch * (b.layout.m * b.layout.n + b.layout.m**2 + b.layout.n**2) for b, _ in work}
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_BUDGET", 100)
    runs = optimizer_module._within_budget(work)
    assert [b for run in runs for b, _ in run] == [b for b, _ in work]
    for run in runs:
        total = sum(size[id(b)] for b, _ in run)
        assert total <= 100 or len(run) == 1
    assert len(runs) > 1
    monkeypatch.setattr(optimizer_module, "_SMALL_TOGETHER_BUDGET", 1 << 22)
    assert len(optimizer_module._within_budget(work)) == 1


def test_the_together_path_runs_no_compiled_twin_inside_an_active_scope(monkeypatch):
    """As each bucket's own turn runs in its group's scope (off without ``compile``), the small buckets run
    with the twins off even when ``step()`` is called inside an active scope."""
    from kronopt import compiled

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 6), (5, 3)]]
    opt = kronopt.build([(f"p{i}", p) for i, p in enumerate(params)], "muon")
    seen = []
    real = compose.step

    def spy(*a, **k):
        seen.append(compiled._ACTIVE.get())
        return real(*a, **k)

    monkeypatch.setattr(compose, "step", spy)
    for p in params:
        p.grad = torch.randn(p.shape)
    with compiled.scope(True):
        opt.step()
    assert seen == [False, False]


def _aliased_run(monkeypatch, preset, *, together, same_bucket):
    """Two parameters whose second's gradient is the first's weight (``same_bucket``: two 6 × 5 in one bucket;
    else a 6 × 5 and a 5 × 6 whose gradient is the first's transposed view): three steps, the second's weight."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    b = torch.nn.Parameter(torch.randn(6, 5, generator=gen) if same_bucket else torch.randn(5, 6, generator=gen))
    with monkeypatch.context() as patch:
        if not together:  # every bucket in its turn on the stacks: no block-by-block AdamW, no small buckets together
            patch.setattr(optimizer_module, "_SMALL_TOGETHER_MAX", 0)
            patch.setattr(optimizer_module, "_BLOCKWISE_MIN", 1 << 30)
        opt = kronopt.build([("a", a), ("b", b)], preset, **({"refresh.every": 2} if preset not in ("adamw", "muon") else {}))
        for _ in range(3):
            a.grad = torch.randn(6, 5, generator=gen)
            b.grad = a.detach() if same_bucket else a.detach().t()
            opt.step()
    return b.detach().clone()


@pytest.mark.parametrize(
    "preset, same_bucket",
    # a preconditioned bucket reads its stack's gradients before any write on every path: one bucket is AdamW's case
    [(p, False) for p in ("adamw", "soap", "muon", "shampoo", "kl_shampoo")] + [("adamw", True)],
    ids=lambda v: {False: "another bucket", True: "one bucket"}.get(v, v) if isinstance(v, bool) else v,
)
def test_a_gradient_in_another_parameters_memory_steps_as_each_bucket_in_turn(monkeypatch, preset, same_bucket):
    """A gradient that is a view of a parameter stepped with it: each bucket in its turn writes its weights before
    the next reads its gradients (and a bucket reads all of its gradients before its write). The ways that step
    buckets together read every gradient first, and block-by-block AdamW wrote one block before reading the
    next's gradient: 1.8e-6 (adamw) to 2.7e-2 (soap) apart. A step with such a gradient takes every bucket in
    its turn (``optimizer._gradients_in_parameters``)."""
    fast = _aliased_run(monkeypatch, preset, together=True, same_bucket=same_bucket)
    turn = _aliased_run(monkeypatch, preset, together=False, same_bucket=same_bucket)
    assert torch.equal(fast, turn), (fast - turn).abs().max().item()
