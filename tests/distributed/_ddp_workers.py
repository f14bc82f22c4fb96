"""Work run inside spawned ranks for ``test_ddp_wrappers.py``: a real ``DistributedDataParallel`` model.

:func:`lm_train` also runs in the parent without DDP (one process on the whole batch),
the reference the ranks are compared with.
"""

import warnings

import torch

import kronopt
from kronopt import linalg

from . import _workers as w
from ._dcp_workers import spawn as _spawn

warnings.filterwarnings("ignore", message="the route sends embeddings")

VOCAB, WIDTH, BATCH = 12, 8, 24  # BATCH tokens per rank
OVERRIDES = {"refresh.every": 4, "state_dtype": "float64"}
STEPS = 10
NAN_AT = (4, 1)  # (step, rank): a NaN in that rank's slice of the batch
FAIL_AT = 0  # every eigh of a WIDTH × WIDTH factor fails at this step (the float64 retry too): SOAP's first refresh


class Lm(torch.nn.Module):
    """Embedding, three tanh layers, a frozen layer, a layer used on even steps only, a head."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(VOCAB, WIDTH, dtype=torch.float64)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, dtype=torch.float64) for _ in range(3))
            self.frozen = torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.float64).requires_grad_(False)
            self.sometimes = torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=torch.float64)
            self.head = torch.nn.Linear(WIDTH, VOCAB, dtype=torch.float64)

    def forward(self, tokens, use_sometimes: bool):
        h = self.embed(tokens)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        h = h + self.frozen(h)
        if use_sometimes:
            h = h + torch.tanh(self.sometimes(h))
        return self.head(h)


def batches(world: int, *, nan_at=None):
    """Per step the whole batch: ``world · BATCH`` tokens, targets and logit scales (a NaN scale at ``nan_at``)."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for k in range(STEPS):
        tokens = torch.randint(0, VOCAB, (world * BATCH,), generator=gen)
        targets = torch.randint(0, VOCAB, (world * BATCH,), generator=gen)
        scale = torch.ones(world * BATCH, dtype=torch.float64)
        if nan_at is not None and nan_at[0] == k:
            scale[nan_at[1] * BATCH] = float("nan")
        out.append((tokens, targets, scale))
    return out


def groups(model):
    """Two groups: layers 0 and 1 with their own lr and refresh period, the rest; the fallback takes
    the biases (vectors), the embedding and the head (by name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or n.startswith("frozen")]
    first = [(n, p) for n, p in named if n.startswith(("layers.0.", "layers.1."))]
    rest = [(n, p) for n, p in named if not n.startswith(("layers.0.", "layers.1."))]
    return [{"params": first, "lr": 0.004, "refresh.every": 3}, {"params": rest}]


def _loss(model, tokens, targets, scale, use):
    return torch.nn.functional.cross_entropy(model(tokens, use) * scale[:, None], targets)


class _FailingEigh:
    """``linalg._eigh`` raises for every ``WIDTH × WIDTH`` factor while ``step == FAIL_AT``: the same blocks
    fail whether a rank solves them alone (their owner) or stacked with others (no sharding)."""

    def __init__(self, on: bool) -> None:
        self.on, self.step, self.raised = on, -1, 0

    def __enter__(self):
        self.saved = linalg._eigh
        if self.on:
            def failing(A):
                if self.step == FAIL_AT and A.shape[-1] == WIDTH:
                    self.raised += A.shape[0] if A.ndim == 3 else 1  # factors, not calls
                    raise RuntimeError("forced eigh failure")
                return self.saved(A)

            linalg._eigh = failing
        return self

    def __exit__(self, *exc):
        linalg._eigh = self.saved


def _tensors(opt):
    return {i: {k: v.clone() for k, v in e.items() if isinstance(v, torch.Tensor)} for i, e in opt.state_dict()["state"].items()}


def lm_train(rank, world, *, preset="kl_shampoo", shard=True, ddp=True, nan_at=None, fail_eigh=False, extra=None):
    """``preset`` (kl_shampoo: an AdamW fallback for the vectors, the embedding and the head) on :class:`Lm`
    with a LambdaLR schedule, under DDP (``ddp=False``: one process on the whole batch, the mean of the
    ranks' mean losses, as DDP averages them)."""
    model = Lm()
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    opt = kronopt.build(groups(model), preset, **OVERRIDES, **{"distributed.shard_work": shard}, **(extra or {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.5 * k))
    out = {"params": [], "states": [], "skipped": []}
    with warnings.catch_warnings(record=True) as caught, _FailingEigh(fail_eigh) as eigh:
        warnings.simplefilter("always", RuntimeWarning)
        for k, (tokens, targets, scale) in enumerate(batches(world, nan_at=nan_at)):
            eigh.step = k
            opt.zero_grad()
            use = k % 2 == 0
            if ddp:
                mine = slice(rank * BATCH, (rank + 1) * BATCH)
                _loss(net, tokens[mine], targets[mine], scale[mine], use).backward()
            else:
                halves = [slice(r * BATCH, (r + 1) * BATCH) for r in range(world)]
                (sum(_loss(model, tokens[s], targets[s], scale[s], use) for s in halves) / world).backward()
            opt.step()
            sched.step()
            out["skipped"].append(opt.skipped_steps())
            out["params"].append([p.detach().clone() for p in model.parameters()])
            out["states"].append(_tensors(opt))
        opt.flush_warnings()
    out.update(
        warnings=[str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)],
        lrs=[g["lr"] for g in opt.param_groups],
        pipelines=[(g["pipeline"], g.get("param_names")) for g in opt.param_groups],
        summary=opt.bucket_summary(),
        eigh_failures=opt.eigh_failures(),
        eigh_raised=eigh.raised,
        nonfinite=opt.nonfinite_counts(),
        owned=sorted(n for n, p in model.named_parameters() if any(isinstance(v, torch.Tensor) and v.ndim > 0 for v in opt.state.get(p, {}).values())),
    )
    return out


def job_lm(rank, world, where):
    """Routing, two groups, LambdaLR, a frozen and a sometimes-unused layer: sharded and not."""
    return {shard: lm_train(rank, world, shard=shard) for shard in (True, False)}


def job_lm_nan(rank, world, where):
    """A NaN in rank 1's slice at step 4, default nonfinite = "warn", scope "step"; and with scope "block"."""
    return {
        (shard, scope): lm_train(rank, world, shard=shard, nan_at=NAN_AT, extra={"nonfinite_scope": scope})
        for shard in (True, False)
        for scope in ("step", "block")
    }


def job_lm_eigh(rank, world, where):
    """SOAP with every 8 × 8 eigh failing at its first refresh (later ones are QR steps from the kept basis)."""
    return {shard: lm_train(rank, world, preset="soap", shard=shard, fail_eigh=True) for shard in (True, False)}


ADD_AT = 6


def add_group_run(shard: bool):
    """Blocks 0–3 from the start; blocks 4 and 5 join as a group of their own (another lr) after ADD_AT steps."""
    params = w.make_params()
    opt = kronopt.build(params[:4], "soap", **w.overrides("soap", **{"distributed.shard_work": shard}))
    for k, step in enumerate(w.gradients(steps=16)):
        if k == ADD_AT:
            opt.add_param_group({"params": params[4:], "lr": 0.01, "refresh.every": 2})
        for j, (p, g) in enumerate(zip(params, step)):
            p.grad = g.clone() if k >= ADD_AT or j < 4 else None
        opt.step()
    return {
        "params": [p.detach().clone() for p in params],
        "owned": w.owned_entries(opt, params),
        "summary": opt.bucket_summary(),
        "state_bytes": opt.state_bytes(),
    }


def job_add_group(rank, world, where):
    return {shard: add_group_run(shard) for shard in (True, False)}


OVERFLOW_AT = 3  # block 1's float32 gradient times 1e30 at this step: finite, but its factors overflow


def overflow_run(shard: bool):
    """SOAP in float32: a finite gradient whose update overflows is skipped on every rank and warned about."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(3)]
    opt = kronopt.build(params, "soap", **{"distributed.shard_work": shard, "refresh.every": 2})
    trace = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for k in range(6):
            for j, p in enumerate(params):
                g = torch.randn(8, 8, generator=gen)
                p.grad = g * 1e30 if (k, j) == (OVERFLOW_AT, 1) else g
            opt.step()
            trace.append([p.detach().clone() for p in params])
        opt.flush_warnings()
    return {
        "trace": trace,
        "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)],
        "nonfinite": opt.nonfinite_counts(),
        "skipped": opt.skipped_steps(),
    }


def job_overflow(rank, world, where):
    return {shard: overflow_run(shard) for shard in (True, False)}


JOBS = {f.__name__.removeprefix("job_"): f for f in (job_lm, job_lm_nan, job_lm_eigh, job_add_group, job_overflow)}


def spawn(world, jobs, where):
    return _spawn(world, jobs, where, module=__name__)
