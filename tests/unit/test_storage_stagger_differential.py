"""Differential tests of ``[storage]`` (per-kind storage dtypes) and ``[refresh] stagger = true``.

Each test compares the optimizer against an expectation computed another way: a run kept in the
compute dtype whose state is rounded by hand after every step, a lone block run with
``refresh.offset`` equal to its documented phase, an uninterrupted run, the documented schedule
written out by hand, a separate optimizer, the per-parameter views summed by hand, or the live
``inspect()``. Small shapes and few steps: the whole file runs in seconds on a CPU.
"""

import io
import warnings

import pytest
import torch

import kronopt
from kronopt.inspection import saved_views

BF16 = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
SLOT_PREFIXES = {"factors": ("factors.",), "basis": ("basis.",), "moments": ("inner.", "split.", "post.")}
#: presets whose blocks refresh a basis (the others' refresh does nothing to watch)
REFRESHING = [name for name in kronopt.PRESETS if name not in ("adamw", "muon")]


def _tensors(seed, shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def _grads(seed, shapes, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _named(params):
    # names no preset routes to its fallback: every matrix is in the main pipeline
    return [(f"layers.{i}.weight", p) for i, p in enumerate(params)]


def _feed(opt, params, steps, has=lambda t, i: True, start=0):
    for t, step in enumerate(steps, start=start):
        for i, (p, g) in enumerate(zip(params, step)):
            p.grad = g.clone() if has(t, i) else None
        opt.step()


def _round_by_hand(opt, params, slots, dtype):
    """Round, in place, every floating state tensor of ``slots`` to ``dtype`` (and back to its own dtype)."""
    prefixes = tuple(x for s in slots for x in SLOT_PREFIXES[s])
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k.startswith(prefixes):
                v.copy_(v.to(dtype))


def _state_tensors(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


# -- [storage]: the trajectory against a compute-dtype run rounded by hand -------------------------


_BF16_OF_FP32 = (torch.float32, torch.bfloat16, "bfloat16")
_FP32_OF_FP64 = (torch.float64, torch.float32, "float32")


@pytest.mark.parametrize(
    "preset,dtype,narrow,name",
    [(p, *_BF16_OF_FP32) for p in ("soap", "shampoo", "muon", "dykaf_rank1", "kl_shampoo", "pro_kl_shampoo")]
    + [(p, *_FP32_OF_FP64) for p in ("kl_soap",)],
)
def test_narrowed_factors_and_moments_equal_a_compute_run_rounded_after_every_step(preset, dtype, narrow, name):
    """Storage ``factors`` and ``moments`` narrowed = a run kept in the compute dtype whose factor and moment
    state is rounded to the storage dtype by hand at construction and after every step, bit for bit.

    Catches: the fresh state not rounded (KL's 0.1 init is not a bfloat16 number); a stage that updates
    the upcast copy in place and returns it (the hook would then hand back the stale stored tensor);
    a record rounded to the wrong dtype or left unrounded; the step running on the narrow tensors
    instead of upcast ones (float64 maths on float32 storage). ``basis`` is left out: a narrow basis
    changes which products a stage may take (``exact_basis``), so it is only equal up to rounding."""
    shapes = [(8, 12), (8, 12), (12, 8)]
    over = {"refresh.every": 3} if preset != "muon" else {}
    grads = _grads(1, shapes, 5, dtype)
    params = [torch.nn.Parameter(t) for t in _tensors(0, shapes, dtype)]
    opt = kronopt.build(_named(params), preset, **over, **{"storage.factors": name, "storage.moments": name})
    refs = [torch.nn.Parameter(t) for t in _tensors(0, shapes, dtype)]
    ref = kronopt.build(_named(refs), preset, **over)
    _round_by_hand(ref, refs, ("factors", "moments"), narrow)
    for step in grads:
        _feed(opt, params, [step])
        _feed(ref, refs, [step])
        _round_by_hand(ref, refs, ("factors", "moments"), narrow)
        for p, r in zip(params, refs):
            assert torch.equal(p, r)
    for p, r in zip(params, refs):
        for k, v in _state_tensors(opt, p).items():
            want = ref.state[r][k]
            if k.startswith(SLOT_PREFIXES["factors"] + SLOT_PREFIXES["moments"]) and v.is_floating_point():
                assert v.dtype == narrow, k
                want = want.to(narrow)
            else:
                assert v.dtype == want.dtype, k
            assert torch.equal(v, want), k


@pytest.mark.parametrize("preset", ["kl_shampoo"])
def test_a_narrow_basis_stays_within_rounding_of_a_compute_run_rounded_by_hand(preset):
    """Storage ``basis = "float32"`` under float64 parameters against a float64 run whose basis is rounded
    to float32 by hand after each step: equal up to float32 rounding (the narrow basis only changes the
    order of some products). Catches a wrong product taken when ``exact_basis`` is False (e.g. a
    transpose or a ``QᵀQ = I`` shortcut on a basis that is not orthonormal), which would be an O(1)
    difference, and a basis not rounded or not upcast."""
    shapes = [(8, 12), (12, 8), (24, 8)]
    grads = _grads(1, shapes, 7, torch.float64)
    params = [torch.nn.Parameter(t) for t in _tensors(0, shapes, torch.float64)]
    opt = kronopt.build(_named(params), preset, **{"refresh.every": 3, "storage.basis": "float32"})
    refs = [torch.nn.Parameter(t) for t in _tensors(0, shapes, torch.float64)]
    ref = kronopt.build(_named(refs), preset, **{"refresh.every": 3})
    _round_by_hand(ref, refs, ("basis",), torch.float32)
    start = [t.clone() for t in _tensors(0, shapes, torch.float64)]
    for step in grads:
        _feed(opt, params, [step])
        _feed(ref, refs, [step])
        _round_by_hand(ref, refs, ("basis",), torch.float32)
    for p, r, w in zip(params, refs, start):
        assert opt.state[p]["basis.Q_L"].dtype == torch.float32 and opt.state[p]["factors.L"].dtype == torch.float64
        assert ((p - r).norm() / (r - w).norm()).item() < 1e-6  # measured ≤ 6e-8 (kl), 0 (soap, shampoo)


# -- resume ---------------------------------------------------------------------------------


# every preset (both dtypes, three storage settings, with and without stagger) was checked this way while
# hunting; the file keeps one of each family, the split (low-rank + flat) one included
@pytest.mark.parametrize(
    "preset,dtype",
    [(p, torch.float32) for p in ("adamw", "soap", "shampoo", "muon", "dykaf_rank1", "kl_soap", "pro_kl_shampoo")]
    + [("kl_shampoo", torch.float64)],
)
def test_resume_through_a_saved_file_is_bit_for_bit_with_bf16_storage_and_stagger(preset, dtype):
    """Save (``torch.save`` of ``state_dict()``) → ``from_state_dict`` on fresh parameters → continue, against
    the uninterrupted run: the same weights and the same state, bit for bit and dtype for dtype, with
    every kind of state stored in bfloat16 and staggered refreshes (several shapes, a vector routed to a
    fallback where the preset routes, blocks of one shape over several phases).

    Catches: a load that casts the saved bfloat16 stacks to the compute dtype (or the reverse), a
    layout (strides) lost at restacking, phases rebuilt differently at load (blocks in other buckets,
    other refresh steps), a phase's config not rebuilt after the load."""
    shapes = [(8, 12), (8, 12), (8, 12), (12, 8), (16,)]
    over = {"refresh.every": 3, "refresh.stagger": True, **BF16}
    grads = _grads(1, shapes, 7, dtype)
    names = [f"l{i}.weight" for i in range(len(shapes))]
    params = [torch.nn.Parameter(t) for t in _tensors(0, shapes, dtype)]
    opt = kronopt.build(list(zip(names, params)), preset, **over)
    _feed(opt, params, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    snapshot = [p.detach().clone() for p in params]
    _feed(opt, params, grads[4:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    again = [torch.nn.Parameter(s) for s in snapshot]
    resumed = kronopt.from_state_dict(list(zip(names, again)), saved)
    assert [r["phase"] for r in resumed.bucket_summary()] == [
        r["phase"] for r in kronopt.build(list(zip(names, again)), preset, **over).bucket_summary()
    ]
    _feed(resumed, again, grads[4:])
    for p, q in zip(params, again):
        assert torch.equal(p, q)
        mine, theirs = _state_tensors(opt, p), _state_tensors(resumed, q)
        assert mine.keys() == theirs.keys()
        for k, v in mine.items():
            assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k
    if preset in REFRESHING:
        assert opt.state[params[0]]["factors.L"].dtype == torch.bfloat16
        assert opt.state[params[0]]["basis.Q_L"].dtype == torch.bfloat16


# -- stagger: each block against its documented schedule ----------------------------------------


@pytest.mark.parametrize(
    "preset,storage",
    [(p, BF16) for p in ("soap", "shampoo", "kl_shampoo", "pro_kl_shampoo")] + [("dykaf", {})],
    ids=lambda x: "bf16" if x is BF16 else "compute" if x == {} else x,
)
def test_a_staggered_block_equals_a_lone_block_run_with_offset_equal_to_its_phase(preset, storage):
    """Four blocks of one shape, ``every = 3``, some gradients missing on some steps (the bucket splits):
    each block's weights equal those of a lone-block optimizer without stagger whose
    ``refresh.offset`` is the block's documented phase (round robin in order for blocks of one shape),
    stepped only when the block had a gradient. Bit for bit.

    Catches: a phase off by one or counted from the wrong end, a split bucket that loses its phase
    (falls back to phase 0), a phase's config cached under the wrong key (two phases sharing one
    schedule), the storage hook seeing another schedule than the step."""
    k, shapes = 3, [(8, 12)] * 4
    init = _tensors(0, shapes)
    grads = _grads(1, shapes, 7)
    missing = {(1, 1), (2, 1), (3, 1), (6, 1), (0, 3)}  # (step, block) without a gradient
    has = lambda t, i: (t, i) not in missing  # noqa: E731
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = kronopt.build(_named(params), preset, **{"refresh.every": k, "refresh.stagger": True, **storage})
    _feed(opt, params, grads, has)
    for i in range(len(shapes)):
        lone = torch.nn.Parameter(init[i].clone())
        ref = kronopt.build(_named([lone]), preset, **{"refresh.every": k, "refresh.offset": i % k, **storage})
        for t, step in enumerate(grads):
            if has(t, i):
                lone.grad = step[i].clone()
                ref.step()
        assert torch.equal(params[i], lone), i


@pytest.mark.parametrize("preset", ["soap", "shampoo", "dykaf", "kl_shampoo"])
def test_each_block_refreshes_exactly_on_its_documented_schedule(preset):
    """Refreshes counted per block by watching its stored bases change (nothing else changes them), with
    bfloat16 storage and blocks of two shapes in several buckets, against the schedule written out
    from the docs: the biggest block (16×16) takes phase 0, the three 8×12 blocks phases 1, 2, 3 in
    order (cost balancing: largest first, each to the least loaded phase); a block of phase ``p``
    refreshes on the first call where ``at_first_call`` and at the updates ``t ≥ 1`` with
    ``t ≡ p (mod k)``, where ``t`` counts updates (a skipped first call is not one).

    Catches: a wrong phase assignment, a shift of the update count (first call counted as an update),
    a refresh missed or doubled on some phase, a refresh whose new basis is not written back."""
    k, shapes, phase = 4, [(8, 12), (16, 16), (8, 12), (8, 12)], [1, 0, 2, 3]
    cfg = kronopt.PRESETS[preset]
    params = [torch.nn.Parameter(t) for t in _tensors(0, shapes)]
    opt = kronopt.build(_named(params), preset, **{"refresh.every": k, "refresh.stagger": True, **BF16})

    def bases():
        return [[opt.state[p][key].clone() for key in ("basis.Q_L", "basis.Q_R") if key in opt.state[p]] for p in params]

    calls = 2 * k + 2
    seen: dict[int, list[int]] = {i: [] for i in range(len(params))}
    before = bases()
    for call, step in enumerate(_grads(1, shapes, calls)):
        _feed(opt, params, [step])
        after = bases()
        for i in range(len(params)):
            assert before[i], preset  # the preset keeps a basis to watch
            if not all(torch.equal(a, b) for a, b in zip(before[i], after[i])):
                seen[i].append(call)
        before = after
    expected = {}
    for i in range(len(params)):
        expected[i] = [
            call
            for call in range(calls)
            if (call == 0 and cfg.refresh.at_first_call)
            or ((t := call if cfg.skip_first_call else call + 1) >= 1 and t % k == phase[i])
        ]
    assert seen == expected


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo"])
def test_add_param_group_mid_training_with_stagger_and_bf16_equals_separate_optimizers(preset):
    """A group added after four steps, with its own shapes (two 8×12, two 12×8, a vector), staggered and
    stored in bfloat16: the old group goes on exactly as if alone, and the new group's blocks follow
    exactly the trajectory of a fresh optimizer built for them alone (phases are per group).

    Catches: the new group's phases computed with the old group's blocks (or not at all), a phase
    config cached by a group index the new group reuses, the new buckets' state not rounded at
    creation, the old buckets' state disturbed by the addition."""
    over = {"refresh.every": 3, "refresh.stagger": True, **BF16}
    A, B = [(8, 12)] * 3, [(8, 12), (8, 12), (12, 8), (12, 8), (16,)]
    ga, gb = _grads(2, A, 9), _grads(3, B, 5)
    a = [torch.nn.Parameter(t) for t in _tensors(0, A)]
    b = [torch.nn.Parameter(t) for t in _tensors(1, B)]
    names_b = [f"b.{i}.weight" for i in range(len(B))]
    opt = kronopt.build(_named(a), preset, **over)
    _feed(opt, a, ga[:4])
    opt.add_param_group({"params": b, "param_names": names_b})
    for t in range(4, 9):
        for p, g in zip(a + b, ga[t] + gb[t - 4]):
            p.grad = g.clone()
        opt.step()
    alone_a = [torch.nn.Parameter(t) for t in _tensors(0, A)]
    _feed(kronopt.build(_named(alone_a), preset, **over), alone_a, ga)
    alone_b = [torch.nn.Parameter(t) for t in _tensors(1, B)]
    _feed(kronopt.build(list(zip(names_b, alone_b)), preset, **over), alone_b, gb)
    for p, q in zip(a + b, alone_a + alone_b):
        assert torch.equal(p, q)
    assert {v.dtype for k, v in _state_tensors(opt, b[0]).items() if k.startswith("inner.")} == {torch.bfloat16}


# -- the non-finite guard with narrowed storage --------------------------------------------------


@pytest.mark.parametrize("preset", ["soap", "kl_shampoo", "pro_soap"])
@pytest.mark.parametrize("scope", ["step", "block"])
def test_a_nonfinite_gradient_leaves_params_and_bf16_state_untouched(preset, scope):
    """With every kind of state in bfloat16 and staggered refreshes, a step where one block's gradient
    holds a NaN and another's an Inf, on each of three consecutive steps (so on a refresh step of
    every phase): under scope ``"step"`` no parameter and no state tensor changes anywhere; under
    ``"block"`` the two bad blocks keep theirs, bit for bit and dtype for dtype. The state stays
    finite and the run goes on finite.

    Catches: a masked write into a bfloat16 stack that lets the rounded new value through, a refresh
    whose replaced stack (new strides or dtype) is taken whole instead of per block, the upcast
    copy written back for a skipped block."""
    shapes = [(8, 12), (8, 12), (12, 8), (8, 12)]
    for bad_step in (1, 2, 3):
        params = [torch.nn.Parameter(t) for t in _tensors(0, shapes)]
        opt = kronopt.build(
            _named(params), preset, nonfinite="skip", nonfinite_scope=scope,
            **{"refresh.every": 3, "refresh.stagger": True, **BF16},
        )
        grads = _grads(1, shapes, bad_step + 3)
        _feed(opt, params, grads[:bad_step])
        before = [(p.detach().clone(), {k: v.clone() for k, v in _state_tensors(opt, p).items()}) for p in params]
        bad = grads[bad_step]
        bad[0][1, 2] = float("nan")
        bad[2][0, 0] = float("inf")
        _feed(opt, params, [bad])
        for i in range(len(params)) if scope == "step" else (0, 2):
            w, state = before[i]
            assert torch.equal(params[i], w), (bad_step, i)
            for k, v in _state_tensors(opt, params[i]).items():
                if k != "nonfinite":
                    assert v.dtype == state[k].dtype and torch.equal(v, state[k]), (bad_step, i, k)
        if scope == "block":
            assert not torch.equal(params[1], before[1][0])  # the good blocks did step
        for p in params:
            assert all(torch.isfinite(v).all() for v in _state_tensors(opt, p).values() if v.is_floating_point())
        _feed(opt, params, grads[bad_step + 1 :])
        assert all(torch.isfinite(p).all() for p in params)


# -- readers: state_bytes, inspect, saved_views ----------------------------------------------------


@pytest.mark.parametrize(
    "preset,dtype", [(p, torch.float32) for p in kronopt.PRESETS if p not in ("pro_soap", "pro_dykaf")] + [("kl_shampoo", torch.float64)]
)
def test_state_bytes_count_the_stored_dtypes(preset, dtype):
    """``state_bytes()`` against the per-parameter state summed by hand (every block's views, each
    tensor's own element size), with staggered buckets, after refreshes; and the saving against the
    compute-dtype optimizer: ``(compute size − storage size)`` bytes per floating element of the main
    pipeline (matrices only, so nothing is routed to a fallback, which keeps its own storage).

    Catches: bytes counted at the compute dtype, a stack counted twice or missed when a refresh
    replaced it, stagger's extra buckets miscounted."""
    shapes = [(8, 12), (8, 12), (12, 8), (16, 16)]
    size = torch.finfo(dtype).bits // 8
    results = {}
    for name, storage in (("compute", {}), ("bf16", BF16), ("fp32", {k: "float32" for k in BF16})):
        params = [torch.nn.Parameter(t) for t in _tensors(0, shapes, dtype)]
        opt = kronopt.build(_named(params), preset, **{"refresh.every": 2, "refresh.stagger": True, **storage})
        _feed(opt, params, _grads(1, shapes, 3, dtype))
        by_hand = sum(
            v.numel() * v.element_size() for p in params for k, v in _state_tensors(opt, p).items() if k != "nonfinite"
        )
        floats = sum(v.numel() for p in params for v in _state_tensors(opt, p).values() if v.is_floating_point())
        assert opt.state_bytes() == by_hand, name
        results[name] = (opt.state_bytes(), floats)
    (full, floats), (half, _), (single, _) = results["compute"], results["bf16"], results["fp32"]
    assert full - half == floats * (size - 2)
    assert full - single == floats * (size - 4)


@pytest.mark.parametrize("preset", ["soap", "dykaf_rank1", "kl_shampoo", "pro_kl_shampoo", "muon"])
def test_inspect_and_saved_views_agree_with_the_stored_bf16_state(preset):
    """With every kind of state in bfloat16 and staggered buckets: ``inspect()`` works for every preset,
    each view's bases are the stored ones exactly (``state[p]``), and ``saved_views(state_dict())``
    gives the same views, tensor for tensor and dtype for dtype.

    Catches: a reader that fails on bfloat16 tensors (a solver or a product with a float32 operand),
    a view computed from another bucket's or phase's state, a saved view that rounds or widens."""
    shapes = [(8, 12), (8, 12), (12, 8), (16,), (16, 16)]
    names = [f"l{i}.weight" for i in range(len(shapes))]
    params = [torch.nn.Parameter(t) for t in _tensors(0, shapes)]
    opt = kronopt.build(list(zip(names, params)), preset, **{"refresh.every": 3, "refresh.stagger": True, **BF16})
    _feed(opt, params, _grads(1, shapes, 4))
    live, saved = opt.inspect(), saved_views(opt.state_dict())
    assert live.keys() == saved.keys() == set(names)
    for name, p in zip(names, params):
        _assert_same_view(live[name], saved[name])
        for which, key in (("left", "basis.Q_L"), ("right", "basis.Q_R")):
            basis = live[name].side(which).basis
            if basis is not None and key in opt.state[p]:
                assert basis.dtype == opt.state[p][key].dtype and torch.equal(basis, opt.state[p][key])


def _assert_same_view(live, saved):
    for which in ("left", "right"):
        for field in ("basis", "eigvals", "flat", "factor"):
            x, y = getattr(live.side(which), field), getattr(saved.side(which), field)
            assert (x is None) == (y is None), (which, field)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), (which, field, x.dtype, y.dtype)
    for slot, record in live.records.items():
        assert record.keys() == saved.records[slot].keys()
        for k, x in record.items():
            y = saved.records[slot][k]
            assert x.dtype == y.dtype and torch.equal(x, y), (slot, k, x.dtype, y.dtype)


@pytest.mark.parametrize(
    "dtype,name", [(torch.float32, "bfloat16"), (torch.float64, "float32")], ids=["bf16_of_fp32", "fp32_of_fp64"]
)
def test_saved_views_keep_the_dtypes_of_a_state_whose_factors_alone_are_narrowed(dtype, name):
    """``saved_views`` promises the views ``inspect()`` gives live. With ``storage.factors`` narrowed and the
    basis and moments kept in the compute dtype, the saved views must show the basis and the moments in
    the compute dtype, equal to the live ones, not rounded to the factors' storage dtype."""
    p = torch.nn.Parameter(_tensors(0, [(8, 12)], dtype)[0])
    opt = kronopt.build([("w", p)], "soap", **{"storage.factors": name})
    _feed(opt, [p], _grads(1, [(8, 12)], 3, dtype))
    assert opt.state[p]["basis.Q_L"].dtype == dtype and opt.state[p]["factors.L"].dtype != dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_view(opt.inspect()["w"], saved_views(opt.state_dict())["w"])
