"""Differential checks of the multi-process paths combined with options no other distributed test combines.

The options: ``[storage]`` narrowed to bfloat16 (factors, basis, moments), bfloat16 products (DyKAF's
``[factors] product_dtype`` and ``rotation_dtype``), ``[refresh] stagger = true``,
a bucket cap (``bucket_cap_mib``: blocks of one shape in buckets of their own),
``nonfinite_scope = "block"`` and ``"step"``, a NaN on the very first step (a first call that used no
gradient is not counted, on every rank alike), ``add_param_group`` mid-training (itself with a NaN at its
first call), presets with a low-rank + flat split (pro_kl_shampoo, pro_soap) and DyKAF; then resumes from
``state_dict()`` and from ``torch.distributed.checkpoint`` under work sharding (DDP) and under FSDP2.

One spawn of two gloo ranks (forked, one thread each) runs every job below; the references run in this
process, without a process group, on the same parameters and gradients (DDP: the same full gradient on every
rank; FSDP2: its ``Shard(0)`` rows, a NaN put in one rank's rows and, in one process, at the same entry).
Sharding on against off is compared bit for bit (docs/distributed.md), every multi-process run against one
process to rounding, and the ranks' parameters against each other bit for bit.

``compile = true`` is left out: its first compilation takes about 30 s per rank on this CPU (checked by
hand: muon and adamw sharded on / off / one process agree, on == off bit for bit).
"""

import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kronopt
from kronopt import distributed as kdist

from ._dcp_workers import give_grad, spawn

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the jobs live in this module: forked ranks"),
]

STEPS = 9
ADD_AT = 3  # add_param_group before this step (the "extra" module's parameters)
SAVE_AT = (1, 5)  # right after the skipped first step; after the added group's first (skipped) call
BF16 = {"storage.factors": "bfloat16", "storage.basis": "bfloat16", "storage.moments": "bfloat16"}
STAGGER = {"refresh.stagger": True}

#: name → (preset, overrides, NaN entries {(step, parameter name): rank whose rows hold it})
FIRST = {(0, "a.weight"): 1, (0, "c.weight"): 0, (ADD_AT, "extra.weight"): 0}
CASES = {
    "soap_step": ("soap", {**BF16, **STAGGER, "nonfinite_scope": "step"}, FIRST),
    "soap_block": ("soap", {**BF16, **STAGGER, "nonfinite_scope": "block"}, {**FIRST, (0, "a.bias"): 1}),
    # and its products in bfloat16: the KSL step's sandwiches and the rotations (a block's form by its own size)
    "dykaf_block": (
        "dykaf",
        {**BF16, **STAGGER, "nonfinite_scope": "block", "factors.product_dtype": "bfloat16", "rotation_dtype": "bfloat16"},
        FIRST,
    ),
    "pro_kl_shampoo_block": ("pro_kl_shampoo", {**BF16, **STAGGER, "nonfinite_scope": "block"}, {**FIRST, (0, "d.weight"): 1, (0, "a.bias"): 0}),
    "pro_soap_step": ("pro_soap", {**BF16, **STAGGER, "nonfinite_scope": "step"}, FIRST),
    # no stagger: the bucket cap alone keeps the two (9, 9) blocks in buckets of their own
    "kl_shampoo_capped": ("kl_shampoo", {**BF16, "bucket_cap_mib": 1e-6, "nonfinite_scope": "block"}, FIRST),
}
#: the cases resumed from state dicts and checkpoints
RESUMED = ["soap_block", "pro_kl_shampoo_block", "kl_shampoo_capped"]


def _close(actual, expected, what=""):
    """To rounding: the runs agree to the last bits in practice; the slack covers a bfloat16 storage rounding
    that a last-bit difference flips. A lost, doubled or misplaced step moves a parameter by about ``lr``."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"{what} {n}: {m}")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class Net(nn.Module):
    """Two (9, 9) matrices (phases differ under stagger), a bias, an uneven (5, 9), a (8, 6), and an "extra"
    module added mid-training. No forward: gradients are given."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def r(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / 3)

        self.a = nn.Module()
        self.a.weight, self.a.bias = r(9, 9), r(9)
        self.b = nn.Module()
        self.b.weight = r(9, 9)
        self.c = nn.Module()
        self.c.weight = r(5, 9)
        self.d = nn.Module()
        self.d.weight = r(8, 6)
        self.extra = nn.Module()
        self.extra.weight, self.extra.bias = r(7, 7), r(7)


def _mesh(world):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", list(range(world)))


def make(case, mesh=None, *, seed=0, together=False, **extra):
    """Model and optimizer (groups: the model without "extra"; with ``together`` both groups at construction)."""
    preset, over, _ = CASES[case]
    model = Net(seed)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for m in (model.a, model.b, model.extra):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    main = [p for n, p in model.named_parameters() if not n.startswith("extra")]
    group = {"params": [p for n, p in model.named_parameters() if n.startswith("extra")], "lr": 0.02}
    cfg = {"state_dtype": "float64", "refresh.every": 3, "nonfinite": "skip", **over, **extra}
    opt = kronopt.build([{"params": main}, group] if together else main, preset, **cfg)
    return model, opt, (None if together else group)


def params_of(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def run(case, model, opt, group, first, last, mesh=None, rank=0):
    """Steps ``first … last - 1`` (gradients seeded per step, so a resume sees the same ones); the parameters after each."""
    nan = CASES[case][2]
    trace = []
    for k in range(first, last):
        if k == ADD_AT and group is not None:
            opt.add_param_group(group)
        gen = torch.Generator().manual_seed(100 + k)
        for name, p in model.named_parameters():
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.startswith("extra") and k < ADD_AT:
                p.grad = None
                continue
            give_grad(p, g, nan.get((k, name)), mesh, rank)
        opt.step()
        trace.append(params_of(model))
    return trace


def counters(opt):
    """Per bucket: shape, refresh phase, the call counter every rank keeps (the plan's, else the state's)."""
    return [(b.layout.n, b.layout.phase, b.plan.calls if b.plan is not None else b.state.calls) for b in opt._buckets]


def train(case, mesh=None, rank=0, **extra):
    model, opt, group = make(case, mesh, **extra)
    trace = run(case, model, opt, group, 0, STEPS, mesh, rank)
    dtypes = {k: v.dtype for e in opt.state_dict()["state"].values() for k, v in e.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return {"trace": trace, "calls": counters(opt), "phases": sorted({b["phase"] for b in opt.bucket_summary()}), "dtypes": dtypes}


# -- jobs ------------------------------------------------------------------------------------------


def job_ddp(rank, world, where):
    return {(case, shard): train(case, **{"distributed.shard_work": shard}) for case in CASES for shard in (True, False)}


def job_fsdp(rank, world, where):
    mesh = _mesh(world)
    return {case: train(case, mesh, rank) for case in CASES}


def _load_dcp(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    dsd.set_model_state_dict(model, state["model"])
    dsd.set_optimizer_state_dict(model, opt, state["optim"])


def _copy_params(model, saved):
    with torch.no_grad():
        for n, p in model.named_parameters():
            (p.to_local() if hasattr(p, "to_local") else p).copy_(saved[n])


def _resume(kind, rank, world, where):
    """Per resumed case and save point: the uninterrupted run's last parameters, this rank's ``state_dict()``,
    the run resumed from it (a fresh optimizer built the same way) and from a DCP checkpoint (same world)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    mesh = _mesh(world) if kind == "fsdp" else None
    out = {}
    for case in RESUMED:
        for save in SAVE_AT:
            path = Path(where) / f"{kind}-{case}-{save}"
            model, opt, group = make(case, mesh)
            run(case, model, opt, group, 0, save, mesh, rank)
            sd = opt.state_dict()
            mine = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}
            dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
            final = run(case, model, opt, group, save, STEPS, mesh, rank)[-1]

            model2, opt2, group2 = make(case, mesh, seed=7)
            if save > ADD_AT:
                opt2.add_param_group(group2)
            _copy_params(model2, mine)
            opt2.load_state_dict(sd)
            own = run(case, model2, opt2, group2, save, STEPS, mesh, rank)[-1]

            model3, opt3, group3 = make(case, mesh, seed=7)
            if save > ADD_AT:
                opt3.add_param_group(group3)
            _load_dcp(model3, opt3, path)
            from_dcp = run(case, model3, opt3, group3, save, STEPS, mesh, rank)[-1]
            out[(case, save)] = {"final": final, "sd": sd, "own": own, "dcp": from_dcp}
    return out


def job_resume_ddp(rank, world, where):
    return _resume("ddp", rank, world, where)


def job_resume_fsdp(rank, world, where):
    return _resume("fsdp", rank, world, where)


def job_from_one(rank, world, where):
    """The one-process checkpoint (saved by the fixture after SAVE_AT[-1] steps) resumed under work sharding
    and under FSDP2: DCP, and (work sharding) the one-process ``state_dict()`` loaded on every rank."""
    out = {}
    for kind in ("ddp", "fsdp"):
        mesh = _mesh(world) if kind == "fsdp" else None
        model, opt, group = make("soap_block", mesh, seed=7)
        opt.add_param_group(group)
        _load_dcp(model, opt, Path(where) / "one")
        out[kind] = run("soap_block", model, opt, None, SAVE_AT[-1], STEPS, mesh, rank)[-1]
    saved = torch.load(Path(where) / "one-plain.pt", weights_only=False)
    model, opt, group = make("soap_block", seed=7)
    opt.add_param_group(group)
    _copy_params(model, saved["params"])
    opt.load_state_dict(saved["optim"])
    out["plain"] = run("soap_block", model, opt, None, SAVE_AT[-1], STEPS)[-1]
    return out


def _agree(ok: bool, world) -> list[bool]:
    flags = torch.tensor([int(ok)])
    every = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(every, flags)
    return [bool(f.item()) for f in every]


def job_together(rank, world, where):
    """A rank's own ``state_dict()`` after ``add_param_group``, loaded into an optimizer given both groups at
    construction (same rank, world size and param groups). The ranks exchange whether their load succeeded
    before stepping on, so a load refused on one rank only is reported instead of hanging the collectives."""
    out = {}
    for kind, case in (("ddp", "soap_block"), ("fsdp", "pro_soap_step")):
        mesh = _mesh(world) if kind == "fsdp" else None
        model, opt, group = make(case, mesh)
        save = SAVE_AT[-1]
        run(case, model, opt, group, 0, save, mesh, rank)
        sd = opt.state_dict()
        mine = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}
        final = run(case, model, opt, group, save, STEPS, mesh, rank)[-1]
        model2, opt2, _ = make(case, mesh, seed=7, together=True)
        _copy_params(model2, mine)
        error = None
        try:
            opt2.load_state_dict(sd)
        except ValueError as exc:
            error = str(exc)
        loaded = _agree(error is None, world)
        resumed = run(case, model2, opt2, None, save, STEPS, mesh, rank)[-1] if all(loaded) else None
        out[kind] = {"final": final, "resumed": resumed, "loaded": loaded, "error": error}
    return out


def _spoiled(sd):
    """A copy of a rank's own state dict with the first float tensor of two or more dims it holds given one
    dim more: a dict this rank alone cannot load."""
    sd = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}}
    for entry in sd["state"].values():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim >= 2:
                local = v.to_local() if hasattr(v, "to_local") else v
                entry[name] = torch.zeros(*local.shape, 2, dtype=local.dtype)
                return sd
    raise AssertionError("no tensor to spoil in this rank's state dict")


def job_refused_on_one_rank(rank, world, where):
    """Rank 1 loads a dict it cannot take, rank 0 its own good one: the load must be refused on both (rank 0
    naming rank 1's reason), each optimizer left as it was, so that both step on exactly as the run that never
    tried the load. The ranks exchange their verdicts first and step on only where they agree (a split verdict
    would pair different collectives)."""
    out = {}
    for kind, case in (("ddp", "soap_block"), ("fsdp", "pro_soap_step")):
        mesh = _mesh(world) if kind == "fsdp" else None
        model, opt, group = make(case, mesh)
        final = run(case, model, opt, group, 0, STEPS, mesh, rank)[-1]
        model, opt, group = make(case, mesh)
        save = SAVE_AT[-1]
        run(case, model, opt, group, 0, save, mesh, rank)
        sd = opt.state_dict()
        error = None
        try:
            opt.load_state_dict(_spoiled(sd) if rank == 1 else sd)
        except ValueError as exc:
            error = str(exc)
        refused = _agree(error is not None, world)
        same = all(refused) or not any(refused)
        resumed = run(case, model, opt, None, save, STEPS, mesh, rank)[-1] if same else None
        out[kind] = {"final": final, "resumed": resumed, "refused": refused, "error": error}
    return out


JOBS = {
    f.__name__.removeprefix("job_"): f
    for f in (job_ddp, job_fsdp, job_resume_ddp, job_resume_fsdp, job_from_one, job_together, job_refused_on_one_rank)
}


def _save_one_process(where):
    """soap_block in one process, saved after SAVE_AT[-1] steps (DCP, and its plain state_dict with torch.save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    model, opt, group = make("soap_block")
    run("soap_block", model, opt, group, 0, SAVE_AT[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}, checkpoint_id=where / "one")
    torch.save({"params": params_of(model), "optim": opt.state_dict()}, where / "one-plain.pt")


_REFERENCE: dict = {}


def reference(case):
    """The uninterrupted run of one process."""
    if case not in _REFERENCE:
        _REFERENCE[case] = train(case)
    return _REFERENCE[case]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.distributed.checkpoint  # noqa: F401 - imported once here, before the fork
    import torch.distributed.fsdp  # noqa: F401

    where = tmp_path_factory.mktemp("options")
    _save_one_process(where)
    return spawn(2, list(JOBS), where, module=__name__), where


# -- the options are in effect (else every comparison below would be vacuous) ----------------------


def test_the_cases_exercise_bfloat16_storage_stagger_and_an_uncounted_first_call():
    """Guards the other tests' premises: the state is stored in bfloat16, the refresh is staggered (phases
    beyond 0) or the cap parts the blocks of one shape, the NaN first step left counters one short on the buckets it skipped (and the step-scoped
    case one short everywhere), and the NaN blocks stayed put while the others moved."""
    for case, (preset, over, nan) in CASES.items():
        ref = reference(case)
        assert torch.bfloat16 in set(ref["dtypes"].values()), case
        if "bucket_cap_mib" in over:
            # a and b (9 × 9) in a bucket each, and c (5 × 9): two buckets of n = 9 without the cap
            assert ref["phases"] == [0] and [n for n, _, _ in ref["calls"]].count(9) == 3, (case, ref["calls"])
        else:
            assert max(ref["phases"]) > 0, case
        calls = [c for _, _, c in ref["calls"]]
        assert STEPS - 1 in calls or STEPS - ADD_AT - 1 in calls, (case, ref["calls"])
        if over["nonfinite_scope"] == "step":
            assert max(calls) == STEPS - 1, (case, ref["calls"])
        start = params_of(Net())
        for (k, name) in nan:
            before = start[name] if k == 0 else ref["trace"][k - 1][name]
            assert torch.equal(ref["trace"][k][name], before), f"{case}: {name} moved at its NaN step {k}"
        assert all(not torch.equal(ref["trace"][-1][n], start[n]) for n in start), case


# -- DDP work sharding ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_work_sharding_with_bf16_storage_stagger_and_a_nan_first_step_equals_off_and_one_process(ranks, case):
    """Catches, under work sharding with bfloat16 storage and staggered phases: an owner's rounding to
    storage that differs from the unsharded one (sharding on ≠ off bit for bit), a phase lost when the
    buckets are cut to their owners (the refresh schedule would differ from one process), a first call that
    used no gradient counted on the owner but not on the other ranks (or the other way round: the plan's
    counter and the state's disagree, the next call's gather is skipped on one rank), the same at the first
    call of a group added by ``add_param_group`` (its owners balanced with the old loads), and a rank whose
    parameters drift from the others'."""
    results, _ = ranks
    ref = reference(case)
    for r, result in enumerate(results):
        on, off = result["ddp"][(case, True)], result["ddp"][(case, False)]
        for k, (a, b) in enumerate(zip(on["trace"], off["trace"], strict=True)):
            assert _equal(a, b), f"rank {r} step {k}: sharding on and off differ"
            _close(a, ref["trace"][k], f"rank {r} step {k}")
        assert on["calls"] == ref["calls"] == off["calls"], f"rank {r}: the buckets' call counters differ from one process"
    assert _equal(results[0]["ddp"][(case, True)]["trace"][-1], results[1]["ddp"][(case, True)]["trace"][-1]), "the ranks differ"


# -- FSDP2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_with_bf16_storage_stagger_and_a_nan_first_step_on_one_rank_equals_one_process(ranks, case):
    """Catches, under FSDP2 with bfloat16 storage and staggered phases: elementwise DTensor state rounded or
    padded otherwise than one process's, an owner's stack of several phases mixed up, a NaN in one rank's rows
    at the very first step (and at an added group's first call) whose uncounted call is undone on one rank
    only (the ranks' plan counters drift: the next call's all_to_all is skipped on one side), the low-rank
    + flat split (pro_kl_shampoo, pro_soap) or DyKAF's factors stepping row shards instead of whole matrices,
    and ranks whose parameters differ."""
    results, _ = ranks
    ref = reference(case)
    for r, result in enumerate(results):
        got = result["fsdp"][case]
        for k, (a, b) in enumerate(zip(got["trace"], ref["trace"], strict=True)):
            _close(a, b, f"rank {r} step {k}")
        assert got["calls"] == ref["calls"], f"rank {r}: the buckets' call counters differ from one process"
    assert _equal(results[0]["fsdp"][case]["trace"][-1], results[1]["fsdp"][case]["trace"][-1]), "the ranks differ"


# -- resumes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("save", SAVE_AT)
@pytest.mark.parametrize("case", RESUMED)
def test_a_rank_resumes_from_its_own_state_dict_and_from_dcp_bit_for_bit(ranks, kind, case, save):
    """Catches a resume that loses what these options add to the state: bfloat16 stacks restacked in
    another dtype or rounded again, a staggered bucket's phase not rebuilt at load (a refresh at another
    step), the uncounted first call of a save right after the NaN first step (or of the added group) loaded
    as counted, split or added buckets' counters mixed up, and DCP's fill of the fresh optimizer's own dict
    missing an owner's bfloat16 tensors or a DTensor's rows. The resumed runs must equal the uninterrupted one
    bit for bit (docs/distributed.md: own dict; DCP at the same world size)."""
    results, _ = ranks
    for r, result in enumerate(results):
        got = result[f"resume_{kind}"][(case, save)]
        assert _equal(got["own"], got["final"]), f"rank {r}: resumed from its own state_dict, the run differs"
        assert _equal(got["dcp"], got["final"]), f"rank {r}: resumed from DCP, the run differs"
    a, b = (res[f"resume_{kind}"][(case, save)]["final"] for res in results)
    assert _equal(a, b), "the ranks differ"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("save", SAVE_AT)
@pytest.mark.parametrize("case", RESUMED)
def test_a_two_rank_checkpoint_resumes_in_one_process_like_the_uninterrupted_run(ranks, kind, case, save):
    """The two ranks' DCP checkpoint (and, under work sharding, their merged ``state_dict()`` s) loaded by one
    process, which steps on as the uninterrupted single-process run. Catches a counters-only entry or marker
    taken for the state of a block (a fresh bfloat16 state at load), counters of the uncounted first call that
    disagree between the ranks' dicts (merge refuses them), and a staggered or added bucket restacked into
    the wrong bucket in one process."""
    results, where = ranks
    expected = reference(case)["trace"][-1]
    model, opt, group = make(case, seed=7)
    if save > ADD_AT:
        opt.add_param_group(group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        _load_dcp(model, opt, where / f"{kind}-{case}-{save}")
    _close(run(case, model, opt, group if save <= ADD_AT else None, save, STEPS)[-1], expected, "DCP → one process")
    if kind == "ddp":
        merged = kdist.merge_state_dicts([res["resume_ddp"][(case, save)]["sd"] for res in results])
        model, opt, group = make(case, seed=7)
        if save > ADD_AT:
            opt.add_param_group(group)
        saved = results[0]["resume_ddp"][(case, save)]
        # the parameters at the save: one process's trace (the ranks equal it, test above)
        _copy_params(model, reference(case)["trace"][save - 1])
        opt.load_state_dict(merged)
        _close(run(case, model, opt, group if save <= ADD_AT else None, save, STEPS)[-1], expected, "merged → one process")
        assert saved["sd"]["kronopt"]["sharding"]["world_size"] == 2


def test_a_one_process_checkpoint_resumes_under_work_sharding_and_fsdp2(ranks):
    """A one-process DCP checkpoint (bfloat16 storage, staggered, after add_param_group and a first-step NaN)
    loaded under work sharding and under FSDP2, and its plain ``state_dict()`` loaded on every sharded rank.
    Catches a loader that gives the new owners another bucket (phase) than the saved one, or rounds the
    bfloat16 stacks when it cuts them to owners or to DTensor rows."""
    results, _ = ranks
    expected = reference("soap_block")["trace"][-1]
    for r, result in enumerate(results):
        for what in ("ddp", "fsdp", "plain"):
            _close(result["from_one"][what], expected, f"rank {r} {what}")
    for what in ("ddp", "fsdp", "plain"):
        assert _equal(results[0]["from_one"][what], results[1]["from_one"][what]), f"{what}: the ranks differ"


# -- owners recorded in the state dict (they once depended on how the optimizer was built) ---------------------


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_ranks_own_state_dict_after_add_param_group_resumes_with_the_groups_given_at_construction(ranks, kind):
    """Same rank, same world size, same param groups (torch.optim's condition for load_state_dict), only the
    second group given at construction instead of by add_param_group: the resume should continue the run
    bit for bit (docs/distributed.md: "a rank loads its own dict back"). Fails where ownership is recomputed
    from the construction history instead of read from the saved dict."""
    results, _ = ranks
    for r, result in enumerate(results):
        got = result["together"][kind]
        assert got["error"] is None, f"rank {r}: {got['error']}"
        assert _equal(got["resumed"], got["final"]), f"rank {r}: the resumed run differs"


def test_a_refused_own_state_dict_is_refused_on_every_rank_alike(ranks):
    """The same load as above under work sharding (soap): whatever the verdict, every rank must reach the same
    one, else the ranks' next collectives do not match. Catches a load that validates only this rank's blocks."""
    results, _ = ranks
    loaded = results[0]["together"]["ddp"]["loaded"]
    assert all(loaded) or not any(loaded), f"the ranks' loads disagree: {loaded}"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_dict_one_rank_refuses_is_refused_on_every_rank_and_changes_nothing(ranks, kind):
    """A state dict that fits on rank 0 but not on rank 1 (one tensor of the wrong shape): before, rank 0 loaded
    it and rank 1 refused it, so their buckets and counters parted and their next collectives would not pair."""
    results, _ = ranks
    got = [results[r]["refused_on_one_rank"][kind] for r in range(2)]
    assert got[0]["refused"] == [True, True], got[0]["refused"]
    assert "refused on another rank" in got[0]["error"] and "rank 1: ValueError" in got[0]["error"], got[0]["error"]
    assert "refused on another rank" not in got[1]["error"], got[1]["error"]  # its own reason
    for r in range(2):
        assert _equal(got[r]["resumed"], got[r]["final"]), f"rank {r}: the refused load changed the optimizer"
