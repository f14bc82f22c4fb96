"""FSDP2 work run inside spawned ranks (``torch.multiprocessing.spawn`` imports this module in each child).

Every job takes ``(rank, world, out_dir)`` with the gloo process group up and returns
plain data (full parameters as plain tensors, ints, dicts) that the parent test
compares with a single-process run built from the same helpers here.
"""

import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import kronopt

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
        self.unused = nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64))
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


def shard(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a)
    fully_shard(model.b)
    fully_shard(model)
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


JOBS = {f.__name__.removeprefix("job_"): f for f in (job_presets,)}


def _main(rank, world, port, out_dir, jobs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {job: JOBS[job](rank, world, out_dir) for job in jobs}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world, jobs, out_dir):
    """Run ``jobs`` on ``world`` ranks; per rank, ``{job: result}``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_main, args=(world, port, str(out_dir), list(jobs)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single(preset, steps=STEPS, **kw):
    """The same preset, model and batches in one process (the whole batch per step)."""
    model = Net()
    opt = kronopt.build(groups(model, preset), preset, **overrides(preset))
    train(model, opt, data(steps), **kw)
    return full(model)
