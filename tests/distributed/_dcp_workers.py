"""Work run inside spawned ranks for ``test_dcp.py`` (and the spawning that ``_ddp_workers.py`` shares).

Every job takes ``(rank, world, where)`` (``where``: a folder shared by the ranks and
the parent test) with the gloo process group up, and returns plain data. The
parent runs :func:`resume` itself for world size 1 (no process group).
"""

import importlib
import multiprocessing
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict as dsd

import kronopt
from . import _workers as w

warnings.filterwarnings("ignore", message="the route sends embeddings")

# -- checkpoints -------------------------------------------------------------------------------

#: the sharding test's blocks plus a head (muon and kl_shampoo send it to their AdamW fallback by name)
SHAPES = [*w.SHAPES, (6, 8)]
NAMES = [*(f"blocks.{i}" for i in range(len(w.SHAPES))), "head.weight"]
PRESETS = ["soap", "kl_shampoo", "muon", "dykaf", "pro_kl_shampoo"]
VARIANTS = {"sharded": False, "full": True}  # StateDictOptions(full_state_dict=...)
SAVE_AT, STEPS = 7, 12
ABSENT = 1  # no gradient on the first two steps: its bucket is split, the two parts' counters differ


class Net(torch.nn.Module):
    """The blocks as parameters of a module (DCP keys state by parameter name); no forward, gradients are given."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        params = w.make_params(SHAPES, seed=seed)
        self.blocks = torch.nn.ParameterList(params[:-1])
        self.head = torch.nn.Linear(8, 6, bias=False, dtype=torch.float64)
        self.head.weight = params[-1]


def gradients():
    return w.gradients(SHAPES, steps=STEPS, seed=1)


def train(model, opt, grads, first: int = 0) -> None:
    params = list(model.parameters())
    for k, step in enumerate(grads, start=first):
        for j, (p, g) in enumerate(zip(params, step)):
            p.grad = None if (k < 2 and j == ABSENT) else g.clone()
        opt.step()


def build(model, preset):
    return kronopt.build(model.named_parameters(), preset, **w.overrides(preset))


def uninterrupted(preset):
    """The reference: one process, no checkpoint."""
    model = Net(seed=0)
    train(model, build(model, preset), gradients())
    return [p.detach().clone() for p in model.parameters()]


def job_save(rank, world, where):
    """Train SAVE_AT steps, dcp.save model + optimizer (each variant), train on; final parameters and this rank's dicts."""
    grads = gradients()
    out = {}
    for preset in PRESETS:
        for variant, full in VARIANTS.items():
            model = Net(seed=0)
            opt = build(model, preset)
            train(model, opt, grads[:SAVE_AT])
            options = dsd.StateDictOptions(full_state_dict=full)
            state = {"model": dsd.get_model_state_dict(model, options=options), "optim": dsd.get_optimizer_state_dict(model, opt, options=options)}
            dcp.save(state, checkpoint_id=Path(where) / preset / variant)
            plain = opt.state_dict()
            calls = [(b.layout.m, b.layout.n, len(b.blocks), b.plan.calls) for b in opt._buckets]
            train(model, opt, grads[SAVE_AT:], first=SAVE_AT)
            out[(preset, variant)] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "optim": state["optim"],
                "plain": plain,
                "calls": calls,
            }
    return out


def resume(rank, world, where, presets=PRESETS):
    """A fresh model (other values) and optimizer at this world size, dcp.load, train the remaining steps."""
    grads = gradients()
    out = {}
    for preset in presets:
        for variant, full in VARIANTS.items():
            model = Net(seed=7)
            opt = build(model, preset)
            options = dsd.StateDictOptions(full_state_dict=full)
            state = {"model": dsd.get_model_state_dict(model, options=options), "optim": dsd.get_optimizer_state_dict(model, opt, options=options)}
            dcp.load(state, checkpoint_id=Path(where) / preset / variant)
            dsd.set_model_state_dict(model, state["model"], options=options)
            dsd.set_optimizer_state_dict(model, opt, state["optim"], options=options)
            buckets = [  # every rank's view of every bucket: shape, blocks, the plan's call counter, the state's
                (b.layout.m, b.layout.n, len(b.blocks), b.state.calls if b.plan is None else b.plan.calls, None if b.state is None else b.state.calls)
                for b in opt._buckets
            ]
            train(model, opt, grads[SAVE_AT:], first=SAVE_AT)
            out[(preset, variant)] = {"params": [p.detach().clone() for p in model.parameters()], "buckets": buckets}
    return out


def job_resume(rank, world, where):
    return resume(rank, world, where)


# -- spawning ----------------------------------------------------------------------------------

JOBS = {f.__name__.removeprefix("job_"): f for f in (job_save, job_resume)}


def _main(rank, world, init_method, where, module, jobs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        table = importlib.import_module(module).JOBS
        results = {job: table[job](rank, world, where) for job in jobs}
        torch.save(results, Path(where) / f"rank{rank}-of-{world}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world, jobs, where, module=__name__):
    """Run ``jobs`` (names in ``module``'s ``JOBS``) on ``world`` ranks; per rank, ``{job: result}``.

    The ranks are forked where the platform can (they inherit the imported torch and
    kronopt instead of importing them again, most of a fresh process's start-up; each
    runs one thread), else spawned.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    w.start_ranks(_main, lambda: (world, w.rendezvous(where), str(where), module, list(jobs)), world, start_method=method)
    return [torch.load(Path(where) / f"rank{r}-of-{world}.pt", weights_only=False) for r in range(world)]


def give_grad(p, g, where, mesh=None, rank=0, world=2):
    """``g`` as ``p``'s gradient with a NaN at the first entry of rank ``where``'s rows of dim 0 (``None``: no
    NaN): in one process the full gradient, under FSDP2 (``mesh``) this rank's ``Shard(0)`` rows, the NaN on
    rank ``where`` alone (the same entry)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if mesh is None:
        if where is not None:
            size = -(-p.shape[0] // world)
            g[min(where * size, p.shape[0])].view(-1)[0] = float("nan")
        p.grad = g
        return
    d = distribute_tensor(g, mesh, [Shard(0)])
    if where == rank:
        d.to_local()[0].view(-1)[0] = float("nan")
    p.grad = d
