r"""Work sharding under ``torch.distributed`` with replicated parameters (DDP).

Every rank holds every parameter and, after DDP's all-reduce, the same gradient.
Instead of every rank computing every block's update, each block gets one
**owner** rank; the owner alone keeps the block's optimizer state and computes its
direction, and one collective per bucket hands every direction to every rank,
which then writes every parameter identically (docs/distributed.md).

* :func:`block_cost` estimates a block's work from its :class:`~kronopt.types.Layout`.
* :func:`assign` picks the owners: within a bucket (equal costs) the counts per
  rank differ by at most one, which keeps the gather's padding below one block per
  rank; across buckets the extra blocks go to the least-loaded ranks.
* :class:`GatherPlan` is a bucket's view of all its blocks (every rank's) and
  performs the one all-gather.
* :func:`merge_state_dicts` joins the per-rank ``state_dict()`` s into the dict of
  a single-process optimizer.

Nothing here computes an update; the optimizer (``kronopt/optimizer.py``) decides
what to gather and where to write it.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import Tensor

from ._shapes import BlockSpec
from .inspection import counters_only
from .types import Layout

#: the ``kronopt`` key under which a sharded ``state_dict()`` describes its shard
SHARDING_KEY = "sharding"


@attrs.frozen(kw_only=True)
class Sharding:
    """Where this process stands: its rank, the world size and the process group (``None``: the default one)."""

    rank: int
    world_size: int
    group: Any = None


def current(*, enabled: bool) -> Sharding | None:
    """The :class:`Sharding` to use now: ``None`` unless ``enabled`` and a process group of more than one rank is up."""
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return Sharding(rank=dist.get_rank(), world_size=world) if world > 1 else None


def block_cost(layout: Layout) -> int:
    r"""Estimated work of one block of ``layout``, in multiply-adds (up to a constant).

    .. math::
        c = m n + \sum_{\text{full side } d} (d^3 + m n d) + \sum_{\text{restricted side } (d, r)} (d r^2 + m n r)

    The cubic term is the refresh (``eigh``/QR of a ``d × d`` factor), the ``m n d``
    terms the factor products and the rotations. A side that is not rotated costs
    nothing beyond the elementwise ``m n`` (Adam on a vector). Only the ratios
    between blocks matter.
    """
    m, n = layout.m, layout.n
    cost = m * n
    for kind, d, r in ((layout.left, m, layout.rank_left), (layout.right, n, layout.rank_right)):
        if kind == "full":
            cost += d**3 + m * n * d
        elif kind == "restricted":
            cost += d * r * r + m * n * r
    return cost


def assign(buckets: Sequence[tuple[int, int]], world_size: int, loads: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """Owner rank of every block: ``buckets[i] = (blocks, cost of one block)``.

    Buckets are taken by total cost, largest first. Each rank gets ``blocks //
    world_size`` blocks of a bucket and the remaining ``blocks % world_size`` go one
    each to the least-loaded ranks (ties to the lower rank), so a bucket's counts
    differ by at most one (the all-gather pads to the largest count) and one big
    block lands where the load is lowest. Within a bucket, rank ``j`` owns a
    contiguous run of blocks. The result depends on the arguments only, so every
    rank computes the same owners without communicating.

    Args:
        buckets: per bucket, its number of blocks and the cost of one (:func:`block_cost`).
        world_size: number of ranks.
        loads: the ranks' cost already assigned (a group added later); zeros if ``None``.

    Returns:
        ``owners[i][k]``, the rank that owns block ``k`` of bucket ``i``, and the ranks' loads.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    load = list(loads) if loads is not None else [0] * world_size
    if len(load) != world_size:
        raise ValueError(f"loads has {len(load)} entries for {world_size} ranks")
    owners: list[list[int]] = [[] for _ in buckets]
    order = sorted(range(len(buckets)), key=lambda i: (-buckets[i][0] * buckets[i][1], i))
    for i in order:
        blocks, cost = buckets[i]
        base, extra = divmod(blocks, world_size)
        counts = [base] * world_size
        for r in sorted(range(world_size), key=lambda r: (load[r], r))[:extra]:
            counts[r] += 1
        for r in range(world_size):
            load[r] += counts[r] * cost
            owners[i].extend([r] * counts[r])
    return owners, load


@attrs.define(eq=False)
class GatherPlan:
    """Every block of a bucket, every rank's, and how their directions are gathered.

    ``params[i]`` (with ``specs[i]``) is owned by ``owners[i]``; this rank's blocks
    are those with ``owners[i] == sharding.rank``, in the same order, and they are
    what the bucket stacks. ``calls`` counts the bucket's ``step()`` calls, known on
    every rank (also on one that owns none of its blocks), so all ranks agree on
    whether a call writes (a first call with ``skip_first_call`` does not, and then
    gathers nothing). ``stateful`` is set on every rank once the bucket's owners hold
    state (created for a trainable block, stepped or loaded): then every rank's
    ``state_dict()`` lists each block, the owner with its tensors, the others with the
    counters (docs/distributed.md, "Checkpoints").
    """

    params: list[Tensor]
    specs: list[BlockSpec]
    owners: list[int]
    sharding: Sharding
    calls: int = 0
    stateful: bool = False

    @property
    def counts(self) -> list[int]:
        """Blocks per rank."""
        out = [0] * self.sharding.world_size
        for r in self.owners:
            out[r] += 1
        return out

    @property
    def width(self) -> int:
        """Blocks each rank sends: the largest count (the others pad with zeros)."""
        return max(self.counts)

    def owned(self) -> list[int]:
        """Positions of this rank's blocks."""
        return [i for i, r in enumerate(self.owners) if r == self.sharding.rank]

    def gather_bytes(self, m: int, n: int, dtype: torch.dtype) -> int:
        """Bytes each rank receives at one gather (its own slot included): ``world · width · m · n · itemsize``."""
        return self.sharding.world_size * self.width * m * n * torch.empty((), dtype=dtype).element_size()

    def gather(self, D: Tensor | None, shape: tuple[int, int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """All blocks' directions ``(b m n)``, in ``params`` order, from this rank's ``D (k m n)``.

        One ``all_gather_single`` (``all_gather_into_tensor`` on older torch) of a
        ``(width m n)`` buffer per rank: equal sizes, so one collective whatever the
        ownership. ``D`` is ``None`` when this rank owns none of the blocks.
        """
        m, n = shape
        world, width = self.sharding.world_size, self.width
        send = torch.zeros((width, m, n), dtype=dtype, device=device)
        if D is not None and D.shape[0]:
            send[: D.shape[0]].copy_(D)
        out = torch.empty((world * width, m, n), dtype=dtype, device=device)
        collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        collective(out, send, group=self.sharding.group)
        slot = [0] * world
        index = []
        for r in self.owners:
            index.append(r * width + slot[r])
            slot[r] += 1
        return out.index_select(0, torch.tensor(index, device=device))

    def subset(self, keep: Sequence[int]) -> "GatherPlan":
        """The plan of the blocks at ``keep`` (a split bucket), ``calls`` carried over."""
        return GatherPlan(
            params=[self.params[i] for i in keep],
            specs=[self.specs[i] for i in keep],
            owners=[self.owners[i] for i in keep],
            sharding=self.sharding,
            calls=self.calls,
            stateful=self.stateful,
        )


def merge_state_dicts(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-rank ``state_dict()`` s of a sharded optimizer as one single-process state dict.

    Each rank's dict holds the entries of the blocks it owns, with their tensors, and
    for the other blocks their counters only (:func:`~kronopt.inspection.counters_only`);
    the union of the owners' entries holds every block once. The result loads into a
    single-process optimizer (or, on every rank, into a sharded one of any world size,
    which keeps its own blocks' entries).

    Raises:
        ValueError: the dicts are not all the ranks of one sharded save (wrong count,
            a rank missing or repeated, different param groups, a block with tensors in
            two dicts or in none, counters that disagree: dicts of different steps).
    """
    if not state_dicts:
        raise ValueError("no state dicts to merge")
    infos = [sd.get("kronopt", {}).get(SHARDING_KEY) for sd in state_dicts]
    if any(info is None for info in infos):
        raise ValueError("merge_state_dicts takes the state_dict() of every rank of a sharded optimizer; one has no sharding record")
    world = infos[0]["world_size"]
    ranks = sorted(info["rank"] for info in infos)
    if ranks != list(range(world)) or any(info["world_size"] != world for info in infos):
        raise ValueError(f"expected the state dicts of ranks 0..{world - 1} once each, got ranks {ranks}")
    first = state_dicts[0]
    state: dict[Any, Any] = {}
    counters: dict[Any, list[Mapping[str, Any]]] = {}
    for sd in state_dicts:
        if sd["param_groups"] != first["param_groups"]:
            raise ValueError("the ranks' state dicts have different param groups")
        for key, entry in sd["state"].items():
            if counters_only(entry):
                counters.setdefault(key, []).append(entry)
            elif key in state:
                raise ValueError(f"parameter {key!r} has state in two ranks' dicts")
            else:
                state[key] = entry
    for key, seen in counters.items():
        if key not in state:
            raise ValueError(f"no rank's dict holds the state of parameter {key!r}, which the others list: a rank's dict is missing")
        if any(entry.get(k) != state[key].get(k) for entry in seen for k in entry):
            raise ValueError(f"the ranks' counters of parameter {key!r} disagree: the dicts were saved at different steps")
    kron = {k: v for k, v in first["kronopt"].items() if k != SHARDING_KEY}
    return {"state": dict(sorted(state.items(), key=lambda kv: str(kv[0]))), "param_groups": first["param_groups"], "kronopt": kron}
