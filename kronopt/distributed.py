r"""Work sharding under ``torch.distributed``: replicated parameters (DDP) and DTensor parameters (FSDP2).

**DDP.** Every rank holds every parameter and, after DDP's all-reduce, the same
gradient. Instead of every rank computing every block's update, each block gets one
**owner** rank; the owner alone keeps the block's optimizer state and computes its
direction, and one collective per bucket hands every direction to every rank,
which then writes every parameter identically (docs/distributed.md).

**FSDP2.** Every rank holds ``torch.chunk``'s rows of each parameter (``Shard(0)``).
The result is still exactly one process's: a block's owner receives the other
ranks' rows of its gradient (one ``all_to_all`` per bucket), steps the full matrix,
and sends every rank its rows of the direction back (a second one); buckets whose
stages all work entry by entry (:func:`is_elementwise`) step each rank's rows
locally with no communication. :class:`ShardPlan` holds the row map and the two
collectives; :func:`check_fsdp_param` refuses placements it cannot map.

* :func:`block_cost` estimates a block's work from its :class:`~kronopt.types.Layout`.
* :func:`assign` picks the owners: within a bucket (equal costs) the counts per
  rank differ by at most one, which keeps the gather's padding below one block per
  rank; across buckets the extra blocks go to the least-loaded ranks.
* :class:`GatherPlan` is a bucket's view of all its blocks (every rank's) and
  performs the one all-gather.
* :func:`merge_state_dicts` joins the per-rank ``state_dict()`` s into the dict of
  a single-process optimizer.
* :func:`chunk_rows`, :func:`fsdp_sharding`, :func:`check_fsdp_param`,
  :class:`ShardPlan` and :func:`is_elementwise` serve FSDP2.

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
from .types import Layout, capabilities

#: the ``kronopt`` key under which a sharded ``state_dict()`` describes its shard
SHARDING_KEY = "sharding"
#: the ``kronopt`` section's key of the blocks' owners (work sharding, FSDP2): ``world_size`` and a rank per parameter
OWNERS_KEY = "owners"


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
    #: index tensors made once per name and device (:meth:`index`): a tensor built from a Python list each step
    #: would be a blocking copy from host memory on a GPU
    _cache: dict[Any, Tensor] = attrs.field(init=False, factory=dict, repr=False)

    def index(self, name: str, values: list[int], device: torch.device) -> Tensor:
        """``values`` as an index tensor on ``device``, made once per ``name`` and device (the plan's owners are
        fixed: a split or a reassignment makes a new plan)."""
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._cache[key]

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
        return out.index_select(0, self.index("gather", index, device))

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
            two dicts or in none, counters that disagree: dicts of different steps), or they
            are an FSDP2 optimizer's (DTensor entries: ``torch.distributed.checkpoint`` reshards those).
    """
    if not state_dicts:
        raise ValueError("no state dicts to merge")
    dtensor = _dtensor_types()[0]
    if any(isinstance(v, dtensor) for sd in state_dicts for entry in sd.get("state", {}).values() if isinstance(entry, Mapping) for v in entry.values()):
        raise ValueError(
            "these are an FSDP2 optimizer's dicts: their elementwise entries are DTensor row shards on every rank, "
            "which merge_state_dicts does not join. Save and load through torch.distributed.checkpoint "
            "(get_optimizer_state_dict / dcp.save, which reshards); full_state_dict=True makes no whole dict on one "
            "rank (the matrix blocks' tensors stay with their owners)"
        )
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
    kron = {k: v for k, v in first["kronopt"].items() if k not in (SHARDING_KEY, OWNERS_KEY)}
    # the entries in the buckets' order, each bucket's blocks in its stack's (the rank dicts' bucket lists, alike on
    # every rank), as one process's state_dict lists them: a load in one process stacks them so (the others after)
    keys = [k for g in first["param_groups"] for k in g["params"]]
    buckets = infos[0].get("buckets") or []
    place = {keys[i]: (bi, n) for bi, idx in enumerate(buckets) for n, i in enumerate(idx) if i < len(keys)}
    ordered = sorted(state.items(), key=lambda kv: (place.get(kv[0], (len(buckets), 0)), str(kv[0])))
    return {"state": dict(ordered), "param_groups": first["param_groups"], "kronopt": kron}


# -- FSDP2: DTensor parameters sharded by rows ----------------------------------------------


def _dtensor_types() -> tuple[type, type]:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 that ``rank`` holds under ``Shard(0)`` (``torch.chunk``'s split:
    ``⌈rows / world⌉`` per rank, the last ranks fewer or none)."""
    size = -(-rows // world_size)
    return min(rank * size, rows), min((rank + 1) * size, rows)


def fsdp_sharding(p: Tensor) -> Sharding:
    """The :class:`Sharding` of a DTensor parameter: its mesh's rank, size and process group."""
    mesh = p.device_mesh  # type: ignore[attr-defined]
    return Sharding(rank=mesh.get_local_rank(), world_size=mesh.size(), group=mesh.get_group())


def check_fsdp_param(p: Tensor) -> None:
    """Refuse a DTensor parameter whose shards kronopt cannot map to whole rows of its block.

    Supported: FSDP2's layout, ``Shard(0)`` on a 1-D device mesh, the local shard being
    ``torch.chunk``'s piece of dim 0 (checked). Every row of dim 0 is ``m / d₀``
    consecutive rows of the ``(m, n)`` block (the shape policy only merges dims into
    the first block dim from the left), so a shard is a run of whole block rows.

    Raises:
        ValueError: another placement (``Replicate``, ``Shard(1)``, HSDP's 2-D mesh), a 0-D
            parameter, or a local shard that is not ``torch.chunk``'s.
    """
    _, Shard = _dtensor_types()
    mesh = p.device_mesh  # type: ignore[attr-defined]
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    where = f"DTensor parameter of shape {tuple(p.shape)} with placements {placements} on a {mesh.ndim}-D mesh"
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"kronopt supports DTensor parameters sharded as FSDP2 does (Shard(0) on a 1-D device mesh); got a {where}"
        )
    if p.ndim == 0:
        raise ValueError(f"kronopt cannot step a 0-D {where}")
    start, stop = chunk_rows(p.shape[0], mesh.size(), mesh.get_local_rank())
    local = p.to_local()  # type: ignore[attr-defined]
    if local.shape[0] != stop - start or tuple(local.shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(
            f"the local shard of a {where} has shape {tuple(local.shape)}, not torch.chunk's rows {start}:{stop} "
            "of dim 0; kronopt maps shards to block rows by that split"
        )


@attrs.define(eq=False, slots=False)
class ShardPlan:
    r"""FSDP2: every block of a bucket, which rows of it each rank holds, and the block's owner.

    Parameter ``params[i]`` (a DTensor, ``Shard(0)``) is the block ``specs[i]``
    ``(m, n)``; rank ``r`` holds the block rows ``rows[i][r]`` (``torch.chunk``'s piece
    of dim 0 times ``m / d₀``). Two kinds of bucket:

    * **owned** (``elementwise = False``): block ``i`` is computed by ``owners[i]`` on the
      full matrix. :meth:`assemble` brings every owner the rows of its blocks (one
      ``all_to_all_single``, uneven splits, no padding), :meth:`scatter` hands every
      rank its rows of the directions back (one more). No rank ever holds a full
      block it does not own.
    * **elementwise**: every stage works entry by entry, so each rank steps its own rows
      (stacked ``(b, pad_rows, n)``, shorter shards zero-padded) and nothing is
      communicated.

    ``calls`` counts the bucket's ``step()`` calls on every rank (owner or not), so
    every rank agrees on whether a call writes.
    """

    params: list[Tensor]
    specs: list[BlockSpec]
    owners: list[int]
    sharding: Sharding
    elementwise: bool = False
    pad_rows: int = 0
    calls: int = 0
    rows: list[list[tuple[int, int]]] = attrs.field(init=False)
    local_rows: list[int] = attrs.field(init=False)
    _cache: dict[Any, Tensor] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        world, rank = self.sharding.world_size, self.sharding.rank
        self.rows = []
        for spec in self.specs:
            per_row = spec.m // spec.shape[0]  # block rows per row of dim 0
            self.rows.append([(a * per_row, b * per_row) for a, b in (chunk_rows(spec.shape[0], world, r) for r in range(world))])
        self.local_rows = [r[rank][1] - r[rank][0] for r in self.rows]
        if self.elementwise and not self.pad_rows:
            self.pad_rows = max([1, *self.local_rows])
        n = self.specs[0].n if self.specs else 0
        owned = self.owned()
        self._send_order = sorted(range(len(self.params)), key=lambda i: (self.owners[i], i))
        self._to_owner = [sum(self.local_rows[i] * n for i in self._send_order if self.owners[i] == o) for o in range(world)]
        self._from_rank = [sum((self.rows[k][s][1] - self.rows[k][s][0]) * n for k in owned) for s in range(world)]
        # received rows, in order (source rank, owned block, its rows): where each owned block row lands
        gather, position = [], 0
        where: dict[tuple[int, int], int] = {}
        for s in range(world):
            for j, k in enumerate(owned):
                a, b = self.rows[k][s]
                for g in range(a, b):
                    where[(j, g)] = position
                    position += 1
        m = self.specs[0].m if self.specs else 0
        self._assemble_index = [where[(j, g)] for j in range(len(owned)) for g in range(m)]
        self._scatter_index = [j * m + g for s in range(world) for j, k in enumerate(owned) for g in range(*self.rows[k][s])]
        # this rank's rows of every block in the scattered directions, grouped by their count
        offset, starts = 0, {}
        for i in self._send_order:
            starts[i] = offset
            offset += self.local_rows[i]
        groups: dict[int, list[int]] = {}
        for i, count in enumerate(self.local_rows):
            if count:
                groups.setdefault(count, []).append(i)
        self._groups = [(count, idx, [starts[i] + g for i in idx for g in range(count)]) for count, idx in sorted(groups.items())]
        self._stack_groups = [(count, idx) for count, idx in sorted(groups.items())]

    def owned(self) -> list[int]:
        """Positions of this rank's blocks (all of them in an elementwise bucket)."""
        if self.elementwise:
            return list(range(len(self.params)))
        return [i for i, r in enumerate(self.owners) if r == self.sharding.rank]

    def index(self, name: str, values: list[int], device: torch.device) -> Tensor:
        """``values`` as an index tensor on ``device``, made once per ``name`` and device (``values`` must not
        change for a name: the plan's row maps and block lists are fixed at construction)."""
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._cache[key]

    def local_block(self, t: Tensor, i: int) -> Tensor:
        """This rank's rows of block ``i`` of ``t`` (the parameter or its gradient, a DTensor), ``(rows n)``: a view."""
        return t.to_local().reshape(self.local_rows[i], self.specs[i].n)  # type: ignore[attr-defined]

    def assemble(self, grads: Sequence[Tensor]) -> Tensor | None:
        """The full gradients ``(k m n)`` of this rank's blocks (``None`` if it owns none), from every rank's rows.

        One ``all_to_all_single`` with uneven splits: each rank sends each owner its rows
        of the owner's blocks and receives only the rows of its own blocks; the owner
        reorders them (one ``index_select``). Every rank must call it, in the same
        bucket order.
        """
        n = self.specs[0].n
        ref = grads[0].to_local()  # type: ignore[attr-defined]
        parts = [self.local_block(grads[i], i).reshape(-1) for i in self._send_order]
        send = torch.cat(parts) if parts else ref.new_empty(0)
        out = ref.new_empty(sum(self._from_rank))
        dist.all_to_all_single(out, send, self._from_rank, self._to_owner, group=self.sharding.group)
        owned = self.owned()
        if not owned:
            return None
        m = self.specs[0].m
        return out.view(-1, n).index_select(0, self.index("assemble", self._assemble_index, out.device)).view(len(owned), m, n)

    def scatter(self, D: Tensor | None, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Every block's directions on this rank's rows ``(rows n)``, from the owners' ``D (k m n)``.

        The inverse of :meth:`assemble`: one ``all_to_all_single``; each owner sends each
        rank only that rank's rows. Rows are ordered by owner, then block position;
        :meth:`groups` says where each block's rows are.
        """
        n = self.specs[0].n
        if D is None or not D.shape[0]:
            send = torch.empty(0, dtype=dtype, device=device)
        else:
            send = D.reshape(-1, n).index_select(0, self.index("scatter", self._scatter_index, device)).reshape(-1)
        out = torch.empty(sum(self._to_owner), dtype=dtype, device=device)
        dist.all_to_all_single(out, send, self._to_owner, self._from_rank, group=self.sharding.group)
        return out.view(-1, n)

    def groups(self) -> list[tuple[int, list[int], list[int]]]:
        """``(rows, block positions, their rows in scatter()'s output)`` per local row count (blocks with no rows left out)."""
        return self._groups

    def row_index(self, count: int, rows: list[int], device: torch.device) -> Tensor:
        """The ``rows`` of the group of ``count`` (from :meth:`groups`) as a cached index tensor on ``device``."""
        return self.index(f"rows{count}", rows, device)

    def stack_groups(self) -> list[tuple[int, list[int]]]:
        """Elementwise bucket: ``(rows, block positions)`` per local row count (blocks with no rows left out)."""
        return self._stack_groups

    def local_stack(self, grads: Sequence[Tensor], *, dtype: torch.dtype) -> Tensor:
        """Elementwise bucket: this rank's rows of every block ``(b pad_rows n)`` in ``dtype``, zero-padded."""
        n = self.specs[0].n
        blocks = [self.local_block(g, i) for i, g in enumerate(grads)]
        if all(r == self.pad_rows for r in self.local_rows):
            return torch.stack(blocks).to(dtype)
        ref = grads[0].to_local()  # type: ignore[attr-defined]
        out = torch.zeros((len(blocks), self.pad_rows, n), dtype=dtype, device=ref.device)
        for i, block in enumerate(blocks):
            out[i, : self.local_rows[i]].copy_(block)
        return out

    def gather_bytes(self, m: int, n: int, dtype: torch.dtype) -> int:
        """Bytes this rank receives from the other ranks per writing step: its blocks' other rows (in the
        gradient dtype) and its rows of the blocks others own (in the state dtype, ``dtype``). 0 elementwise."""
        if self.elementwise or not self.params:
            return 0
        rank = self.sharding.rank
        grad_size = self.params[0].element_size()
        size = torch.empty((), dtype=dtype).element_size()
        incoming = sum((m - self.local_rows[k]) * n * grad_size for k in self.owned())
        return incoming + sum(self.local_rows[i] * n * size for i, r in enumerate(self.owners) if r != rank)

    def subset(self, keep: Sequence[int]) -> "ShardPlan":
        """The plan of the blocks at ``keep`` (a split bucket), ``calls`` and ``pad_rows`` carried over."""
        return ShardPlan(
            params=[self.params[i] for i in keep],
            specs=[self.specs[i] for i in keep],
            owners=[self.owners[i] for i in keep],
            sharding=self.sharding,
            elementwise=self.elementwise,
            pad_rows=self.pad_rows,
            calls=self.calls,
        )

    # -- per-parameter state of an elementwise bucket: DTensors sharded like the parameter --

    def to_dtensor(self, i: int, value: Tensor) -> Tensor:
        """A state tensor ``(pad_rows n)`` of block ``i`` as a DTensor shaped and sharded like the parameter (a view)."""
        DTensor, _ = _dtensor_types()
        p = self.params[i]
        local = value[: self.local_rows[i]].view(p.to_local().shape)  # type: ignore[attr-defined]
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())  # type: ignore[attr-defined]

    def is_rows(self, i: int, value: Any) -> bool:
        """Whether a saved state value of block ``i`` is a block-sized tensor (a DTensor like the
        parameter, or a whole tensor of a single-process save, shaped like the parameter or, as saved
        before, like its ``(m n)`` block) that :meth:`from_saved` cuts."""
        DTensor, _ = _dtensor_types()
        spec = self.specs[i]
        if isinstance(value, DTensor):
            return tuple(value.shape) == tuple(self.params[i].shape)
        return isinstance(value, Tensor) and tuple(value.shape) in ((spec.m, spec.n), tuple(spec.shape))

    def from_saved(self, i: int, value: Tensor) -> Tensor:
        """A saved state tensor of block ``i`` (a DTensor like the parameter, or the whole parameter-shaped
        tensor of a single-process save) as this rank's padded rows ``(pad_rows n)``."""
        DTensor, _ = _dtensor_types()
        spec = self.specs[i]
        if isinstance(value, DTensor):
            local = value.to_local().reshape(-1, spec.n)
        else:
            a, b = self.rows[i][self.sharding.rank]
            local = value.reshape(spec.m, spec.n)[a:b]
        out = local.new_zeros((self.pad_rows, spec.n))
        out[: local.shape[0]].copy_(local)
        return out


def is_elementwise(cfg: Any, layout: Layout) -> bool:
    """Whether a bucket of ``layout`` under the pipeline ``cfg`` (a bound ``KronConfig``) works entry by entry.

    Then a row shard of a block can be stepped alone, exactly (FSDP2 without
    communication). It holds when the inner rule declares the ``elementwise``
    capability and its options keep it so (``is_elementwise()``: Adam without
    ``normalize``, SGD); the basis keeps no rotation on this layout (its ``Q_L`` and
    ``Q_R`` are ``None``: the identity, as for an unrotated side or the ``identity``
    basis); the factor estimator, the basis and the split keep nothing larger than one
    number per block (nothing that could couple the entries); and ``post`` neither
    normalises nor grafts (both read the whole block).
    """
    from . import compose

    if not capabilities(cfg.inner).elementwise or not cfg.inner.is_elementwise():
        return False
    if cfg.post.normalize or cfg.post.grafting != "none":
        return False
    probe = attrs.evolve(layout, batch=1)
    state = compose.init_state(cfg, probe, dtype=torch.float32, device=torch.device("cpu"))
    if state.basis.Q_L is not None or state.basis.Q_R is not None:
        return False
    for record in (state.factors, state.basis, state.split):
        for value in compose.flatten(record).values() if attrs.has(type(record)) else ():
            if isinstance(value, Tensor) and value.ndim > 1:
                return False
    return True
