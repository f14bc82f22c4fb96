"""FSDP2 work run inside forked ranks (:func:`spawn`).

Every job takes ``(rank, world, out_dir)`` with the gloo process group and the job's
device mesh (``MESH``) up, and returns plain data (full parameters as plain tensors,
ints, dicts) that the parent test compares with a single-process run built from the
same helpers here. One set of three processes serves both world sizes: the 2-rank
jobs run on a mesh of ranks 0 and 1 (so the collectives run on a group other than
the default one). The ranks are forked rather than spawned: importing
``torch.distributed.tensor`` takes seconds per process, and the children only set
one thread before touching torch's thread pools.
"""

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import kronopt

from ._workers import rendezvous, start_ranks

warnings.filterwarnings("ignore", message="the route sends embeddings")

PRESETS = ["soap", "dykaf", "kl_shampoo", "pro_kl_shampoo", "muon", "adamw"]
STEPS = 21
BATCH = 24  # the whole batch; each rank takes BATCH / world rows (2 and 3 ranks)


def overrides(preset: str, **extra):
    out = {"refresh.every": 5, "state_dtype": "float64"}
    if preset == "muon":
        out["inner.ns_dtype"] = "float64"
    if preset == "dykaf":  # full-rank first factors: "kron" starts from the rank-1 σ₁u₁u₁ᵀ, which leaves the
        out["factors.init"] = "sum"  # first basis of its null space to the gradients' rounding
    return {**out, **extra}


class Net(nn.Module):
    """Square layers (full-rank first factors with batches of 24) whose rows split unevenly over 2 and 3 ranks.

    ``a`` and ``b`` are ``(9, 9)`` (5 + 4 rows on 2 ranks, 3 each on 3) with ``(9,)`` biases;
    ``c`` is ``(3, 3, 9)``, the block ``(9, 9)`` under ``merge_dims`` with ``max_dim = 9`` (three
    block rows per row of dim 0: rows 2 + 1 of dim 0 on 2 ranks); ``unused`` gets no gradient.
    Every output feeds the loss, so no gradient has a zero row (a rank-deficient factor would
    leave the basis of its null space to rounding, and Adam in that basis amplifies it).
    ``big`` (optional, ``(big, big)``) is a large matrix for the memory test.
    """

    def __init__(self, seed=0, big=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(9, 9)
        self.b = nn.Linear(9, 9)
        self.c = nn.Parameter(torch.randn(3, 3, 9, generator=gen, dtype=torch.float64) / 3)
        self.unused = nn.Parameter(torch.randn(9, 9, generator=gen, dtype=torch.float64))  # shares a.weight's bucket
        self.big = nn.Linear(big, big, bias=False) if big else None
        for p in [*self.a.parameters(), *self.b.parameters()] + ([self.big.weight] if big else []):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[-1] ** 0.5)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        y = h @ self.c.reshape(9, 9).T
        if self.big is not None:
            y = y + self.big(x.new_ones(x.shape[0], self.big.in_features) * x[:, :1]).sum(-1, keepdim=True) * 1e-3
        return y


def groups(model, preset, lr_c=None):
    """Two groups: the 9×9 layers (and biases), and ``c`` under merge_dims with max_dim 9 (its own lr if given)."""
    named = [(n, p) for n, p in model.named_parameters() if n != "c"]
    c = {"params": [("c", model.c)], "shapes.merge_dims": True, "shapes.max_dim": 9}
    if lr_c is not None:
        c["lr"] = lr_c
    return [{"params": named}, c]


def data(steps=STEPS, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, 9, generator=gen, dtype=torch.float64), torch.randn(BATCH, 9, generator=gen, dtype=torch.float64))
        for _ in range(steps)
    ]


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


MESH = None  # the device mesh of the jobs running now (all ranks, or the first two)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a, mesh=MESH)
    fully_shard(model.b, mesh=MESH)
    fully_shard(model, mesh=MESH)
    return model


def full(model):
    """Every parameter as a plain full tensor, by name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def train(model, opt, batches, rank=0, world=1, *, hook=None, scheduler=None):
    rows = BATCH // world
    for k, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        mine = slice(rows * rank, rows * (rank + 1))
        loss_fn(model, x[mine], y[mine]).backward()
        if hook is not None:
            hook(k, model)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def owned(opt, model):
    """Names of the parameters whose state holds block-sized tensors on this rank."""
    return sorted(
        n for n, p in model.named_parameters()
        if any(isinstance(v, torch.Tensor) and v.ndim > 0 for v in opt.state.get(p, {}).values())
    )


def job_presets(rank, world, out_dir):
    out = {}
    for preset in PRESETS:
        model = shard(Net())
        opt = kronopt.build(groups(model, preset), preset, **overrides(preset))
        train(model, opt, data(), rank, world)
        out[preset] = {
            "params": full(model),
            "owned": owned(opt, model),
            "state_bytes": opt.state_bytes(),
            "summary": opt.bucket_summary(),
        }
    return out


class PeakNumel(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


BIG = 48


def job_peak(rank, world, out_dir):
    """SOAP with a (48, 48) matrix next to the 9×9 ones: the largest tensor any op makes during ``step()``."""
    model = shard(Net(big=BIG))
    opt = kronopt.build(groups(model, "soap"), "soap", **overrides("soap"))
    peaks = []
    for k, (x, y) in enumerate(data(6)):
        opt.zero_grad(set_to_none=True)
        rows = BATCH // world
        loss_fn(model, x[rows * rank : rows * (rank + 1)], y[rows * rank : rows * (rank + 1)]).backward()
        with torch.no_grad(), PeakNumel() as mode:
            opt.step()
        peaks.append(mode.peak)
    return {"peaks": peaks, "owned": owned(opt, model), "local_big": model.big.weight.to_local().numel()}


def _nan_hook(rank, at, where):
    """Put a NaN in this rank's rows of ``a.weight``'s gradient at step ``at`` (on rank ``where`` only)."""

    def hook(k, model):
        if k == at and rank == where:
            model.a.weight.grad.to_local()[0, 0] = float("nan")

    return hook


def job_nonfinite(rank, world, out_dir):
    """A NaN in one rank's shard of ``a.weight``'s gradient at step 4: parameters after every step, per scope."""
    out = {}
    for scope in ("step", "block"):
        model = shard(Net())
        opt = kronopt.build(groups(model, "soap"), "soap", nonfinite="skip", nonfinite_scope=scope, **overrides("soap"))
        trace = []
        for k, batch in enumerate(data(8)):
            train(model, opt, [batch], rank, world, hook=lambda _, m, k=k: _nan_hook(rank, 4, world - 1)(k, m))
            trace.append(full(model))
        out[scope] = {"trace": trace, "skipped": opt.skipped_steps(), "nonfinite": opt.nonfinite_counts()}
    model = shard(Net())
    opt = kronopt.build(groups(model, "soap"), "soap", nonfinite="raise", **overrides("soap"))
    batches = data(5)
    train(model, opt, batches[:4], rank, world)
    before = full(model)
    try:
        train(model, opt, batches[4:], rank, world, hook=lambda _, m: _nan_hook(rank, 0, world - 1)(0, m))
        out["raise"] = None
    except FloatingPointError as exc:
        out["raise"] = {"message": str(exc), "unchanged": all(torch.equal(a, before[n]) for n, a in full(model).items())}
    return out


def misc_setup(model):
    """Muon routed by name (biases to the AdamW fallback), two groups with their own lr, a LambdaLR."""
    opt = kronopt.build(groups(model, "muon", lr_c=0.01), "muon", **overrides("muon"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.1 * k))
    return opt, scheduler


def job_misc(rank, world, out_dir):
    model = shard(Net())
    opt, scheduler = misc_setup(model)
    train(model, opt, data(12), rank, world, scheduler=scheduler)
    try:  # every rank's dict (this rank's stands in for each: the refusal reads their entries' kind)
        kronopt.distributed.merge_state_dicts([opt.state_dict()] * world)
        merge_error = None
    except ValueError as exc:
        merge_error = str(exc)
    out = {
        "params": full(model),
        "pipelines": [(g["pipeline"], g.get("param_names"), g["lr"]) for g in opt.param_groups],
        "summary": opt.bucket_summary(),
        "merge_error": merge_error,
    }
    # every parameter's entry deleted on rank 1 only: its state is kept (it cannot start afresh alone under FSDP2),
    # and every rank steps on together (an error on rank 1 alone left rank 0 waiting in the step's collectives)
    if rank == 1:
        for p in list(opt.state):
            del opt.state[p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, data(2), rank, world)
    out["after_delete"] = full(model)
    out["entries_after_delete"] = len(opt.state)
    return out


def job_dcp(rank, world, out_dir):
    """Train 6 steps, save model and optimizer with torch.distributed.checkpoint, train 6 more; a fresh
    model and optimizer load the checkpoint and train the same 6."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    batches = data(12)
    model = shard(Net())
    opt = kronopt.build(groups(model, "soap"), "soap", **overrides("soap"))
    train(model, opt, batches[:6], rank, world)
    path = Path(out_dir) / "ckpt"
    group = MESH.get_group()
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path, process_group=group)
    train(model, opt, batches[6:], rank, world)
    fresh = shard(Net(seed=5))
    opt2 = kronopt.build(groups(fresh, "soap"), "soap", **overrides("soap"))
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(state, checkpoint_id=path, process_group=group)
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    train(fresh, opt2, batches[6:], rank, world)
    return {"final": full(model), "resumed": full(fresh), "state_bytes": (opt.state_bytes(), opt2.state_bytes())}


def job_dcp_reshard(rank, world, out_dir):
    """The 2-rank job_dcp checkpoint loaded on this world size (3), then the same 6 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    fresh = shard(Net(seed=5))
    opt = kronopt.build(groups(fresh, "soap"), "soap", **overrides("soap"))
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, opt)}
    dcp.load(state, checkpoint_id=Path(out_dir).parent / "world2" / "ckpt", process_group=MESH.get_group())
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, opt, state["optim"])
    train(fresh, opt, data(12)[6:], rank, world)
    return {"resumed": full(fresh), "owned": owned(opt, fresh)}


def eigh_run(model, steps, rank=0, world=1, fail_from=5):
    """Shampoo (eigh every 3 updates) whose eigh fails from update ``fail_from`` on: parameters and failure counts."""
    from kronopt import linalg

    opt = kronopt.build(groups(model, "shampoo"), "shampoo", **overrides("shampoo", **{"refresh.every": 3}))
    original = linalg._eigh

    def fails(A):
        raise RuntimeError("simulated convergence failure")

    try:
        for k, batch in enumerate(data(steps)):
            if k == fail_from:
                linalg._eigh = fails
            train(model, opt, [batch], rank, world)
    finally:
        linalg._eigh = original
    return {"params": full(model), "failures": opt.eigh_failures()}


def per_layer_groups(model):
    """Groups that differ in their rates alone: ``a``'s weight and bias, ``b``'s with ``unused`` (another lr and no
    decay); so ``a.weight``, ``b.weight`` and ``unused`` share one (9, 9) bucket, the biases another."""
    return [
        {"params": list(model.a.named_parameters(prefix="a")), "lr": 2e-2, "weight_decay": 0.1},
        {"params": [*model.b.named_parameters(prefix="b"), ("unused", model.unused)], "lr": 5e-3, "weight_decay": 0.0},
    ]


PER_LAYER_PRESETS = ["soap", "muon"]


def job_per_layer(rank, world, out_dir):
    """Per-layer groups (:func:`per_layer_groups`) over FSDP2: full parameters and the buckets' groups."""
    out = {}
    for preset in PER_LAYER_PRESETS:
        model = shard(Net())
        opt = kronopt.build(per_layer_groups(model), preset, **overrides(preset))
        train(model, opt, data(12), rank, world)
        out[preset] = {"params": full(model), "groups": [r["groups"] for r in opt.bucket_summary()]}
    # a checkpoint of the shared buckets through torch.distributed.checkpoint: a fresh optimizer resumes from it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    batches, group, path = data(8), MESH.get_group(), Path(out_dir) / "per_layer_ckpt"
    model = shard(Net())
    opt = kronopt.build(per_layer_groups(model), "soap", **overrides("soap"))
    train(model, opt, batches[:4], rank, world)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path, process_group=group)
    train(model, opt, batches[4:], rank, world)
    fresh = shard(Net(seed=5))
    opt2 = kronopt.build(per_layer_groups(fresh), "soap", **overrides("soap"))
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(state, checkpoint_id=path, process_group=group)
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    train(fresh, opt2, batches[4:], rank, world)
    out["dcp"] = {"final": full(model), "resumed": full(fresh), "groups": [r["groups"] for r in opt2.bucket_summary()]}
    return out


def job_eigh(rank, world, out_dir):
    return eigh_run(shard(Net()), 9, rank, world)


JOBS = {
    f.__name__.removeprefix("job_"): f
    for f in (job_presets, job_peak, job_nonfinite, job_misc, job_dcp, job_dcp_reshard, job_eigh, job_per_layer)
}


def _main(rank, world, init_method, out_dir, plan):
    """``plan``: ``{ranks: jobs}``; the jobs of each entry run on a device mesh of its first ``ranks`` ranks
    (the others wait), so one spawn serves several world sizes."""
    global MESH
    from torch.distributed.device_mesh import DeviceMesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        results = {}
        for size, jobs in plan.items():
            MESH = DeviceMesh("cpu", list(range(size)))  # every rank takes part in creating it
            if rank < size:
                sub = Path(out_dir) / f"world{size}"
                sub.mkdir(exist_ok=True)
                results[size] = {job: JOBS[job](rank, size, sub) for job in jobs}
            dist.barrier()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(plan, out_dir):
    """Run ``plan`` (``{ranks: jobs}``) in one set of ``max(ranks)`` processes; per world size, per rank, ``{job: result}``."""
    world = max(plan)
    # fork, after importing FSDP2 here: each child would otherwise spend seconds importing torch.distributed.tensor
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    start_ranks(_main, lambda: (world, rendezvous(out_dir), str(out_dir), dict(plan)), world, start_method="fork")
    ranks = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {size: [ranks[r][size] for r in range(size)] for size in plan}


def single(preset, steps=STEPS, **kw):
    """The same preset, model and batches in one process (the whole batch per step)."""
    model = Net()
    opt = kronopt.build(groups(model, preset), preset, **overrides(preset))
    train(model, opt, data(steps), **kw)
    return full(model)
