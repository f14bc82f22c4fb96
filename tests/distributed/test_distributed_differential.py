"""Differential checks of the multi-process paths against one process, on layouts the other distributed tests skip.

One spawn of two gloo ranks (forked, one thread each) runs three jobs, defined here:

* ``ddp``: replicated parameters, work sharding on and off, with non-contiguous parameters
  (a ``channels_last`` conv weight, two transposed matrices), a 0-D parameter, a bucket of
  three blocks on two ranks, 1-D parameters (the AdamW fallback of kl_shampoo) and a
  gradient pattern that leaves blocks without gradients on some steps (split buckets), and a
  NaN that skips the first step whole (no bucket's first call counted: the plan's too);
* ``fsdp``: FSDP2 (``fully_shard``) with parameters whose dim 0 is shorter than the world
  (``(1, 9)``, ``(1,)``: one rank holds no row) or splits unevenly (``(5, 9)``), and a NaN in
  one rank's rows of an elementwise bucket (a bias) and of a matrix one rank alone holds, at
  their first call too (a first call that used no gradient is not counted, on every rank alike);
* ``dcp_from_one``: a ``torch.distributed.checkpoint`` of one process loaded under FSDP2.

Gradients are given (the same full gradient on every rank; under FSDP2 its ``Shard(0)``
rows), so every run sees exactly the single-process gradients.
"""

import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kronopt

from ._dcp_workers import give_grad, spawn

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the jobs live in this module: forked ranks"),
]

STEPS = 10


def _close(actual, expected, what=""):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"{what}[{i}]: {m}")


# -- replicated parameters (DDP) -------------------------------------------------------------------

DDP_PRESETS = ["soap", "kl_shampoo"]


def ddp_params():
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return [
        nn.Parameter(r(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)),  # block (8, 36), not its memory
        nn.Parameter(r(6, 10).t()),  # (10, 6), transposed
        nn.Parameter(r(8, 8)), nn.Parameter(r(8, 8)), nn.Parameter(r(8, 8)),  # a bucket of three on two ranks
        nn.Parameter(r(5)), nn.Parameter(r(7)),
        nn.Parameter(r(())),
        nn.Parameter(r(12, 8)),
        nn.Parameter(r(3, 5).t()),
    ]


def ddp_absent(k, j):
    """No gradient for block 2 on the first two steps, for blocks 0 and 5 at step 5, for block 9 every third step."""
    return (k in (0, 1) and j == 2) or (k == 5 and j in (0, 5)) or (k % 3 == 2 and j == 9)


def ddp_train(preset, **extra):
    params = ddp_params()
    over = {"state_dtype": "float64", "refresh.every": 4, **extra}
    opt = kronopt.build(params, preset, **over)
    gen = torch.Generator().manual_seed(1)
    trace = []
    for k in range(STEPS):
        for j, p in enumerate(params):
            g = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))  # p's strides, as autograd
            if k == 0 and j == 3:  # the first step skipped whole (scope "step"): no first call is counted
                g[0, 0] = float("nan")
            p.grad = None if ddp_absent(k, j) else g
        opt.step()
        trace.append([p.detach().clone() for p in params])
    return {"trace": trace, "strides": [p.stride() for p in params]}


def job_ddp(rank, world, where):
    return {preset: {shard: ddp_train(preset, **{"distributed.shard_work": shard}) for shard in (True, False)} for preset in DDP_PRESETS}


# -- FSDP2 -----------------------------------------------------------------------------------------

FSDP_PRESETS = ["soap", "adamw"]
#: (step, parameter name) → the rank whose rows get a NaN gradient entry
FSDP_NAN = {(0, "narrow"): 0, (0, "a.bias"): 1, (3, "a.bias"): 1, (5, "narrow"): 0, (6, "a.weight"): 1, (7, "odd"): 1}


class FsdpNet(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def r(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / 3)

        self.a = nn.Module()
        self.a.weight, self.a.bias = r(9, 9), r(9)  # 5 + 4 rows
        self.narrow = r(1, 9)  # one row: rank 1 holds none
        self.odd = r(5, 9)  # 3 + 2 rows
        self.one = r(1)  # rank 1 holds none


def fsdp_train(preset, mesh=None, rank=0):
    """``mesh``: FSDP2 on it; ``None``: one process, the NaN entries at the same places of the full gradients."""
    model = FsdpNet()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.a, mesh=mesh)
        fully_shard(model, mesh=mesh)
    over = {"state_dtype": "float64", "nonfinite": "skip", "nonfinite_scope": "block"}
    if preset != "adamw":
        over["refresh.every"] = 4
    opt = kronopt.build(list(model.parameters()), preset, **over)
    gen = torch.Generator().manual_seed(1)
    trace = []
    for k in range(STEPS):
        for name, p in model.named_parameters():
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            give_grad(p, g, FSDP_NAN.get((k, name)), mesh, rank)
        opt.step()
        trace.append({n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()})
    return trace


def _mesh(world):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", list(range(world)))


def job_fsdp(rank, world, where):
    mesh = _mesh(world)
    return {preset: fsdp_train(preset, mesh, rank) for preset in FSDP_PRESETS}


# -- a checkpoint of one process loaded under FSDP2 -----------------------------------------------


def _linear():
    torch.manual_seed(0)
    return nn.Linear(9, 9, dtype=torch.float64)


def _linear_grads(k):
    gen = torch.Generator().manual_seed(10 + k)
    return [torch.randn(9, 9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)]


def _linear_step(model, opt, k, mesh=None):
    from torch.distributed.tensor import Shard, distribute_tensor

    for p, g in zip(model.parameters(), _linear_grads(k)):
        p.grad = g if mesh is None else distribute_tensor(g, mesh, [Shard(0)])
    opt.step()


def save_one_process(where):
    """Two adamw steps of one process, saved with DCP; then the uninterrupted run's two more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    model = _linear()
    opt = kronopt.build(model.parameters(), "adamw", state_dtype="float64")
    for k in range(2):
        _linear_step(model, opt, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}, checkpoint_id=where / "one")
    for k in range(2, 4):
        _linear_step(model, opt, k)
    return [p.detach().clone() for p in model.parameters()]


def job_dcp_from_one(rank, world, where):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    model = fully_shard(_linear(), mesh=mesh)
    opt = kronopt.build(model.parameters(), "adamw", state_dtype="float64")
    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}
    try:
        dcp.load(state, checkpoint_id=Path(where) / "one")
        dsd.set_model_state_dict(model, state["model"])
        dsd.set_optimizer_state_dict(model, opt, state["optim"])
    except BaseException as exc:  # noqa: BLE001 - a CheckpointException is raised on every rank alike
        return {"error": str(exc).strip().splitlines()[-1]}
    for k in range(2, 4):
        _linear_step(model, opt, k, mesh)
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()]}


def job_dcp_to_one(rank, world, where):
    """Two adamw steps under FSDP2, saved with DCP for one process to resume (the test below)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(world)
    model = fully_shard(_linear(), mesh=mesh)
    opt = kronopt.build(model.parameters(), "adamw", state_dtype="float64")
    for k in range(2):
        _linear_step(model, opt, k, mesh)
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)},
             checkpoint_id=Path(where) / "fsdp")
    return {}


JOBS = {f.__name__.removeprefix("job_"): f for f in (job_ddp, job_fsdp, job_dcp_from_one, job_dcp_to_one)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.distributed.checkpoint  # noqa: F401 - imported once here, before the fork
    import torch.distributed.fsdp  # noqa: F401

    where = tmp_path_factory.mktemp("differential")
    uninterrupted = save_one_process(where)
    return spawn(2, list(JOBS), where, module=__name__), uninterrupted, where


@pytest.mark.parametrize("preset", DDP_PRESETS)
def test_sharding_on_non_contiguous_parameters_and_split_buckets_equals_off_and_one_process(ranks, preset):
    """Catches the sharded write (``post.apply_`` on the gathered directions) stepping a reshaped copy of a
    ``channels_last`` or transposed parameter instead of the parameter (it would stay unchanged, or its
    strides change), a gather whose slots are misordered after a bucket split (a block without gradient),
    and a 0-D or fallback vector's step lost under sharding: every step equals sharding off bit for bit
    and one process to rounding, and the parameters keep their memory layout."""
    results, *_ = ranks
    reference = ddp_train(preset)
    for r, result in enumerate(results):
        on, off = result["ddp"][preset][True], result["ddp"][preset][False]
        for k, (a, b) in enumerate(zip(on["trace"], off["trace"], strict=True)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"rank {r}, step {k}: sharding on and off differ"
            _close(a, reference["trace"][k], f"rank {r} step {k}")
        assert on["strides"] == reference["strides"]
    for a, b in zip(results[0]["ddp"][preset][True]["trace"][-1], results[1]["ddp"][preset][True]["trace"][-1]):
        assert torch.equal(a, b), "the ranks' parameters differ"
    moved = [not torch.equal(a, b) for a, b in zip(reference["trace"][-1], ddp_params())]
    assert all(moved), "a parameter never moved: the comparison would not see a lost step"


@pytest.mark.parametrize("preset", FSDP_PRESETS)
def test_fsdp2_rows_shorter_than_the_world_and_a_nan_on_one_rank_equal_one_process(ranks, preset):
    """Catches a rank that holds no row of a parameter (``(1, 9)``, ``(1,)`` on two ranks) or fewer rows
    (``(5, 9)``) mis-mapping rows in the owners' all_to_all or the elementwise stacks, and a NaN in one
    rank's rows of an elementwise bucket (a bias) or of a one-row matrix skipped on that rank only (the
    ranks must agree on the flag): every step equals one process with the NaN at that entry."""
    results, *_ = ranks
    reference = fsdp_train(preset)
    for r, result in enumerate(results):
        for k, (got, want) in enumerate(zip(result["fsdp"][preset], reference, strict=True)):
            assert got.keys() == want.keys()
            _close(list(got.values()), list(want.values()), f"rank {r} step {k}")
    start = dict(FsdpNet().named_parameters())
    for k, name in FSDP_NAN:  # the NaN blocks were skipped: the comparison covers a skip
        before = start[name].detach() if k == 0 else reference[k - 1][name]
        assert torch.equal(reference[k][name], before), f"{name} moved at step {k}"


def test_a_one_process_checkpoint_with_a_bias_resumes_under_fsdp2(ranks):
    """Catches a state layout that differs between one process and FSDP2 (a bias's elementwise moments: once
    ``(9, 1)`` in one process, ``(9,)`` under FSDP2), which made a torch.distributed.checkpoint unloadable
    across the two (docs/distributed.md, "Checkpoints")."""
    results, uninterrupted, _ = ranks
    for result in results:
        got = result["dcp_from_one"]
        assert "error" not in got, got.get("error")
        _close(got["params"], uninterrupted)



def test_an_fsdp2_checkpoint_with_a_bias_resumes_in_one_process(ranks):
    """The other direction: two FSDP2 ranks' DCP checkpoint loaded by one process, which then steps as the
    uninterrupted run of one process does. Catches the same layout mismatch seen from the single-process side."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    _, uninterrupted, where = ranks
    model = _linear()
    opt = kronopt.build(model.parameters(), "adamw", state_dtype="float64")
    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.load(state, checkpoint_id=where / "fsdp")
    dsd.set_model_state_dict(model, state["model"])
    dsd.set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.state[model.bias]["inner.exp_avg"].shape == model.bias.shape  # shaped like the parameter, as torch.optim
    for k in range(2, 4):
        _linear_step(model, opt, k)
    _close([p.detach() for p in model.parameters()], uninterrupted)
