"""Work run inside forked ranks for ``test_distributed_edges_differential.py`` (and, without a process group,
the single-process references the parent compares them with).

Every job takes ``(rank, world, where)`` with the gloo process group up (``_dcp_workers.spawn``) and returns
plain data; a job whose load or step raises returns the error as a string (``_caught``), so that a failing
case fails its test instead of the whole spawn.

* ``ddp``: work sharding at an odd world size (3) on a set of blocks no other test has: one bucket per dtype
  for the same shape (float32 and float64 parameters), a bucket of exactly one block, a bucket of two blocks
  (fewer than the ranks: one rank owns none), a frozen parameter alone in its bucket and one sharing a bucket,
  float32 and float64 vectors, a parameter without gradient for one step, and a group added by
  ``add_param_group`` after five steps;
* ``dcp_save`` (2 ranks) / ``dcp_resume`` (3 ranks and one process): those blocks checkpointed with
  ``torch.distributed.checkpoint`` with and without ``shard_work``, loaded with and without it;
* ``nan``: a real ``DistributedDataParallel`` model on 3 ranks, a NaN in one rank's slice of the batch, an
  ``inf`` and a ``-inf`` in two others' at another step, a branch used by one rank only and one used by none;
* ``fsdp``: ``fully_shard`` on 3 ranks with a mixed precision policy (bfloat16 parameters in the forward,
  float32 reduction) or ``reshard_after_forward = False``, rows split 2 + 2 + 1 and 1 + 1 + 0 (a rank holding an
  empty shard), a ``(2,)`` bias and a ``(1,)`` parameter smaller than the world;
* ``frozen_*``: FSDP2 checkpoints of models with frozen parameters.
"""

import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

import kronopt

from ._dcp_workers import spawn as _spawn

warnings.filterwarnings("ignore", message="the route sends embeddings")
warnings.filterwarnings("ignore", message="find_unused_parameters=True was specified")


def _caught(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - a CheckpointException too; raised on every rank alike
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _mesh(world):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", list(range(world)))


def _load_dcp(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    state = {"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    dsd.set_model_state_dict(model, state["model"])
    dsd.set_optimizer_state_dict(model, opt, state["optim"])


def _save_dcp(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


# -- replicated parameters under work sharding ------------------------------------------------------------

STEPS = 9
NONE_AT = (3, 2)  # (step, parameter): no gradient on any rank (DDP with find_unused_parameters leaves None)
ADD_AT = 5  # add_param_group before this step
SAVE_AT = 7  # after the split (NONE_AT) and the added group's first calls
F32 = torch.float32


class Blocks(nn.Module):
    """The blocks as parameters of a module (DCP keys state by name). ``ps`` from the start, ``added`` later."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def r(*shape, dtype=torch.float64):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype))

        self.ps = nn.ParameterList([
            r(8, 8, dtype=F32), r(8, 8),  # one shape, two dtypes: two buckets of one block
            r(6, 6),  # a bucket of exactly one block; no gradient at NONE_AT
            r(5, 5), r(5, 5),  # two blocks on three ranks
            r(4, 4).requires_grad_(False),  # frozen, alone in its bucket
            r(7, dtype=F32), r(7),  # vectors of two dtypes (the fallback of muon)
            r(3, 3).requires_grad_(False), r(3, 3),  # a frozen block sharing a bucket with a trained one
        ])
        self.added = nn.ParameterList([r(9, 4), r(9, 4, dtype=F32), r(2, 2)])


def _gradients():
    model = Blocks()
    gen = torch.Generator().manual_seed(1)
    out = []
    for k in range(STEPS):
        live = list(model.ps) + (list(model.added) if k >= ADD_AT else [])
        out.append([torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in live])
    return out


GRADS = _gradients()
DDP_PRESETS = ["soap", "muon", "shampoo"]


def build(model, preset, shard=True):
    over = {"state_dtype": "float64", "refresh.every": 3, "distributed.shard_work": shard}
    if preset == "muon":
        over["inner.ns_dtype"] = "float64"
    return kronopt.build(list(model.ps.named_parameters(prefix="ps")), preset, **over)


def add_group(opt, model):
    opt.add_param_group({"params": list(model.added.named_parameters(prefix="added")), "lr": 0.01})


def run(model, opt, start, stop):
    """Steps ``start … stop - 1``; the parameters after each (every parameter, ``added`` included)."""
    trace = []
    for k in range(start, stop):
        if k == ADD_AT:
            add_group(opt, model)
        live = list(model.ps) + (list(model.added) if k >= ADD_AT else [])
        for j, (p, g) in enumerate(zip(live, GRADS[k], strict=True)):
            p.grad = None if not p.requires_grad or (k, j) == NONE_AT else g.clone()
        opt.step()
        trace.append([full(p) for p in model.parameters()])
    return trace


def ddp_train(preset, shard=True):
    model = Blocks()
    opt = build(model, preset, shard)
    trace = run(model, opt, 0, STEPS)
    return {"trace": trace, "state_bytes": opt.state_bytes(), "owned": sum(r["owned"] for r in opt.bucket_summary())}


def job_ddp(rank, world, where):
    return {(preset, shard): _caught(ddp_train, preset, shard) for preset in DDP_PRESETS for shard in (True, False)}


DCP_PRESETS = ["soap", "muon"]


def job_dcp_save(rank, world, where):
    """Train SAVE_AT steps with and without shard_work, save with DCP, train on: the final parameters."""
    out = {}
    for preset in DCP_PRESETS:
        for shard in (True, False):
            def go(preset=preset, shard=shard):
                model = Blocks()
                opt = build(model, preset, shard)
                run(model, opt, 0, SAVE_AT)
                _save_dcp(model, opt, Path(where) / f"blocks-{preset}-{shard}")
                return run(model, opt, SAVE_AT, STEPS)[-1]

            out[(preset, shard)] = _caught(go)
    return out


def dcp_resume(where):
    """Every checkpoint of ``job_dcp_save`` loaded into a fresh model and optimizer with and without shard_work
    (built as the saved one: the group added), then the remaining steps: the final parameters."""
    out = {}
    for preset in DCP_PRESETS:
        for saved in (True, False):
            for shard in (True, False):
                def go(preset=preset, saved=saved, shard=shard):
                    model = Blocks(seed=9)
                    opt = build(model, preset, shard)
                    add_group(opt, model)
                    _load_dcp(model, opt, Path(where) / f"blocks-{preset}-{saved}")
                    return run(model, opt, SAVE_AT, STEPS)[-1]

                out[(preset, saved, shard)] = _caught(go)
    return out


def job_dcp_resume(rank, world, where):
    return dcp_resume(where)


# -- a real DDP model, non-finite gradients on some ranks only --------------------------------------------

NAN_STEPS, ROWS = 8, 6  # ROWS samples per rank
#: (step, rank) → the scale of that rank's first sample: NaN on one rank; +inf and -inf on two others
BAD = {(2, 1): float("nan"), (5, 0): float("inf"), (5, 2): float("-inf")}
ONLY_RANK0, NOBODY = 3, 4  # the branch runs on rank 0 only at step 3, on no rank at step 4, else on even steps


class Lm(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.a = nn.Linear(6, 6, dtype=torch.float64)
            self.b = nn.Linear(6, 6, dtype=torch.float64)
            self.branch = nn.Linear(6, 6, bias=False, dtype=torch.float64)
            self.head = nn.Linear(6, 5, dtype=torch.float64)

    def forward(self, x, scale, use):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        if use:
            h = h + torch.tanh(self.branch(h))
        return self.head(h) * scale[:, None]


def _batches(world):
    gen = torch.Generator().manual_seed(3)
    out = []
    for k in range(NAN_STEPS):
        x = torch.randn(world * ROWS, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(world * ROWS, 5, generator=gen, dtype=torch.float64)
        scale = torch.ones(world * ROWS, dtype=torch.float64)
        for (at, r), v in BAD.items():
            if at == k:
                scale[r * ROWS] = v
        out.append((x, y, scale))
    return out


def uses_branch(k, r):
    return r == 0 if k == ONLY_RANK0 else (k != NOBODY and k % 2 == 0)


NAN_CASES = [
    (preset, shard, nonfinite, scope)
    for preset, shards in (("soap", (True, False)), ("muon", (True,)))
    for shard in shards
    for nonfinite, scope in (("skip", "block"), ("skip", "step"), ("raise", "step"))
]


def lm_train(preset, shard, nonfinite, scope, rank=0, world=3, ddp=True):
    """Under DDP each rank its slice; without (``ddp=False``, one process) the mean of the slices' mean losses,
    as DDP averages them, each slice with the branch where its rank used it."""
    model = Lm()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    over = {"state_dtype": "float64", "refresh.every": 3, "nonfinite": nonfinite, "nonfinite_scope": scope,
            "distributed.shard_work": shard}
    if preset == "muon":
        over["inner.ns_dtype"] = "float64"
    opt = kronopt.build(list(model.named_parameters()), preset, **over)
    out = {"trace": [], "raised": [], "without_grad": []}
    for k, (x, y, scale) in enumerate(_batches(world)):
        opt.zero_grad()
        if ddp:
            mine = slice(rank * ROWS, (rank + 1) * ROWS)
            nn.functional.mse_loss(net(x[mine], scale[mine], uses_branch(k, rank)), y[mine]).backward()
        else:
            parts = [slice(r * ROWS, (r + 1) * ROWS) for r in range(world)]
            loss = sum(nn.functional.mse_loss(model(x[s], scale[s], uses_branch(k, r)), y[s]) for r, s in enumerate(parts))
            (loss / world).backward()
        out["without_grad"].append(sorted(n for n, p in model.named_parameters() if p.grad is None))
        try:
            opt.step()
            out["raised"].append(None)
        except FloatingPointError as exc:
            out["raised"].append(str(exc))
        out["trace"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def job_nan(rank, world, where):
    return {case: _caught(lm_train, *case, rank=rank, world=world) for case in NAN_CASES}


# -- FSDP2: mixed precision, reshard_after_forward = False, empty shards ----------------------------------

FSDP_STEPS, BATCH = 6, 12
#: (mode, preset): "mp" bfloat16 parameters in the forward and a float32 reduction; "keep":
#: reshard_after_forward = False (float64)
FSDP_CASES = [("mp", "soap"), ("mp", "shampoo"), ("mp", "muon"), ("keep", "soap"), ("keep", "adamw")]


class Net(nn.Module):
    """``l1`` (5, 7): 2 + 2 + 1 rows on three ranks; ``l2`` (2, 5): 1 + 1 + 0 (rank 2 holds no row) and its
    ``(2,)`` bias; ``s`` ``(1,)``; ``c`` ``(4, 3, 2)``, the block ``(4, 6)``."""

    def __init__(self, dtype):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.l1 = nn.Linear(7, 5, dtype=dtype)
            self.l2 = nn.Linear(5, 2, dtype=dtype)
            self.s = nn.Parameter(torch.randn(1, dtype=dtype))
            self.c = nn.Parameter(torch.randn(4, 3, 2, dtype=dtype) / 3)

    def forward(self, x):
        y = self.l2(torch.tanh(self.l1(x))) * self.s
        return y.sum(-1, keepdim=True) + (x[:, :6] @ self.c.reshape(4, 6).T).sum(-1, keepdim=True)


def fsdp_over(preset):
    over = {"state_dtype": "float64", "refresh.every": 3}
    if preset == "muon":
        over["inner.ns_dtype"] = "float64"
    return over


def _dtype(mode):
    return torch.float32 if mode == "mp" else torch.float64


def fsdp_train(mode, preset, rank, world):
    """Real forward and backward under fully_shard: per step the full gradients the optimizer was given and the
    full parameters after its step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = _dtype(mode)
    model = Net(dtype)
    kw = {"mesh": _mesh(world)}
    if mode == "mp":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        kw["reshard_after_forward"] = False
    fully_shard(model.l1, **kw)
    fully_shard(model, **kw)
    opt = kronopt.build(list(model.named_parameters()), preset, **fsdp_over(preset))
    gen = torch.Generator().manual_seed(3)
    out = {"grads": [], "trace": []}
    for _ in range(FSDP_STEPS):
        x = torch.randn(BATCH, 7, generator=gen, dtype=dtype)
        y = torch.randn(BATCH, 1, generator=gen, dtype=dtype)
        opt.zero_grad(set_to_none=True)
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        # the loss in the parameters' dtype: bfloat16 outputs against float32 targets fail in backward on torch 2.9
        nn.functional.mse_loss(model(x[mine]).to(dtype), y[mine]).backward()
        out["grads"].append({n: full(p.grad) for n, p in model.named_parameters()})
        opt.step()
        out["trace"].append({n: full(p) for n, p in model.named_parameters()})
    return out


def fsdp_replay(mode, preset, grads):
    """One process, the same optimizer on the gradients the ranks were given."""
    model = Net(_dtype(mode))
    opt = kronopt.build(list(model.named_parameters()), preset, **fsdp_over(preset))
    trace = []
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()
        trace.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trace


def job_fsdp(rank, world, where):
    return {case: _caught(fsdp_train, *case, rank, world) for case in FSDP_CASES}


# -- FSDP2 checkpoints with frozen parameters -------------------------------------------------------------

FROZEN_STEPS, FROZEN_SAVE = 6, 3


class Frozen(nn.Module):
    """``kind`` "shared": a frozen (6, 6) and a trained one, one bucket of two blocks: on two ranks each owns
    one, so one rank owns only the frozen block. ``kind`` "alone": two trained (6, 6) and a frozen (4, 4) alone
    in its bucket (no state on any rank, as in one process). Both with a trained bias."""

    def __init__(self, kind, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def r(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))

        if kind == "shared":
            self.f = r(6, 6).requires_grad_(False)
            self.w = r(6, 6)
        else:
            self.w = r(6, 6)
            self.v = r(6, 6)
            self.g = r(4, 4).requires_grad_(False)
        self.b = r(6)


def frozen_make(kind, world, seed=0):
    model = Frozen(kind, seed)
    mesh = None
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        mesh = _mesh(world)
        fully_shard(model, mesh=mesh)
    opt = kronopt.build(list(model.named_parameters()), "soap", state_dtype="float64", **{"refresh.every": 2})
    return model, opt, mesh


def frozen_run(model, opt, mesh, start, stop):
    from torch.distributed.tensor import Shard, distribute_tensor

    for k in range(start, stop):
        gen = torch.Generator().manual_seed(100 + k)
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.requires_grad:
                p.grad = g if mesh is None else distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return {n: full(p) for n, p in model.named_parameters()}


def frozen_uninterrupted(kind):
    model, opt, mesh = frozen_make(kind, 1)
    return frozen_run(model, opt, mesh, 0, FROZEN_STEPS)


def job_frozen_save(rank, world, where):
    """Per kind: FROZEN_SAVE steps, a DCP checkpoint and this rank's ``state_dict()``; the uninterrupted run's end;
    the run resumed from the rank's own dict (a fresh model given this rank's rows, a fresh optimizer)."""
    out = {}
    for kind in ("shared", "alone"):
        def go(kind=kind):
            model, opt, mesh = frozen_make(kind, world)
            frozen_run(model, opt, mesh, 0, FROZEN_SAVE)
            _save_dcp(model, opt, Path(where) / f"frozen-{kind}-fsdp")
            sd = opt.state_dict()
            rows = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
            final = frozen_run(model, opt, mesh, FROZEN_SAVE, FROZEN_STEPS)
            model2, opt2, _ = frozen_make(kind, world, seed=9)
            with torch.no_grad():
                for n, p in model2.named_parameters():
                    p.to_local().copy_(rows[n])
            own = _caught(lambda: (opt2.load_state_dict(sd), frozen_run(model2, opt2, mesh, FROZEN_SAVE, FROZEN_STEPS))[1])
            return {"final": final, "own": own}

        out[kind] = _caught(go)
    return out


def frozen_resume(kind, world, path):
    """A fresh model and optimizer at this world size loading the DCP checkpoint ``path``, then the rest."""
    model, opt, mesh = frozen_make(kind, world, seed=9)
    _load_dcp(model, opt, path)
    return frozen_run(model, opt, mesh, FROZEN_SAVE, FROZEN_STEPS)


def save_frozen_one_process(where):
    model, opt, mesh = frozen_make("alone", 1)
    frozen_run(model, opt, mesh, 0, FROZEN_SAVE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        _save_dcp(model, opt, Path(where) / "frozen-alone-one")


def job_frozen_from_one(rank, world, where):
    """The one-process checkpoint of the "alone" model (a frozen parameter, no state) loaded under FSDP2."""
    return _caught(frozen_resume, "alone", world, Path(where) / "frozen-alone-one")


JOBS = {
    f.__name__.removeprefix("job_"): f
    for f in (job_ddp, job_dcp_save, job_dcp_resume, job_nan, job_fsdp, job_frozen_save, job_frozen_from_one)
}


def spawn(world, jobs, where):
    return _spawn(world, jobs, where, module=__name__)
