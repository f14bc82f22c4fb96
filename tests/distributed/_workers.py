"""Work run inside spawned ranks (``torch.multiprocessing.spawn`` imports this module in each child).

Every job takes ``(rank, world)`` with the gloo process group up and returns plain
data (tensors, ints, dicts) that the parent test compares.
"""

import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import kronopt

warnings.filterwarnings("ignore", message="the route sends embeddings")

#: square, full-rank-at-the-first-refresh blocks: three (8, 8) share a bucket, one (6, 6), one wide, one vector
SHAPES = [(8, 8), (8, 8), (8, 8), (6, 6), (12, 8), (8,)]
PRESETS = ["soap", "dykaf", "kl_shampoo", "pro_kl_shampoo", "muon"]
OVERRIDES = {"refresh.every": 5, "state_dtype": "float64"}
MUON = {"inner.ns_dtype": "float64"}
STEPS = 24


def overrides(preset: str, **extra):
    return {**OVERRIDES, **(MUON if preset == "muon" else {}), **extra}


def make_params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def gradients(shapes=SHAPES, steps=STEPS, seed=1, nan_at=None):
    """The same gradients on every rank (DDP after its all-reduce); ``nan_at``: a NaN in block 0 at that step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if k == nan_at:
            grads[0][0, 0] = float("nan")
        out.append(grads)
    return out


def run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


def owned_entries(opt, params):
    """Positions of the parameters whose ``state[p]`` holds tensors on this rank."""
    return [i for i, p in enumerate(params) if any(isinstance(v, torch.Tensor) and v.ndim > 0 for v in opt.state.get(p, {}).values())]


def job_presets(rank, world, modes=(True, False)):
    """Each preset sharded and not: final parameters, who holds state, the bytes gathered."""
    out = {}
    grads = gradients()
    for preset in PRESETS:
        row = {}
        for shard in modes:
            params = make_params()
            opt = kronopt.build(params, preset, **overrides(preset, **{"distributed.shard_work": shard}))
            run(opt, params, grads)
            row[shard] = {
                "params": [p.detach().clone() for p in params],
                "owned": owned_entries(opt, params),
                "state_bytes": opt.state_bytes(),
                "summary": opt.bucket_summary(),
            }
        out[preset] = row
    return out


def job_dykaf_late(rank, world):
    """dykaf with block 0 (one of three same-shape blocks) given zero gradients on its first two steps (dykaf.md §5:
    it waits for a nonzero one), work sharding on and off: every rank's parameters and step counts."""
    out = {}
    grads = gradients()
    for k in (0, 1):
        grads[k][0] = grads[k][0] * 0
    for shard in (True, False):
        params = make_params()
        opt = kronopt.build(params, "dykaf", **overrides("dykaf", **{"distributed.shard_work": shard}))
        run(opt, params, grads)
        out[shard] = {"params": [p.detach().clone() for p in params], "calls": opt.state_dict()["state"][0]["calls"]}
    return out


def job_nonfinite(rank, world):
    """A NaN gradient (on every rank) at step 7: parameters after every step, scope step and block."""
    out = {}
    for scope in ("step", "block"):
        params = make_params()
        opt = kronopt.build(params, "soap", nonfinite="skip", nonfinite_scope=scope, **overrides("soap"))
        trace = []
        for step in gradients(steps=12, nan_at=7):
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
            trace.append([p.detach().clone() for p in params])
        out[scope] = {"trace": trace, "skipped": opt.skipped_steps()}
    return out


def job_state_dict(rank, world):
    """Save after 12 steps (each rank its own dict), then 8 more; a fresh sharded optimizer resumes from the rank's dict."""
    grads = gradients(steps=20)
    params = make_params()
    opt = kronopt.build(params, "soap", **overrides("soap"))
    run(opt, params, grads[:12])
    sd = opt.state_dict()
    snapshot = [p.detach().clone() for p in params]
    run(opt, params, grads[12:])
    restored = [torch.nn.Parameter(s.clone()) for s in snapshot]
    opt2 = kronopt.build(restored, "soap", **overrides("soap"))
    opt2.load_state_dict(sd)
    run(opt2, restored, grads[12:])
    return {"sd": sd, "snapshot": snapshot, "final": [p.detach().clone() for p in params], "resumed": [p.detach().clone() for p in restored]}


def job_ddp(rank, world):
    """A real DistributedDataParallel wrapper: each rank its own slice of the batch, SOAP sharded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 8)).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = kronopt.build(ddp.parameters(), "soap", **overrides("soap"))
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(16 * world, 8, generator=gen, dtype=torch.float64)
        y = torch.randn(16 * world, 8, generator=gen, dtype=torch.float64)
        mine = slice(16 * rank, 16 * (rank + 1))
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "owned": owned_entries(opt, list(model.parameters()))}


#: one big block and several small ones of different shapes, plus a bucket of four
BALANCE_SHAPES = [(32, 32), (4, 4), (5, 5), (6, 6), (7, 7), (9, 9), (10, 10), (3, 3), (3, 3), (3, 3), (3, 3)]


def job_balance(rank, world):
    params = make_params(BALANCE_SHAPES)
    opt = kronopt.build(params, "soap", **overrides("soap"))
    return {"owned": owned_entries(opt, params), "state_bytes": opt.state_bytes()}


#: two param groups of other rates over SHAPES (a learning rate per layer): the (8, 8) blocks 0 and 2 in the first,
#: 1 in the second, so their shared bucket's blocks run first, second, first group
PER_LAYER = [([0, 2, 4, 5], {"lr": 2e-2, "weight_decay": 0.1}), ([1, 3], {"lr": 5e-3, "weight_decay": 0.0})]
PER_LAYER_PRESETS = ["soap", "muon"]


def per_layer_groups(params):
    return [{"params": [params[i] for i in idx], **rates} for idx, rates in PER_LAYER]


def job_per_layer(rank, world):
    """Per-layer groups that differ in their rates alone, sharded: final parameters and the buckets' groups."""
    out = {}
    grads = gradients(steps=12)
    for preset in PER_LAYER_PRESETS:
        params = make_params()
        opt = kronopt.build(per_layer_groups(params), preset, **overrides(preset))
        assert opt._sharding is not None
        run(opt, params, grads)
        out[preset] = {"params": [p.detach().clone() for p in params], "groups": [r["groups"] for r in opt.bucket_summary()]}
    return out


def job_presets_sharded(rank, world):
    return job_presets(rank, world, modes=(True,))


#: plain AdamW blocks of 16 K entries or more, where torch's fused kernel first stepped them on the CPU
#: (two share a bucket), one a vector
LARGE_ADAM_SHAPES = [(160, 128), (160, 128), (20480,)]


def job_adamw_large(rank, world):
    """Plain AdamW on large blocks, sharded and not: final parameters."""
    grads = gradients(LARGE_ADAM_SHAPES, steps=3)
    out = {}
    for shard in (True, False):
        params = make_params(LARGE_ADAM_SHAPES)
        opt = kronopt.build(params, "adamw", **{"state_dtype": "float64", "distributed.shard_work": shard})
        run(opt, params, grads)
        out[shard] = [p.detach().clone() for p in params]
    return out


def job_reset_reshape(rank, world):
    """Every rank empties ``state[p0]`` (which one rank owns), then gives p0 another shape: every rank must take
    both alike (the state kept with a warning where the rank sees it, then a refusal on every rank), or the ranks
    would wait on each other in the step's collectives."""
    grads = gradients(steps=6)
    params = make_params()
    opt = kronopt.build(params, "soap", **overrides("soap"))
    run(opt, params, grads[:3])
    opt.state[params[0]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(opt, params, grads[3:])
    kept = [str(w.message) for w in caught if "cannot start afresh alone" in str(w.message)]
    params[0].data = torch.zeros(4, 16, dtype=torch.float64)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone() if p is not params[0] else torch.zeros(4, 16, dtype=torch.float64)
    try:
        opt.step()
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    return {"kept": kept, "refused": refused, "after": [p.detach().clone() for p in params[1:]], "owned": owned_entries(opt, params)}


JOBS = {
    f.__name__.removeprefix("job_"): f
    for f in (
        job_presets, job_presets_sharded, job_nonfinite, job_state_dict, job_ddp, job_balance, job_adamw_large,
        job_dykaf_late, job_reset_reshape, job_per_layer,
    )
}


def _main(rank, world, init_method, out_dir, jobs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        results = {job: JOBS[job](rank, world) for job in jobs}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rendezvous(where):
    """The ranks' meeting point: a store file of its own under ``where``, as an ``init_method``.

    A file rather than a TCP port: a port found free here and bound by rank 0 a moment
    later can be taken in between by any other process on the machine.
    """
    return (Path(where).resolve() / f"store-{uuid.uuid4().hex}").as_uri()


def start_ranks(main, make_args, world, *, start_method="spawn"):
    """torch's ``start_processes`` of ``main`` on ``world`` ranks, ``make_args()`` giving each try its arguments (a
    rendezvous of its own). A world one of whose ranks dies by a signal, not by an error raised in Python, is started
    once more, with a warning: gloo's start-up has aborted a rank on rare runs (``terminate called without an active
    exception`` before any job ran, once in the forty-sixth session's fresh-clone runs of the suite). A rank that dies
    so again, or any error raised in a rank, fails the test."""
    for attempt in (0, 1):
        try:
            torch.multiprocessing.start_processes(
                main, args=make_args(), nprocs=world, join=True, start_method=start_method
            )
            return
        except torch.multiprocessing.ProcessExitedException as died:
            if attempt:
                raise
            warnings.warn(f"a rank died by a signal ({died}); the {world} ranks start once more", stacklevel=2)


def spawn(world, jobs, out_dir):
    """Run ``jobs`` on ``world`` ranks; per rank, ``{job: result}``."""
    start_ranks(_main, lambda: (world, rendezvous(out_dir), str(out_dir), list(jobs)), world)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
